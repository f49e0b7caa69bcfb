"""Which attention and which Dense matmul the encoder blocks run, chosen once for the platform compiled for.

The model's blocks ask an `Implementations` for `attention(qkv)` and for the `dot_general` of their Dense layers;
they never name a kernel. The choice follows `model.attention_impl` / `model.matmul_impl` ('' = automatic):

- one CPU device in float32, where the kernels of `kernels.py` build: the fused attention ('cpu_fused') and the
  OpenBLAS matmuls ('openblas'), as XLA custom calls;
- elsewhere on CPU (several devices, bfloat16, no compiler): 'einsum' attention (about twice as fast as
  `jax.nn.dot_product_attention` on XLA:CPU) and XLA's matmuls;
- on accelerators: `jax.nn.dot_product_attention` ('xla', or 'cudnn' when asked) and XLA's matmuls.

It is made for the platform a step is compiled for, not the host that traces it: a module exported for GPUs from a
CPU host, or a step sharded over a mesh (XLA's SPMD partitioner does not know the custom calls), keeps XLA's ops.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mma_dfer_jax import settings
from mma_dfer_jax.cpu import kernels

# The implementations a config may force ('' in settings.CHOICES: chosen here for the platform).
ATTENTION_IMPLS = tuple(name for name in settings.CHOICES['model.attention_impl'] if name)
MATMUL_IMPLS = tuple(name for name in settings.CHOICES['model.matmul_impl'] if name)
ATTENTION_PROBS = 'attention_probs'  # checkpoint name of the einsum attention's softmax output
_CPU_ONLY = {'attention_impl': 'cpu_fused', 'matmul_impl': 'openblas'}
_PORTABLE = {'cpu_fused': 'einsum', 'openblas': 'xla'}  # the same function through XLA's own ops


def einsum_attention(qkv: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with heads moved next to the batch: (B, L, 3, H, d) -> (B, L, H, d).

  On XLA:CPU this runs the attention of a train step about twice as fast as `jax.nn.dot_product_attention`,
  whose (B, L, H, d) layout becomes strided batched matmuls there (BENCHMARKS.md).
  """
  q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))   # each (B, H, L, d)
  logits = jnp.einsum('bhqd,bhkd->bhqk', q * q.shape[-1] ** -0.5, k)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)  # float32 softmax, as the default
  probs = checkpoint_name(probs, ATTENTION_PROBS)  # a remat policy may keep these (`Implementations.probs_saveable`)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs, v)
  return jnp.swapaxes(out, 1, 2)


def _fused_attention(qkv: jax.Array) -> jax.Array:
  return kernels.attention(qkv.astype(jnp.float32)).astype(qkv.dtype)


@dataclasses.dataclass(frozen=True)
class Implementations:
  """The resolved choice (never ''): what the encoder blocks' attention and Dense layers run."""
  attention_impl: str
  matmul_impl: str

  def attention(self, qkv: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for qkv of shape (B, L, 3, H, d); returns (B, L, H, d)."""
    if self.attention_impl == 'cpu_fused':
      return _fused_attention(qkv)
    if self.attention_impl == 'einsum':
      return einsum_attention(qkv)
    q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
    return jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)

  @property
  def dot_general(self):
    """The `dot_general` of the blocks' Dense layers; None is Flax's default (XLA's dot)."""
    return kernels.dot_general if self.matmul_impl == 'openblas' else None

  @property
  def names(self) -> dict:
    """{'attention': ..., 'matmul': ...} (recorded by the benchmark)."""
    return {'attention': self.attention_impl, 'matmul': self.matmul_impl}

  @staticmethod
  def outputs_saveable(primitive, *args, **params) -> bool:
    """A remat policy term: keep what the CPU kernels compute as XLA's dots would be kept (the attention's out and
    log-sum-exp, which its backward pass reads, and the weight matmuls' outputs) rather than run them again."""
    return kernels.outputs_saveable(primitive, *args, **params)

  # A remat policy term: keep the einsum attention's probabilities.
  probs_saveable = staticmethod(jax.checkpoint_policies.save_only_these_names(ATTENTION_PROBS))


def _check_choice(setting: str, value: str, allowed: tuple) -> None:
  if value and value not in allowed:
    raise ValueError(f"{setting}={value!r}: use '' (automatic) or one of {', '.join(map(repr, allowed))}")


def _as_platforms(platforms) -> tuple:
  if platforms is None:
    return (jax.default_backend(),)
  return (platforms,) if isinstance(platforms, str) else tuple(platforms)


def kernels_suited(platforms: tuple, num_devices: int, dtype) -> bool:
  """Whether the kernels are the default: float32 on a single CPU device. XLA's SPMD partitioner does not know these
  custom calls and would run each one whole on every device of a mesh, so sharded runs keep XLA's own ops; a module
  lowered for several platforms (or for an accelerator) keeps them too, as the calls exist on CPU only."""
  return tuple(platforms) == ('cpu',) and num_devices == 1 and jnp.dtype(dtype) == jnp.float32


def default_implementations(dtype, platforms=None, num_devices: int | None = None,
                            custom_calls: bool = True) -> dict[str, str]:
  """What '' means for `attention_impl` / `matmul_impl` (arguments as for `resolve`)."""
  platforms = _as_platforms(platforms)
  num_devices = jax.device_count() if num_devices is None else num_devices
  if custom_calls and kernels_suited(platforms, num_devices, dtype) and kernels.available():
    return {'attention_impl': 'cpu_fused', 'matmul_impl': 'openblas'}
  return {'attention_impl': 'einsum' if 'cpu' in platforms else 'xla', 'matmul_impl': 'xla'}


def resolve(model_config=None, platforms=None, num_devices: int | None = None, custom_calls: bool = True,
            dtype=None) -> dict[str, str]:
  """The concrete `attention_impl` and `matmul_impl` for compiling `model_config` for `platforms`.

  Args:
    model_config: config.model; its `attention_impl` / `matmul_impl` ('' = automatic) are kept where given. None:
      both automatic, for `dtype`.
    platforms: the platform the step is compiled for ('cpu', 'cuda', 'rocm', 'tpu', or jax's 'gpu'), or a tuple of
      them for a module lowered for several (jax.export); None: this host's backend.
    num_devices: devices the step is partitioned over; None: every device JAX sees.
    custom_calls: False for a module that must run where this package is absent (the exported model): the CPU
      kernels' settings become XLA's ops that compute the same function.
    dtype: the compute dtype where `model_config` is None (default float32).
  Returns:
    {'attention_impl': ..., 'matmul_impl': ...}, never '': the CPU kernels ('cpu_fused', 'openblas') only for a
    single CPU device in float32 where they could be built; otherwise attention 'einsum' on CPU and 'xla'
    elsewhere, matmuls 'xla'.
  Raises:
    ValueError: an unknown setting, or a CPU kernel asked for explicitly while compiling for another platform.
  """
  platforms = _as_platforms(platforms)
  if model_config is None:
    chosen, dtype = {'attention_impl': '', 'matmul_impl': ''}, jnp.dtype(dtype or jnp.float32)
  else:
    chosen = {'attention_impl': model_config.attention_impl or '', 'matmul_impl': model_config.matmul_impl or ''}
    dtype = jnp.dtype(model_config.dtype)
  _check_choice('model.attention_impl', chosen['attention_impl'], ATTENTION_IMPLS)
  _check_choice('model.matmul_impl', chosen['matmul_impl'], MATMUL_IMPLS)
  for setting, value in chosen.items():
    if value and value == _CPU_ONLY[setting]:
      if not custom_calls:
        chosen[setting] = _PORTABLE[value]
      elif platforms != ('cpu',):
        raise ValueError(f'model.{setting}={value!r} runs on CPU only, and the step is compiled for '
                         f'{", ".join(platforms)}: leave it empty (the default picks per platform)')
  defaults = default_implementations(dtype, platforms, num_devices, custom_calls)
  return {setting: value or defaults[setting] for setting, value in chosen.items()}


def implementations(model_config=None, platforms=None, num_devices: int | None = None, custom_calls: bool = True,
                    dtype=None) -> Implementations:
  """The `Implementations` of `resolve` (same arguments)."""
  return Implementations(**resolve(model_config, platforms, num_devices, custom_calls, dtype))


def resolved_model_config(model_config, platforms=None, num_devices: int | None = None, custom_calls: bool = True):
  """A copy of `model_config` (ConfigDict or FrozenConfigDict, as given) with the implementations of `resolve`
  written in, so that tracing no longer depends on the host's backend."""
  import ml_collections  # pylint: disable=import-outside-toplevel  (only where steps are built)
  chosen = resolve(model_config, platforms, num_devices, custom_calls)
  frozen = isinstance(model_config, ml_collections.FrozenConfigDict)
  resolved = ml_collections.ConfigDict(model_config.as_configdict() if frozen else model_config.to_dict())
  resolved.update(chosen)
  return ml_collections.FrozenConfigDict(resolved) if frozen else resolved
