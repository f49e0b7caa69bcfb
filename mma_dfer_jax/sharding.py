"""Every sharding decision in one place: the device mesh, how the state and the batches lie on it.

The global batch is split over the mesh's `data` axis (every device of every process); the train state is
replicated. Each process feeds only its own slice of every global batch; `global_batch` assembles the global array.
"""
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mma_dfer_jax import settings

DATA_AXIS = 'data'


def make_mesh(config) -> Mesh:
  """A 1-D mesh over `config.mesh.data` devices (-1: all of them, over every process)."""
  devices = jax.devices()
  settings.check_mesh(config, len(devices))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what='batch_size') -> None:
  settings.check_divisible(what, global_batch_size, mesh.size, jax.process_count())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's slice of a global batch -> global jax.Arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def state_sharding(state, mesh: Mesh):
  """Sharding of every leaf of the train state (replicated)."""
  return jax.tree_util.tree_map(lambda _: replicated(mesh), state)
