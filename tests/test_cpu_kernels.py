"""The CPU kernels (mma_dfer_jax/cpu/csrc/cpu_kernels.cc) against XLA's ops, their build fallback, and the
implementation choice the model's blocks ask."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mma_dfer_jax import cpu
from mma_dfer_jax.cpu import choice
from mma_dfer_jax.cpu import kernels as cpu_kernels
from mma_dfer_jax.models import vit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module', autouse=True)
def kernel():
  if cpu_kernels._compiler() is None:
    pytest.skip('no C++ compiler on this machine: the model uses the einsum attention')
  # With a compiler the kernel must build; the reason is in the log otherwise.
  assert cpu_kernels._load() is None, cpu_kernels._load()


def _einsum_reference(qkv):
  """The einsum attention over any leading dimensions."""
  flat = qkv.reshape((-1,) + qkv.shape[-4:])
  return choice.einsum_attention(flat).reshape(qkv.shape[:-3] + qkv.shape[-2:])


# Lengths that are and are not multiples of the micro-kernel's 6 rows and 16 columns, head sizes under, at and over
# 16, one head and several, extra leading dimensions.
SHAPES = [(2, 17, 3, 3, 24), (1, 203, 3, 12, 64), (3, 1, 3, 2, 8), (1, 40, 3, 1, 80), (2, 2, 7, 3, 2, 16)]


@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_forward_and_gradient_match_the_einsum_attention(shape):
  qkv = 2 * jax.random.normal(jax.random.key(0), shape)  # large scores: a peaked softmax
  cotangent = jax.random.normal(jax.random.key(1), shape[:-3] + shape[-2:])
  fused_out, fused_vjp = jax.vjp(cpu_kernels.attention, qkv)
  einsum_out, einsum_vjp = jax.vjp(_einsum_reference, qkv)
  np.testing.assert_allclose(fused_out, einsum_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fused_vjp(cotangent)[0], einsum_vjp(cotangent)[0], rtol=1e-4, atol=1e-4)


def test_under_jit_vmap_and_scan():
  qkv = jax.random.normal(jax.random.key(0), (4, 2, 9, 3, 2, 16))
  expected = _einsum_reference(qkv)
  np.testing.assert_allclose(jax.jit(jax.vmap(cpu_kernels.attention))(qkv), expected, rtol=1e-5, atol=1e-6)
  _, scanned = jax.lax.scan(lambda carry, x: (carry, cpu_kernels.attention(x)), 0, qkv)
  np.testing.assert_allclose(scanned, expected, rtol=1e-5, atol=1e-6)


def test_is_the_default_attention_on_cpu_in_float32_only():
  x = jax.random.normal(jax.random.key(0), (2, 11, 32))
  fused, einsum = vit.Attention(4), vit.Attention(4, ops=cpu.Implementations('einsum', 'xla'))
  params = fused.init(jax.random.key(1), x)
  np.testing.assert_allclose(fused.apply(params, x), einsum.apply(params, x), rtol=1e-5, atol=1e-5)
  assert cpu.implementations(dtype=jnp.float32) == cpu.Implementations('cpu_fused', 'openblas')
  assert cpu.implementations(dtype=jnp.bfloat16) == cpu.Implementations('einsum', 'xla')
  assert 'mma_dfer_attention_forward' in str(jax.make_jaxpr(lambda p: fused.apply(p, x))(params))


def test_library_is_cached_per_machine():
  path = cpu_kernels._library_path(cpu_kernels._compiler())
  assert path.exists() and path.parent == cpu_kernels._cache_dir()


def test_without_a_working_compiler_the_model_falls_back_to_einsum(tmp_path):
  """A compiler that fails: one warning naming the reason, the einsum attention, the same numbers."""
  script = (
      'import jax, jax.numpy as jnp\n'
      'from mma_dfer_jax import cpu\n'
      'from mma_dfer_jax.models import vit\n'
      'x = jnp.ones((1, 5, 8))\n'
      'm = vit.Attention(2)\n'
      'print(m.apply(m.init(jax.random.key(0), x), x).sum(), cpu.implementations().attention_impl)\n')
  env = dict(os.environ, CXX='false', JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             **{cpu_kernels.CACHE_ENV: str(tmp_path)})
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, check=True)
  assert result.stdout.split()[-1] == 'einsum'
  assert result.stderr.count('CPU kernels unavailable') == 1, result.stderr
  assert not list(tmp_path.rglob('*.so'))


@pytest.mark.parametrize('x_shape,n', [((2, 7, 33), 20), ((5, 1), 3), ((130, 64), 17), ((100, 40), 200),
                                       ((1100, 24), 40)], ids=str)
def test_matmul_and_its_gradients_match_xla(x_shape, n):
  """Leading dimensions, one row, odd sizes, blocks of rows and of columns (few rows, many columns); dx and dw
  (x^T dy) through OpenBLAS too."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), (x_shape[-1], n))
  dy = jax.random.normal(jax.random.key(2), x_shape[:-1] + (n,))
  ours, ours_vjp = jax.vjp(cpu_kernels.matmul, x, w)
  xla, xla_vjp = jax.vjp(jnp.matmul, x, w)
  np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5)
  for a, b in zip(ours_vjp(dy), xla_vjp(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_dot_general_takes_only_dense_float32_matmuls():
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  dense = (((2,), (0,)), ((), ()))
  assert 'mma_dfer_matmul' in str(jax.make_jaxpr(lambda a, b: cpu_kernels.dot_general(a, b, dense))(x, w))
  batched = (((2,), (1,)), ((0,), (0,)))
  y = jnp.ones((2, 4, 5))
  jaxpr = str(jax.make_jaxpr(lambda a, b: cpu_kernels.dot_general(a, b, batched))(x, y))
  assert 'mma_dfer_matmul' not in jaxpr and 'dot_general' in jaxpr
  half = str(jax.make_jaxpr(lambda a, b: cpu_kernels.dot_general(a, b, dense))(x.astype(jnp.bfloat16),
                                                                              w.astype(jnp.bfloat16)))
  assert 'mma_dfer_matmul' not in half


def test_remat_keeps_kernel_outputs_instead_of_running_them_again():
  """Under the default remat policy each forward kernel runs once per layer, as XLA's saved dots do."""
  from mma_dfer_jax.models import mma_dfer
  w = jax.random.normal(jax.random.key(0), (32, 96))

  def layer(x, _):
    qkv = cpu_kernels.matmul(x, w).reshape(2, 9, 3, 2, 16)
    return jnp.tanh(cpu_kernels.attention(qkv).reshape(2, 9, 32)), None

  checkpointed = jax.checkpoint(layer, policy=mma_dfer.remat_policy('dots_with_no_batch_dims_saveable'))
  loss = lambda x: jax.lax.scan(checkpointed, x, None, length=3)[0].sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.ones((2, 9, 32))))
  assert jaxpr.count(cpu_kernels.FORWARD_TARGET) == 1
  assert jaxpr.count(cpu_kernels.BACKWARD_TARGET) == 1
  forward_matmul = "(('transpose_a', False), ('transpose_b', False))"  # dx and dw transpose one operand
  assert jaxpr.count(forward_matmul) == 1


def test_unknown_matmul_impl_is_an_error():
  model = common.model_config(7)
  model.matmul_impl = 'mkl'
  with pytest.raises(ValueError, match="model.matmul_impl='mkl'"):
    cpu.implementations(model)


def test_a_mesh_of_several_devices_keeps_xlas_own_ops():
  """XLA's partitioner would run a custom call whole on every device, so sharded runs use XLA's attention/matmuls."""
  script = ('from configs import common\n'
            'from mma_dfer_jax import cpu\n'
            'print(cpu.implementations(common.model_config(7)).names)\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, check=True)
  assert result.stdout.strip() == "{'attention': 'einsum', 'matmul': 'xla'}"


def test_cpu_kernels_asked_for_on_another_backend_are_a_clear_error(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  model = common.model_config(7)
  model.update(attention_impl='', matmul_impl='openblas')
  with pytest.raises(ValueError, match="model.matmul_impl='openblas' runs on CPU only"):
    cpu.implementations(model)
  model.update(attention_impl='cpu_fused', matmul_impl='xla')
  with pytest.raises(ValueError, match="model.attention_impl='cpu_fused' runs on CPU only"):
    cpu.implementations(model)
  assert cpu.implementations(dtype=jnp.float32) == cpu.Implementations('xla', 'xla')  # the default picks XLA there
  assert cpu.Implementations('xla', 'xla').dot_general is None


def test_the_models_blocks_run_the_chosen_implementations():
  """One choice for the whole model (`cpu.implementations`), passed to every block: the kernels' custom calls
  appear in the traced model exactly where the choice names them."""
  from mma_dfer_jax import models
  from mma_dfer_jax.models import MMADFER
  sizes = dict(width=32, depth=6, num_heads=2, mlp_dim=64, img_size=32, num_frames=2, audio_frames=32,
               audio_mels=32, fusion_width=16)
  model = common.model_config(7)
  model.update(sizes)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))

  def traced(attention_impl, matmul_impl):
    model.update(attention_impl=attention_impl, matmul_impl=matmul_impl)
    return str(jax.make_jaxpr(lambda p, v, a: MMADFER(model).apply({'params': p}, v, a))(
        params, *models.dummy_inputs(model)))
  assert {t for t in (cpu_kernels.FORWARD_TARGET, cpu_kernels.MATMUL_TARGET) if t in traced('', '')} == \
      {cpu_kernels.FORWARD_TARGET, cpu_kernels.MATMUL_TARGET}
  only_matmuls = traced('einsum', 'openblas')
  assert cpu_kernels.MATMUL_TARGET in only_matmuls and cpu_kernels.FORWARD_TARGET not in only_matmuls
  assert 'mma_dfer_' not in traced('xla', 'xla')
