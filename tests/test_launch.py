"""launch.py end to end on the synthetic dataset: summary, resume after SIGKILL/SIGTERM, devices, errors (several
processes, gs:// and topology changes: tests/test_pod.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--config', 'configs/demo.py', '--config.input.synthetic_train_size=32', '--config.input.synthetic_test_size=12',
        '--config.batch_size=8', '--config.eval_batch_size=8', '--config.num_epochs=2',
        '--config.checkpoint_every_steps=2', '--config.model.depth=6']


def launch(workdir, *extra, devices=1, wait=True, env=None):
  environment = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                     **(env or {}))
  command = [sys.executable, 'launch.py', *TINY, '--workdir', str(workdir), *extra]
  process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  if not wait:
    return process
  out, err = process.communicate(timeout=600)
  return process.returncode, out, err


def summary(workdir):
  return json.loads((Path(workdir) / 'summary.json').read_text())


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('baseline')
  code, out, err = launch(workdir)
  assert code == 0, err[-3000:]
  return workdir, summary(workdir)


@pytest.mark.slow
def test_train_writes_summary_logs_and_plots(baseline):
  workdir, result = baseline
  for key in ('war', 'uar', 'epochs', 'steps', 'train_loss', 'trainable_l2'):
    assert key in result
  assert result['steps'] == 2 * (32 // 8) and result['epochs'] == 2
  assert 0 <= result['war'] <= 100 and result['trainable_l2'] > 0
  assert sum(map(sum, result['confusion_matrix'])) == 12  # every test clip exactly once
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in records] == [0, 1]
  for name in ('learning_curves.png', 'confusion_matrix.png', 'config.json'):
    assert (workdir / name).stat().st_size > 0
  assert list((workdir / 'tensorboard').iterdir())
  assert (workdir / 'checkpoints').is_dir()


@pytest.mark.slow
def test_rerun_of_a_finished_run_changes_nothing(baseline):
  workdir, result = baseline
  code, _, err = launch(workdir)
  assert code == 0, err[-2000:]
  assert summary(workdir)['trainable_l2'] == result['trainable_l2']


@pytest.mark.slow
def test_eval_mode_reproduces_the_final_figures(baseline):
  workdir, result = baseline
  code, out, err = launch(workdir, '--mode', 'eval')
  assert code == 0, err[-2000:]
  evaluation = json.loads((workdir / 'eval_fold1.json').read_text())
  assert evaluation['war'] == result['war'] and evaluation['uar'] == result['uar']


def _wait_for_checkpoint(workdir, step, process, timeout=300):
  target = Path(workdir) / 'checkpoints' / str(step)
  started = time.time()
  while time.time() - started < timeout:
    if (target / 'state').is_dir() and not list(target.parent.glob('*tmp*')):
      return
    if process.poll() is not None:
      raise AssertionError(f'run ended before checkpoint {step}: {process.stderr.read()[-2000:]}')
    time.sleep(0.2)
  raise AssertionError(f'no checkpoint {step} within {timeout} s')


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(baseline, tmp_path):
  _, expected = baseline
  process = launch(tmp_path, wait=False)
  _wait_for_checkpoint(tmp_path, 2, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (tmp_path / 'summary.json').exists()
  code, out, err = launch(tmp_path)
  assert code == 0, err[-2000:]
  assert 'Resumed' in out
  result = summary(tmp_path)
  assert result['steps'] == expected['steps']
  assert abs(result['trainable_l2'] - expected['trainable_l2']) <= 1e-6
  assert result['war'] == expected['war']


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(baseline, tmp_path):
  _, expected = baseline
  process = launch(tmp_path, wait=False)
  _wait_for_checkpoint(tmp_path, 2, process)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-2000:]
  # It saved: its message names a step past the checkpoint seen (or that one), the step is on disk, no summary yet.
  saved_at = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split(';')[0])
  assert saved_at >= 2 and (tmp_path / 'checkpoints' / str(saved_at) / 'state').is_dir()
  assert not (tmp_path / 'summary.json').exists()
  code, out, err = launch(tmp_path)
  assert code == 0, err[-2000:]
  assert f'Resumed from {tmp_path} at step {saved_at}' in out
  result = summary(tmp_path)
  assert abs(result['trainable_l2'] - expected['trainable_l2']) <= 1e-6
  assert (result['war'], result['uar'], result['confusion_matrix']) == (
      expected['war'], expected['uar'], expected['confusion_matrix'])


@pytest.mark.slow
def test_four_devices_equal_one(baseline, tmp_path):
  _, expected = baseline
  code, _, err = launch(tmp_path, devices=4)
  assert code == 0, err[-2000:]
  result = summary(tmp_path)
  assert abs(result['trainable_l2'] - expected['trainable_l2']) <= 1e-4
  assert (result['war'], result['uar'], result['confusion_matrix']) == (
      expected['war'], expected['uar'], expected['confusion_matrix'])


@pytest.mark.slow
def test_cross_validation_table_and_resume(tmp_path):
  code, out, err = launch(tmp_path, '--mode', 'cross_validate', '--folds', '1,2', '--config.num_epochs=1')
  assert code == 0, err[-2000:]
  table = json.loads((tmp_path / 'cross_validation.json').read_text())
  assert set(table['folds']) == {'1', '2'} and 'war_mean' in table
  assert 'mean +- std' in (tmp_path / 'cross_validation.md').read_text()
  code, out, err = launch(tmp_path, '--mode', 'cross_validate', '--folds', '1,2', '--config.num_epochs=1')
  assert code == 0 and out.count('already done') == 2


@pytest.mark.parametrize('args, message', [
    (['--config.dataset=affectnet'], 'unknown dataset'),
    (['--config.fold=6'], 'folds are numbered 1..5'),
    (['--config.model.widht=8'], "config key 'widht' does not exist"),
    (['--config.init.face_checkpoint=/nope/face.pth'], 'init.face_checkpoint'),
    (['--config.dataset=dfew', '--config.data_dir=/nope', '--config.model.num_classes=7'], 'python -m data.dfew.build'),
])
def test_user_errors_are_one_line(tmp_path, args, message):
  code, out, err = launch(tmp_path, *args)
  assert code == 2
  assert message in err and 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith('error: ')
