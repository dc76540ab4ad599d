"""Global arrays from host data: a process's part of a batch, and values every process holds."""

import jax
import numpy as np

from configs import default
from pconv_jax import input_pipeline, parallel


def test_global_batch_shards_over_the_data_axis():
  mesh = parallel.create_mesh()
  config = default.get_config().data
  config.update(source="demo", image_size=32)
  with input_pipeline.create_train_iter(config, global_batch_size=8, seed=0) as iterator:
    batch = next(iterator)
  global_batch = parallel.global_batch(batch, mesh)
  for key, array in global_batch.items():
    assert array.shape == batch[key].shape
    assert array.sharding.spec == jax.sharding.PartitionSpec("data")
    assert len(array.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(array), batch[key])


def test_host_values_replicated_or_split():
  mesh = parallel.create_mesh()
  tree = {"a": np.arange(16.0).reshape(8, 2), "b": [np.int32(3)]}
  replicated = parallel.replicate(tree, mesh)
  assert replicated["a"].sharding.is_fully_replicated and replicated["b"][0].shape == ()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(replicated), tree)
  split = parallel.global_arrays(tree["a"], parallel.batch_sharded(mesh))
  assert [shard.data.shape for shard in split.addressable_shards] == [(1, 2)] * 8
  np.testing.assert_array_equal(np.asarray(split), tree["a"])
