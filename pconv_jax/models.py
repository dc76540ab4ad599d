"""The PConv U-Net of Liu et al. (ECCV 2018): an encoder and a decoder of PConv-BatchNorm-activation
blocks.

Variables are nested as `encoder/block_{i}/{conv,bn}` and `decoder/block_{i}/{conv,bn}` (i = 1 is
the level nearest the image), so the encoder's BatchNorm statistics are simply
`batch_stats['encoder']`.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pconv_jax.batch_norm import BatchNorm
from pconv_jax.kernels import XLA, Kernels
from pconv_jax.layers import Conv, PartialConv

Array = jax.Array
ModuleDef = Any


def paper_features(depth: int) -> tuple[int, ...]:
  """Encoder widths of the paper's network: 64, 128, 256, 512, then 512 for every further level."""
  return ((64, 128, 256) + (512,) * depth)[:depth]


def paper_kernel_sizes(depth: int) -> tuple[int, ...]:
  """Encoder kernel sizes of the paper's network: 7, 5, 5, then 3 for every further level."""
  return ((7, 5, 5) + (3,) * depth)[:depth]


OUTPUT_ACTIVATIONS = ("tanh", "linear", "sigmoid")
CONV_BIAS_RULES = ("last", "without_bn", "all")
CHANNEL_ORDERS = ("RGB", "BGR")


class PConvBlock(nn.Module):
  """`conv` (PartialConv, or the baseline's Conv), optional BatchNorm,
  optional activation. Returns (x, mask)."""

  conv: ModuleDef
  features: int
  kernel_size: int
  strides: int
  use_bn: bool = True
  activation: str | None = "relu"  # "relu" | "leaky_relu" | None
  use_bias: bool = False
  frozen_bn: bool = False
  upsample_first: bool = False
  bn_epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(
    self, x: Array | list[Array], mask: Array | None | list[Array | None], train: bool
  ) -> tuple[Array, Array | None]:
    x, mask = self.conv(
      self.features,
      self.kernel_size,
      self.strides,
      self.kernel_size // 2,
      use_bias=self.use_bias,
      upsample_first=self.upsample_first,
      name="conv",
    )(x, mask)
    if self.use_bn:
      x = BatchNorm(
        use_running_average=not train or self.frozen_bn,
        epsilon=self.bn_epsilon,
        dtype=self.dtype,
        name="bn",
      )(x)
    if self.activation == "relu":
      x = nn.relu(x)
    elif self.activation == "leaky_relu":
      x = nn.leaky_relu(x, negative_slope=0.2)
    return x, mask


def _has_bias(rule: str, use_bn: bool, last: bool) -> bool:
  """Whether a block's convolution has a bias under `PUNet.conv_bias`."""
  return {"last": last, "without_bn": not use_bn, "all": True}[rule]


class Encoder(nn.Module):
  """Strided blocks; returns the (x, mask) of every level, level 0 being the input."""

  block: ModuleDef  # PConvBlock with its conv, BatchNorm epsilon and dtype set.
  features: Sequence[int]
  kernel_sizes: Sequence[int]
  conv_bias: str = "last"
  first_bn: bool = False
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, train: bool) -> list[tuple[Array, Array | None]]:
    levels = [(x, mask)]
    for i, (features, kernel_size) in enumerate(zip(self.features, self.kernel_sizes), start=1):
      use_bn = i > 1 or self.first_bn
      x, mask = self.block(
        features=features,
        kernel_size=kernel_size,
        strides=2,
        use_bn=use_bn,
        activation="relu",
        use_bias=_has_bias(self.conv_bias, use_bn, last=False),
        frozen_bn=self.frozen_bn,
        name=f"block_{i}",
      )(x, mask, train)
      levels.append((x, mask))
    return levels


class Decoder(nn.Module):
  """Per level: upsample x2 (nearest), concatenate the encoder's skip (features and mask), 3x3
  block; the last block has no BN and no activation (LeakyReLU when `last_activation`). (The
  upsampling is the conv layer's `upsample_first`, so that a `kernels` implementation may convolve
  the upsampled block at its own resolution.)"""

  block: ModuleDef
  features: Sequence[int]
  out_channels: int
  conv_bias: str = "last"
  last_activation: bool = False

  @nn.compact
  def __call__(self, levels: list[tuple[Array, Array | None]], train: bool) -> Array:
    x, mask = levels[-1]
    for i in range(len(levels) - 1, 0, -1):
      skip_x, skip_mask = levels[i - 1]
      last = i == 1
      x, mask = self.block(
        features=self.out_channels if last else self.features[i - 2],
        kernel_size=3,
        strides=1,
        use_bn=not last,
        activation="leaky_relu" if not last or self.last_activation else None,
        use_bias=_has_bias(self.conv_bias, use_bn=not last, last=last),
        upsample_first=True,
        name=f"block_{i}",
      )([x, skip_x], [mask, skip_mask], train)
    return x


class PUNet(nn.Module):
  """The PConv U-Net. Defaults are the paper's 7-level network for 256x256 images; `depth=8` is its
  512 one.

  Called as `model.apply(variables, images, masks, train=False)` with images in [-1, 1] RGB (NHWC)
  and masks NHWC with 1 = valid pixel, one channel or one per image channel. Returns images in
  [-1, 1] RGB, float32 (float64 for float64 inputs).

  The fields after `partial` describe the published networks of other projects (see
  `pconv_jax.published`); their defaults are the paper's network. `input_mean`/`input_std` and
  `channel_order` are the value range the weights were trained on: the network maps [-1, 1] RGB
  into it and its output back, so that every caller sees [-1, 1] RGB whatever the weights.

  Attributes:
    depth: number of encoder (and decoder) levels; height and width must be multiples of 2**depth.
    features: encoder widths per level (default: the paper's, see `paper_features`).
    kernel_sizes: encoder kernel sizes per level (default: 7, 5, 5, 3, ...).
    out_channels: channels of the output image.
    partial: False builds the paper's "Conv" baseline: plain convolutions, the holes set to mid-grey
      (0 in [-1, 1]; the paper's 127.5).
    output_activation: "tanh" (the paper), "linear" or "sigmoid", applied to the last layer.
    conv_bias: which convolutions have a bias: "last" (the last decoder block, the paper's),
      "without_bn" (every block without BatchNorm) or "all".
    hole_bias: the bias is added also where a window has no valid input (PConv-Keras' layer).
    first_bn: BatchNorm also in the first encoder block.
    bn_epsilon: BatchNorm's epsilon (PyTorch's 1e-5; Keras' is 1e-3).
    head: the last decoder block keeps the decoder's LeakyReLU and a 1x1 convolution with a bias
      (variables `head`) makes the output (PConv-Keras).
    input_mean, input_std: per-channel mean and standard deviation on the [0, 1] scale that the
      inputs were normalised with and the outputs are un-normalised with (e.g. ImageNet's); None:
      [-1, 1] (the paper's tanh range).
    channel_order: "RGB", or "BGR" for weights trained on OpenCV's channel order.
    freeze_encoder_bn: the encoder's BatchNorm uses its running averages even when training.
    dtype: activation dtype, e.g. jnp.bfloat16; parameters and the mask path stay float32.
    kernels: the convolutions' implementation (`pconv_jax.kernels`).
  """

  depth: int = 7
  features: Sequence[int] | None = None
  kernel_sizes: Sequence[int] | None = None
  out_channels: int = 3
  partial: bool = True
  output_activation: str = "tanh"
  conv_bias: str = "last"
  hole_bias: bool = False
  first_bn: bool = False
  bn_epsilon: float = 1e-5
  head: bool = False
  input_mean: Sequence[float] | None = None
  input_std: Sequence[float] | None = None
  channel_order: str = "RGB"
  freeze_encoder_bn: bool = False
  dtype: Any = None
  kernels: Kernels = XLA

  @property
  def size_multiple(self) -> int:
    return 2**self.depth

  @nn.compact
  def __call__(self, images: Array, masks: Array, train: bool = False) -> Array:
    features = tuple(self.features or paper_features(self.depth))
    kernel_sizes = tuple(self.kernel_sizes or paper_kernel_sizes(self.depth))
    if len(features) != self.depth or len(kernel_sizes) != self.depth:
      raise ValueError(
        f"PUNet(depth={self.depth}) needs {self.depth} features and kernel sizes, "
        f"got features={features} and kernel_sizes={kernel_sizes}"
      )
    self.check_variant()
    self.check_inputs(images, masks)
    masks = masks.astype(jnp.float32)
    images, masks = self._to_network_range(images), self._to_channel_order(masks)
    x = images.astype(self.dtype or images.dtype)
    if not self.partial:
      x, masks = x * masks.astype(x.dtype), None
    conv = (
      functools.partial(PartialConv, multi_channel=True, hole_bias=self.hole_bias)
      if self.partial
      else Conv
    )
    conv = functools.partial(conv, dtype=self.dtype, kernels=self.kernels)
    block = functools.partial(PConvBlock, conv, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    levels = Encoder(
      block,
      features,
      kernel_sizes,
      self.conv_bias,
      self.first_bn,
      self.freeze_encoder_bn,
      name="encoder",
    )(x, masks, train)
    x = Decoder(block, features, self.out_channels, self.conv_bias, self.head, name="decoder")(
      levels, train
    )
    if self.head:
      x, _ = Conv(self.out_channels, 1, dtype=self.dtype, kernels=self.kernels, name="head")(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x = {"tanh": jnp.tanh, "linear": lambda y: y, "sigmoid": nn.sigmoid}[self.output_activation](x)
    return self._to_model_range(x)

  def _to_channel_order(self, x: Array) -> Array:
    """RGB <-> the network's channel order (one-channel masks unchanged)."""
    return x[..., ::-1] if self.channel_order == "BGR" and x.shape[-1] > 1 else x

  def _to_network_range(self, images: Array) -> Array:
    """[-1, 1] RGB images -> the value range and channel order the weights were trained on."""
    if self.input_mean is not None:
      mean, std = jnp.asarray(self.input_mean), jnp.asarray(self.input_std)
      images = ((images + 1.0) * 0.5 - mean.astype(images.dtype)) / std.astype(images.dtype)
    return self._to_channel_order(images)

  def _to_model_range(self, outputs: Array) -> Array:
    """The network's outputs (in its value range and channel order) -> [-1, 1] RGB."""
    outputs = self._to_channel_order(outputs)
    if self.input_mean is not None:
      mean, std = jnp.asarray(self.input_mean), jnp.asarray(self.input_std)
      outputs = (outputs * std.astype(outputs.dtype) + mean.astype(outputs.dtype)) * 2.0 - 1.0
    return outputs

  def check_variant(self) -> None:
    """Raises a ValueError naming a variant field with a value PUNet does not know."""
    choices = {
      "output_activation": OUTPUT_ACTIVATIONS,
      "conv_bias": CONV_BIAS_RULES,
      "channel_order": CHANNEL_ORDERS,
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"PUNet.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if (self.input_mean is None) != (self.input_std is None):
      raise ValueError("PUNet.input_mean and input_std are set together (or both left None)")
    for name in ("input_mean", "input_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.out_channels:
        raise ValueError(
          f"PUNet.{name} needs one value per image channel ({self.out_channels}), got {value}"
        )

  def check_inputs(self, images: Array, masks: Array) -> None:
    """Raises a ValueError saying what is wrong with the shapes of `images` and `masks`."""
    if images.ndim != 4:
      raise ValueError(
        f"images must be NHWC (batch, height, width, channels), got shape {images.shape}"
      )
    _, height, width, channels = images.shape
    if (
      masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[-1] not in (1, channels)
    ):
      raise ValueError(
        f"masks must be NHWC with the images' batch, height and width and 1 or {channels} "
        f"channels (1 = valid pixel, 0 = hole); got masks {masks.shape} for images {images.shape}"
      )
    m = self.size_multiple
    if height % m or width % m:
      raise ValueError(
        f"PUNet(depth={self.depth}) takes heights and widths that are multiples of {m} ({m}, "
        f"{2 * m}, {3 * m}, {4 * m}, ...); got {height}x{width}. Resize the image, or pad it to "
        f"{-(-height // m) * m}x{-(-width // m) * m} and mark the padding as hole."
      )


# The fields of PUNet that describe published networks (besides depth, widths and kernel sizes).
VARIANT_FIELDS = (
  "output_activation",
  "conv_bias",
  "hole_bias",
  "first_bn",
  "bn_epsilon",
  "head",
  "input_mean",
  "input_std",
  "channel_order",
)


def variant(config: Mapping[str, Any]) -> dict[str, Any]:
  """The variant fields of a model config (PUNet's defaults where absent), sequences as tuples."""
  fields = {field.name: field for field in dataclasses.fields(PUNet)}
  values = {name: config.get(name, fields[name].default) for name in VARIANT_FIELDS}
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}


def create_model(config: Mapping[str, Any], *, kernels: Kernels = XLA, **overrides: Any) -> PUNet:
  """A PUNet from a `config.model` section or the model dict stored with a checkpoint, computed with
  `kernels` (`pconv_jax.kernels.select`)."""
  features, kernel_sizes = config.get("features"), config.get("kernel_sizes")
  kwargs = dict(
    depth=config["depth"],
    features=None if features is None else tuple(features),
    kernel_sizes=None if kernel_sizes is None else tuple(kernel_sizes),
    partial=config.get("partial", True),
    dtype=jnp.dtype(config.get("dtype", "float32")),
    kernels=kernels,
    **variant(config),
  )
  return PUNet(**(kwargs | overrides))


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
  """What fixes a model config's variables and meaning (not its dtype):
  for checking checkpoints against configs."""
  depth = config["depth"]
  return {
    "depth": depth,
    "features": list(config.get("features") or paper_features(depth)),
    "kernel_sizes": list(config.get("kernel_sizes") or paper_kernel_sizes(depth)),
    "partial": bool(config.get("partial", True)),
    **{k: list(v) if isinstance(v, tuple) else v for k, v in variant(config).items()},
  }
