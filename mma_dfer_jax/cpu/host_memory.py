"""Host allocator setting for training on XLA:CPU.

XLA:CPU allocates each step's temporary buffer (1.8 GB for the paper's model at batch 1) with `malloc` and frees it
when the step ends. glibc serves blocks that large with a fresh `mmap` and unmaps them on `free`, so every step
page-faults the whole buffer in again (~440k faults and seconds of system time a step). Asking glibc to serve every
block from its main heap and to keep freed memory (`mallopt`) lets the next step reuse the same pages: no faults, a
faster step on CPU (BENCHMARKS.md).

The price is memory: the process keeps its peak until it exits, and with some allocation patterns the heap
fragments and grows (the paper's batch 8 once grew past 24 GB with the setting on from the start). So it is done in
two stages, with a guard:

1. `configure(config)`, before JAX starts its CPU client: every thread allocates from glibc's main heap
   (`M_ARENA_MAX=1`; a thread with an arena of its own would map large blocks afresh whatever the later settings).
   Nothing is kept yet.
2. `StepMemoryKeeper.after_step()`, after each train step. After the first one it decides, from the process's
   peak so far and what it holds between steps (the difference is about one step's buffer). glibc's heap can end up
   holding two step buffers: the freed one, once a small allocation has taken its first bytes, no longer fits the
   next step's, which is then placed beside it (seen at batch 2: 5.8 GB after the first step, 9.3 GB from the
   second on, then stable). So the resident limit is the peak plus 1.1 buffers, and freed memory is kept only where
   the machine has room for that limit plus one more buffer (which a step may take before the check after it).
   When the resident memory grows past the limit, the freed pages are handed back (`malloc_trim`); after three
   such hand-backs freed memory is no longer kept.

Hand-written because `mallopt` and `malloc_trim` are glibc's own interface and no Python library wraps them; they
are called through ctypes. Elsewhere (macOS, musl) this does nothing.
"""
import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import logging
import os
import platform
import resource

import jax

# glibc's mallopt parameter numbers (malloc.h) and its defaults on 64-bit Linux (man mallopt).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1                        # for M_TRIM_THRESHOLD: never give freed memory back
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536

SECOND_BUFFER = 1.1  # the resident limit: the peak plus this many step buffers
MAX_TRIMS = 3        # after this many hand-backs, stop keeping freed memory


@functools.cache
def _glibc():
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return None
  return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')


@functools.cache
def single_heap() -> bool:
  """Tells glibc to serve every thread from its main heap; True if it accepted. Call before JAX starts."""
  libc = _glibc()
  return bool(libc and libc.mallopt(_M_ARENA_MAX, 1))


def keep_freed_memory(keep: bool = True) -> bool:
  """Large blocks from the heap (not fresh mappings) and freed memory kept for reuse; or glibc's defaults again."""
  libc = _glibc()
  if libc is None:
    return False
  if keep:
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER))
  return bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))


def release_freed_memory() -> None:
  """Hands the heap's free pages back to the system (they fault in again when next used)."""
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(ctypes.c_size_t(0))


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


_prepared = False


def configure(config) -> bool:
  """Stage 1 of `config.cpu_keep_freed_memory` when JAX will run on CPU; returns whether it is prepared."""
  global _prepared
  if config.get('cpu_keep_freed_memory', False) and cpu_only():
    _prepared = single_heap()
  return _prepared


# ---------------------------------------------------------------------------------------------------------------
# Readings of this process and machine (Linux).

def resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_resident_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def available_bytes() -> int:
  """What more this process may take: the kernel's MemAvailable, or less where a cgroup (container) limit says so."""
  available = None
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        available = int(line.split()[1]) * 1024
  try:
    with open('/sys/fs/cgroup/memory.max') as f_max, open('/sys/fs/cgroup/memory.current') as f_cur:
      limit = f_max.read().strip()
      if limit != 'max':
        room = int(limit) - int(f_cur.read())
        available = room if available is None else min(available, room)
  except (OSError, ValueError):
    pass
  return available if available is not None else 0


class StepMemoryKeeper:
  """Stage 2: decides after the first step whether freed memory is kept, then guards against heap growth.

  Call `after_step()` after every train step (the first call needs that step finished). The readings and glibc
  calls are attributes, so the policy can be tested without a process of that size.
  """

  def __init__(self, prepared: bool, read_resident=resident_bytes, read_peak=peak_resident_bytes,
               read_available=available_bytes, keep=keep_freed_memory, release=release_freed_memory):
    self.prepared = prepared
    self.read_resident, self.read_peak, self.read_available = read_resident, read_peak, read_available
    self.keep, self.release = keep, release
    self.decided = False
    self.active = False
    self.limit_bytes = None
    self.trims = 0

  @property
  def needs_finished_step(self) -> bool:
    """Whether the next `after_step` decides, and so must follow a finished step (block on it first)."""
    return self.prepared and not self.decided

  def before_first_step(self, step_bytes: int) -> None:
    """Decides before the first step where the step's memory is known (XLA's memory analysis of the compiled
    step), so that already the second step reuses the first one's pages."""
    if self.prepared and not self.decided:
      self._decide(step_bytes)

  def after_step(self) -> None:
    if not self.prepared:
      return
    if not self.decided:
      self._decide()
    elif self.active:
      resident = self.read_resident()
      if resident > self.limit_bytes:
        self._trim(resident)

  def _decide(self, step_bytes: int = 0) -> None:
    self.decided = True
    resident, available = self.read_resident(), self.read_available()
    peak = max(self.read_peak(), resident + step_bytes)
    step_buffer = peak - resident
    limit = int(peak + SECOND_BUFFER * step_buffer)
    if limit + step_buffer > resident + available:
      logging.info('Not keeping freed host memory: %.1f GB peak, %.1f GB between steps, %.1f GB available',
                   peak / 1e9, resident / 1e9, available / 1e9)
      return
    self.active = self.keep(True)
    self.limit_bytes = limit

  def _trim(self, resident: int) -> None:
    self.trims += 1
    self.release()
    if self.trims >= MAX_TRIMS:
      self.keep(False)
      self.active = False
      logging.warning('Host memory kept growing (%.1f GB resident): freed memory is no longer kept for reuse '
                      '(steps page-fault their buffers again; cpu_keep_freed_memory=False avoids this check)',
                      resident / 1e9)
    else:
      logging.warning('Host memory grew to %.1f GB (limit %.1f GB): freed pages handed back (%d of %d before keeping '
                      'stops)', resident / 1e9, self.limit_bytes / 1e9, self.trims, MAX_TRIMS)


def step_keeper() -> StepMemoryKeeper:
  """A keeper for this process's train loop, active only where `configure` prepared the heap."""
  return StepMemoryKeeper(_prepared)
