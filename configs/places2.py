"""Places2 (tfds `places365_small`, 256x256) with the paper's 7-level network and recipe.

Variants (`--config configs/places2.py:VARIANT`):
  hires: the paper's 512x512 8-level network, trained on a folder of your own high-resolution images
         (set --config.data.folder=DIR).
"""

import ml_collections

from configs import default


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.source = "tfds"
  config.data.tfds_name = "places365_small"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = 256
  if variant == "hires":
    config.model.depth = 8
    config.data.source = "folder"
    config.data.image_size = 512
  elif variant is not None:
    raise ValueError(f"Unknown variant {variant!r} of configs/places2.py; the only one is 'hires'.")
  return config
