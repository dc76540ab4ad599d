"""3x3 stride-1 'SAME' convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, CVPR
2016).

Each 4x4 tile of outputs is computed from the 6x6 tile of inputs around it with 36 multiplications
per (input, output) channel pair instead of 144: the input tiles are transformed (B^T d B), the
kernel too (G g G^T), the 36 transformed positions are 36 matrix products over the channels, and the
products are transformed back (A^T m A). The transforms are additions and multiplications by small
constants, so XLA runs them as element-wise passes over memory; the products then take a quarter of
the direct convolution's multiply-adds. On XLA:CPU this wins where the channels are many enough for
the products to outweigh the passes, one image at a time (whose transformed tiles stay in cache;
VGG-16's conv2 and conv3 blocks: 1.3-2.3x, benchmarks/RESULTS.md, optimisation 32). The result
differs from the direct convolution by float32 rounding only (relative error ~1e-5; in float64 it
equals the convolution's definition to 1e-12, tests/test_layers.py).
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TILE = 4  # Outputs per tile side; each reads TILE + 2 inputs.
TILE_POSITIONS = (TILE + 2) ** 2  # 36 transformed positions, one matrix product each.

# F(4x4, 3x3) at the interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray, section 4.2).
INPUT_TRANSFORM = np.array(
  [  # B^T
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
  ],
  np.float64,
)
KERNEL_TRANSFORM = np.array(
  [  # G
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
  ],
  np.float64,
)
OUTPUT_TRANSFORM = np.array(
  [  # A^T
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
  ],
  np.float64,
)


def is_faster(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], dtype: Any) -> bool:
  """Whether `conv3x3`, one image at a time, beats XLA:CPU's convolution for these shapes
  (RESULTS.md 32).

  The products' work per output grows with inputs x outputs / (inputs + outputs), the transforms'
  memory traffic with inputs + outputs: the products win from 43 (64 -> 128 channels at 128x128:
  1.5-1.7x; 64 -> 64 at 256x256 is 0.9x) at 32x32 outputs or more (1.2-2.3x measured up to 512
  channels).
  """
  _, height, width, _ = x_shape
  _, _, inputs, outputs = kernel_shape
  return (
    jnp.dtype(dtype) == jnp.float32
    and inputs * outputs >= 40 * (inputs + outputs)
    and height >= 32
    and width >= 32
  )


def _linear_combination(coefficients: np.ndarray, terms: list[Array]) -> Array:
  """sum_i coefficients[i] * terms[i], skipping zero coefficients
  and multiplying by none for +-1."""
  total = None
  for coefficient, term in zip(coefficients, terms):
    if coefficient == 0:
      continue
    term = term if abs(coefficient) == 1 else term * jnp.asarray(abs(coefficient), term.dtype)
    if total is None:
      total = term if coefficient > 0 else -term
    else:
      total = total + term if coefficient > 0 else total - term
  return total


def _taps(x: Array, axis: int, tiles: int) -> list[Array]:
  """The TILE + 2 inputs of every tile along `axis` (of length TILE * (tiles + 1)): tap j of tile t
  is element TILE * t + j. Views the axis as (tiles + 1, TILE) blocks, so each tap is a slice, not a
  strided gather."""
  blocks = x.reshape(x.shape[:axis] + (tiles + 1, TILE) + x.shape[axis + 1 :])

  def tap(block: int, j: int) -> Array:
    rows = lax.slice_in_dim(blocks, block, block + tiles, axis=axis)
    return lax.index_in_dim(rows, j, axis + 1, keepdims=False)

  return [tap(0, j) for j in range(TILE)] + [tap(1, j) for j in range(2)]


def conv3x3(x: Array, kernel: Array, precision: Any = None) -> Array:
  """`lax.conv_general_dilated(x, kernel, (1, 1), 'SAME')` for NHWC
  `x` and a (3, 3, C, K) HWIO `kernel`."""
  batch, height, width, inputs = x.shape
  outputs = kernel.shape[-1]
  rows, cols = -(-height // TILE), -(-width // TILE)
  # One zero row/column before (the 'SAME' padding), and enough after for rows + 1 whole blocks.
  padded = jnp.pad(
    x, ((0, 0), (1, TILE * (rows + 1) - height - 1), (1, TILE * (cols + 1) - width - 1), (0, 0))
  )
  by_row = _taps(padded, 1, rows)
  # (6, B, rows, W', C)
  transformed_rows = jnp.stack([_linear_combination(b, by_row) for b in INPUT_TRANSFORM])
  by_col = _taps(transformed_rows, 3, cols)
  # (6, 6, B, r, c, C)
  transformed = jnp.stack([_linear_combination(b, by_col) for b in INPUT_TRANSFORM], axis=1)
  transformed = transformed.reshape(TILE_POSITIONS, -1, inputs)

  kernel_transform = np.einsum("ki,lj->klij", KERNEL_TRANSFORM, KERNEL_TRANSFORM).reshape(
    TILE_POSITIONS, 9
  )
  kernel_transformed = lax.dot_general(
    jnp.asarray(kernel_transform, kernel.dtype),
    kernel.reshape(9, -1),
    (((1,), (0,)), ((), ())),
    precision=lax.Precision.HIGHEST,
  )
  products = lax.dot_general(
    transformed,
    kernel_transformed.reshape(TILE_POSITIONS, inputs, outputs),
    (((2,), (1,)), ((0,), (0,))),
    precision=precision,
  )
  products = products.reshape(6, 6, batch, rows, cols, outputs)

  by_row = [products[k] for k in range(6)]
  # (6, B, rows, 4, cols, K)
  half = jnp.stack([_linear_combination(a, by_row) for a in OUTPUT_TRANSFORM], axis=3)
  by_col = [half[j] for j in range(6)]
  # (B, rows, 4, cols, 4, K)
  tiles = jnp.stack([_linear_combination(a, by_col) for a in OUTPUT_TRANSFORM], axis=-2)
  return tiles.reshape(batch, TILE * rows, TILE * cols, outputs)[:, :height, :width]


def input_gradient_kernel(kernel: Array) -> Array:
  """The kernel whose 'SAME' convolution with a 3x3 'SAME' convolution's
  output gradient is its input gradient."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
