"""gs:// paths through etils.epath, against the local GCS emulator (tests/gcs_emulator.py, the `gcs` fixture):
parameter checkpoints and training work directories, metrics and plots, the writable-directory check, a TFDS
data_dir in a bucket, convert --out and predict --checkpoint, export."""
import json
import os
import subprocess
import sys
import uuid

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT
from etils import epath

from mma_dfer_jax import checkpoint
from mma_dfer_jax import cli
from mma_dfer_jax import metrics

FACE_CLIP = ROOT.parent / 'shared' / 'fixtures' / 'audio' / 'clip_face_speech.mp4'
SMALL_SIZES = ['--config.model.width=96', '--config.model.num_heads=3', '--config.model.mlp_dim=384']


@pytest.fixture
def bucket_dir(gcs, request) -> epath.Path:
  """A fresh folder in the emulator's bucket for one test."""
  return epath.Path(f'{gcs.root}/{request.node.name}-{uuid.uuid4().hex[:8]}')


def tiny_tree(seed):
  rng = np.random.default_rng(seed)
  return {'encoder': {'kernel': rng.normal(size=(3, 4)).astype(np.float32)}, 'head': np.arange(5, dtype=np.int32)}


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_as_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert str(checkpoint.as_path('gs://bucket/run')) == 'gs://bucket/run'
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint.as_path('run/ckpt')) == str(tmp_path / 'run' / 'ckpt')


def test_parameter_checkpoint_round_trip(bucket_dir):
  params = tiny_tree(0)
  config = ml_collections.ConfigDict({'model': {'width': 96}, 'dataset': 'dfew'})
  written = checkpoint.save_params(str(bucket_dir), params, config)
  assert str(written) == str(bucket_dir)
  assert (bucket_dir / checkpoint.PARAMS_DIR).is_dir() and (bucket_dir / checkpoint.CONFIG_FILE).is_file()
  assert_trees_equal(checkpoint.load_params(str(bucket_dir)), params)
  assert checkpoint.load_config(str(bucket_dir)).model.width == 96
  assert checkpoint.train_steps(str(bucket_dir)) == []
  with pytest.raises(FileExistsError, match='already exists'):
    checkpoint.save_params(str(bucket_dir), params, config)
  with pytest.raises(checkpoint.CheckpointNotFoundError, match='no checkpoint here'):
    checkpoint.load_params(str(bucket_dir / 'nothing'))
  assert checkpoint.load_config(str(bucket_dir / 'nothing')) is None


def test_work_directory_skips_and_moves_aside_a_damaged_step(bucket_dir):
  """A training work directory in a bucket: the newest step that restores is used; a damaged newer one is moved to
  checkpoints.damaged/ (a rename on the object store), never deleted."""
  trees = {2: tiny_tree(2), 4: tiny_tree(4)}
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(bucket_dir / checkpoint.TRAIN_CHECKPOINTS_DIR, item_names=('state',),
                             options=options) as manager:
    for step, tree in trees.items():
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': tree})))
  checkpoint.save_config(str(bucket_dir), ml_collections.ConfigDict({'seed': 1}))
  assert checkpoint.train_steps(str(bucket_dir)) == [2, 4]
  assert_trees_equal(checkpoint.load_params(str(bucket_dir)), trees[4])
  (bucket_dir / checkpoint.TRAIN_CHECKPOINTS_DIR / '4' / 'state' / '_METADATA').write_text('')
  assert_trees_equal(checkpoint.load_params(str(bucket_dir)), trees[2])
  assert checkpoint.train_steps(str(bucket_dir)) == [2]
  aside = bucket_dir / (checkpoint.TRAIN_CHECKPOINTS_DIR + checkpoint.DAMAGED_SUFFIX)
  moved = [p for p in aside.iterdir() if p.name.startswith('4-')]
  assert len(moved) == 1 and (moved[0] / 'state' / '_METADATA').read_text() == ''
  assert checkpoint.load_config(str(bucket_dir)).seed == 1


def test_metrics_log_and_plots(bucket_dir):
  log = bucket_dir / 'metrics.jsonl'
  assert metrics.read_jsonl(str(log)) == []
  records = [{'kind': 'epoch', 'epoch': e, 'train_loss': 1.0 / (e + 1), 'war': 50.0 + e, 'uar': 40.0 + e}
             for e in range(3)]
  for record in records:
    metrics.append_jsonl(str(log), record)
  assert metrics.read_jsonl(str(log)) == records
  metrics.plot_learning_curves(records, str(bucket_dir / 'curves.png'))
  metrics.plot_confusion_matrix([[3, 1], [0, 2]], ('happy', 'sad'), str(bucket_dir / 'cm.png'))
  for name in ('curves.png', 'cm.png'):
    data = (bucket_dir / name).read_bytes()
    assert data.startswith(b'\x89PNG') and len(data) > 1000


def test_check_writable_dir(gcs, bucket_dir):
  cli.check_writable_dir(str(bucket_dir / 'run'), '--workdir')  # a folder that does not exist yet is fine
  assert not bucket_dir.exists()  # the probe is gone
  with pytest.raises(cli.UserError) as error:
    cli.check_writable_dir('gs://no-such-bucket-here/run', '--workdir')
  text = str(error.value)
  assert '\n' not in text and text.startswith('--workdir gs://no-such-bucket-here/run: cannot write there')
  (bucket_dir / 'file').write_text('x')
  with pytest.raises(cli.UserError, match='is a file, not a directory'):
    cli.check_writable_dir(str(bucket_dir / 'file'), '--out')


def test_export_reads_and_writes_gcs(bucket_dir):
  from mma_dfer_jax import export  # pylint: disable=import-outside-toplevel
  params = tiny_tree(5)
  checkpoint.save_params(str(bucket_dir / 'ckpt'), params, ml_collections.ConfigDict({'seed': 3}))
  loaded, config = checkpoint.load_params(str(bucket_dir / 'ckpt')), checkpoint.load_config(str(bucket_dir / 'ckpt'))
  assert_trees_equal(loaded, params)
  assert config.seed == 3
  exported = jax.export.export(jax.jit(lambda x: x + 1))(jax.ShapeDtypeStruct((2,), np.float32))
  out = bucket_dir / 'model' / 'model.jax'
  written = export.write(exported, {'platforms': ['cpu']}, str(out))
  assert out.read_bytes() == bytes(exported.serialize()) and written['bytes'] == len(out.read_bytes())
  assert json.loads((bucket_dir / 'model' / ('model.jax' + export.SIDECAR_SUFFIX)).read_text()) == {
      'platforms': ['cpu']}
  restored = jax.export.deserialize(bytearray(out.read_bytes()))
  np.testing.assert_array_equal(restored.call(np.zeros(2, np.float32)), np.ones(2, np.float32))


# ---------------------------------------------------------------------------------------------------------------
# A TFDS data_dir in a bucket (ArrayRecord reads gs:// through its own GCS client, google-cloud-cpp).

@pytest.fixture(scope='module')
def local_mafw(tmp_path_factory):
  from data import common  # pylint: disable=import-outside-toplevel
  from data.mafw import mafw_dataset_builder as mafw  # pylint: disable=import-outside-toplevel
  from test_builders import make_mafw  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('mafw_gcs')
  common.build(mafw.Mafw, make_mafw(root / 'MAFW'), root / 'out', [1], workers=1)
  return root / 'out'


def copy_tree(local, remote: epath.Path):
  for path in local.rglob('*'):
    if path.is_file():
      (remote / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())


def test_input_pipeline_reads_a_data_dir_in_a_bucket(local_mafw, bucket_dir):
  from configs import mafw as mafw_config  # pylint: disable=import-outside-toplevel
  from test_builders import eval_ids_and_labels  # pylint: disable=import-outside-toplevel
  from test_builders import tiny_config  # pylint: disable=import-outside-toplevel

  from mma_dfer_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  copy_tree(local_mafw, bucket_dir / 'tfds')
  remote = tiny_config(mafw_config, str(bucket_dir / 'tfds'))
  local = tiny_config(mafw_config, local_mafw)
  assert len(input_pipeline.get_source(remote, 'train')) == 6
  seen, count = eval_ids_and_labels(remote)
  assert count == 3 and seen == eval_ids_and_labels(local)[0]
  first = input_pipeline.get_source(remote, 'test')[0]
  np.testing.assert_array_equal(first['fbank'], input_pipeline.get_source(local, 'test')[0]['fbank'])
  missing = tiny_config(mafw_config, str(bucket_dir / 'empty'))
  with pytest.raises(input_pipeline.DatasetError, match=r'data_dir=gs://.*: no built mafw dataset there'):
    input_pipeline.get_source(missing, 'test')


# ---------------------------------------------------------------------------------------------------------------
# The commands, as fresh processes given the emulator's environment.

def run_module(gcs, module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **gcs.env)
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.slow
def test_convert_out_then_predict_checkpoint_in_a_bucket(gcs, bucket_dir, reference_small):
  """convert --out gs://... and predict --checkpoint gs://... (the video stays local)."""
  from conftest import require_fixture  # pylint: disable=import-outside-toplevel
  from conftest import small_model_config  # pylint: disable=import-outside-toplevel

  from mma_dfer_jax import convert  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import labels  # pylint: disable=import-outside-toplevel
  out = bucket_dir / 'converted'
  done = run_module(gcs, 'mma_dfer_jax.convert', 'released', '--src', reference_small / 'model.pth', '--out', out,
                    '--config', 'configs/dfew.py', *SMALL_SIZES)
  assert done.returncode == 0, done.stderr[-2000:]
  expected = convert.load_released_checkpoint(reference_small / 'model.pth', small_model_config())
  assert_trees_equal(checkpoint.load_params(str(out)), expected)
  again = run_module(gcs, 'mma_dfer_jax.convert', 'released', '--src', reference_small / 'model.pth', '--out', out,
                     '--config', 'configs/dfew.py', *SMALL_SIZES)
  assert again.returncode == 2 and '--overwrite' in again.stderr  # the existence checks work on gs:// too
  replaced = run_module(gcs, 'mma_dfer_jax.convert', 'released', '--src', reference_small / 'model.pth', '--out',
                        out, '--config', 'configs/dfew.py', *SMALL_SIZES, '--overwrite')
  assert replaced.returncode == 0, replaced.stderr[-2000:]
  assert_trees_equal(checkpoint.load_params(str(out)), expected)

  run = run_module(gcs, 'mma_dfer_jax.predict', require_fixture(FACE_CLIP), '--checkpoint', out, '--json')
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(run.stdout)
  assert set(result['probabilities']) == set(labels.DFEW_CLASSES)
  assert sum(result['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)
  missing = run_module(gcs, 'mma_dfer_jax.predict', FACE_CLIP, '--checkpoint', bucket_dir / 'absent')
  lines = missing.stderr.strip().splitlines()
  assert missing.returncode == 2 and len(lines) == 1 and 'no such checkpoint directory' in lines[0], missing.stderr
