"""The PConv U-Net of Liu et al. (ECCV 2018): an encoder and a decoder of PConv-BatchNorm-activation
blocks.

Variables are nested as `encoder/block_{i}/{conv,bn}` and `decoder/block_{i}/{conv,bn}` (i = 1 is
the level nearest the image), so the encoder's BatchNorm statistics are simply
`batch_stats['encoder']`.
"""

from collections.abc import Mapping, Sequence
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
      x = BatchNorm(use_running_average=not train or self.frozen_bn, dtype=self.dtype, name="bn")(x)
    if self.activation == "relu":
      x = nn.relu(x)
    elif self.activation == "leaky_relu":
      x = nn.leaky_relu(x, negative_slope=0.2)
    return x, mask


class Encoder(nn.Module):
  """Strided blocks; returns the (x, mask) of every level, level 0 being the input."""

  conv: ModuleDef
  features: Sequence[int]
  kernel_sizes: Sequence[int]
  frozen_bn: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, train: bool) -> list[tuple[Array, Array | None]]:
    levels = [(x, mask)]
    for i, (features, kernel_size) in enumerate(zip(self.features, self.kernel_sizes), start=1):
      x, mask = PConvBlock(
        self.conv,
        features,
        kernel_size,
        strides=2,
        use_bn=i > 1,
        activation="relu",
        frozen_bn=self.frozen_bn,
        dtype=self.dtype,
        name=f"block_{i}",
      )(x, mask, train)
      levels.append((x, mask))
    return levels


class Decoder(nn.Module):
  """Per level: upsample x2 (nearest), concatenate the encoder's skip (features and mask), 3x3
  block; the last block has a bias and no BN or activation. (The upsampling is the conv layer's
  `upsample_first`, so that a `kernels` implementation may convolve the upsampled block at its own
  resolution.)"""

  conv: ModuleDef
  features: Sequence[int]
  out_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, levels: list[tuple[Array, Array | None]], train: bool) -> Array:
    x, mask = levels[-1]
    for i in range(len(levels) - 1, 0, -1):
      skip_x, skip_mask = levels[i - 1]
      last = i == 1
      x, mask = PConvBlock(
        self.conv,
        self.out_channels if last else self.features[i - 2],
        3,
        strides=1,
        use_bn=not last,
        activation=None if last else "leaky_relu",
        use_bias=last,
        upsample_first=True,
        dtype=self.dtype,
        name=f"block_{i}",
      )([x, skip_x], [mask, skip_mask], train)
    return x


class PUNet(nn.Module):
  """The PConv U-Net. Defaults are the paper's 7-level network for 256x256 images; `depth=8` is its
  512 one.

  Called as `model.apply(variables, images, masks, train=False)` with images in [-1, 1] (NHWC) and
  masks NHWC with 1 = valid pixel, one channel or one per image channel. Returns images in [-1, 1]
  (tanh), float32 (float64 for float64 inputs).

  Attributes:
    depth: number of encoder (and decoder) levels; height and width must be multiples of 2**depth.
    features: encoder widths per level (default: the paper's, see `paper_features`).
    kernel_sizes: encoder kernel sizes per level (default: 7, 5, 5, 3, ...).
    out_channels: channels of the output image.
    partial: False builds the paper's "Conv" baseline: plain convolutions, the holes set to mid-grey
      (0 in [-1, 1]; the paper's 127.5).
    freeze_encoder_bn: the encoder's BatchNorm uses its running averages even when training.
    dtype: activation dtype, e.g. jnp.bfloat16; parameters and the mask path stay float32.
    kernels: the convolutions' implementation (`pconv_jax.kernels`).
  """

  depth: int = 7
  features: Sequence[int] | None = None
  kernel_sizes: Sequence[int] | None = None
  out_channels: int = 3
  partial: bool = True
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
    self.check_inputs(images, masks)
    masks = masks.astype(jnp.float32)
    x = images.astype(self.dtype or images.dtype)
    if not self.partial:
      x, masks = x * masks.astype(x.dtype), None
    conv = functools.partial(PartialConv, multi_channel=True) if self.partial else Conv
    conv = functools.partial(conv, dtype=self.dtype, kernels=self.kernels)
    levels = Encoder(
      conv, features, kernel_sizes, self.freeze_encoder_bn, self.dtype, name="encoder"
    )(x, masks, train)
    x = Decoder(conv, features, self.out_channels, self.dtype, name="decoder")(levels, train)
    return jnp.tanh(x.astype(jnp.promote_types(x.dtype, jnp.float32)))

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
  }
