"""Run an MMA-DFER model exported by `python -m mma_dfer_jax.export` with only jax and numpy installed.

This file imports nothing of mma_dfer_jax (nor Flax): copy it next to the artifact and run

  python portable_loader.py MODEL.jax VIDEO.npy AUDIO.npy [--silent-audio]

VIDEO.npy: uint8 face crops (N, T, H, W, 3) or one clip (T, H, W, 3), RGB 0..255; AUDIO.npy: the normalised fbank
float32 (N, 512, 128) or (512, 128); --silent-audio instead feeds the fbank of a clip without audio. It prints one
JSON line per clip: `label` and `probabilities` (class name -> probability). Shapes and class names come from
MODEL.jax.json when it is there. Bad input: one line on stderr and exit code 2.

From Python: `model = load('MODEL.jax')`; `model(video, audio)` returns the probabilities (N, C) as numpy.
"""
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

EXIT_USER_ERROR = 2
SIDECAR_SUFFIX = '.json'


class LoaderError(Exception):
  """A user error: the message is the one line printed."""


class ExportedModel:
  """A deserialized artifact: call it with (video uint8, fbank float32); `class_names`, `info` (the sidecar)."""

  def __init__(self, exported, info: dict, path: str):
    self.exported = exported
    self.info = info
    self.path = path
    video, audio = exported.in_avals
    self.video_shape, self.audio_shape = tuple(video.shape[1:]), tuple(audio.shape[1:])
    num_classes = exported.out_avals[0].shape[-1]
    self.class_names = tuple(info.get('class_names') or (f'class_{k}' for k in range(num_classes)))

  def __call__(self, video, audio) -> np.ndarray:
    video = self._batched(video, self.video_shape, np.uint8, 'video')
    audio = self._batched(audio, self.audio_shape, np.float32, 'audio')
    if video.shape[0] != audio.shape[0]:
      raise LoaderError(f'video has {video.shape[0]} clips and audio {audio.shape[0]}: give one fbank per clip')
    return np.asarray(self.exported.call(video, audio))

  def silent_audio(self, num_clips: int) -> np.ndarray:
    """The fbank of clips without audio, as the model was trained to see them."""
    value = self.info.get('inputs', {}).get('audio', {}).get('silent_value')
    if value is None:
      raise LoaderError(f'{self.path}{SIDECAR_SUFFIX} is missing or has no silent-audio value: give AUDIO.npy')
    return np.full((num_clips, *self.audio_shape), value, np.float32)

  def _batched(self, array, shape, dtype, name) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == len(shape):
      array = array[None]
    if tuple(array.shape[1:]) != shape:
      raise LoaderError(f'{name} of shape {array.shape}: the model takes (N, {", ".join(map(str, shape))})')
    if name == 'video' and array.dtype != np.uint8:
      raise LoaderError(f'video of dtype {array.dtype}: the model takes uint8 frames (0..255)')
    return array.astype(dtype, copy=False)


def load(path) -> ExportedModel:
  """Deserializes the artifact at `path` (and reads `path`.json beside it, if any)."""
  path = Path(path)
  if not path.is_file():
    raise LoaderError(f'{path}: no such file (write one with python -m mma_dfer_jax.export)')
  try:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
  except Exception as e:  # a damaged or foreign file fails inside the flatbuffer reader with many types
    raise LoaderError(f'{path}: not a serialized jax.export module ({type(e).__name__}: {e})') from e
  sidecar = Path(str(path) + SIDECAR_SUFFIX)
  info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
  backend = jax.default_backend()
  runs_here = {'gpu': ('cuda', 'rocm')}.get(backend, (backend,))
  if not set(runs_here) & set(exported.platforms):
    raise LoaderError(f'{path}: exported for {", ".join(exported.platforms)}, and JAX runs on {backend}; '
                      'export again with --platforms including it')
  return ExportedModel(exported, info, str(path))


def _read_npy(path, what) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise LoaderError(f'{path}: cannot read the {what} as a .npy file ({e})') from e


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('artifact', help='the file `python -m mma_dfer_jax.export --out` wrote')
  parser.add_argument('video', help='.npy of uint8 face crops (N, T, H, W, 3) or (T, H, W, 3)')
  parser.add_argument('audio', nargs='?', help='.npy of the normalised fbank (N, 512, 128) or (512, 128)')
  parser.add_argument('--silent-audio', action='store_true', help='the clips have no audio (no AUDIO.npy)')
  args = parser.parse_args(argv)
  try:
    start = time.perf_counter()
    model = load(args.artifact)
    load_seconds = time.perf_counter() - start
    video = _read_npy(args.video, 'video')
    if args.silent_audio == bool(args.audio):
      raise LoaderError('give AUDIO.npy or --silent-audio (exactly one)')
    audio = model.silent_audio(1 if video.ndim == 4 else video.shape[0]) if args.silent_audio else \
        _read_npy(args.audio, 'audio')
    start = time.perf_counter()
    probabilities = model(video, audio)
    run_seconds = time.perf_counter() - start  # the first call compiles the module for these shapes
  except LoaderError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USER_ERROR
  for row in probabilities:
    print(json.dumps({'label': model.class_names[int(np.argmax(row))],
                      'probabilities': {name: float(p) for name, p in zip(model.class_names, row)}}))
  print(json.dumps({'load_s': round(load_seconds, 3), 'first_call_s': round(run_seconds, 3)}), file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
