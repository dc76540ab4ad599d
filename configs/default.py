"""Shared defaults: the paper's recipe (Liu et al., ECCV 2018) for a 256x256 PConv U-Net.

Dataset configs import this module and override a few fields. Every size is global:
`optim.batch_size` is the batch over all devices and hosts.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The network (pconv_jax.models.PUNet). features/kernel_sizes: None means the paper's widths for
  # `depth`.
  config.model = ml_collections.ConfigDict()
  config.model.depth = 7
  config.model.features = ml_collections.config_dict.placeholder(tuple)
  config.model.kernel_sizes = ml_collections.config_dict.placeholder(tuple)
  config.model.partial = (
    True  # False: the paper's "Conv" baseline (plain convolutions, holes filled).
  )
  # The variants of published networks (pconv_jax.models.PUNet, pconv_jax.published); the defaults
  # are the paper's network. `python -m pconv_jax.convert` records them with converted weights.
  config.model.output_activation = "tanh"  # "tanh" | "linear" | "sigmoid"
  config.model.conv_bias = "last"  # Which convolutions have a bias: "last" | "without_bn" | "all".
  config.model.hole_bias = False  # The bias also where a window sees no valid input (Keras).
  config.model.first_bn = False  # BatchNorm also in the first encoder block.
  config.model.bn_epsilon = 1e-5
  config.model.head = False  # A 1x1 convolution after the decoder (PConv-Keras).
  # The range the weights were trained on: per-channel mean/std on [0, 1] (None: [-1, 1]), and the
  # channel order. The network maps [-1, 1] RGB into it and its outputs back.
  config.model.input_mean = ml_collections.config_dict.placeholder(tuple)
  config.model.input_std = ml_collections.config_dict.placeholder(tuple)
  config.model.channel_order = "RGB"
  config.model.dtype = (
    "float32"  # Activation dtype; "bfloat16" for mixed precision. Params stay float32.
  )
  # How convolutions, pooling and Gram matrices are computed (pconv_jax.kernels): "xla" (plain,
  # every backend), "cpu" (the CPU engine, CPU devices only) or "auto" (cpu on CPU meshes, else
  # xla).
  config.model.conv_impl = "auto"

  # Images and masks (pconv_jax.input_pipeline, pconv_jax.masks).
  config.data = ml_collections.ConfigDict()
  config.data.source = (
    "tfds"  # "tfds" | "folder" | "demo" (natural photos shipped inside installed packages).
  )
  config.data.tfds_name = (
    "places365_small"  # Prepared with file_format="array_record" (see README).
  )
  config.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  config.data.train_split = "train"  # tfds split; slices such as "train[:27000]" work.
  config.data.eval_split = "validation"
  config.data.image_key = "image"  # tfds feature holding the encoded image.
  # source="folder": training images.
  config.data.folder = ml_collections.config_dict.placeholder(str)
  # None: evaluate on `folder`.
  config.data.eval_folder = ml_collections.config_dict.placeholder(str)
  config.data.image_size = 256
  # None: crop at the stored resolution (images smaller than image_size are resized up). An int:
  # first resize the shorter side to this (>= image_size), e.g. 256 to train on whole 1024px
  # CelebA-HQ faces.
  config.data.resize_shorter_side = ml_collections.config_dict.placeholder(int)
  config.data.random_flip = True
  # Further augmentation, off for the paper: random multiples of 90 degrees, and crops of up to
  # max_zoom_out x image_size resized down to image_size.
  config.data.random_rotate90 = False
  config.data.max_zoom_out = 1.0
  config.data.worker_count = 0  # grain worker processes per host; 0 decodes in the main process.
  config.data.worker_buffer_size = 2  # Batches each worker (or the main process) prepares ahead.
  config.data.read_threads = (
    1  # Threads per process preparing batches ahead; 0: on demand, in order.
  )
  config.data.masks = ml_collections.ConfigDict()
  config.data.masks.source = "procedural"  # "procedural" | "nvidia"
  # NVIDIA Irregular Mask Dataset.
  config.data.masks.dir = ml_collections.config_dict.placeholder(str)
  config.data.masks.min_hole_ratio = 0.01
  config.data.masks.max_hole_ratio = 0.6
  # Evaluation masks: None generates the procedural per-bin sets; else NVIDIA's test masks or a
  # saved set.
  config.data.masks.test_dir = ml_collections.config_dict.placeholder(str)
  config.data.masks.border_margin = (
    0.0625  # Border-constrained eval masks: no hole within 1/16 of a side.
  )

  # The loss (pconv_jax.losses): the paper's weights; VGG-16 weights for the perceptual and style
  # terms.
  config.loss = ml_collections.ConfigDict()
  config.loss.valid = 1.0
  config.loss.hole = 6.0
  config.loss.perceptual = 0.05
  config.loss.style_out = 120.0
  config.loss.style_comp = 120.0
  config.loss.tv = 0.1
  # 1 - SSIM of the composite: not in the paper (0 keeps its loss); the CPU quality recipe uses it.
  config.loss.ssim = 0.0
  config.loss.vgg_weights = ml_collections.config_dict.placeholder(str)  # None: look in the cache.
  config.loss.require_vgg = (
    True  # False: without weights, train with perceptual/style off (demo only).
  )

  # Optimizer: Adam with the paper's global batch of 6.
  config.optim = ml_collections.ConfigDict()
  config.optim.batch_size = 6
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999

  # Two stages in one run (steps count from the start of the run). "initial": every BatchNorm
  # trains. "finetune": the encoder's BatchNorm statistics and scale/bias are frozen, the learning
  # rate drops.
  # The paper gives times, not steps (10 days initial, under a day fine-tuning on one V100): these
  # counts are ours.
  config.stages = ml_collections.ConfigDict()
  config.stages.initial_steps = 1_000_000
  config.stages.initial_lr = 2e-4
  config.stages.finetune_steps = 500_000
  config.stages.finetune_lr = 5e-5
  # "constant" (the paper) or "cosine": finetune_lr decays to 0 over the finetune stage.
  config.stages.finetune_schedule = "constant"
  # A checkpoint directory of a finished initial stage: a new run then starts directly in
  # "finetune".
  config.stages.finetune_from = ml_collections.config_dict.placeholder(str)

  # Device mesh: one data-parallel axis; -1 takes every device of every host.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1

  config.train = ml_collections.ConfigDict()
  config.train.log_every_steps = 100
  config.train.sample_every_steps = 5_000  # Sample grids (PNG and TensorBoard).
  config.train.num_samples = 4
  config.train.nonfinite = "stop"  # A non-finite loss: "stop" with an error, or "skip" the update.
  config.train.compilation_cache_dir = ml_collections.config_dict.placeholder(str)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5_000
  config.checkpoint.max_to_keep = 3

  # Evaluation (pconv_jax.evaluate): the paper's per-bin table for the newest checkpoint, with
  # baselines. Masks come from config.data.masks (procedural sets with and without border
  # constraint, or test_dir, e.g. NVIDIA's).
  config.eval = ml_collections.ConfigDict()
  config.eval.at_end = True  # Evaluate when a training run finishes.
  # Also during training, every N steps (and at step 0): the learning curve on the evaluation set
  # (PSNR/SSIM per bin, baselines as lines) to TensorBoard and <workdir>/eval/learning_curve.png.
  config.eval.every_steps = ml_collections.config_dict.placeholder(int)
  # None: the newest readable checkpoint.
  config.eval.step = ml_collections.config_dict.placeholder(int)
  config.eval.num_images = 1000  # Evenly spaced over the eval split; None: all of it.
  config.eval.masks_per_bin = (
    1000  # Per bin and mask set; a bin evaluates max(num_images, masks) pairs.
  )
  config.eval.batch_size = 64  # Global; rounded up to a multiple of the device count.
  config.eval.seed = 0  # Of the procedural evaluation masks (independent of the training seed).
  # Rows besides the model's; () for none.
  config.eval.baselines = ("telea", "navier_stokes", "mean_fill")
  config.eval.inception = (
    True  # IScore and FID columns (need Inception-v3 weights; n/a without them).
  )
  # None: look in the cache.
  config.eval.inception_weights = ml_collections.config_dict.placeholder(str)
  # The model's output averaged over the 8 flips and 90-degree turns (pconv_jax.self_ensemble).
  config.eval.self_ensemble = False
  config.eval.note = ml_collections.config_dict.placeholder(str)  # A line for the results' notes.

  return config
