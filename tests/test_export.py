"""The exported model (export.py, portable_loader.py) and implementation choices made for the target platform."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from configs import demo
from mma_dfer_jax import checkpoint
from mma_dfer_jax import export
from mma_dfer_jax import models
from mma_dfer_jax import train
from mma_dfer_jax.cpu import choice
from mma_dfer_jax.cpu import kernels as cpu_kernels
from mma_dfer_jax.models import MMADFER

ROOT = Path(__file__).resolve().parents[1]
LOADER = ROOT / 'mma_dfer_jax' / 'portable_loader.py'
ACCELERATORS = ('cuda', 'tpu')


def custom_call_targets(module_text: str) -> set:
  return set(re.findall(r'custom_call @(\w+)', module_text))


def ours(targets) -> set:
  return {t for t in targets if t.startswith('mma_dfer_')}


# ---------------------------------------------------------------------------------------------------------------
# Implementations resolved for the platform compiled for.

def test_resolve_implementations_follows_the_target_not_the_host():
  model = common.model_config(7)
  kernels = cpu_kernels.available()
  cpu_one = choice.resolve(model, 'cpu', 1)
  assert cpu_one == ({'attention_impl': 'cpu_fused', 'matmul_impl': 'openblas'} if kernels else
                     {'attention_impl': 'einsum', 'matmul_impl': 'xla'})
  assert choice.resolve(model, 'cpu', 8) == {'attention_impl': 'einsum', 'matmul_impl': 'xla'}
  assert choice.resolve(model, ACCELERATORS, 1) == {'attention_impl': 'xla', 'matmul_impl': 'xla'}
  assert choice.resolve(model, ('cpu', 'cuda', 'tpu'), 1) == {'attention_impl': 'einsum', 'matmul_impl': 'xla'}
  model.dtype = 'bfloat16'
  assert choice.resolve(model, 'cpu', 1) == {'attention_impl': 'einsum', 'matmul_impl': 'xla'}
  # Explicit choices stay; a CPU kernel asked for an accelerator is a clear error, and a portable module swaps it.
  model.update(dtype='float32', attention_impl='cpu_fused', matmul_impl='openblas')
  with pytest.raises(ValueError, match="model.attention_impl='cpu_fused' runs on CPU only.*cuda, tpu"):
    choice.resolve(model, ACCELERATORS, 1)
  assert choice.resolve(model, 'tpu', 1, custom_calls=False) == {'attention_impl': 'einsum', 'matmul_impl': 'xla'}
  model.update(attention_impl='cudnn', matmul_impl='xla')
  assert choice.resolve(model, 'cuda', 1) == {'attention_impl': 'cudnn', 'matmul_impl': 'xla'}
  model.attention_impl = 'flash'
  with pytest.raises(ValueError, match='model.attention_impl'):
    choice.resolve(model, 'cuda', 1)


def test_resolved_model_config_keeps_its_type_and_leaves_the_callers_config():
  model = common.model_config(7)  # (a config saved before the settings existed gets them where it is loaded)
  resolved = choice.resolved_model_config(ml_collections.FrozenConfigDict(model), 'tpu', 1)
  assert isinstance(resolved, ml_collections.FrozenConfigDict)
  assert (resolved.attention_impl, resolved.matmul_impl) == ('xla', 'xla')
  assert model.attention_impl == ''  # the caller's config is untouched


def _abstract_state(config, platforms):
  params = jax.eval_shape(lambda: models.init_params(config.model, jax.random.key(0)))
  return jax.eval_shape(lambda p: train.create_train_state(config, p, platforms=platforms), params)


def _batch_specs(c, size):
  return {'video': jax.ShapeDtypeStruct((size, c.num_frames, c.img_size, c.img_size, 3), jnp.uint8),
          'audio': jax.ShapeDtypeStruct((size, c.audio_frames, c.audio_mels), jnp.float32),
          'label': jax.ShapeDtypeStruct((size,), jnp.int32)}


def test_a_step_compiled_for_accelerators_on_a_one_cpu_host_has_no_cpu_kernels():
  """On one CPU device in float32 the host's own step uses the kernels; the same step built for cuda/tpu does not."""
  if not cpu_kernels.available():
    pytest.skip('the CPU kernels cannot be built here')
  config = demo.get_config()
  rng = jax.eval_shape(lambda: jax.random.key(0))
  batch = _batch_specs(config.model, 2)
  step = train.jit_train_step()
  host = step.lower(_abstract_state(config, None), batch, rng).as_text()
  assert ours(custom_call_targets(host)) == {cpu_kernels.FORWARD_TARGET, cpu_kernels.BACKWARD_TARGET,
                                             cpu_kernels.MATMUL_TARGET}
  exported = jax.export.export(step, platforms=ACCELERATORS)(_abstract_state(config, ACCELERATORS), batch, rng)
  assert exported.platforms == ACCELERATORS
  assert not ours(custom_call_targets(exported.mlir_module()))


PAPER_STEPS_SCRIPT = r'''
import json, re, sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from configs import dfew
from mma_dfer_jax import experiment, models, sharding, train

platforms = ('cuda', 'tpu')
sds = jax.ShapeDtypeStruct
results = {}
for dtype in ('float32', 'bfloat16'):
  config = dfew.get_config()
  config.model.dtype = dtype
  c = config.model
  mesh = sharding.make_mesh(config)
  frames = (c.num_frames, c.img_size, c.img_size, 3)
  params = jax.eval_shape(lambda: models.init_params(c, jax.random.key(0)))
  state = jax.eval_shape(lambda p: train.create_train_state(config, p, platforms=platforms), params)
  train_step, eval_step = experiment.compiled_steps(state, mesh)
  n = config.batch_size
  batch = {'video': sds((n, *frames), jnp.uint8), 'audio': sds((n, c.audio_frames, c.audio_mels), jnp.float32),
           'label': sds((n,), jnp.int32)}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  exported = {'train': jax.export.export(train_step, platforms=platforms)(state, batch, rng),
              'eval': jax.export.export(eval_step, platforms=platforms)(state, dict(batch, mask=sds((n,), bool)))}
  for name, e in exported.items():
    text = e.mlir_module()
    results[f'{dtype}/{name}'] = {
        'targets': sorted(set(re.findall(r'custom_call @(\w+)', text))), 'devices': e.nr_devices,
        'platforms': list(e.platforms), 'sharded': bool(re.search(r'\{"data"\}|devices=\[8', text)),  # batch on 'data'
        'bf16_dots': bool(re.search(r'dot_general.*bf16', text))}
  results[f'{dtype}/impls'] = [state.model.config.attention_impl, state.model.config.matmul_impl]
print(json.dumps(results))
'''


@pytest.mark.slow  # the 224-px 12-layer model (lowering only: 11-20 s here)
def test_paper_train_and_eval_steps_export_for_accelerators_from_an_8_device_cpu_mesh():
  """DFEW's ViT-B, 224 px, 16 frames, batch 8, sharded over 8 CPU devices, lowered (no arrays) for cuda and tpu."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', PAPER_STEPS_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(result.stdout.strip().splitlines()[-1])
  for dtype in ('float32', 'bfloat16'):
    assert results[f'{dtype}/impls'] == ['xla', 'xla']
    for name in ('train', 'eval'):
      record = results[f'{dtype}/{name}']
      assert not [t for t in record['targets'] if t.startswith('mma_dfer_')], record
      assert record['devices'] == 8 and record['platforms'] == list(ACCELERATORS) and record['sharded']
    assert results[f'{dtype}/train']['bf16_dots'] == (dtype == 'bfloat16')


# ---------------------------------------------------------------------------------------------------------------
# The exported model and its portable loader.

@pytest.fixture(scope='module')
def demo_model(tmp_path_factory):
  """A demo-size model with every parameter moved off its init (gates open), saved as `convert` saves one."""
  config = demo.get_config()
  c = config.model
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (3, c.num_frames, c.img_size, c.img_size, 3), dtype=np.uint8)
  audio = rng.normal(size=(3, c.audio_frames, c.audio_mels)).astype(np.float32)
  model = MMADFER(c)
  shapes = jax.eval_shape(model.init, jax.random.key(0), video[:1] / 255.0, audio[:1])['params']
  # Random values everywhere (no init compile): norms' scales near 1, the adapters' gates open.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (float(jax.tree_util.keystr(path).endswith("'scale']")) + 0.1 * rng.standard_normal(x.shape))
      .astype(np.float32), shapes)
  directory = tmp_path_factory.mktemp('export') / 'ckpt'
  checkpoint.save_params(directory, params, config)
  logits = jax.jit(model.apply)({'params': params}, video / 255.0, audio)  # the host's own implementations
  expected = np.asarray(jax.nn.softmax(logits, axis=-1))
  return {'dir': directory, 'config': config, 'video': video, 'audio': audio, 'expected': expected}


@pytest.fixture(scope='module')
def artifact(demo_model):
  out = demo_model['dir'].parent / 'model.jax'
  assert export.main(['export', '--checkpoint', str(demo_model['dir']), '--out', str(out)]) == 0
  return out


def test_exported_model_matches_flax_at_batch_1_and_3(demo_model, artifact):
  exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
  assert exported.platforms == export.PLATFORMS
  assert len(exported.in_avals) == 2  # parameters are constants, not inputs
  assert str(exported.in_avals[0]) == 'uint8[batch,16,32,32,3]'
  assert str(exported.out_avals[0]) == 'float32[batch,4]'
  assert not ours(custom_call_targets(exported.mlir_module()))
  for n in (1, 3):
    got = np.asarray(exported.call(demo_model['video'][:n], demo_model['audio'][:n]))
    np.testing.assert_allclose(got, demo_model['expected'][:n], atol=1e-5, rtol=0)
  assert not np.allclose(demo_model['expected'][0], demo_model['expected'][1], atol=1e-3)  # inputs matter


def test_sidecar_names_classes_inputs_and_config(demo_model, artifact):
  info = json.loads(Path(str(artifact) + '.json').read_text())
  assert info['class_names'] == ['happiness', 'sadness', 'neutral', 'anger']
  assert info['inputs']['video'] == {**info['inputs']['video'], 'shape': ['batch', 16, 32, 32, 3], 'dtype': 'uint8'}
  assert info['inputs']['audio']['shape'] == ['batch', 512, 128]
  assert info['inputs']['audio']['silent_value'] == pytest.approx(0.46703, abs=1e-5)
  assert info['outputs']['probabilities']['shape'] == ['batch', 4]
  assert info['platforms'] == list(export.PLATFORMS)
  assert info['config']['model'] == demo_model['config'].model.to_dict()
  assert info['checkpoint'] == str(demo_model['dir'].absolute())


BLOCKING_PRELUDE = r'''
import importlib.abc, json, runpy, sys

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('flax', 'mma_dfer_jax'):
      raise ImportError(f'{name} is not installed here')

sys.meta_path.insert(0, Blocked())
for name in ('flax', 'mma_dfer_jax'):
  try:
    __import__(name)
  except ImportError:
    pass
  else:
    raise SystemExit(f'{name} could be imported')
loader_path, artifact, video, audio, clip, clip_audio = sys.argv[1:]
import numpy as np
loader = runpy.run_path(loader_path)  # as a module: its load() ...
model = loader['load'](artifact)
video, audio = np.load(video), np.load(audio)
print(json.dumps({str(n): model(video[:n], audio[:n]).tolist() for n in (1, 3)}))
sys.argv = [loader_path, artifact, clip, clip_audio]
try:
  runpy.run_path(loader_path, run_name='__main__')  # ... and as the script
except SystemExit as e:
  assert not e.code, e.code
assert not any(m.split('.')[0] in ('flax', 'mma_dfer_jax') for m in sys.modules)
'''


@pytest.mark.slow  # 20-26 s on the loaded 2-core machine (a fresh process compiles the module twice)
def test_portable_loader_runs_without_flax_or_the_package(demo_model, artifact, tmp_path):
  """Its load() at batch 1 and 3, then the command line on one clip (T, H, W, 3), where flax and the package fail to
  import: both equal the Flax model's probabilities."""
  files = {name: tmp_path / f'{name}.npy' for name in ('video', 'audio', 'clip', 'clip_audio')}
  for name, array in (('video', demo_model['video']), ('audio', demo_model['audio']),
                      ('clip', demo_model['video'][1]), ('clip_audio', demo_model['audio'][1])):
    np.save(files[name], array)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run([sys.executable, '-c', BLOCKING_PRELUDE, str(LOADER), str(artifact), *map(str, files.values())],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  batches, line = result.stdout.strip().splitlines()
  got = json.loads(batches)
  for n in (1, 3):
    np.testing.assert_allclose(np.asarray(got[str(n)]), demo_model['expected'][:n], atol=1e-5, rtol=0)
  record = json.loads(line)
  names = ['happiness', 'sadness', 'neutral', 'anger']
  assert list(record['probabilities']) == names
  np.testing.assert_allclose([record['probabilities'][k] for k in names], demo_model['expected'][1], atol=1e-5)
  assert record['label'] == names[int(np.argmax(demo_model['expected'][1]))]


def test_portable_loader_user_errors_are_one_line(demo_model, artifact, tmp_path, capsys):
  from mma_dfer_jax import portable_loader  # pylint: disable=import-outside-toplevel
  float_video = tmp_path / 'float.npy'
  np.save(float_video, demo_model['video'][:1] / 255.0)
  audio = tmp_path / 'audio.npy'
  np.save(audio, demo_model['audio'][:1])
  cases = [((tmp_path / 'missing.jax', float_video, audio), 'no such file'),
           ((artifact, float_video, audio), 'uint8'),
           ((artifact, audio, audio), 'the model takes (N, 16, 32, 32, 3)'),
           ((artifact, float_video), 'give AUDIO.npy or --silent-audio'),
           ((float_video, float_video, audio), 'not a serialized jax.export module')]
  for args, message in cases:
    assert portable_loader.main([str(a) for a in args]) == portable_loader.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1, err


def test_export_command_user_errors_exit_2(demo_model, tmp_path, capsys):
  cases = [(['--checkpoint', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'm.jax')],
            'no such checkpoint directory'),
           (['--checkpoint', str(demo_model['dir']), '--out', str(tmp_path / 'm.jax'), '--platforms=cpu,metal'],
            '--platforms=cpu,metal'),
           (['--checkpoint', str(demo_model['dir'])], '--out FILE are required')]
  for args, message in cases:
    with pytest.raises(SystemExit) as exit_info:
      export.run(['export', *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1
  assert not (tmp_path / 'm.jax').exists()
