"""The error contract every command shares: a user error is one line on stderr and exit code 2.

A *user error* is a mistake the user can fix: a missing or damaged input file, a config value out of range, a
model config that does not fit the checkpoint, an output path that cannot be written. It is printed as

  error: <what, naming the input or setting, and what to do>

and the command exits with 2. Anything else is a bug and keeps its traceback (exit code 1).

What counts as a user error is decided here, in one place (`user_error_message`):
- `UserError` below, and the package's own error types listed in `USER_ERROR_TYPES`;
- the OS errors about a path (`PATH_ERRORS`: missing, existing, not a directory, permission denied);
- a `ValueError` whose message starts with `config.`: the package's convention for a check of a config key.

The commands (launch.py / mma-dfer-train, convert, predict, bench) wrap their `main` in `guard` and parse absl
flags with `parse_flags`; `check_config` and `check_writable_dir` are the checks they run before anything is
computed or written. This module imports nothing heavy: launch.py must configure the allocator before JAX starts.
"""
import functools
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

EXIT_USER_ERROR = 2

# The package's user-error types as (module, class). A module that was never imported cannot have raised its error,
# so they are looked up in sys.modules when an error arrives: listing them costs no import.
USER_ERROR_TYPES = (
    ('mma_dfer_jax.experiment', 'UserError'),
    ('mma_dfer_jax.input_pipeline', 'DatasetError'),
    ('mma_dfer_jax.audio', 'AudioError'),
    ('mma_dfer_jax.convert', 'ConversionError'),
    ('mma_dfer_jax.pth_reader', 'PthFormatError'),
    ('mma_dfer_jax.predict', 'PredictError'),
    ('mma_dfer_jax.video', 'VideoError'),
    ('mma_dfer_jax.checkpoint', 'CheckpointNotFoundError'),
    ('mma_dfer_jax.distributed', 'DistributedConfigError'),
)
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


class UserError(Exception):
  """A mistake the user can fix; the message names the input or setting and what to do."""


def _loaded_modules(name: str) -> list:
  """The module `name` as imported, and `__main__` when it is `name` run with `python -m` (a second copy)."""
  modules = [sys.modules.get(name)]
  main = sys.modules.get('__main__')
  if getattr(getattr(main, '__spec__', None), 'name', None) == name:
    modules.append(main)
  return [m for m in modules if m is not None]


def _registered_types() -> tuple:
  types = [UserError]
  for module_name, class_name in USER_ERROR_TYPES:
    for module in _loaded_modules(module_name):
      found = getattr(module, class_name, None)
      if isinstance(found, type):
        types.append(found)
  return tuple(types)


def _path_error_text(error: OSError) -> str:
  if not error.filename:
    return str(error)  # raised with a message of ours, e.g. checkpoint.CheckpointNotFoundError
  paths = f'{error.filename}' + (f' -> {error.filename2}' if error.filename2 else '')
  hint = {PermissionError: 'check its permissions or choose another path',
          FileNotFoundError: 'check the path'}.get(type(error), 'choose another path')
  return f'{paths}: {error.strerror}; {hint}'


def user_error_message(error: BaseException) -> Optional[str]:
  """The one line to print for a user error, or None when `error` is a bug (keep its traceback)."""
  if isinstance(error, _registered_types()):
    text = _path_error_text(error) if isinstance(error, OSError) else str(error)
  elif isinstance(error, PATH_ERRORS):
    text = _path_error_text(error)
  elif isinstance(error, ValueError) and str(error).startswith('config.'):
    text = str(error)
  else:
    return None
  return ' '.join(text.split()) or type(error).__name__


def report(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)


def guard(function: Callable, hard_exit: bool = False) -> Callable:
  """`function` with user errors reported as one line and exit code 2; other errors pass through.

  hard_exit (for a command's process, never in a test process): leave at once after the line, so that threads of a
  failed checkpoint write (TensorStore's event loops) cannot print their shutdown noise after it.
  """

  @functools.wraps(function)
  def guarded(*args, **kwargs):
    try:
      return function(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-exception-caught
      message = user_error_message(e)
      if message is None:
        raise
      report(message)
      if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)  # pylint: disable=protected-access
      sys.exit(EXIT_USER_ERROR)
  return guarded


def run_main(main: Callable, *args) -> None:
  """Runs `main(*args)` under the contract and exits with its return code (0 for None)."""
  sys.exit(guard(main)(*args) or 0)


# ---------------------------------------------------------------------------------------------------------------
# absl / ml_collections flags.

def define_config_flag(flag_values, argv, help_text='Experiment config file, e.g. configs/demo.py.') -> None:
  """`--config FILE` plus `--config.key=value` overrides (found in `argv`) on `flag_values`."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file('config', None, help_text, flag_values=flag_values, sys_argv=list(argv),
                                  lock_config=True)


def _config_path(argv) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error_text(error: Exception) -> str:
  text = str(error)
  if 'Error whilst parsing config file' in text:  # ml_collections puts the config file's traceback in the message
    last = [line for line in text.splitlines() if line.strip()][-1]
    return f'--config: the config file failed to load ({last.strip()})'
  return text


def parse_flags(flag_values, argv) -> list:
  """absl's parsing of `argv`; a bad flag or `--config.key=value` override becomes a UserError.

  Returns the arguments left after the flags (argv[0] first), as absl does.
  """
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path.split(':')[0]):
    raise UserError(f'--config {path}: no such file (configs/dfew.py, configs/mafw.py and configs/demo.py come '
                    'with the code)')
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flag_values(list(argv))
  except (KeyError, AttributeError) as e:  # ml_collections: the overridden key does not exist
    text = str(e).replace('\\', '')
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    raise UserError(f'config key {key.group(1) if key else text!r} does not exist'
                    + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
                    + '; see the config file for the available keys') from None
  except flags.Error as e:
    raise UserError(_flag_error_text(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# Checks run before anything is computed or written.

def _require(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


def _check_count(config, key: str, minimum: int) -> None:
  value = config
  for part in key.split('.'):
    value = value.get(part) if hasattr(value, 'get') else None
  if value is None:
    return  # an older config without this key: its module's default applies
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           f'config.{key}={value!r}: must be an integer >= {minimum}')


def check_model_config(model_config) -> None:
  _require(model_config.depth >= 6 and model_config.depth % 6 == 0,
           f'config.model.depth={model_config.depth}: must be a positive multiple of 6 (prompt stages every 6 '
           'blocks)')
  for key in ('num_classes', 'img_size', 'num_frames', 'width', 'num_heads', 'mlp_dim'):
    _check_count(model_config, key, 1)
  _require(model_config.width % model_config.num_heads == 0,
           f'config.model.width={model_config.width} is not divisible by config.model.num_heads='
           f'{model_config.num_heads}')
  kinds = ('audio_video', 'video', 'audio')  # models/mma_dfer.py MODALITIES (not imported: cli stays JAX-free)
  modalities = model_config.get('modalities', 'audio_video')
  _require(modalities in kinds, f'config.model.modalities={modalities!r}: use one of {", ".join(kinds)}')


def check_config(config, device_count: Optional[int] = None, process_count: int = 1) -> None:
  """The experiment settings a run needs, each checked with the key named (UserError).

  With `device_count`, also that every global batch splits evenly over the devices and processes.
  """
  from mma_dfer_jax import input_pipeline  # pylint: disable=import-outside-toplevel  (the dataset table; no JAX)
  datasets = input_pipeline.DATASETS
  _require(config.dataset in datasets,
           f'config.dataset={config.dataset!r}: unknown dataset; use one of {", ".join(datasets)}')
  folds = input_pipeline.num_folds(config.dataset)
  _require(isinstance(config.fold, int) and 1 <= config.fold <= folds,
           f'config.fold={config.fold}: {config.dataset} folds are numbered 1..{folds}')
  for key in ('batch_size', 'eval_batch_size', 'num_epochs', 'keep_checkpoints', 'log_every_steps'):
    _check_count(config, key, 1)
  _check_count(config, 'checkpoint_every_steps', 0)
  check_model_config(config.model)
  if device_count is not None:
    wanted = config.get('mesh', {}).get('data', -1)
    _require(wanted in (-1, device_count),
             f'config.mesh.data={wanted}, but {device_count} devices are visible; use -1 for all of them')
    for key in ('batch_size', 'eval_batch_size'):
      value = config.get(key)
      if value is None:
        continue
      _require(value % device_count == 0,
               f'config.{key}={value} is not divisible by the {device_count} devices; use a multiple of '
               f'{device_count}')
      _require(value % process_count == 0,
               f'config.{key}={value} is not divisible by the {process_count} processes; use a multiple of '
               f'{process_count}')


def check_writable_dir(path, flag: str) -> None:
  """`path` is a directory this process can write into, or can be created as one (nothing is created here).

  A probe file is written and removed, since permission bits alone do not tell (root ignores them; read-only mounts
  do not show in them). URLs such as gs://bucket/run the same way, through etils.epath (a missing bucket, no
  credentials or no write permission fail here).
  """
  if re.match(r'^[a-z][a-z0-9+.-]*://', str(path)):
    _check_writable_url(str(path), flag)
    return
  path = Path(path)
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise UserError(f'{flag} {path}: {existing} is a file, not a directory; choose another {flag}')
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise UserError(f'{flag} {path}: cannot write in {existing} ({e.strerror}); choose another {flag} or fix its '
                    'permissions') from None


def _check_writable_url(url: str, flag: str) -> None:
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(url)
  probe = path / f'.write-probe-{os.getpid()}-{os.urandom(4).hex()}'
  try:
    is_file = path.is_file()
    if not is_file:
      probe.write_text('')
      probe.unlink()
  except Exception as e:  # pylint: disable=broad-exception-caught  # each storage client raises its own types
    reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
    raise UserError(f'{flag} {url}: cannot write there ({reason}); check that the bucket exists and that these '
                    f'credentials may write to it, or choose another {flag}') from None
  if is_file:
    raise UserError(f'{flag} {url}: is a file, not a directory; choose another {flag}')
