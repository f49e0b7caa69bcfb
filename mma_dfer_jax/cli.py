"""The error contract every command shares: a user error is one line on stderr and exit code 2.

A *user error* is a mistake the user can fix: a missing or damaged input file, a config value out of range, a
model config that does not fit the checkpoint, an output path that cannot be written. It is printed as

  error: <what, naming the input or setting, and what to do>

and the command exits with 2. Anything else is a bug and keeps its traceback (exit code 1).

What counts as a user error is decided here, in one place (`user_error_message`):
- `UserError` below, and the package's own error types listed in `USER_ERROR_TYPES`;
- the OS errors about a path (`PATH_ERRORS`: missing, existing, not a directory, permission denied);
- a `ValueError` whose message starts with `config.`: the package's convention for a check of a config key.

The commands (launch.py / mma-dfer-train, convert, predict, export, bench) wrap their `main` in `guard` and take
`--config FILE` plus `--config.key=value` overrides (`define_config_flag`, `parse_flags`); `check_config`
(settings.validate) and `check_writable_dir` are the checks they run before anything is computed or written. This
module imports nothing heavy: launch.py must configure the allocator before JAX starts.
"""
import difflib
import functools
import importlib.util
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
# absl / ml_collections flags: `--config FILE` plus `--config.key=value` overrides, the same for every command.

def flag_value(argv, name: str) -> Optional[str]:
  """The value of `--name=VALUE` or `--name VALUE` in `argv` (the last one given), read before absl parses."""
  found = None
  for i, arg in enumerate(argv):
    if re.match(rf'^--?{re.escape(name)}=', arg):
      found = arg.split('=', 1)[1]
    elif re.match(rf'^--?{re.escape(name)}$', arg) and i + 1 < len(argv):
      found = argv[i + 1]
  return found


def override_keys(argv) -> list:
  """The keys of the `--config.key=value` overrides (and `--config.flag` / `--noconfig.flag`) in `argv`."""
  keys = []
  for arg in argv:
    match = re.match(r'^--?(?:no)?config\.([^=]+)', arg)
    if match and match.group(1) not in keys:
      keys.append(match.group(1))
  return keys


def _config_keys(config, prefix='') -> list:
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if hasattr(value, 'items'):
      keys.extend(_config_keys(value, f'{prefix}{key}.'))
  return keys


def _closest_key(key: str, known: list) -> Optional[str]:
  """The known key `key` is most likely a misspelling of: by the whole path, else by its last part."""
  close = difflib.get_close_matches(key, known, n=1)
  if close:
    return close[0]
  last = key.rsplit('.', 1)[-1]
  by_last = {k.rsplit('.', 1)[-1]: k for k in known}
  close = difflib.get_close_matches(last, list(by_last), n=1)
  return by_last[close[0]] if close else None


def check_override_keys(config, argv) -> None:
  """Every `--config.key` override in `argv` names a key of `config` (UserError naming the closest key if not)."""
  known = _config_keys(config)
  for key in override_keys(argv):
    if key in known:
      continue
    missing = next(part for i, part in enumerate(key.split('.'), 1) if '.'.join(key.split('.')[:i]) not in known)
    closest = _closest_key(key, known)
    raise UserError(f'--config.{key}: config key {missing!r} does not exist'
                    + (f' (did you mean --config.{closest}?)' if closest else '')
                    + '; see the config file for the available keys')


def load_config_file(path):
  """`get_config()` of a config file such as configs/mafw.py (`FILE:ARG` calls `get_config(ARG)`)."""
  file, arg = (path, None) if os.path.isfile(path) or ':' not in path else path.rsplit(':', 1)
  if not os.path.isfile(file):
    raise UserError(f'--config {path}: no such file (configs/dfew.py, configs/mafw.py and configs/demo.py come '
                    'with the code)')
  spec = importlib.util.spec_from_file_location(f'_config_{Path(file).stem}', file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg is not None else module.get_config()
  except Exception as e:  # pylint: disable=broad-exception-caught  # a config file is user code
    raise UserError(f'--config {path}: the config file failed to load ({type(e).__name__}: {e})') from None
  if not hasattr(config, 'to_dict'):
    raise UserError(f'--config {path}: get_config() returned a {type(config).__name__}, not a ConfigDict')
  return config


def _without_config_file(argv) -> list:
  """`argv` less `--config FILE` / `--config=FILE` (the file is loaded here; absl sees only the overrides)."""
  kept, skip = [], False
  for i, arg in enumerate(argv):
    if skip:
      skip = False
    elif re.match(r'^--?config=', arg):
      continue
    elif re.match(r'^--?config$', arg) and i + 1 < len(argv):
      skip = True
    else:
      kept.append(arg)
  return kept


def define_config_flag(flag_values, argv, help_text='Experiment config file, e.g. configs/demo.py.', stored=None,
                       no_config_hint='give --config FILE, e.g. --config configs/demo.py') -> None:
  """`--config FILE` plus `--config.key=value` overrides (found in `argv`) on `flag_values`.

  The config is the file's, else `stored` (e.g. the config saved with a checkpoint), else None. Every override key
  is checked against it here, before absl parses (UserError naming the key); the values are parsed by absl with the
  key's type, and a bad one is a UserError from `parse_flags`.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  path = flag_value(argv, 'config')
  config = load_config_file(path) if path is not None else stored
  if config is None:
    keys = override_keys(argv)
    if keys:
      raise UserError(f'--config.{keys[0]}: there is no config to apply it to; {no_config_hint}')
    config_flags.DEFINE_config_file('config', None, help_text, flag_values=flag_values, sys_argv=list(argv))
    return
  check_override_keys(config, argv)
  config_flags.DEFINE_config_dict('config', config, help_text, flag_values=flag_values,
                                  sys_argv=_without_config_file(argv), lock_config=True)


def saved_config(argv):
  """Without `--config FILE`: the config saved with `--checkpoint DIR` (overrides apply onto it), else None.

  A checkpoint that does not exist is reported here only when overrides need its config; otherwise the command
  reports it after its other flags are checked.
  """
  checkpoint_dir = flag_value(argv, 'checkpoint')
  if flag_value(argv, 'config') is not None or not checkpoint_dir:
    return None
  from etils import epath  # pylint: disable=import-outside-toplevel
  from mma_dfer_jax import settings  # pylint: disable=import-outside-toplevel  (settings imports this module)
  if not epath.Path(checkpoint_dir).is_dir():
    if override_keys(argv):
      raise UserError(f'--checkpoint {checkpoint_dir}: no such checkpoint directory (give the --out of convert or a '
                      'launch.py work directory)')
    return None
  return settings.load_saved(checkpoint_dir)


def define_checkpoint_flags(flag_values, argv) -> None:
  """`--checkpoint DIR` and `--config`, as the commands that read a checkpoint take them (predict, extract, export).

  The config is the one saved with the checkpoint, with the `--config.key=value` overrides applied; `--config FILE`
  replaces it. The caller fits it to the parameters (predict.load_model).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  define_config_flag(flag_values, argv, 'Experiment config file; replaces the config stored with the checkpoint '
                     '(default: that config, with the --config.key=value overrides applied).',
                     stored=saved_config(argv),
                     no_config_hint='the checkpoint holds no config.json: give --config FILE, e.g. configs/mafw.py')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint directory: the --out of convert or a launch.py work directory.',
                      flag_values=flag_values)


def parse_flags(flag_values, argv, usage: Optional[str] = None) -> list:
  """absl's parsing of `argv`; a bad flag or override value becomes a UserError. `--help` prints `usage` and the
  flags, and exits 0.

  Returns the arguments left after the flags (argv[0] first), as absl does.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  if 'help' not in flag_values and any(arg in ('-h', '--help', '--helpfull') for arg in argv):
    print(f'usage: {usage or Path(argv[0]).name + " [flags]"}\n\n{flag_values.get_help()}')
    sys.exit(0)
  try:
    return flag_values(_without_config_file(argv))
  except flags.Error as e:
    raise UserError(f'{e} (see --help)') from None


# ---------------------------------------------------------------------------------------------------------------
# Checks run before anything is computed or written: mma_dfer_jax/settings.py, named here for the commands.

def check_model_config(model_config) -> None:
  """config.model's choices and ranges (settings.validate_model)."""
  from mma_dfer_jax import settings  # pylint: disable=import-outside-toplevel  (settings imports this module)
  settings.validate_model(model_config)


def check_config(config, device_count: Optional[int] = None, process_count: int = 1) -> None:
  """Every setting, with the key named (settings.validate); with `device_count`, also the batches' split."""
  from mma_dfer_jax import settings  # pylint: disable=import-outside-toplevel
  settings.validate(config, device_count, process_count)


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
