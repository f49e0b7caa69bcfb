"""A synthetic audio-visual expression dataset: deterministic from a seed, learnable, in the builders' record format.

Each class is a face-like drawing with its own colour and motion (the "expression") and its own tone (the "voice").
Nuisances (background, position, size, speed, clip length, noise, loudness, pitch) are drawn per clip, so a model
has to learn the class cues. Optional, for a harder set: `colour_jitter` (the face's hue drawn within a band of
that fraction of the distance to the next class's hue) and `silent_fraction` (clips without audio, stored with the
silent fbank and has_audio=False, like MAFW's clips without a wav); both 0 by default (the demo's setting). Records are what the TFDS builders store: `frames` (JPEG
bytes, one per frame), `fbank` (512 x 128 normalised), `label`, `id`, `has_audio`. Clips are generated on demand
(about 10 ms each, cached), so there is no build step.
"""
import functools
import math

import cv2
import numpy as np

from mma_dfer_jax import audio as audio_lib

FRAME_SIZE = 48
SAMPLE_RATE = 16000
SPLIT_OFFSETS = {'train': 0, 'test': 1_000_003}  # disjoint clip streams per split


def _face_colour(label, num_classes, jitter, rng):
  """RGB of a face of this class: the class's hue, moved up by up to `jitter` of the distance to the next class's
  hue (one-sided, so the bands stay apart below jitter 1)."""
  hue = 180 / max(1, num_classes) * (label + (rng.uniform(0, jitter) if jitter else 0.0))
  hsv = np.uint8([[[int(hue), 200, 230]]])
  return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _draw_frame(label, num_classes, t, rng_params, size):
  """One frame: a coloured face whose mouth and position move in a class-specific way."""
  background, colour, cx, cy, radius, speed, phase = rng_params
  frame = np.empty((size, size, 3), np.uint8)
  frame[:] = background
  angle = 2 * math.pi * label / num_classes
  x = int(cx + 0.18 * size * math.cos(angle) * math.sin(speed * t + phase))
  y = int(cy + 0.18 * size * math.sin(angle) * math.sin(speed * t + phase))
  cv2.circle(frame, (x, y), radius, colour, -1)
  eye = max(1, radius // 5)
  cv2.circle(frame, (x - radius // 3, y - radius // 4), eye, (20, 20, 20), -1)
  cv2.circle(frame, (x + radius // 3, y - radius // 4), eye, (20, 20, 20), -1)
  mouth_open = max(1, int(radius / 3 * (0.5 + 0.5 * math.sin(speed * t * (1 + label % 3)))))
  cv2.ellipse(frame, (x, y + radius // 3), (radius // 2, mouth_open), 0, 0, 360, (90, 20, 30), -1)
  return frame


def _voice(label, num_classes, rng, seconds):
  """A class-specific tone (pitch and vibrato) with noise."""
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  pitch = 200.0 * 2 ** (2.5 * label / max(1, num_classes)) * rng.uniform(0.97, 1.03)
  vibrato = 1 + 0.02 * np.sin(2 * np.pi * (2 + label % 4) * t)
  wave = np.sin(2 * np.pi * pitch * vibrato * t) + 0.4 * np.sin(4 * np.pi * pitch * t)
  wave = rng.uniform(0.1, 0.5) * wave / 1.4 + rng.normal(0, 0.02, t.shape)
  return wave.astype(np.float32)


@functools.lru_cache(maxsize=2048)
def make_clip(seed: int, split: str, index: int, num_classes: int, audio_frames: int = 512,
              frame_size: int = FRAME_SIZE, colour_jitter: float = 0.0, silent_fraction: float = 0.0) -> dict:
  """The record of clip `index` of `split`; the label cycles through the classes so splits are balanced."""
  rng = np.random.default_rng([seed, SPLIT_OFFSETS[split] + index])
  # The optional nuisances draw from their own stream, so that without them a clip is what it always was.
  extra_rng = np.random.default_rng([seed, SPLIT_OFFSETS[split] + index, 1])
  label = index % num_classes
  size = frame_size
  num_frames = int(rng.integers(12, 41))  # some clips shorter than 16 frames: edge padding
  shift = size / 12
  params = (rng.integers(0, 120, 3), _face_colour(label, num_classes, colour_jitter, extra_rng),
            size / 2 + rng.uniform(-shift, shift), size / 2 + rng.uniform(-shift, shift),
            int(rng.uniform(0.22, 0.3) * size), rng.uniform(0.3, 0.6), rng.uniform(0, 2 * math.pi))
  frames = []
  for t in range(num_frames):
    frame = _draw_frame(label, num_classes, t, params, size)
    frame = np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    frames.append(encoded.tobytes())
  has_audio = bool(extra_rng.random() >= silent_fraction)
  if has_audio:
    fbank = audio_lib.fbank_from_waveform(_voice(label, num_classes, rng, num_frames / 10), SAMPLE_RATE,
                                          num_frames=audio_frames)
  else:
    fbank = audio_lib.silent_fbank(audio_frames)
  return {'frames': frames, 'fbank': fbank, 'label': label, 'id': f'{split}_{index:05d}', 'has_audio': has_audio}


class SyntheticSource:
  """A random-access source (len / getitem), like the TFDS data sources of the real datasets."""

  def __init__(self, seed, split, size, num_classes, audio_frames=512, frame_size=FRAME_SIZE, colour_jitter=0.0,
               silent_fraction=0.0):
    if split not in SPLIT_OFFSETS:
      raise ValueError(f'split={split!r}: the synthetic dataset has the splits {", ".join(SPLIT_OFFSETS)}')
    self.seed, self.split, self.size, self.num_classes = seed, split, size, num_classes
    self.clip_options = (audio_frames, frame_size, float(colour_jitter), float(silent_fraction))

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    if not 0 <= index < self.size:
      raise IndexError(index)
    return make_clip(self.seed, self.split, int(index), self.num_classes, *self.clip_options)
