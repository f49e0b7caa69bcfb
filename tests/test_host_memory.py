"""glibc keeps freed memory for reuse once host_memory says so (each case in a fresh process, as it is global)."""
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
if sys.argv[2] == 'keep':
  from mma_dfer_jax import host_memory
  assert host_memory.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
def faults_of_touching_a_new_block():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(ctypes.c_size_t(size))
  ctypes.memset(block, 1, size)
  libc.free(ctypes.c_void_p(block))
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
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


def test_configure_follows_the_setting_and_the_platform(monkeypatch):
  import ml_collections
  from mma_dfer_jax import host_memory
  monkeypatch.setattr(host_memory, 'keep_freed_memory', lambda: True)
  on, off = (ml_collections.ConfigDict({'cpu_keep_freed_memory': v}) for v in (True, False))
  monkeypatch.setattr(host_memory, 'requested_platforms', lambda: 'cpu')
  assert host_memory.configure(on) and not host_memory.configure(off)
  monkeypatch.setattr(host_memory, 'requested_platforms', lambda: 'cuda,cpu')
  assert not host_memory.configure(on)
