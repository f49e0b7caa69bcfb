"""Host allocator setting for training on XLA:CPU.

XLA:CPU allocates each step's temporary buffer (1.8 GB for the paper's model at batch 1) with `malloc` and frees it
when the step ends. glibc serves blocks that large with a fresh `mmap` and unmaps them on `free`, so every step
page-faults the whole buffer in again (~430k faults a step). Asking glibc to serve every block from its main heap
and to keep freed memory (`mallopt`) lets the next step reuse the same pages: no faults, a faster step on CPU
(BENCHMARKS.md). The price is that the process keeps its peak memory until it exits, and with some allocation
patterns (the paper's batch 8 on CPU) the heap fragments and keeps growing: hence opt-in.

Hand-written because `mallopt` is glibc's own interface and no Python library wraps it; it is called through
ctypes. Elsewhere (macOS, musl) this does nothing.
"""
import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import platform

import jax

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # for M_TRIM_THRESHOLD: never give freed memory back (man mallopt)


@functools.cache
def keep_freed_memory() -> bool:
  """Tells glibc to serve every block from its main heap and never return freed memory; True if it accepted.

  Affects the whole process. Call it before JAX starts its CPU client: threads pick their malloc arena when they
  first allocate, and a thread's own arena would still map large blocks afresh.
  """
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  return all([libc.mallopt(_M_ARENA_MAX, 1),              # every thread allocates from the main heap...
              libc.mallopt(_M_MMAP_MAX, 0),               # ...large blocks too, not fresh mappings...
              libc.mallopt(_M_TRIM_THRESHOLD, _NEVER)])   # ...and freed memory stays mapped for reuse


def requested_platforms() -> str:
  """JAX_PLATFORMS (or jax.config's jax_platforms): '' when JAX picks the platform itself."""
  return jax.config.jax_platforms or ''


def cpu_only() -> bool:
  """Whether JAX will run on CPU, decided without starting a backend (which would start its threads)."""
  platforms = requested_platforms()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  accelerator_plugins = list(importlib.metadata.entry_points(group='jax_plugins'))
  return not accelerator_plugins and importlib.util.find_spec('libtpu') is None


def configure(config) -> bool:
  """Applies `config.cpu_keep_freed_memory` when JAX will run on CPU; returns whether it is in effect."""
  if not config.get('cpu_keep_freed_memory', False) or not cpu_only():
    return False
  return keep_freed_memory()
