"""glibc keeps freed memory for reuse once cpu/host_memory says so, where there is room, with a guard against
growth; the CPU step hook the training loop calls drives it.

The glibc cases run in fresh processes, as the settings are global."""
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# Allocates 256 MiB and touches it, frees it, then allocates and touches it again; prints the page faults of each
# touch (with transparent huge pages always on, both counts shrink by 512x alike, so the test compares them).
_PROBE = r'''
import ctypes, resource, sys
sys.path.insert(0, sys.argv[1])
from mma_dfer_jax.cpu import host_memory
if sys.argv[2] == 'keep':
  assert host_memory.keep_freed_memory()
if sys.argv[2] == 'late':  # as in training: one heap from the start, freed memory kept once threads run
  assert host_memory.single_heap()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
def faults_of_touching_a_new_block():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(ctypes.c_size_t(size))
  ctypes.memset(block, 1, size)
  libc.free(ctypes.c_void_p(block))
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if sys.argv[2] == 'late':
  import threading
  faults = []
  def in_a_thread():
    faults_of_touching_a_new_block()             # the thread has allocated (and picked its arena) before...
    assert host_memory.keep_freed_memory()       # ...freed memory is kept
    faults.extend([faults_of_touching_a_new_block(), faults_of_touching_a_new_block()])
  worker = threading.Thread(target=in_a_thread)
  worker.start()
  worker.join()
  print(*faults)
else:
  print(faults_of_touching_a_new_block(), faults_of_touching_a_new_block())
'''


def _faults_of_two_allocations(mode):
  out = subprocess.run([sys.executable, '-c', _PROBE, str(ROOT), mode], capture_output=True, text=True, check=True)
  first, second = map(int, out.stdout.split()[-2:])
  return first, second


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc-only')
def test_freed_memory_is_reused_without_page_faults():
  first, second = _faults_of_two_allocations('default')
  assert second > first // 2                 # glibc maps a large block afresh each time
  first, second = _faults_of_two_allocations('keep')
  assert first > 0 and second <= first // 50  # the freed pages are reused


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc-only')
def test_freed_memory_kept_from_a_later_moment_in_another_thread():
  first, second = _faults_of_two_allocations('late')
  assert first > 0 and second <= first // 50


def test_configure_follows_the_setting_and_the_platform(monkeypatch):
  import ml_collections
  from mma_dfer_jax.cpu import host_memory
  monkeypatch.setattr(host_memory, 'single_heap', lambda: True)
  on, off = (ml_collections.ConfigDict({'cpu_keep_freed_memory': v}) for v in (True, False))
  monkeypatch.setattr(host_memory, 'requested_platforms', lambda: 'cuda,cpu')
  monkeypatch.setattr(host_memory, '_prepared', False)
  assert not host_memory.configure(on)
  monkeypatch.setattr(host_memory, 'requested_platforms', lambda: 'cpu')
  assert not host_memory.configure(off)
  assert host_memory.configure(on) and host_memory.step_keeper().prepared


GB = 10 ** 9


class _Machine:
  """Fake readings and glibc calls for StepMemoryKeeper."""

  def __init__(self, peak, resident, available):
    self.peak, self.resident, self.available = peak, resident, available
    self.calls = []

  def keeper(self, prepared=True):
    from mma_dfer_jax.cpu import host_memory
    return host_memory.StepMemoryKeeper(
        prepared, read_resident=lambda: self.resident, read_peak=lambda: self.peak,
        read_available=lambda: self.available, keep=lambda keep=True: self.calls.append(('keep', keep)) or True,
        release=lambda: self.calls.append(('release',)))


def test_keeper_keeps_freed_memory_where_there_is_room():
  machine = _Machine(peak=6 * GB, resident=2 * GB, available=18 * GB)  # a 4 GB step buffer
  keeper = machine.keeper()
  assert keeper.needs_finished_step
  keeper.after_step()
  assert keeper.active and machine.calls == [('keep', True)] and not keeper.needs_finished_step
  assert keeper.limit_bytes == int(6 * GB + 1.1 * 4 * GB)
  for resident in (6 * GB, 10 * GB):  # one kept buffer, then two (a heap that placed the next one beside it)
    machine.resident = resident
    keeper.after_step()
  assert machine.calls == [('keep', True)] and keeper.trims == 0


def test_keeper_does_not_keep_where_there_is_no_room():
  machine = _Machine(peak=15 * GB, resident=2.5 * GB, available=21 * GB)  # the paper's batch 8 on a 24 GB machine
  keeper = machine.keeper()
  keeper.after_step()
  keeper.after_step()
  assert not keeper.active and machine.calls == [] and keeper.decided


def test_keeper_counts_the_step_before_it_runs():
  machine = _Machine(peak=1 * GB, resident=1 * GB, available=12 * GB)
  keeper = machine.keeper()
  keeper.before_first_step(step_bytes=4 * GB)    # 5 + 4.4 GB limit, + 4 GB > 1 + 12 GB
  assert keeper.decided and not keeper.active
  keeper = machine.keeper()
  keeper.before_first_step(step_bytes=3 * GB)    # 4 + 3.3 GB limit, + 3 GB <= 13 GB
  assert keeper.active and keeper.limit_bytes == int(4 * GB + 1.1 * 3 * GB)


def test_keeper_hands_memory_back_when_the_heap_grows_and_stops_after_three_times():
  machine = _Machine(peak=4 * GB, resident=2 * GB, available=18 * GB)
  keeper = machine.keeper()
  keeper.after_step()
  machine.resident = 7 * GB   # past 4 + 1.1 x 2 GB
  keeper.after_step()
  keeper.after_step()
  assert keeper.active and keeper.trims == 2 and machine.calls[1:] == [('release',), ('release',)]
  keeper.after_step()
  assert not keeper.active and keeper.trims == 3 and machine.calls[-2:] == [('release',), ('keep', False)]
  keeper.after_step()         # nothing more once it stopped
  assert keeper.trims == 3 and len(machine.calls) == 5


def test_keeper_does_nothing_unless_prepared():
  machine = _Machine(peak=1 * GB, resident=1 * GB, available=100 * GB)
  keeper = machine.keeper(prepared=False)
  keeper.before_first_step(1 * GB)
  keeper.after_step()
  assert not keeper.active and not keeper.needs_finished_step and machine.calls == []


def test_readings_of_this_process_are_plausible():
  from mma_dfer_jax.cpu import host_memory
  resident = host_memory.resident_bytes()
  assert 10 * 2 ** 20 < resident <= host_memory.peak_resident_bytes() * 1.01
  assert host_memory.available_bytes() > 0


def test_the_step_hook_waits_for_a_step_only_where_the_keeper_decides(monkeypatch):
  """The training loop's one call, `hook.after_step(outputs)`: it blocks on the outputs once (the keeper's first
  decision reads the finished step's memory), never after; the benchmark's record reads its summary."""
  import jax
  from mma_dfer_jax import cpu
  machine = _Machine(peak=6 * GB, resident=2 * GB, available=18 * GB)
  waited = []
  monkeypatch.setattr(jax, 'block_until_ready', waited.append)
  hook = cpu.step_hook()
  hook._keeper = machine.keeper()  # pylint: disable=protected-access
  for step in range(3):
    hook.after_step(f'outputs of step {step}')
  assert waited == ['outputs of step 0'] and machine.calls == [('keep', True)]
  assert hook.summary() == {'cpu_keep_freed_memory': True, 'cpu_freed_memory_trims': 0}

  class Compiled:  # XLA's memory analysis of a compiled step: the keeper decides before the first step
    def memory_analysis(self):
      return type('Analysis', (), {'temp_size_in_bytes': 4 * GB})()
  hook._keeper = _Machine(peak=1 * GB, resident=1 * GB, available=12 * GB).keeper()  # pylint: disable=protected-access
  hook.before_first_step(Compiled())
  hook.after_step('first step')
  assert waited == ['outputs of step 0'] and hook.summary()['cpu_keep_freed_memory'] is False
