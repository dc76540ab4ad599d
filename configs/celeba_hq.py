"""CelebA-HQ at 256x256 (tfds `celeb_a_hq/256`, prepared from the manually downloaded files) with
the paper's recipe. The paper's initial stage took 3 days on one V100, a third of Places2's, hence
fewer steps."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.source = "tfds"
  config.data.tfds_name = "celeb_a_hq/256"
  config.data.train_split = (
    "train[:-2000]"  # CelebA-HQ has one split: hold out its last 2000 images.
  )
  config.data.eval_split = "train[-2000:]"
  config.data.image_size = 256
  config.stages.initial_steps = 300_000
  config.stages.finetune_steps = 150_000
  return config
