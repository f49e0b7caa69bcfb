"""Decisions every process agrees on, and the one step at which all of them stop for a preemption.

On a pod each process runs the same loop and must take the same collective path: the same resume step, the same
epochs to evaluate, the same "fold finished". A process must never decide from a file another process wrote (a
bucket or NFS may show it late, or not at all where work directories are not shared): process 0 decides, and
`broadcast_json` hands its value to every process. One process alone is the degenerate case: nothing is sent.
"""
import json
import secrets
import signal

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

SHARED_PROBE = '.shared_workdir_probe'


def is_main_process() -> bool:
  return jax.process_index() == 0


def broadcast_json(value):
  """Process 0's `value` (anything json.dumps takes) on every process."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  padded = np.zeros(size, np.uint8)
  padded[:data.size] = data[:size]
  received = np.asarray(multihost_utils.broadcast_one_to_all(padded), np.uint8)
  return json.loads(received.tobytes().decode())


def all_processes(flag: bool) -> bool:
  """True where `flag` holds on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.bool_(flag))))


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_shared_workdir(workdir) -> bool:
  """Whether every process sees the files process 0 writes in `workdir` (checkpoints are written collectively and
  logs by process 0 only, so a work directory must be one shared place: a bucket or a shared disk). Always true
  for one process."""
  if jax.process_count() == 1:
    return True
  probe = epath.Path(workdir) / SHARED_PROBE
  token = broadcast_json(secrets.token_hex(8) if is_main_process() else None)
  if is_main_process():
    probe.write_text(token)
  sync('mma_dfer_shared_probe_written')
  try:
    seen = probe.exists() and probe.read_text() == token
  except OSError:
    seen = False
  shared = all_processes(seen)
  sync('mma_dfer_shared_probe_read')
  if is_main_process():
    probe.unlink(missing_ok=True)
  return shared


class PreemptionWatch:
  """`stop_now(step)`: whether every process should save at this step and exit.

  Several processes: JAX's preemption sync point (the coordination service notices SIGTERM on any process and
  names one step at which all of them answer True; it installs its own SIGTERM handler). One process: a SIGTERM
  flag set by a Python handler, restored by `close()`.
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    self._distributed = jax.process_count() > 1
    if not self._distributed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def stop_now(self, step: int) -> bool:
    if self._distributed:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
