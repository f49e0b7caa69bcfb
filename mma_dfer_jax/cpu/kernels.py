"""CPU kernels for the float32 train step on XLA:CPU (csrc/cpu_kernels.cc), built with the host's compiler at first use.

- `attention(qkv)`: a fused self-attention, (..., L, 3, H, d) -> (..., L, H, d). XLA:CPU has no fused attention
  and no library offers one as a JAX primitive; the einsum form's separate batched matmuls took about a fifth of a
  CPU train step of the paper's model (BENCHMARKS.md). Its custom VJP recomputes the probabilities from q, k and the
  saved log-sum-exp of each score row, flash-attention style.
- `dot_general`: Flax Dense's matmul through OpenBLAS (the scipy-openblas32 wheel), single-threaded sgemms on
  blocks of the output spread over XLA's intra-op pool; in the train step the encoders' weight matmuls ran at
  174-187 GFLOP/s on 2 cores against 125-153 for XLA:CPU's own (BENCHMARKS.md).

The library is compiled once per machine into a cache folder (MMA_DFER_JAX_CACHE, else ~/.cache/mma_dfer_jax),
keyed by its source, the compiler, jaxlib's and OpenBLAS's versions and the CPU, and loaded as XLA FFI targets.
Where it cannot be built, `available()` is False, the reason is logged once, and `implementations` picks XLA's own
ops instead.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).parent / 'csrc' / 'cpu_kernels.cc'
FORWARD_TARGET = 'mma_dfer_attention_forward'
BACKWARD_TARGET = 'mma_dfer_attention_backward'
MATMUL_TARGET = 'mma_dfer_matmul'
CACHE_ENV = 'MMA_DFER_JAX_CACHE'
COMPILER_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


def _compiler() -> str | None:
  return os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')


def _cache_dir() -> Path:
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'mma_dfer_jax')
  return Path(root) / 'kernels'


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU's flags, so a cache shared over NFS never serves another CPU."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _openblas():
  import scipy_openblas32  # pylint: disable=import-outside-toplevel  (only where the kernels are built)
  return scipy_openblas32


def _library_path(compiler: str) -> Path:
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), ' '.join(COMPILER_FLAGS).encode(), version.encode(), jaxlib.__version__.encode(),
               _openblas().get_openblas_config().encode(), _openblas().get_lib_dir().encode(),
               _cpu_signature().encode()):
    key.update(part)
  return _cache_dir() / f'cpu_kernels-{key.hexdigest()[:16]}.so'


def _build(compiler: str, target: Path) -> None:
  """Compiles into a temporary file and renames it into place, so concurrent processes never load a partial file."""
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    blas = _openblas()
    command = [compiler, *COMPILER_FLAGS, '-isystem', jax.ffi.include_dir(), '-isystem', blas.get_include_dir(),
               str(SOURCE), '-o', str(partial), f'-L{blas.get_lib_dir()}', f'-l{blas.get_library()}',
               f'-Wl,-rpath,{blas.get_lib_dir()}']
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f'{" ".join(command)} failed (exit {result.returncode}):\n{result.stderr[-4000:]}')
    os.replace(partial, target)


@functools.cache
def _load() -> str | None:
  """Builds (once per machine) and registers the kernels; returns None when ready, else why they are not."""
  compiler = _compiler()
  if compiler is None:
    return 'no C++ compiler found (set CXX, or install g++)'
  try:
    library_path = _library_path(compiler)
    if not library_path.exists():
      logging.info('Building the CPU kernels (attention, OpenBLAS matmul) with %s into %s', compiler, library_path)
      _build(compiler, library_path)
    library = ctypes.cdll.LoadLibrary(str(library_path))
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.MmaDferAttentionForward), platform='cpu')
    jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(library.MmaDferAttentionBackward), platform='cpu')
    jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(library.MmaDferMatmul), platform='cpu')
    library.MmaDferInitBlas()
  except (ImportError, OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
    return str(e)
  return None


def available() -> bool:
  """Whether the kernels are built and registered; logs the reason once where they cannot be."""
  reason = _load()
  if reason is not None:
    _warn_unavailable(reason)
  return reason is None


@functools.cache
def _warn_unavailable(reason: str) -> None:
  logging.warning('CPU kernels unavailable, using XLA:CPU\'s own attention and matmuls instead: %s', reason)


def _forward_call(qkv: jax.Array) -> tuple[jax.Array, jax.Array]:
  *batch, length, _, heads, head_dim = qkv.shape
  out = jax.ShapeDtypeStruct((*batch, length, heads, head_dim), jnp.float32)
  lse = jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32)
  return jax.ffi.ffi_call(FORWARD_TARGET, (out, lse), vmap_method='broadcast_all')(qkv)


@jax.custom_vjp
def attention(qkv: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for qkv of shape (..., L, 3, H, d), float32, on CPU; returns (..., L, H, d)."""
  return _forward_call(qkv)[0]


def _attention_forward(qkv):
  out, lse = _forward_call(qkv)
  return out, (qkv, out, lse)


def _attention_backward(residuals, d_out):
  qkv, out, lse = residuals
  d_qkv = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
  return (jax.ffi.ffi_call(BACKWARD_TARGET, d_qkv, vmap_method='broadcast_all')(qkv, out, lse, d_out),)


attention.defvjp(_attention_forward, _attention_backward)


def outputs_saveable(primitive, *_, **params) -> bool:
  """A remat policy term: keep what these kernels compute as XLA's dots would be kept (the attention's out and lse,
  which its backward pass reads, and the weight matmuls' outputs), rather than recompute them in the backward pass."""
  return primitive.name == 'ffi_call' and params.get('target_name') in (FORWARD_TARGET, MATMUL_TARGET)


def _matmul_call(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
  """op(a) @ op(b) for a of shape (..., n) taken as a matrix (leading dimensions flattened) and b a matrix."""
  rows = (a.shape[-1],) if transpose_a else a.shape[:-1]
  out = jax.ShapeDtypeStruct((*rows, b.shape[0] if transpose_b else b.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(MATMUL_TARGET, out, vmap_method='sequential')(
      a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w for x (..., K) and w (K, N), float32, through OpenBLAS."""
  return _matmul_call(x, w, False, False)


def _matmul_forward(x, w):
  return _matmul_call(x, w, False, False), (x, w)


def _matmul_backward(residuals, dy):
  x, w = residuals
  dx = _matmul_call(dy, w, False, True)  # dy @ w^T
  # x^T @ dy: for a frozen w nothing reads it, and XLA removes the call.
  dw = _matmul_call(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), True, False)
  return dx, dw


matmul.defvjp(_matmul_forward, _matmul_backward)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general for Flax's Dense: its (..., K) x (K, N) float32 case through OpenBLAS, the rest through XLA."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and not lhs_batch
           and not rhs_batch and rhs.ndim == 2 and lhs.dtype == rhs.dtype == jnp.float32
           and preferred_element_type in (None, jnp.float32))
  if plain and available():
    return matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)
