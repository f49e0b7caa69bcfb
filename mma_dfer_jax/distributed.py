"""Starting JAX's distributed runtime: on every cluster JAX knows, from explicit flags, or not at all.

`jax.distributed.initialize()` must run before anything touches a device, in every process of a multi-process job.
Which clusters JAX can bootstrap from on its own is JAX's knowledge, not ours: its `ClusterEnv` classes (TPU VM
pods through the GCE metadata server, GKE TPU through `TPU_WORKER_HOSTNAMES`, SLURM, Open MPI / mpirun,
Kubernetes with the `kubernetes` package) each say whether they are present. We ask them in JAX's own order and
start the runtime when one is present with more than one process; a single process (a laptop, one GPU host, a
one-host TPU VM, a one-task SLURM job) stays without it. Explicit `coordinator_address` / `num_processes` /
`process_id` (num_processes > 1) always start it; `num_processes=1` says "single process" and skips detection.

The TPU VM check reads no network off a TPU VM: JAX decides `running_in_cloud_tpu_vm` from the local TPU chips at
import, and queries the metadata server only where there are chips.
"""
import dataclasses
import logging
import os

import jax

# Where JAX's cluster detection changed place or shape, the environment variables that always meant a TPU pod.
_LEGACY_TPU_POD_VARIABLES = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')


class DistributedConfigError(ValueError):
  """Explicit settings that cannot start a multi-process job (a user error: one line)."""


@dataclasses.dataclass(frozen=True)
class Decision:
  """What `initialize` did: `started` and, when it did, from what ('flags' or the JAX cluster class's name)."""
  started: bool
  source: str | None = None
  num_processes: int | None = None


def _cluster_types() -> list | None:
  """JAX's cluster environments in its own detection order (opt-in ones left out), or None where JAX moved them."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    types = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return None
  return [env for env in types if not getattr(env, 'opt_in_only_method', False)]


def detect_cluster():
  """The first of JAX's cluster environments present here (a ClusterEnv subclass), else None."""
  for env in _cluster_types() or ():
    if env.is_env_present():
      return env
  return None


def _legacy_tpu_pod() -> bool:
  return any(os.environ.get(name) for name in _LEGACY_TPU_POD_VARIABLES)


def _process_count(env) -> int:
  try:
    return int(env.get_process_count())
  except Exception as e:  # pylint: disable=broad-except  (metadata server, Kubernetes API, malformed variables)
    raise DistributedConfigError(f'JAX detected a {env.__name__} job but could not read its process count '
                                 f'({type(e).__name__}: {e}); pass --num_processes=1 to run as one process') from e


def decide(coordinator_address=None, num_processes=None, process_id=None) -> Decision:
  """Whether to start the distributed runtime, without starting it (see the module docstring)."""
  if num_processes is not None:
    if num_processes < 1:
      raise DistributedConfigError(f'--num_processes={num_processes}: must be at least 1')
    if process_id is not None and not 0 <= process_id < num_processes:
      raise DistributedConfigError(f'--process_id={process_id}: must be in 0..{num_processes - 1} '
                                   f'(--num_processes={num_processes})')
    if num_processes == 1:
      return Decision(False, 'flags', 1)
  if _cluster_types() is None:
    logging.warning('jax %s has no jax._src.clusters.ClusterEnv; only explicit flags and the TPU pod variables %s '
                    'start jax.distributed', jax.__version__, ', '.join(_LEGACY_TPU_POD_VARIABLES))
    env = None
    if num_processes is None and _legacy_tpu_pod():
      return Decision(True, 'tpu_pod_variables')
  else:
    env = detect_cluster()
  if num_processes is not None:
    if env is None and (coordinator_address is None or process_id is None):
      raise DistributedConfigError(
          f'--num_processes={num_processes} needs --coordinator_address=HOST:PORT and --process_id on every '
          'process (no cluster that JAX can read them from was detected)')
    return Decision(True, 'flags', num_processes)
  if env is None:
    if coordinator_address is not None or process_id is not None:
      raise DistributedConfigError('--coordinator_address/--process_id need --num_processes (no cluster that JAX '
                                   'can read it from was detected)')
    return Decision(False)
  count = _process_count(env)
  return Decision(count > 1, env.__name__, count)


def initialize(coordinator_address=None, num_processes=None, process_id=None, cpu_collectives='gloo') -> Decision:
  """Start `jax.distributed` where the job has several processes (flags or a detected cluster); see `decide`.

  Call before any JAX computation. `cpu_collectives` ('gloo' or 'mpi', None: JAX's default) carries CPU
  collectives between processes. Missing explicit values are filled by JAX from the detected cluster.
  """
  if jax.distributed.is_initialized():
    return Decision(True, 'already_initialized')
  decision = decide(coordinator_address, num_processes, process_id)
  if not decision.started:
    return decision
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info('jax.distributed started from %s (%s processes)', decision.source,
               decision.num_processes or 'JAX-detected')
  return decision
