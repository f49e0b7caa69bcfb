"""Feature extraction (mma_dfer_jax/extract.py): `launch.py --mode extract` on a split and `extract --videos` on a
folder, against evaluation's logits, predict's probabilities and the model's own classifier and temporal head."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from mma_dfer_jax import checkpoint
from mma_dfer_jax import cli
from mma_dfer_jax import convert
from mma_dfer_jax import extract
from mma_dfer_jax import input_pipeline
from mma_dfer_jax import predict
from mma_dfer_jax import train
from mma_dfer_jax.models import temporal

ROOT = Path(__file__).resolve().parents[1]
FACE_CLIP = ROOT.parent / 'shared' / 'fixtures' / 'audio' / 'clip_face_speech.mp4'
TEST_CLIPS, EVAL_BATCH, STEP = 10, 4, 7  # 3 eval batches, the last one half padding
OVERRIDES = [f'--config.input.synthetic_test_size={TEST_CLIPS}', f'--config.eval_batch_size={EVAL_BATCH}']


def demo_config(**model):
  config = demo.get_config()
  config.input.synthetic_test_size, config.eval_batch_size = TEST_CLIPS, EVAL_BATCH
  config.model.update(model)
  return config


def random_params(model_config, seed=0):
  """Random values at the model's shapes (no init compile): norms' scales near 1, the adapters' gates open."""
  rng = np.random.default_rng(seed)
  flat = {path: (float(path[-1] == 'scale') + 0.1 * rng.standard_normal(shape)).astype(np.float32)
          for path, shape in convert.param_shapes(model_config).items()}
  return flax.traverse_util.unflatten_dict(flat)


def write_workdir(workdir, config, params, step):
  """A launch.py work directory holding one training checkpoint at `step`, as the experiment loop writes it."""
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(checkpoint.as_path(workdir) / checkpoint.TRAIN_CHECKPOINTS_DIR, options=options,
                                  item_names=('state',))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params, 'step': np.int32(step)})))
  manager.wait_until_finished()
  manager.close()
  checkpoint.save_config(workdir, config)
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = demo_config()
  params = random_params(config.model)
  return write_workdir(tmp_path_factory.mktemp('extract') / 'run', config, params, STEP), config, params


@pytest.fixture(scope='module')
def launched(workdir):
  """`launch.py --mode extract` on the test split of the work directory: the npz it wrote."""
  directory, _, _ = workdir
  environment = dict(os.environ, JAX_PLATFORMS='cpu')
  command = [sys.executable, 'launch.py', '--config', 'configs/demo.py', *OVERRIDES, '--workdir', str(directory),
             '--mode', 'extract']
  done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = directory / 'features_fold1_test.npz'
  assert json.loads(done.stdout.strip().splitlines()[-1])['out'] == str(out)
  with np.load(out) as data:  # no pickle: every array is numeric or a fixed-width string
    return {key: data[key] for key in data.files}


def eval_logits(config, params):
  """Evaluation's logits of every real test clip, in the eval pipeline's order, and their positions."""
  state = train.create_train_state(config, params)
  logits, positions = [], []
  for batch in input_pipeline.create_eval_iterator(config):
    mask = np.asarray(batch['mask'], bool)
    logits.append(np.asarray(train.eval_step(state, {k: batch[k] for k in ('video', 'audio', 'label')}))[mask])
    positions.append(np.asarray(batch['index'])[mask])
  return np.concatenate(logits), np.concatenate(positions)


def head_from_frame_features(params, model_config, frame_features):
  """The temporal head run on extracted frame features: projection, temporal transformer -> the clip embedding."""
  c = model_config
  proj = params['vision_proj']
  h = frame_features @ np.asarray(proj['kernel']) + np.asarray(proj['bias'])
  head = temporal.TemporalTransformer(c.num_frames, c.temporal_layers, c.temporal_heads, c.temporal_head_dim,
                                      c.temporal_mlp_dim)
  return np.asarray(jax.jit(head.apply)({'params': params['temporal']}, h))


def classify(params, embeddings):
  return embeddings @ np.asarray(params['classifier']['kernel']) + np.asarray(params['classifier']['bias'])


@pytest.mark.slow  # launch.py in a subprocess: ~20 s here
def test_launch_extract_writes_every_test_clip_with_evals_logits(workdir, launched):
  directory, config, params = workdir
  c = config.model
  data = launched
  assert data['embeddings'].shape == (TEST_CLIPS, c.temporal_width)
  assert data['frame_features'].shape == (TEST_CLIPS, c.num_frames, c.width)
  assert data['logits'].shape == (TEST_CLIPS, c.num_classes)
  assert all(data[k].dtype == np.float32 for k in ('embeddings', 'frame_features', 'logits'))
  source = input_pipeline.get_source(config, 'test')
  ids = [source[i]['id'] for i in range(len(source))]
  assert list(data['ids']) == ids and len(set(data['ids'])) == TEST_CLIPS  # every clip once, padding dropped
  assert list(data['labels']) == [source[i]['label'] for i in range(len(source))]
  # Provenance: the config it ran with, the checkpoint and its training step.
  assert str(data['checkpoint']) == str(directory) and int(data['checkpoint_step']) == STEP
  stored = json.loads(str(data['config_json']))
  assert stored['eval_batch_size'] == EVAL_BATCH and stored['model']['width'] == c.width
  assert str(data['source']) == 'split:test' and len(data['class_names']) == c.num_classes

  expected, positions = eval_logits(config, params)
  assert [ids[i] for i in positions] == list(data['ids'])
  np.testing.assert_array_equal(data['logits'].argmax(-1), expected.argmax(-1))
  np.testing.assert_allclose(data['logits'], expected, atol=1e-5, rtol=0)
  assert np.ptp(expected, axis=0).max() > 1e-3  # the clips' logits differ: the comparison can fail
  # The embedding is what the classifier receives; the frame features are what the temporal head runs on.
  np.testing.assert_allclose(classify(params, data['embeddings']), data['logits'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(head_from_frame_features(params, c, data['frame_features']), data['embeddings'],
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('modalities,split', [('video', 'test'), ('audio', 'train')])
def test_unimodal_models_through_the_command_on_a_split(tmp_path, modalities, split):
  """`extract --split` on a converted checkpoint, with --config.key=value overrides onto its stored config."""
  config = demo_config(modalities=modalities)
  params = random_params(config.model, seed=1)
  directory = checkpoint.save_params(tmp_path / 'ckpt', params, config)
  out = tmp_path / 'features.npz'
  assert extract.main(['extract', '--checkpoint', str(directory), '--split', split, '--out', str(out),
                       f'--config.input.synthetic_{split}_size=3', '--config.eval_batch_size=2', '--noprogress']) == 0
  with np.load(out) as data:
    data = {key: data[key] for key in data.files}
  c = config.model
  assert data['frame_features'].shape == (3, c.num_frames, c.width) and data['embeddings'].shape == (3, 64)
  frame_spread = np.ptp(data['frame_features'], axis=1).max()
  if modalities == 'audio':  # the audio cls repeated over the temporal steps
    assert frame_spread == 0
  else:
    assert frame_spread > 1e-3
  np.testing.assert_allclose(classify(params, data['embeddings']), data['logits'], atol=1e-4, rtol=0)
  assert list(data['ids']) == [f'{split}_0000{i}' for i in range(3)] and list(data['labels']) == [0, 1, 2]
  assert str(data['source']) == f'split:{split}' and int(data['checkpoint_step']) == -1 and str(data['checkpoint']) == str(directory)
  stored = json.loads(str(data['config_json']))  # the config it ran with: the overrides applied
  assert stored['model']['modalities'] == modalities and stored['input'][f'synthetic_{split}_size'] == 3


@pytest.fixture
def video_folder(tmp_path):
  if not FACE_CLIP.is_file():
    pytest.skip(f'{FACE_CLIP} is absent: this test needs ../shared/fixtures beside the checkout')
  folder = tmp_path / 'videos'
  (folder / 'session1').mkdir(parents=True)
  shutil.copy(FACE_CLIP, folder / 'session1' / 'face.mp4')
  (folder / 'broken.mp4').write_bytes(b'\x00\x01not a video' * 50)
  (folder / 'notes.txt').write_text('not a video')
  return folder


def test_folder_of_videos_gives_predicts_logits(workdir, video_folder, tmp_path, capsys):
  directory, config, params = workdir
  out = tmp_path / 'features.npz'
  # batch 2: the one readable video is padded
  assert extract.main(['extract', '--checkpoint', str(directory), '--videos', str(video_folder), '--out', str(out),
                       '--batch_size', '2', '--noprogress']) == 0
  captured = capsys.readouterr()
  assert 'skipped: ' in captured.err and 'broken.mp4' in captured.err
  assert json.loads(captured.out.strip().splitlines()[-1])['failed'] == 1
  with np.load(out) as data:
    assert list(data['ids']) == ['session1/face.mp4'] and list(data['failed']) == ['broken.mp4']
    assert 'labels' not in data.files and int(data['checkpoint_step']) == STEP
    assert bool(data['has_audio'][0])
    c = config.model
    assert data['frame_features'].shape == (1, c.num_frames, c.width) and data['embeddings'].shape == (1, 64)
    logits, face_detected = data['logits'][0], bool(data['face_detected'][0])
  result = predict.predict_video(video_folder / 'session1' / 'face.mp4', params, config)
  assert face_detected == result['face_detected']
  expected = np.asarray(list(result['probabilities'].values()))
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), expected, atol=1e-5, rtol=0)
  assert np.argmax(logits) == np.argmax(expected)


def user_error(argv) -> str:
  """The one line the command prints for `argv` (a user error, never a traceback)."""
  with pytest.raises(Exception) as raised:
    extract.main(['extract', *argv])
  message = cli.user_error_message(raised.value)
  assert message is not None, raised.value
  return message


def test_user_errors(workdir, tmp_path):
  directory, _, _ = workdir
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.txt').write_text('no videos here')
  out = ['--out', str(tmp_path / 'f.npz')]
  assert 'no video files' in user_error(['--checkpoint', str(directory), '--videos', str(empty), *out])
  assert 'no such folder' in user_error(['--checkpoint', str(directory), '--videos', str(tmp_path / 'missing'), *out])
  assert 'give one of --videos' in user_error(['--checkpoint', str(directory), *out])
  assert '--split=valid: use one of test, train' in user_error(['--checkpoint', str(directory), '--split', 'valid',
                                                                 *out])
  assert 'name a .npz file' in user_error(['--checkpoint', str(directory), '--split', 'test', '--out', 'f.csv'])
  assert '--batch_size=0: must be at least 1' in user_error(['--checkpoint', str(directory), '--videos', str(empty),
                                                             *out, '--batch_size', '0'])
  (empty / 'a.mp4').write_bytes(b'not read before the checkpoint is')
  assert 'no such checkpoint directory' in user_error(['--checkpoint', str(tmp_path / 'nope'), '--videos', str(empty),
                                                       *out])
  assert 'model.width' in user_error(['--checkpoint', str(directory), '--videos', str(empty), *out,
                                      '--config.model.width=96'])


def test_folder_without_videos_is_one_line_and_exit_2(tmp_path):
  done = subprocess.run([sys.executable, '-m', 'mma_dfer_jax.extract', '--checkpoint', str(tmp_path), '--videos',
                         str(tmp_path), '--out', str(tmp_path / 'f.npz')], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert done.returncode == cli.EXIT_USER_ERROR
  assert done.stderr.strip().splitlines() == [f'error: --videos {tmp_path}: no video files '
                                              f'({", ".join(extract.VIDEO_EXTENSIONS)}) in it or below it']
