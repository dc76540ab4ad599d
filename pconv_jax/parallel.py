"""The device mesh and the two shardings the project uses: replicated state, batch split over `data`."""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(data_devices: int = -1) -> Mesh:
  """A one-axis data-parallel mesh: every device of every host (-1), or the first `data_devices` devices of a
  single-process job."""
  available = jax.device_count()
  size = available if data_devices == -1 else data_devices
  if not (size == available or (jax.process_count() == 1 and 0 < size <= available)):
    raise ValueError(f"config.mesh.data={data_devices}, but the job has {available} devices in "
                     f"{jax.process_count()} process(es): use -1 (all) or, in a single process, 1..{available}.")
  return jax.make_mesh((size,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:size])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
