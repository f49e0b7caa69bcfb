"""`python -m mma_dfer_jax.predict` and `predict_video` end to end, with a tiny random model.

The real-face clip comes from ../shared/fixtures; the other videos (no audio, 5 frames, portrait, corrupt) are
made here with PyAV.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from mma_dfer_jax import predict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures'
FACE_CLIP = FIXTURES / 'audio' / 'clip_face_speech.mp4'
TIMING_KEYS = {'decode', 'faces', 'audio', 'model', 'model_compile', 'model_run', 'total'}


def face_clip() -> Path:
  if not FACE_CLIP.is_file():
    pytest.skip(f'{FACE_CLIP} is absent: these tests need ../shared/fixtures beside the checkout')
  return FACE_CLIP


TINY_CONFIG_FILE = '''
from configs import common


def get_config():
  c = common.base_config()
  c.dataset = {dataset!r}
  c.model = common.model_config(num_classes=11)
  m = c.model
  m.img_size, m.width, m.depth, m.num_heads, m.mlp_dim = 32, 32, 6, 2, 64
  m.fusion_width, m.prompts_per_stage = 8, 1
  m.temporal_width, m.temporal_heads, m.temporal_head_dim, m.temporal_mlp_dim = 32, 2, 16, 64
  return c
'''


def write_config(path, dataset):
  path.write_text(TINY_CONFIG_FILE.format(dataset=dataset))
  return path


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
  """A checkpoint of a tiny random MAFW-class model (11 classes), written as `convert` writes one."""
  import flax  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import convert  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('predict')
  config = predict.load_config_file(write_config(root / 'tiny_mafw.py', 'mafw'))
  # Random values at the model's shapes, drawn with numpy: running the model's init would compile it once more.
  rng = np.random.default_rng(0)
  flat = {path: rng.normal(0.0, 0.02, shape).astype(np.float32)
          for path, shape in convert.param_shapes(config.model).items()}
  return checkpoint.save_params(root / 'ckpt', flax.traverse_util.unflatten_dict(flat), config), root


@pytest.fixture(scope='session')
def tiny_model(tiny_checkpoint):
  return predict.load_model(tiny_checkpoint[0])


def write_video(path, frames, fps=25, audio=None, sample_rate=48000):
  with av.open(str(path), 'w') as out:
    stream = out.add_stream('libx264', rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    audio_stream = out.add_stream('aac', rate=sample_rate, layout='mono') if audio is not None else None
    for frame in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    out.mux(stream.encode(None))
    if audio_stream is not None:
      for start in range(0, audio.size, 1024):  # the AAC encoder takes 1024 samples a frame
        block = np.ascontiguousarray(audio[None, start:start + 1024], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(block, format='fltp', layout='mono')
        frame.sample_rate, frame.pts = sample_rate, start
        out.mux(audio_stream.encode(frame))
      out.mux(audio_stream.encode(None))
  return path


def gradient_frames(count, height, width):
  rng = np.random.default_rng(0)
  return rng.integers(0, 255, (count, height, width, 3), dtype=np.uint8)


def check_probabilities(result, names):
  assert set(result['probabilities']) == set(names)
  assert sum(result['probabilities'].values()) == pytest.approx(1.0, abs=1e-6)
  assert all(0 <= p <= 1 for p in result['probabilities'].values())
  assert result['label'] == max(result['probabilities'], key=result['probabilities'].get)


@pytest.mark.slow
def test_cli_json_on_the_face_clip(tiny_checkpoint, tmp_path):
  """The contract: exactly one JSON object on stdout, from a fresh process."""
  from mma_dfer_jax import labels  # pylint: disable=import-outside-toplevel
  checkpoint_dir, _ = tiny_checkpoint
  montage = tmp_path / 'montage.png'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-m', 'mma_dfer_jax.predict', str(face_clip()), '--checkpoint',
                        str(checkpoint_dir), '--json', '--save-frames', str(montage)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)  # fails unless stdout holds exactly one JSON document
  check_probabilities(result, labels.MAFW_CLASSES)
  assert result['face_detected'] is True and result['has_audio'] is True
  assert len(result['frames_used']) == 16 and result['num_frames'] == 100
  assert result['frames_used'] == sorted(result['frames_used']) and result['frames_used'][-1] < 100
  assert TIMING_KEYS | {'checkpoint'} <= set(result['timings'])
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(montage) as image:
    assert image.width == 4 * predict.MONTAGE_MIN_TILE and image.height > image.width


def test_no_audio_five_frames_portrait(tiny_model, tmp_path):
  from mma_dfer_jax import labels  # pylint: disable=import-outside-toplevel
  params, config = tiny_model
  path = write_video(tmp_path / 'five_portrait.mp4', gradient_frames(5, 320, 180))
  result = predict.predict_video(path, params, config)
  check_probabilities(result, labels.MAFW_CLASSES)
  assert result['has_audio'] is False and result['sample_rate'] is None
  assert result['num_frames'] == 5
  assert result['frames_used'] == [0, 1, 2, 3, 4] + [4] * 11  # edge padding to 16
  assert any('no audio' in note for note in result['notes'])
  assert result['face_detected'] is False  # noise has no face: centre crops


def test_mono_audio_and_table_output(tiny_checkpoint, tmp_path, capsys):
  checkpoint_dir, _ = tiny_checkpoint
  rate = 22050
  tone = 0.2 * np.sin(2 * np.pi * 330 * np.arange(rate) / rate)
  path = write_video(tmp_path / 'tone.mp4', gradient_frames(40, 96, 128), audio=tone, sample_rate=rate)
  assert predict.main([str(path), '--checkpoint', str(checkpoint_dir)]) == 0
  table = capsys.readouterr().out
  assert 'face detected: no' in table and 'audio: yes' in table and 'anger' in table


def test_config_override_names_the_classes(tiny_checkpoint, tmp_path, capsys):
  checkpoint_dir, root = tiny_checkpoint
  override = write_config(tmp_path / 'tiny_other.py', 'other')
  assert predict.main([str(face_clip()), '--checkpoint', str(checkpoint_dir), '--config', str(override),
                       '--json']) == 0
  result = json.loads(capsys.readouterr().out)
  assert set(result['probabilities']) == {f'class_{k}' for k in range(11)}


def test_user_errors_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys):
  checkpoint_dir, _ = tiny_checkpoint
  corrupt = tmp_path / 'corrupt.mp4'
  corrupt.write_bytes(b'\x00\x00\x00\x18ftypmp42' + os.urandom(2000))
  cases = [
      ([str(tmp_path / 'missing.mp4'), '--checkpoint', str(checkpoint_dir)], 'missing.mp4'),
      ([str(corrupt), '--checkpoint', str(checkpoint_dir)], 'corrupt.mp4'),
      ([str(face_clip()), '--checkpoint', str(tmp_path / 'no_ckpt')], 'no_ckpt'),
      ([str(face_clip()), '--checkpoint', str(tmp_path)], str(tmp_path)),  # a folder without a checkpoint
      ([str(face_clip()), '--checkpoint', str(checkpoint_dir), '--config', str(tmp_path / 'x.py')], 'x.py'),
  ]
  for argv, named in cases:
    assert predict.main(argv) == predict.EXIT_USER_ERROR, argv
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and named in lines[0], captured.err


def test_audio_features_match_the_extracted_wav(tmp_path):
  """predict's fbank of the decoded track equals the training pipeline's fbank of the wav extract_audio writes."""
  from mma_dfer_jax import audio  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import video  # pylint: disable=import-outside-toplevel
  clip = video.read_video(face_clip(), pick=lambda n: [0])
  wav = tmp_path / 'clip.wav'
  assert video.extract_wav(face_clip(), wav)
  np.testing.assert_allclose(audio.fbank_from_waveform(clip.audio, clip.sample_rate), audio.load_fbank(wav),
                             atol=1e-5)


def test_predict_feeds_the_model_what_the_eval_pipeline_feeds_for_the_same_frames(tmp_path):
  """The same 16 frames and the same recording, once through predict's front end (crop of the whole frame, PIL
  bilinear resize, fbank of the samples) and once as a dataset record through the eval pipeline: equal inputs."""
  import cv2  # pylint: disable=import-outside-toplevel
  import soundfile  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import audio as audio_lib  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  size = 48
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(16)]
  wav = tmp_path / 'clip.wav'
  seconds = np.arange(22050 * 2) / 22050
  soundfile.write(wav, 0.3 * np.sin(2 * np.pi * 220 * seconds) * (1 + seconds), 22050, subtype='PCM_16')
  samples, rate = audio_lib.read_audio(wav)
  crops, fbank, _, _ = predict.clip_inputs(frames, samples, rate, config.model,
                                           face_boxes=[(0, 0, size, size)] * 16)  # the whole frame is the face
  record = {'frames': [cv2.imencode('.png', f[..., ::-1])[1].tobytes() for f in frames],  # lossless, RGB kept
            'fbank': audio_lib.load_fbank(wav), 'label': 0, 'id': 'clip', 'num_frames': 16}
  example = input_pipeline.test_example(record, config)
  np.testing.assert_array_equal(example['video'], crops)
  np.testing.assert_array_equal(example['audio'], fbank)


# ---------------------------------------------------------------------------------------------------------------
# --config.key=value overrides onto the checkpoint's own config.

def test_overrides_apply_onto_the_checkpoints_config(tiny_checkpoint, tmp_path, capsys):
  checkpoint_dir, _ = tiny_checkpoint
  clip = write_video(tmp_path / 'clip.mp4', gradient_frames(4, 48, 48))
  argv = [str(clip), '--checkpoint', str(checkpoint_dir), '--config.model.attention_impl=einsum', '--json']
  args = predict.parse_args(argv)
  assert args.config_path is None and args.overrides == ['model.attention_impl']
  assert args.config.model.attention_impl == 'einsum'
  assert args.config.dataset == 'mafw' and args.config.model.width == 32  # the rest is the stored config
  _, config = predict.load_model(args.checkpoint, args.config_path, args.config, args.overrides)
  assert config.model.attention_impl == 'einsum'
  assert predict.main([*argv[:2], str(checkpoint_dir), '--config.seed=3', '--json']) == 0  # compiled already
  check_probabilities(json.loads(capsys.readouterr().out), config_classes(config))


@pytest.mark.slow
def test_a_model_override_runs_end_to_end(tiny_checkpoint, tmp_path, capsys):
  """Compiles the model once more (its config differs): slow on a loaded machine."""
  checkpoint_dir, _ = tiny_checkpoint
  clip = write_video(tmp_path / 'clip.mp4', gradient_frames(4, 48, 48))
  assert predict.main([str(clip), '--checkpoint', str(checkpoint_dir), '--config.model.attention_impl=einsum',
                       '--json']) == 0
  from mma_dfer_jax import labels  # pylint: disable=import-outside-toplevel
  check_probabilities(json.loads(capsys.readouterr().out), labels.MAFW_CLASSES)


def config_classes(config):
  from mma_dfer_jax import labels  # pylint: disable=import-outside-toplevel
  return labels.class_names(config.dataset, config.model.num_classes)


@pytest.mark.parametrize('override, named', [
    ('--config.model.width=64', 'model.width (32 in the checkpoint, 64 given)'),  # changes the parameters' shapes
    ('--config.model.num_classes=7', 'model.num_classes (11 in the checkpoint, 7 given)'),
    ('--config.model.widht=64', "config key 'widht' does not exist (did you mean --config.model.width?)"),
    ('--config.model.depth=abc', '--config.model.depth=abc'),
    ('--config.model.depth=4', 'config.model.depth=4'),
])
def test_bad_overrides_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, override, named):
  checkpoint_dir, _ = tiny_checkpoint
  clip = write_video(tmp_path / 'clip.mp4', gradient_frames(2, 48, 48))
  assert predict.main([str(clip), '--checkpoint', str(checkpoint_dir), override, '--json']) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert captured.out == '' and len(lines) == 1 and lines[0].startswith('error: ') and named in lines[0], captured.err


def test_an_older_checkpoints_config_is_upgraded(tiny_checkpoint, tmp_path):
  """A config.json written before model.modalities / attention_impl / matmul_impl existed loads with their
  defaults (settings.upgrade, applied by checkpoint.load_config)."""
  import shutil  # pylint: disable=import-outside-toplevel
  checkpoint_dir, _ = tiny_checkpoint
  old = Path(shutil.copytree(checkpoint_dir, tmp_path / 'old'))
  saved = json.loads((old / 'config.json').read_text())
  for key in ('modalities', 'attention_impl', 'matmul_impl'):
    del saved['model'][key]
  (old / 'config.json').write_text(json.dumps(saved))
  _, config = predict.load_model(old)
  assert (config.model.modalities, config.model.attention_impl, config.model.matmul_impl) == ('audio_video', '', '')
  assert config.model.width == 32


def test_an_override_without_a_checkpoint_names_the_checkpoint(tmp_path, capsys):
  clip = write_video(tmp_path / 'clip.mp4', gradient_frames(2, 48, 48))
  assert predict.main([str(clip), '--checkpoint', str(tmp_path / 'none'), '--config.seed=2']) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and 'none: no such checkpoint directory' in lines[0], lines
