"""mma_dfer_jax/settings.py: the experiment configs validate, every bad range is refused naming its key, older saved
configs are upgraded, and the module stays free of JAX (the training command reads it before JAX starts)."""
import importlib
import json
import subprocess
import sys

import ml_collections
import pytest

from conftest import ROOT
from mma_dfer_jax import cli
from mma_dfer_jax import settings

CONFIG_FILES = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem not in ('__init__', 'common'))
PAPER_CLASSES = {'dfew': 7, 'mafw': 11, 'cremad': 6, 'ravdess': 8, 'ferv39k': 7}


def demo():
  return importlib.import_module('configs.demo').get_config()


def assert_refused(config, key, **counts):
  """validate refuses `config` with one line that names `config.<key>`; the error is a UserError (exit 2 on
  the command line) and a ValueError (for library callers)."""
  with pytest.raises(settings.ConfigError) as error:
    settings.validate(config, **counts)
  message = str(error.value)
  assert isinstance(error.value, cli.UserError) and isinstance(error.value, ValueError)
  assert message.startswith('config.') and f'config.{key}' in message and '\n' not in message, message
  assert cli.user_error_message(error.value) == message
  return message


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_file_validates(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  settings.validate(config)
  assert set(settings.DATASETS) >= {config.dataset}
  if name in PAPER_CLASSES:  # the paper's recipe from one place
    assert config.dataset == name and config.model.num_classes == PAPER_CLASSES[name]
    expected = settings.paper_config(name, PAPER_CLASSES[name])
    assert config.to_dict() == expected.to_dict()


def test_configs_common_still_serves_older_config_files():
  common = importlib.import_module('configs.common')
  assert common.base_config is settings.base_config and common.model_config is settings.model_config
  assert common.model_config(5).num_classes == 5


@pytest.mark.parametrize('key, value', [
    ('dataset', 'affwild'), ('schedule', 'linear'), ('model.modalities', 'vision'), ('model.dtype', 'float64'),
    ('model.attention_impl', 'flash'), ('model.matmul_impl', 'mkl'),
    ('fold', 6), ('fold', 0), ('model.depth', 8), ('model.depth', 0), ('model.num_heads', 5), ('model.img_size', 40),
    ('learning_rate', 0.0), ('label_smoothing', 1.0), ('model.drop_path_rate', -0.1),
    ('input.synthetic_silent_fraction', 1.5), ('mesh.data', 0), ('grad_accum_steps', 3), ('batch_size', True),
    ('model.num_classes', 0), ('adam_eps', 0.0),
])
def test_validate_names_the_key(key, value):
  config = demo()
  section, _, leaf = key.rpartition('.')
  (config[section] if section else config)[leaf] = value
  message = assert_refused(config, key)
  assert repr(value) in message or str(value) in message


@pytest.mark.parametrize('key', sorted(settings.COUNTS))
def test_every_count_is_checked(key):
  config = demo().to_dict()
  *parents, leaf = key.split('.')
  holder = config
  for part in parents:
    holder = holder[part]
  holder[leaf] = settings.COUNTS[key] - 1
  assert 'must be an integer >=' in assert_refused(ml_collections.ConfigDict(config), key)


def test_batches_must_split_over_devices_and_processes():
  config = demo()  # batch_size 16, eval_batch_size 32
  settings.validate(config, device_count=4, process_count=2)
  assert '3 devices' in assert_refused(config, 'batch_size', device_count=3)
  assert '3 processes' in assert_refused(config, 'batch_size', device_count=1, process_count=3)
  config.mesh.data = 2
  assert assert_refused(config, 'mesh.data', device_count=4).endswith('use -1 for all of them')


def test_cli_aliases_run_the_same_checks():
  config = demo()
  config.model.depth = 7
  with pytest.raises(cli.UserError, match=r'^config\.model\.depth=7'):
    cli.check_config(config)
  with pytest.raises(cli.UserError, match=r'^config\.model\.depth=7'):
    cli.check_model_config(config.model)


def old_saved_config() -> dict:
  """A config.json as an older version wrote it: no modalities, matmul_impl, attention_impl, synthetic options."""
  saved = demo().to_dict()
  for key in ('modalities', 'matmul_impl', 'attention_impl'):
    del saved['model'][key]
  del saved['input']['synthetic_colour_jitter']
  del saved['cpu_keep_freed_memory']
  return saved


def test_upgrade_fills_what_an_older_config_lacks_and_keeps_the_rest():
  upgraded = settings.upgrade(ml_collections.ConfigDict(old_saved_config()))
  assert upgraded.model.modalities == 'audio_video'
  assert upgraded.model.matmul_impl == '' and upgraded.model.attention_impl == ''
  assert upgraded.input.synthetic_colour_jitter == 0.0 and upgraded.cpu_keep_freed_memory is True
  assert upgraded.to_dict() == demo().to_dict()  # the saved values stay (width 48, 4 classes, synthetic, ...)
  settings.validate(upgraded)


def test_load_saved_upgrades_and_reports_a_damaged_file_in_one_line(tmp_path):
  assert settings.load_saved(tmp_path) is None
  (tmp_path / 'config.json').write_text(json.dumps(old_saved_config()))
  assert settings.load_saved(tmp_path).model.matmul_impl == ''
  (tmp_path / 'config.json').write_text('{"dataset": ')
  with pytest.raises(cli.UserError, match='config.json: not a readable config') as error:
    settings.load_saved(tmp_path)
  assert '\n' not in str(error.value)


def test_override_keys_are_checked_with_a_suggestion():
  config = demo()
  cli.check_override_keys(config, ['p', '--config.model.width=8', '--noconfig.model.remat', '--config.fold', '2'])
  with pytest.raises(cli.UserError, match=r"config key 'depht' does not exist \(did you mean --config.model.depth"):
    cli.check_override_keys(config, ['p', '--config.model.depht=12'])
  with pytest.raises(cli.UserError, match=r'did you mean --config.model.num_heads'):
    cli.check_override_keys(config, ['p', '--config.num_heads=2'])


def test_settings_and_the_training_command_import_no_jax():
  code = ('import sys\nimport mma_dfer_jax.settings, mma_dfer_jax.launch, configs.dfew\n'
          'assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))[:5]')
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
