"""A tiny network on the demo photos for end-to-end tests: seconds per run on a CPU."""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.model.depth = 3
  config.model.features = (8, 16, 16)
  config.data.image_size = 32
  config.optim.batch_size = 8
  config.stages.initial_steps = 3
  config.stages.finetune_steps = 3
  config.train.log_every_steps = 1
  config.train.sample_every_steps = 3
  config.train.num_samples = 2
  config.checkpoint.every_steps = 1
  config.checkpoint.max_to_keep = 20
  config.eval.at_end = (
    False  # tests/test_evaluate.py covers evaluation; test_train enables it where needed.
  )
  return config
