"""Decoding raw videos (video.py), face crops (faces.py) and the data-preparation tools built on them.

Videos are made here with PyAV, except the real-face clip from ../shared/fixtures.
"""
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from mma_dfer_jax import faces
from mma_dfer_jax import video as video_lib

FIXTURES = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'
FACE_CLIP = FIXTURES / 'audio' / 'clip_face_speech.mp4'


def face_clip() -> Path:
  if not FACE_CLIP.is_file():
    pytest.skip(f'{FACE_CLIP} is absent: these tests need ../shared/fixtures beside the checkout')
  return FACE_CLIP


def write_video(path, frames, fps=25, codec='libx264', rotation=None, audio=None, sample_rate=None,
                audio_codec='aac'):
  """Encodes frames (T, H, W, 3) uint8 and optionally audio (channels, samples) float32."""
  container_format = {'.webm': 'webm', '.mkv': 'matroska', '.avi': 'avi'}.get(Path(path).suffix)
  with av.open(str(path), 'w', format=container_format) as out:
    stream = out.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    if rotation is not None:
      stream.set_display_rotation(rotation)
    audio_stream = None
    if audio is not None:
      layout = 'mono' if audio.shape[0] == 1 else 'stereo'
      audio_stream = out.add_stream(audio_codec, rate=sample_rate, layout=layout)
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)
    if audio_stream is not None:
      chunk = 1024
      for start in range(0, audio.shape[1], chunk):
        block = np.ascontiguousarray(audio[:, start:start + chunk].astype(np.float32))
        frame = av.AudioFrame.from_ndarray(block, format='fltp', layout=audio_stream.layout.name)
        frame.sample_rate = sample_rate
        frame.pts = start
        for packet in audio_stream.encode(frame):
          out.mux(packet)
      for packet in audio_stream.encode(None):
        out.mux(packet)
  return Path(path)


def numbered_frames(count, height, width):
  """Frames whose mean brightness encodes their index (robust to lossy coding)."""
  levels = np.linspace(20, 235, count).astype(np.uint8) if count > 1 else np.array([128], np.uint8)
  return np.stack([np.full((height, width, 3), level, np.uint8) for level in levels])


def tone(seconds, sample_rate, channels):
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  return np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)]).astype(np.float32)


def test_face_clip_frames_and_audio():
  clip = video_lib.read_video(face_clip(), pick=lambda n: np.linspace(0, n - 1, 16).astype(int))
  assert clip.num_frames == 100 and clip.fps == pytest.approx(25.0)
  assert clip.frames.shape == (16, 320, 320, 3) and clip.frames.dtype == np.uint8
  assert clip.indices[0] == 0 and clip.indices[-1] == 99
  assert clip.has_audio and clip.sample_rate == 48000
  assert clip.audio.dtype == np.float32 and clip.audio.shape[0] == 2
  assert clip.audio.shape[1] == pytest.approx(4 * 48000, rel=0.01)
  assert 0.05 < np.abs(clip.audio).max() <= 1.0


def test_picked_frames_are_the_right_ones(tmp_path):
  frames = numbered_frames(30, 48, 64)
  path = write_video(tmp_path / 'ramp.mp4', frames)
  clip = video_lib.read_video(path, pick=lambda n: [0, 29, 7, 7])
  assert clip.num_frames == 30 and not clip.has_audio and clip.audio is None and clip.sample_rate is None
  np.testing.assert_allclose(clip.frames.mean(axis=(1, 2, 3)), frames[[0, 29, 7, 7]].mean(axis=(1, 2, 3)), atol=3)
  every = video_lib.read_video(path)
  assert every.frames.shape == (30, 48, 64, 3)
  np.testing.assert_array_equal(every.indices, np.arange(30))


def test_short_clip_without_audio(tmp_path):
  path = write_video(tmp_path / 'five.mp4', numbered_frames(5, 32, 32))
  clip = video_lib.read_video(path, pick=lambda n: list(range(n)) + [n - 1] * (16 - n))
  assert clip.num_frames == 5 and clip.frames.shape == (16, 32, 32, 3) and clip.audio is None


def test_portrait_display_matrix_is_applied(tmp_path):
  # A phone stores portrait video as landscape frames plus a display rotation; ffmpeg shows it upright.
  frame = np.zeros((180, 320, 3), np.uint8)
  frame[:40, :60] = 255  # the top-left corner as stored
  path = write_video(tmp_path / 'phone.mp4', np.stack([frame] * 3), rotation=90)
  clip = video_lib.read_video(path)
  assert clip.frames.shape == (3, 320, 180, 3)
  # 90 degrees counter-clockwise moves the stored top-left corner to the bottom-left, as `ffmpeg -i` shows it.
  assert clip.frames[0, -30:, :30].mean() > 200 and clip.frames[0, :30, :30].mean() < 50


def test_portrait_frames_without_rotation(tmp_path):
  path = write_video(tmp_path / 'tall.mp4', numbered_frames(4, 320, 180))
  assert video_lib.read_video(path).frames.shape == (4, 320, 180, 3)


@pytest.mark.parametrize('suffix,codec,audio_codec', [('.mkv', 'libx264', 'aac'), ('.webm', 'libvpx', 'libopus'),
                                                     ('.avi', 'mpeg4', 'mp3')])
def test_other_containers(tmp_path, suffix, codec, audio_codec):
  if codec not in av.codecs_available or audio_codec not in av.codecs_available:
    pytest.skip(f'this PyAV build cannot encode {codec}/{audio_codec}')
  rate = 48000 if audio_codec == 'libopus' else 44100
  path = write_video(tmp_path / f'clip{suffix}', numbered_frames(12, 64, 96), codec=codec,
                     audio=tone(0.5, rate, 2), sample_rate=rate, audio_codec=audio_codec)
  clip = video_lib.read_video(path, pick=lambda n: [0, n - 1])
  assert clip.frames.shape == (2, 64, 96, 3)
  assert clip.num_frames == 12
  assert clip.sample_rate == rate and clip.audio.shape[0] == 2


def test_max_side_scales_down(tmp_path):
  path = write_video(tmp_path / 'wide.mp4', numbered_frames(3, 240, 320))
  assert video_lib.read_video(path, max_side=160).frames.shape == (3, 120, 160, 3)


def test_missing_and_corrupt_files_raise_video_error(tmp_path):
  with pytest.raises(video_lib.VideoError, match='nope.mp4'):
    video_lib.read_video(tmp_path / 'nope.mp4')
  garbage = tmp_path / 'garbage.mp4'
  garbage.write_bytes(b'\x00\x01not a video' * 100)
  with pytest.raises(video_lib.VideoError, match='garbage.mp4'):
    video_lib.read_video(garbage)
  good = write_video(tmp_path / 'good.mp4', numbered_frames(10, 64, 64))
  truncated = tmp_path / 'truncated.mp4'
  truncated.write_bytes(good.read_bytes()[:600])
  with pytest.raises(video_lib.VideoError, match='truncated.mp4'):
    video_lib.read_video(truncated)


def test_extract_wav_keeps_rate_and_channels(tmp_path):
  clip = video_lib.read_video(face_clip(), pick=lambda n: [0])
  wav = tmp_path / 'out.wav'
  assert video_lib.extract_wav(face_clip(), wav)
  info = soundfile.info(str(wav))
  assert (info.samplerate, info.channels, info.subtype) == (48000, 2, 'PCM_16')
  data, _ = soundfile.read(str(wav), dtype='float32', always_2d=True)
  assert data.shape[0] == clip.audio.shape[1]
  np.testing.assert_array_equal(data.T, clip.audio)  # read_video's audio is the wav's PCM16 samples
  assert not list(tmp_path.glob('.*tmp')), 'the temporary file was left behind'


def test_extract_wav_mono_44k_and_no_audio(tmp_path):
  path = write_video(tmp_path / 'mono.mp4', numbered_frames(5, 32, 32), audio=tone(0.6, 44100, 1),
                     sample_rate=44100)
  wav = tmp_path / 'mono.wav'
  assert video_lib.extract_wav(path, wav)
  info = soundfile.info(str(wav))
  assert (info.samplerate, info.channels) == (44100, 1)
  silent = write_video(tmp_path / 'silent.mp4', numbered_frames(5, 32, 32))
  assert not video_lib.extract_wav(silent, tmp_path / 'silent.wav')
  assert not (tmp_path / 'silent.wav').exists()


# faces.py


def test_detects_the_face_in_the_fixture():
  clip = video_lib.read_video(face_clip(), pick=lambda n: [0, n // 2])
  height, width = clip.frames.shape[1:3]
  for frame in clip.frames:
    boxes = faces.detect_faces(frame)
    assert len(boxes) == 1
    x1, y1, x2, y2 = boxes[0]
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert 30 < x2 - x1 < 200 and 30 < y2 - y1 < 200


def test_no_face_in_a_flat_frame():
  assert faces.detect_faces(np.full((120, 160, 3), 90, np.uint8)) == []


def test_square_box_follows_the_reference_rule():
  # Taller than wide by 11: widened by 11 // 2 = 5 on each side (one pixel short of square, as the reference).
  assert faces.square_box((10.2, 20.0, 30.0, 51.0)) == (5, 20, 35, 51)
  # Wider than tall: grown vertically; the near corner is clipped at 0 before squaring.
  assert faces.square_box((-4.0, 10.0, 36.0, 20.0)) == (0, -3, 36, 33)


def test_crop_box_clips_to_the_image_and_centre_crop():
  frame = np.arange(100 * 80 * 3, dtype=np.uint32).reshape(100, 80, 3).astype(np.uint8)
  crop = faces.crop_box(frame, (60.0, 10.0, 90.0, 50.0))  # runs off the right edge: cut there, not shifted
  assert crop.shape == (40, 80 - 55, 3)
  np.testing.assert_array_equal(crop, frame[10:50, 55:80])
  centre = faces.crop_box(frame, None)  # no face: a centre square of half the shorter side
  np.testing.assert_array_equal(centre, frame[30:70, 20:60])


def test_union_box():
  assert faces.union_box([(0, 5, 10, 20), (8, 2, 30, 12)]) == (0, 2, 30, 20)
  assert faces.union_box([]) is None


def test_smooth_boxes_fills_gaps_and_removes_a_jump():
  box = (10.0, 10.0, 50.0, 60.0)
  jumpy = (110.0, 10.0, 150.0, 60.0)
  smoothed = faces.smooth_boxes([box, None, box, jumpy, box, box, None])
  for b in smoothed:
    np.testing.assert_allclose(b, box)
  assert faces.smooth_boxes([None, None]) == [None, None]


def test_face_crops_on_fixture_and_on_faceless_frames():
  clip = video_lib.read_video(face_clip(), pick=lambda n: np.linspace(0, n - 1, 6).astype(int))
  crops, found = faces.face_crops(clip.frames, 64)
  assert found and crops.shape == (6, 64, 64, 3) and crops.dtype == np.uint8
  flat = np.full((3, 90, 120, 3), 77, np.uint8)
  crops, found = faces.face_crops(flat, 32)
  assert not found and crops.shape == (3, 32, 32, 3)


# data/ tools


def test_extract_audio_folder_is_resumable(tmp_path):
  from data import extract_audio  # pylint: disable=import-outside-toplevel
  src = tmp_path / 'src'
  src.mkdir()
  (src / '00001.mp4').write_bytes(face_clip().read_bytes())
  write_video(src / '00002.mp4', numbered_frames(5, 32, 32))
  (src / '00003.mp4').write_bytes(b'broken')
  dst = tmp_path / 'wav'
  summary = extract_audio.extract_folder(src, dst, workers=1, progress=False)
  assert summary['done'] == 1 and len(summary['no_audio']) == 1 and len(summary['failed']) == 1
  assert (dst / '00001.wav').is_file() and not (dst / '00002.wav').exists()
  assert '00002.mp4' in (dst / 'no_audio.txt').read_text()
  again = extract_audio.extract_folder(src, dst, workers=1, progress=False)
  assert again['done'] == 0 and again['skipped'] == 1


def test_mafw_crop_faces_writes_reference_named_frames(tmp_path):
  from data import mafw_crop_faces  # pylint: disable=import-outside-toplevel
  src = tmp_path / 'clips'
  src.mkdir()
  write_video(src / '00025.mp4', numbered_frames(4, 60, 80))
  summary = mafw_crop_faces.crop_folder(src, tmp_path / 'faces', workers=1, progress=False)
  assert summary == {'done': 1, 'skipped': 0, 'failed': []}
  out = tmp_path / 'faces' / '00025'
  assert sorted(p.name for p in out.iterdir()) == ['0.jpg', '1.jpg', '2.jpg', '3.jpg']
  from PIL import Image  # pylint: disable=import-outside-toplevel
  assert Image.open(out / '0.jpg').size == (30, 30)  # no face: the centre square of half the shorter side
  assert mafw_crop_faces.crop_folder(src, tmp_path / 'faces', workers=1, progress=False)['skipped'] == 1


def test_every_frame_matches_a_plain_decode():
  """Counting packets first and converting only picked frames gives the decoder's own frames, in order."""
  container = av.open(str(face_clip()))
  expected = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])
  container.close()
  clip = video_lib.read_video(face_clip(), pick=lambda n: list(range(n)), audio=False)
  assert clip.num_frames == len(expected)
  np.testing.assert_array_equal(clip.frames, expected)


def test_edit_list_frames_are_not_counted(tmp_path):
  """A stream copy cut mid-GOP keeps the GOP's head as packets the player discards: they are no frames."""
  ffmpeg = shutil.which('ffmpeg')
  if ffmpeg is None:
    pytest.skip('ffmpeg is not installed: it makes the edit-list clip (apt-get install ffmpeg)')
  source = write_video(tmp_path / 'gop.mp4', numbered_frames(60, 64, 64))
  cut = tmp_path / 'cut.mp4'
  subprocess.run([ffmpeg, '-v', 'error', '-y', '-ss', '0.9', '-i', str(source), '-c', 'copy', str(cut)], check=True)
  container = av.open(str(cut))
  shown = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  container.close()
  clip = video_lib.read_video(cut, pick=lambda n: list(range(n)))
  assert clip.num_frames == len(shown)
  np.testing.assert_array_equal(clip.frames, np.stack(shown))


def test_damaged_packets_are_skipped(tmp_path):
  data = bytearray(face_clip().read_bytes())
  rng = np.random.default_rng(0)
  for start in (60000, 120000, 180000):  # inside the media data, past the header
    data[start:start + 3000] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
  damaged = tmp_path / 'damaged.mp4'
  damaged.write_bytes(bytes(data))
  clip = video_lib.read_video(damaged, pick=lambda n: [0, n - 1])
  assert clip.num_frames == 100 and clip.frames.shape == (2, 320, 320, 3)
  assert clip.has_audio and clip.damaged_packets > 0
  assert video_lib.extract_wav(damaged, tmp_path / 'damaged.wav')
