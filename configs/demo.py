"""The built-in demo: the paper's 7-level network at 128x128 on natural photos shipped inside
scikit-image.

Runs in a few minutes on 2 CPU cores with no network, leaving checkpoints, logs, sample grids and an
evaluation table in the workdir. Without cached VGG-16 weights
(`python -m pconv_jax.vgg fetch torchvision`) it trains without the perceptual and style losses and
says so. A few CPU minutes show learning, not the paper's quality.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.source = "demo"
  config.data.image_size = 128
  config.loss.require_vgg = False
  config.optim.batch_size = 4
  config.stages.initial_steps = 300
  config.stages.finetune_steps = 100
  config.train.log_every_steps = 25
  config.train.sample_every_steps = 100
  config.checkpoint.every_steps = 100
  # Evaluation on the two held-out photos with 8 procedural masks per bin; IScore/FID mean nothing
  # on 16 images.
  config.eval.num_images = None
  config.eval.masks_per_bin = 8
  config.eval.batch_size = 16
  config.eval.inception = False
  config.eval.note = (
    "Demo model: 400 steps on 7 photos at 128x128 on a CPU. It shows learning, not the paper's "
    "quality: days of accelerator training on Places2 with the full loss are what compete "
    "with the classical baselines."
  )
  return config
