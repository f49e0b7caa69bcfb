"""The error contract of every command: a user error is one `error: ...` line on stderr and exit code 2.

The command lines run as subprocesses on the demo config and fail before anything is compiled; the predict cases
that need a forward pass run in-process on a tiny model (compiled once for all of them).
"""
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import ROOT
from mma_dfer_jax import cli
from mma_dfer_jax import predict

DEMO = str(ROOT / 'configs' / 'demo.py')


def run(*command, devices=1, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  started = time.perf_counter()
  done = subprocess.run([sys.executable, *map(str, command)], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  done.seconds = time.perf_counter() - started
  return done


def assert_one_line_error(done, *named):
  assert done.returncode == cli.EXIT_USER_ERROR, (done.returncode, done.stderr[-3000:])
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), done.stderr[-3000:]
  for text in named:
    assert text in lines[0], lines[0]
  return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The rule itself.

def test_user_errors_are_told_from_bugs():
  assert cli.user_error_message(ValueError('config.batch_size=0: must be positive')) == \
      'config.batch_size=0: must be positive'
  assert cli.user_error_message(ValueError('operands could not be broadcast')) is None  # a bug
  assert cli.user_error_message(KeyError('params')) is None
  denied = PermissionError(13, 'Permission denied', '/data/out')
  assert cli.user_error_message(denied) == '/data/out: Permission denied; check its permissions or choose another path'
  assert cli.user_error_message(cli.UserError('two\nlines')) == 'two lines'
  from mma_dfer_jax import video  # pylint: disable=import-outside-toplevel
  assert cli.user_error_message(video.VideoError('clip.mp4: no video stream')) == 'clip.mp4: no video stream'


def test_guard_exits_2_for_user_errors_and_lets_bugs_through(capsys):
  def user_mistake():
    raise cli.UserError('--out x: is a file')

  def bug():
    raise RuntimeError('a bug')

  with pytest.raises(SystemExit) as exit_info:
    cli.guard(user_mistake)()
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == 'error: --out x: is a file\n'
  with pytest.raises(RuntimeError):
    cli.guard(bug)()


def test_every_registered_error_type_exists():
  """The table in cli.py names real classes (a renamed class would silently stop being a user error)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  for module_name, class_name in cli.USER_ERROR_TYPES:
    if module_name == 'mma_dfer_jax.distributed' and importlib.util.find_spec(module_name) is None:
      continue  # being written in parallel; absent modules cost nothing at run time
    assert issubclass(getattr(importlib.import_module(module_name), class_name), Exception), class_name


def test_console_scripts_point_at_callables():
  import importlib  # pylint: disable=import-outside-toplevel
  scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
  assert {'mma-dfer-train', 'mma-dfer-convert', 'mma-dfer-predict', 'mma-dfer-bench'} <= set(scripts)
  for target in scripts.values():
    module_name, function = target.split(':')
    assert callable(getattr(importlib.import_module(module_name), function)), target


# ---------------------------------------------------------------------------------------------------------------
# launch.py (mma-dfer-train): config and work-directory errors, before anything is written.

@pytest.mark.parametrize('override, named', [
    ('--config.batch_size=0', 'config.batch_size=0'),
    ('--config.batch_size=-4', 'config.batch_size=-4'),
    ('--config.eval_batch_size=0', 'config.eval_batch_size=0'),
    ('--config.model.depth=4', 'config.model.depth=4'),
])
def test_launch_refuses_config_values(tmp_path, override, named):
  workdir = tmp_path / 'run'
  assert_one_line_error(run('launch.py', '--config', DEMO, '--workdir', workdir, override), named)
  assert not workdir.exists()


def test_launch_refuses_a_batch_the_devices_do_not_divide(tmp_path):
  workdir = tmp_path / 'run'
  done = run('launch.py', '--config', DEMO, '--workdir', workdir, '--config.batch_size=4', devices=3)
  assert_one_line_error(done, 'config.batch_size=4', '3 devices')
  assert not workdir.exists()


@pytest.mark.parametrize('where', ['file', 'under_file'])
def test_launch_refuses_a_workdir_it_cannot_write(tmp_path, where):
  blocker = tmp_path / 'not_a_dir'
  blocker.write_text('x')
  workdir = blocker if where == 'file' else blocker / 'run'
  assert_one_line_error(run('launch.py', '--config', DEMO, '--workdir', workdir), '--workdir', str(blocker))


def test_launch_usage_errors(tmp_path):
  assert_one_line_error(run('launch.py', '--config', DEMO), '--workdir is required')
  assert_one_line_error(run('launch.py', '--config', DEMO, '--workdir', tmp_path, '--config.batch_size=abc'),
                        'config.batch_size')
  assert_one_line_error(run('launch.py', '--config', DEMO, '--workdir', tmp_path, '--mode=cross_validate',
                            '--folds=1,9'), '--folds')


# ---------------------------------------------------------------------------------------------------------------
# convert and bench.

def test_convert_out_an_existing_file_fails_at_once(tmp_path):
  out = tmp_path / 'out'
  out.write_text('not a directory')
  done = run('-m', 'mma_dfer_jax.convert', 'released', '--src', tmp_path / 'model.pth', '--out', out,
             '--config', DEMO)
  assert_one_line_error(done, f'--out {out}', 'is a file')
  assert done.seconds < 60  # no wait on a barrier
  assert out.read_text() == 'not a directory'


def test_convert_out_a_work_directory_needs_overwrite(tmp_path):
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"dataset": "synthetic"}')
  args = ['-m', 'mma_dfer_jax.convert', 'released', '--src', tmp_path / 'missing.pth', '--out', workdir,
          '--config', DEMO]
  assert_one_line_error(run(*args), 'config.json', '--overwrite')
  assert (workdir / 'config.json').read_text() == '{"dataset": "synthetic"}'
  # With --overwrite the out directory is accepted: the next problem in line (the missing source) is reported.
  assert_one_line_error(run(*args, '--overwrite'), 'missing.pth')


def test_convert_exit_code_is_2_for_usage_errors(tmp_path):
  assert_one_line_error(run('-m', 'mma_dfer_jax.convert', 'released', '--out', tmp_path / 'o', '--config', DEMO),
                        '--src')
  assert_one_line_error(run('-m', 'mma_dfer_jax.convert', 'bogus', '--out', tmp_path / 'o', '--config', DEMO),
                        'usage')


def test_bench_refuses_config_values():
  assert_one_line_error(run('-m', 'mma_dfer_jax.bench', '--config', DEMO, '--config.batch_size=0'),
                        'config.batch_size=0')
  assert_one_line_error(run('-m', 'mma_dfer_jax.bench', '--config', DEMO, '--config.batch_size=4', devices=3),
                        'config.batch_size=4', '3 devices')


# ---------------------------------------------------------------------------------------------------------------
# predict.

def write_clip(path, count=24, size=48, fast_start=False):
  rng = np.random.default_rng(0)
  options = {'movflags': 'faststart'} if fast_start else {}
  with av.open(str(path), 'w', options=options) as out:
    stream = out.add_stream('libx264', rate=25)
    stream.width = stream.height = size
    stream.pix_fmt = 'yuv420p'
    for _ in range(count):
      frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), format='rgb24')
      out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
  return path


def demo_checkpoint(directory, nan=False):
  """The demo model with random parameters (one of them NaN when asked), saved as `convert` saves one.

  The values are drawn with numpy at the shapes `convert.param_shapes` gives: nothing is compiled.
  """
  import flax  # pylint: disable=import-outside-toplevel

  from configs import demo  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import convert  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  rng = np.random.default_rng(0)
  flat = {path: rng.normal(0.0, 0.02, shape).astype(np.float32)
          for path, shape in convert.param_shapes(config.model).items()}
  if nan:
    flat[('classifier', 'bias')][0] = np.nan  # as a damaged file would hold it
  return checkpoint.save_params(directory, flax.traverse_util.unflatten_dict(flat), config)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli_predict')
  return demo_checkpoint(root / 'good'), demo_checkpoint(root / 'nan', nan=True), root


def test_predict_config_that_does_not_fit_the_checkpoint(checkpoints, tmp_path):
  good, _, _ = checkpoints
  clip = write_clip(tmp_path / 'clip.mp4')
  wider = tmp_path / 'wider.py'
  wider.write_text('from configs import demo\n\n\ndef get_config():\n  c = demo.get_config()\n'
                   '  c.model.width = 96\n  return c\n')
  done = run('-m', 'mma_dfer_jax.predict', clip, '--checkpoint', good, '--config', wider, '--json')
  assert_one_line_error(done, 'model.width (48 in the checkpoint, 96 in --config)', str(good))
  assert done.stdout == ''


def test_predict_usage_error_is_one_line(checkpoints, tmp_path):
  assert_one_line_error(run('-m', 'mma_dfer_jax.predict', tmp_path / 'clip.mp4'), '--checkpoint')


def test_predict_refuses_a_non_finite_output(checkpoints, tmp_path, capsys):
  _, nan, _ = checkpoints
  clip = write_clip(tmp_path / 'clip.mp4')
  assert predict.main([str(clip), '--checkpoint', str(nan), '--json']) == cli.EXIT_USER_ERROR
  captured = capsys.readouterr()
  assert captured.out == ''  # never a JSON NaN
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and 'not finite' in lines[0] and 'NaN' in lines[0], captured.err


def test_failed_save_frames_keeps_the_prediction(checkpoints, tmp_path, capsys):
  good, _, _ = checkpoints
  clip = write_clip(tmp_path / 'clip.mp4')
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  code = predict.main([str(clip), '--checkpoint', str(good), '--json', '--save-frames', str(blocker / 'm.png')])
  captured = capsys.readouterr()
  result = json.loads(captured.out)  # the prediction is printed in full
  assert result['label'] in result['probabilities']
  assert code == cli.EXIT_USER_ERROR
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: --save-frames') and 'prediction is complete' in lines[0]


def test_truncated_video_gets_a_note(checkpoints, tmp_path, capsys):
  good, _, _ = checkpoints
  full = write_clip(tmp_path / 'full.mp4', count=100, fast_start=True)
  half = tmp_path / 'half.mp4'
  half.write_bytes(full.read_bytes()[:full.stat().st_size // 2])  # `head -c`: the header still says 100 frames
  assert predict.main([str(half), '--checkpoint', str(good), '--json']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['num_frames'] < 100
  assert any('ends early' in note and 'declares 100 frames' in note for note in result['notes']), result['notes']
  assert predict.main([str(half), '--checkpoint', str(good)]) == 0
  assert 'note: the video stream ends early' in capsys.readouterr().out
  assert predict.main([str(full), '--checkpoint', str(good), '--json']) == 0
  assert not any('ends early' in note for note in json.loads(capsys.readouterr().out)['notes'])


def test_configs_load_from_another_working_directory(tmp_path):
  """A config file given by path imports `configs.common` wherever the command runs (installed or in a checkout
  with the package on the path)."""
  env_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
  done = subprocess.run([sys.executable, '-m', 'mma_dfer_jax.bench', '--config', DEMO, '--config.batch_size=0'],
                        cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=env_path),
                        capture_output=True, text=True, timeout=300, check=False)
  assert_one_line_error(done, 'config.batch_size=0')  # the config file loaded; its value was checked


# ---------------------------------------------------------------------------------------------------------------
# One convention: --config FILE plus --config.key=value; export and --mode eval start from the checkpoint's config.

def test_export_starts_from_the_checkpoints_config(checkpoints, tmp_path):
  from mma_dfer_jax import export  # pylint: disable=import-outside-toplevel
  good, _, _ = checkpoints
  argv = ['export', '--checkpoint', str(good), '--out', str(tmp_path / 'm.jax'), '--config.model.attention_impl=einsum']
  flag_values = export._flag_values(argv)  # pylint: disable=protected-access
  cli.parse_flags(flag_values, argv)
  config = flag_values.config
  assert (config.dataset, config.model.width, config.model.attention_impl) == ('synthetic', 48, 'einsum')
  argv = ['export', '--checkpoint', str(good), '--config', DEMO, '--config.model.width=96']  # the file replaces it
  flag_values = export._flag_values(argv)  # pylint: disable=protected-access
  cli.parse_flags(flag_values, argv)
  assert flag_values.config.model.width == 96
  with pytest.raises(cli.UserError, match=r"'widht' does not exist \(did you mean --config.model.width\?\)"):
    export._flag_values(['export', '--checkpoint', str(good), '--config.model.widht=1'])  # pylint: disable=protected-access
  with pytest.raises(cli.UserError, match='no config to apply it to; the checkpoint holds no config.json: give --config FILE'):
    export._flag_values(['export', '--checkpoint', str(tmp_path), '--config.seed=2'])  # pylint: disable=protected-access


def test_eval_starts_from_the_checkpoints_config(checkpoints, tmp_path):
  from mma_dfer_jax import launch  # pylint: disable=import-outside-toplevel
  good, _, _ = checkpoints
  config = launch.stored_config(['launch.py', '--mode', 'eval', '--workdir', str(tmp_path),
                                 f'--config.init.checkpoint={good}'])
  assert (config.dataset, config.model.width, config.init.checkpoint) == ('synthetic', 48, str(good))
  assert launch.stored_config(['launch.py', '--mode=eval', '--workdir', str(good)]).init.checkpoint == str(good)
  assert launch.stored_config(['launch.py', '--workdir', str(good)]) is None  # training needs --config
  assert launch.stored_config(['launch.py', '--mode', 'eval', '--config', DEMO, '--workdir', str(good)]) is None
  assert launch.stored_config(['launch.py', '--mode', 'eval', '--workdir', str(tmp_path)]) is None


def test_launch_without_a_config_to_start_from(tmp_path):
  assert_one_line_error(run('launch.py', '--mode', 'eval', '--workdir', tmp_path), '--config is required',
                        'config.json')
  assert_one_line_error(run('launch.py', '--workdir', tmp_path, '--config.batch_size=2'), '--config.batch_size',
                        'no config to apply it to')


@pytest.mark.slow
def test_eval_without_config_evaluates_with_the_saved_one(checkpoints, tmp_path):
  good, _, _ = checkpoints
  done = run('launch.py', '--mode', 'eval', '--workdir', tmp_path / 'eval', f'--config.init.checkpoint={good}',
             '--config.input.synthetic_test_size=8', '--config.eval_batch_size=8')
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((tmp_path / 'eval' / 'eval_fold1.json').read_text())
  assert result['num_clips'] == 8 and result['checkpoint'] == str(good)


def test_predict_help_lists_its_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    predict.main(['--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: mma-dfer-predict VIDEO --checkpoint DIR')
  for flag in ('--checkpoint', '--config', '--[no]json', '--save-frames', '--timeline', '--window', '--hop'):
    assert flag in out, flag
