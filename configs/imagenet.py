"""ImageNet (tfds `imagenet2012`, prepared from the manually downloaded
archives) at 256x256, the paper's recipe."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.source = "tfds"
  config.data.tfds_name = "imagenet2012"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = 256
  return config
