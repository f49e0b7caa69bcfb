"""CPU speed work in a room of its own: what makes the float32 train step fast on XLA:CPU.

Inside: fused attention and OpenBLAS matmul kernels as XLA FFI custom calls (`kernels.py`, `csrc/`), glibc's
allocator kept from page-faulting each step's buffer in anew (`host_memory.py`), and the reference recipe's step
timed beside ours by the benchmark (`reference_timing.py`). docs/ and BENCHMARKS.md have the measurements.

The rest of the package sees two things only:

1. The implementation choice, made once for the platform a step is compiled for: `implementations(model_config,
   platforms, ...)` gives the blocks an object to ask for `attention(qkv)` and the Dense layers' `dot_general`;
   `resolved_model_config` writes that choice into config.model (`model.attention_impl` / `model.matmul_impl`) so
   that tracing no longer depends on the host.
2. A step hook the training loop calls without knowing what it does: `prepare_host(config)` before JAX starts its
   CPU client, then `hook = step_hook()`, `hook.before_first_step(compiled)` where the compiled step is at hand, and
   `hook.after_step(outputs)` after every step.
"""
import jax

from mma_dfer_jax.cpu import host_memory
from mma_dfer_jax.cpu.choice import Implementations  # noqa: F401
from mma_dfer_jax.cpu.choice import implementations  # noqa: F401
from mma_dfer_jax.cpu.choice import resolved_model_config  # noqa: F401


def prepare_host(config) -> None:
  """Before JAX starts its CPU client (launch.py, the benchmark): with `config.cpu_keep_freed_memory` on XLA:CPU,
  glibc serves every thread from its main heap, so that the step hook may later keep freed memory for reuse."""
  host_memory.configure(config)


class StepHook:
  """What the CPU speed work needs around the train steps (today: glibc keeps freed host memory for reuse where the
  machine has room, with a guard against heap growth; nothing where `prepare_host` did not prepare it)."""

  def __init__(self):
    self._keeper = host_memory.step_keeper()

  def before_first_step(self, compiled=None) -> None:
    """Optional, with the compiled step: decides from XLA's memory analysis before the first step runs."""
    if compiled is not None:
      self._keeper.before_first_step(_temp_bytes(compiled))

  def after_step(self, outputs) -> None:
    """After each step, with its outputs (waited for only where the hook must read the finished step's memory)."""
    if self._keeper.needs_finished_step:
      jax.block_until_ready(outputs)
    self._keeper.after_step()

  def summary(self) -> dict:
    """For the benchmark's record: whether freed memory is kept now, and how often the guard handed it back."""
    return {'cpu_keep_freed_memory': self._keeper.active, 'cpu_freed_memory_trims': self._keeper.trims}


def step_hook() -> StepHook:
  return StepHook()


def _temp_bytes(compiled) -> int:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return 0
