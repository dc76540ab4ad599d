"""The device mesh, the two shardings the project uses (replicated state, batch split over `data`),
and global arrays made from host data."""

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"


def create_mesh(data_devices: int = -1) -> Mesh:
  """A one-axis data-parallel mesh: every device of every host (-1), or the first `data_devices`
  devices of a single-process job."""
  available = jax.device_count()
  size = available if data_devices == -1 else data_devices
  if not (size == available or (jax.process_count() == 1 and 0 < size <= available)):
    raise ValueError(
      f"config.mesh.data={data_devices}, but the job has {available} devices in "
      f"{jax.process_count()} process(es): use -1 (all) or, in a single process, 1..{available}."
    )
  return jax.make_mesh(
    (size,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:size]
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_arrays(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host values that every process holds in full -> global arrays laid out by `sharding`."""

  def to_global(value: Any) -> jax.Array:
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(to_global, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values that every process holds in full -> arrays replicated over `mesh`."""
  return global_arrays(tree, replicated(mesh))


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's part of a batch -> global arrays split over the data axis (in process order)."""
  sharding = batch_sharded(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()
  }
