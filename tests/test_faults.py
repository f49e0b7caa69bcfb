"""Faults in a work directory: damaged checkpoints heal, a torn metrics line is dropped, a changed config is refused
before anything is written, a checkpoint write error stops the run at once, a non-finite step stops it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import demo
from mma_dfer_jax import checkpoint
from mma_dfer_jax import experiment
from mma_dfer_jax import input_pipeline

ROOT = Path(__file__).resolve().parents[1]
# tests/test_launch.py's TINY run: 4 steps an epoch, 2 epochs, a checkpoint every 2 steps (2 kept: steps 6 and 8).
TINY_FLAGS = ['--config', 'configs/demo.py', '--config.input.synthetic_train_size=32',
              '--config.input.synthetic_test_size=12', '--config.batch_size=8', '--config.eval_batch_size=8',
              '--config.num_epochs=2', '--config.checkpoint_every_steps=2']


def tiny_config(**model):
  c = demo.get_config()
  c.input.synthetic_train_size, c.input.synthetic_test_size = 32, 12
  c.batch_size, c.eval_batch_size, c.num_epochs, c.checkpoint_every_steps = 8, 8, 2, 2
  c.model.update(model)
  return c


def launch(workdir, *extra, max_file_kb=None, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  command = [sys.executable, 'launch.py', *TINY_FLAGS, '--workdir', str(workdir), *extra]
  if max_file_kb:  # files over this size cannot be written (EFBIG: Python ignores SIGXFSZ)
    command = ['bash', '-c', f'ulimit -f {max_file_kb} && exec "$@"', 'bash', *command]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished tiny run (in this process) and its summary."""
  workdir = tmp_path_factory.mktemp('finished')
  summary = experiment.train_and_evaluate(tiny_config(), workdir)
  assert checkpoint.train_steps(workdir) == [6, 8]
  return workdir, summary


def copy_run(finished, tmp_path) -> Path:
  workdir = tmp_path / 'run'
  shutil.copytree(finished[0], workdir)
  return workdir


# The three kinds of damage seen after a power loss or a full disk.
def truncate_largest_array_file(step_dir: Path):
  largest = max((p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'),
                key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as f:
    f.truncate(100)


def empty_metadata(step_dir: Path):
  (step_dir / 'state' / '_METADATA').write_text('')


def lost_array_files(step_dir: Path):
  for path in (step_dir / 'state').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.unlink()


DAMAGE = [truncate_largest_array_file, empty_metadata, lost_array_files]


def damaged_dirs(workdir: Path) -> list:
  aside = workdir / (checkpoint.TRAIN_CHECKPOINTS_DIR + checkpoint.DAMAGED_SUFFIX)
  return sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize('damage', DAMAGE, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(finished, tmp_path, damage, capsys, caplog):
  workdir = copy_run(finished, tmp_path)
  (workdir / 'summary.json').unlink()
  damage(workdir / 'checkpoints' / '8')
  damaged_bytes = sorted(p.stat().st_size for p in (workdir / 'checkpoints' / '8').rglob('*') if p.is_file())

  summary = experiment.train_and_evaluate(tiny_config(), workdir)

  assert f'Resumed from {workdir} at step 6' in capsys.readouterr().out
  aside = damaged_dirs(workdir)
  assert len(aside) == 1 and aside[0].startswith('8-')  # moved, not deleted: the same files are there
  moved = workdir / 'checkpoints.damaged' / aside[0]
  assert sorted(p.stat().st_size for p in moved.rglob('*') if p.is_file()) == damaged_bytes
  warnings = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  assert len(warnings) == 1 and 'checkpoints/8' in warnings[0] and str(moved) in warnings[0]
  # Steps 7 and 8 were trained again from the exact state of step 6: the same end as the uninterrupted run.
  expected = finished[1]
  assert summary['steps'] == expected['steps'] == 8
  assert abs(summary['trainable_l2'] - expected['trainable_l2']) <= 1e-6
  assert summary['war'] == expected['war'] and summary['uar'] == expected['uar']
  assert checkpoint.train_steps(workdir) == [6, 8]


@pytest.mark.slow
def test_load_params_skips_a_damaged_step(finished, tmp_path, caplog):
  """What predict, --mode eval and init.checkpoint read: the newest step that restores."""
  workdir = copy_run(finished, tmp_path)
  step6 = checkpoint.load_params(workdir)  # the newest (8) while intact
  truncate_largest_array_file(workdir / 'checkpoints' / '8')
  params = checkpoint.load_params(workdir)
  assert damaged_dirs(workdir)[0].startswith('8-') and checkpoint.train_steps(workdir) == [6]
  assert 'checkpoints/8 does not restore' in caplog.text
  reference = ocp.StandardCheckpointer().restore(finished[0] / 'checkpoints' / '6' / 'state')
  leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  assert all(np.array_equal(a, b) for a, b in zip(leaves(params), leaves(reference['params'])))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(params), leaves(step6)))


@pytest.mark.slow
def test_no_step_restores_raises_not_found(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  for step in ('6', '8'):
    empty_metadata(workdir / 'checkpoints' / step)
  with pytest.raises(checkpoint.NoIntactCheckpointError, match=r'none of the checkpoints \[6, 8\] restores'):
    checkpoint.load_params(workdir)
  assert not damaged_dirs(workdir) and checkpoint.train_steps(workdir) == [6, 8]  # a systematic cause: kept


@pytest.mark.slow
def test_no_step_restores_stops_training_and_moves_nothing(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  for step in ('6', '8'):  # every step damaged alike (a systematic cause is likelier than two power losses)
    empty_metadata(workdir / 'checkpoints' / step)
  with pytest.raises(experiment.UserError, match=r'none of the checkpoints \[6, 8\] restores .* nothing was moved'):
    experiment.train_and_evaluate(tiny_config(), workdir)
  assert not damaged_dirs(workdir) and checkpoint.train_steps(workdir) == [6, 8]


@pytest.mark.slow
def test_eval_mode_on_a_damaged_workdir(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  empty_metadata(workdir / 'checkpoints' / '8')
  result = experiment.evaluate_checkpoint(tiny_config(), workdir)
  assert result['num_clips'] == 12 and damaged_dirs(workdir)[0].startswith('8-')


@pytest.mark.slow
def test_torn_last_line_of_metrics_is_dropped(finished, tmp_path, caplog):
  workdir = copy_run(finished, tmp_path)
  (workdir / 'summary.json').unlink()
  metrics = workdir / 'metrics.jsonl'
  lines = metrics.read_text().splitlines()
  metrics.write_text('\n'.join(lines[:-1]) + '\n' + lines[-1][:len(lines[-1]) // 2])  # power loss mid-write

  summary = experiment.train_and_evaluate(tiny_config(), workdir)

  assert 'torn last line' in caplog.text
  records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses again
  assert [r['epoch'] for r in records] == [0, 1]  # the lost evaluation of epoch 2 was done again
  assert summary['war'] == finished[1]['war'] and summary['trainable_l2'] == finished[1]['trainable_l2']


def test_changed_settings_names_what_a_rerun_may_not_change():
  saved = json.loads(tiny_config().to_json_best_effort())
  assert experiment.changed_settings(saved, tiny_config()) == []
  rerun = tiny_config(width=24)
  rerun.batch_size, rerun.num_epochs, rerun.log_every_steps, rerun.mesh.data = 4, 5, 1, 2
  assert experiment.changed_settings(saved, rerun) == ['batch_size', 'model.width']
  del saved['input']['augment']  # a setting added since the run began keeps its old behaviour by default
  rerun.input.augment = False
  assert experiment.changed_settings(saved, rerun) == ['batch_size', 'model.width']


@pytest.mark.slow
def test_changed_model_width_is_refused_before_anything_is_written(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  before = (workdir / 'config.json').read_bytes()
  with pytest.raises(experiment.UserError, match=r'model\.width \(48 -> 24\)'):
    experiment.train_and_evaluate(tiny_config(width=24), workdir)
  assert (workdir / 'config.json').read_bytes() == before
  assert checkpoint.train_steps(workdir) == [6, 8] and not damaged_dirs(workdir)


@pytest.mark.slow
def test_changed_model_width_is_one_line_from_the_command_line(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  before = (workdir / 'config.json').read_bytes()
  result = launch(workdir, '--config.model.width=24')
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'model.width' in last
  assert (workdir / 'config.json').read_bytes() == before


def test_config_json_is_written_atomically(tmp_path):
  checkpoint.save_config(tmp_path, tiny_config())
  checkpoint.save_config(tmp_path, tiny_config(width=24))
  assert json.loads((tmp_path / 'config.json').read_text())['model']['width'] == 24
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']  # no temporary file left


def test_checkpoints_path_that_cannot_be_a_folder_fails_before_training(tmp_path):
  (tmp_path / 'checkpoints').write_text('not a folder')  # root ignores permissions; a file blocks any write
  with pytest.raises(experiment.UserError, match='checkpoints: cannot write there'):
    experiment.train_and_evaluate(tiny_config(), tmp_path)
  assert not (tmp_path / 'config.json').exists()


@pytest.mark.slow
def test_checkpoint_write_error_stops_at_once_with_one_line(tmp_path):
  # A full disk, as root can make one: files over 100 KB cannot be written. The checkpoint's array files are
  # larger, everything written before the first checkpoint is smaller. Before, the error was logged, then the run
  # waited out Orbax's 300 s signal timeout; 120 s is the guard.
  result = launch(tmp_path, max_file_kb=100, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.replace('\r', '\n').strip().splitlines()
  assert lines[-1].startswith('error: could not write the checkpoint of step 2 to ') and 'File too large' in lines[-1]
  assert '/checkpoints/2.orbax-checkpoint-tmp/' in lines[-1]
  assert sum('error:' in line for line in lines) == 1
  assert 'barrier' not in result.stderr.lower() and 'Timed out' not in result.stderr
  # Orbax's own logs of the failed write are filtered (TensorStore's 'Event loop is closed' echoes are not).
  assert 'ERROR:absl' not in result.stderr and 'future.py' not in result.stderr
  assert checkpoint.train_steps(tmp_path) == []


@pytest.mark.slow
def test_non_finite_batch_stops_with_the_step_and_clip_ids(tmp_path, monkeypatch):
  config = tiny_config()
  poisoned = experiment.batch_clip_ids(config, 2)[3]  # a clip of the third batch (step 3)
  original = input_pipeline.train_example

  def train_example(record, rng, config):
    example = original(record, rng, config)
    if record['id'] == poisoned:
      example['audio'] = np.full_like(example['audio'], np.nan)
    return example
  monkeypatch.setattr(input_pipeline, 'train_example', train_example)

  with pytest.raises(experiment.NonFiniteError, match=rf'step 3: non-finite loss .* {poisoned}'):
    experiment.train_and_evaluate(config, tmp_path)
  assert checkpoint.train_steps(tmp_path) == [2]  # the state after the NaN step was never saved
