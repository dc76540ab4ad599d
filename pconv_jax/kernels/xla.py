"""The plain path: every operation as XLA's own primitive, as the paper defines it.

Correct on every backend, and what GPUs and TPUs always run (their compilers already choose good
convolution algorithms). The CPU engine (`kernels.cpu`) computes the same values faster on XLA:CPU.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
# 'SAME', 'VALID' or ((top, bottom), (left, right)), as `lax.conv_general_dilated` takes it.
Padding = str | Sequence[tuple[int, int]]

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def upsample2x(x: Array) -> Array:
  """Nearest-neighbour x2 upsampling of an NHWC array (PyTorch's `interpolate(scale_factor=2)`)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@dataclasses.dataclass(frozen=True)
class XlaKernels:
  """The heavy operations of the network and the loss; every implementation has these methods."""

  def conv2d(
    self,
    x: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: Padding,
    dilation: tuple[int, int] = (1, 1),
    precision: Any = None,
    preferred_element_type: Any = None,
  ) -> Array:
    """Convolution of NHWC `x` with the HWIO `kernel`."""
    return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=strides,
      padding=padding,
      rhs_dilation=dilation,
      dimension_numbers=DIMENSION_NUMBERS,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )

  def upsampled_conv2d(
    self,
    low: Array,
    rest: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: Padding,
    dilation: tuple[int, int] = (1, 1),
    precision: Any = None,
  ) -> Array:
    """A U-Net decoder's convolution: `low` upsampled x2, concatenated with `rest`, convolved."""
    upsampled = jnp.concatenate([upsample2x(low), rest], axis=-1)
    return self.conv2d(upsampled, kernel, strides, padding, dilation, precision)

  def max_pool_2x2(self, x: Array) -> Array:
    """2x2, stride-2 max pooling (an odd last row or column is dropped)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")

  def feature_products(self, features: Array) -> Array:
    """features^T features per image, (B, C, C) from (B, H, W, C), in float32 or wider."""
    return jnp.einsum(
      "bhwc,bhwd->bcd",
      features,
      features,
      precision=lax.Precision.HIGHEST,
      preferred_element_type=jnp.promote_types(features.dtype, jnp.float32),
    )
