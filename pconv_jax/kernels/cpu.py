"""The CPU engine: the same values as the plain path (`kernels.xla`), computed faster on XLA:CPU.

XLA:CPU computes some convolutions, their gradients, pooling gradients and Gram-matrix gradients far
slower than their arithmetic needs; each rule here replaces one such case with matrix products or
element-wise passes that XLA:CPU runs near its matmul speed (benchmarks/RESULTS.md, optimisations
8-32):

  * convolutions with a custom VJP: input gradients of strided and small layers and weight
    gradients of small and even-sized kernels as matrix products over the kernel's taps; layers
    with few outputs (the U-Net's last) as per-tap products; weight gradients of large layers one
    image per device at a time; wide float32 3x3 layers by Winograd's F(4x4, 3x3) (`winograd`), one
    image per device at a time;
  * a decoder's convolution of an x2 upsampled block as 2x2 phase kernels at the block's own
    resolution;
  * 2x2 max pooling and Gram matrices with VJPs that XLA:CPU does not slow down.

`CpuKernels(batch_shards=n)` is told how many devices the batch is split over (the mesh's data
axis), so that "one image per device at a time" keeps each device on its own images.
"""

import dataclasses
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from pconv_jax.kernels import winograd, xla

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class CpuKernels(xla.XlaKernels):
  """The CPU rules; `batch_shards` is the number of devices the batch is split over."""

  batch_shards: int = 1

  def conv2d(
    self,
    x: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: xla.Padding,
    dilation: tuple[int, int] = (1, 1),
    precision: Any = None,
    preferred_element_type: Any = None,
  ) -> Array:
    """The convolution, with the rules above for undilated kernels whose output keeps x's dtype.

    Per-tap products for layers with taps x outputs < inputs (forward and gradients); Winograd for
    the forward and input gradient of float32 3x3 'SAME' stride-1 layers wide enough
    (`winograd.is_faster`); in the backward, matrix products for the input gradient of strided
    layers and of layers with at most 16x16 outputs, and for the weight gradient of layers with at
    most 8x8 outputs or an even-sized kernel; the weight gradient of one image per device of
    stride-1 layers with taps x outputs <= 3 x inputs as per-tap products, and of larger batches
    with at least 64x64 outputs image by image.
    """
    widened = preferred_element_type is not None and jnp.dtype(preferred_element_type) != x.dtype
    if dilation != (1, 1) or widened:
      return super().conv2d(
        x, kernel, strides, padding, dilation, precision, preferred_element_type
      )
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    pads = tuple((int(low), int(high)) for low, high in padding)
    return _conv(x, kernel, tuple(strides), pads, precision, self.batch_shards)

  def upsampled_conv2d(
    self,
    low: Array,
    rest: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: xla.Padding,
    dilation: tuple[int, int] = (1, 1),
    precision: Any = None,
  ) -> Array:
    """For a 3x3 'SAME' stride-1 layer with more than 16x16 outputs, `low` is convolved at its own
    resolution: each of the four output phases (row and column parity) of a 3x3 kernel over a x2
    nearest-upsampled input is a 2x2 kernel over the input itself, 2.25x fewer multiplications for
    those channels (RESULTS.md, optimisation 27), in the forward and, through `conv2d`'s rules, the
    backward."""
    same_3x3 = (
      kernel.shape[:2] == (3, 3)
      and tuple(strides) == tuple(dilation) == (1, 1)
      and padding in ("SAME", ((1, 1), (1, 1)))
    )
    large = rest.shape[1] * rest.shape[2] > 16 * 16
    if not same_3x3 or not large or _few_outputs(kernel):
      return super().upsampled_conv2d(low, rest, kernel, strides, padding, dilation, precision)
    channels = low.shape[-1]
    one = ((1, 1), (1, 1))
    by_phase = self.conv2d(
      low, _phase_kernels(kernel[:, :, :channels]), (1, 1), one, precision=precision
    )
    from_rest = self.conv2d(rest, kernel[:, :, channels:], (1, 1), one, precision=precision)
    return _interleave_phases(by_phase, *low.shape[1:3]) + from_rest

  def max_pool_2x2(self, x: Array) -> Array:
    return max_pool_2x2(x)

  def feature_products(self, features: Array) -> Array:
    return feature_products(features)


# --------------------------------------------------------------------------------------------------
# Convolutions.


def _xla_conv(
  x: Array, kernel: Array, strides: tuple[int, int], padding: Pads, precision: Any = None
) -> Array:
  return lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=xla.DIMENSION_NUMBERS, precision=precision
  )


def _matmul_conv(
  x: Array, kernel: Array, strides: tuple[int, int], padding: Pads, precision: Any = None
) -> Array:
  """The same convolution as one matrix product of the kernel with the input's patches."""
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (top, bottom), (left, right) = strides, padding[0], padding[1]
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
  taps = [
    lax.slice(
      padded,
      (0, i, j, 0),
      (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
      (1, sh, sw, 1),
    )
    for i in range(kh)
    for j in range(kw)
  ]
  patches = jnp.concatenate(taps, axis=-1)
  return lax.dot_general(
    patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())), precision=precision
  )


def _few_outputs(kernel: Array) -> bool:
  """Whether taps x outputs < inputs (the U-Net's last layer: 9 x 3 < 67): per-tap products win."""
  kh, kw, cin, cout = kernel.shape
  return kh * kw * cout < cin


def _output_side_conv(
  x: Array, kernel: Array, strides: tuple[int, int], padding: Pads, precision: Any = None
) -> Array:
  """The same convolution as one product of the input with every tap's kernel, (positions, taps x
  outputs), then a sum of that product's shifted slices (accumulated in float32 or wider): for few
  outputs, about 2x faster than XLA:CPU's convolution."""
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (top, bottom), (left, right) = strides, padding[0], padding[1]
  per_tap = lax.dot_general(
    x,
    kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout),
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
  )
  zero = jnp.zeros((), per_tap.dtype)
  per_tap = lax.pad(per_tap, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  batch, hp, wp, _ = per_tap.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  out = sum(
    lax.slice(
      per_tap,
      (0, i, j, (i * kw + j) * cout),
      (batch, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, (i * kw + j + 1) * cout),
      (1, sh, sw, 1),
    )
    for i in range(kh)
    for j in range(kw)
  )
  return out.astype(x.dtype)


def _output_side_gradients(
  x: Array,
  kernel: Array,
  g: Array,
  strides: tuple[int, int],
  padding: Pads,
  precision: Any = None,
  input_gradient: bool = True,
) -> tuple[Array | None, Array]:
  """Input (unless not asked for) and weight gradients through per-tap products.

  `g` is placed, for each kernel tap, at the padded input positions that tap reads: a (positions,
  taps x outputs) matrix, narrow when taps x outputs < inputs. Both gradients are then one matrix
  product each with it, instead of products over the wide input patches (the U-Net's last layer: 67
  inputs, 9 x 3 taps x outputs). The weight gradient alone also beats XLA:CPU's for one image of the
  decoders' 3x3 layers (taps x outputs = 3 x inputs).
  """
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (top, bottom), (left, right) = strides, padding[0], padding[1]
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  batch, hp, wp, _ = padded.shape
  ho, wo = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  per_tap = jnp.stack(
    [
      lax.pad(
        g,
        zero,
        (
          (0, 0, 0),
          (i, hp - i - sh * (ho - 1) - 1, sh - 1),
          (j, wp - j - sw * (wo - 1) - 1, sw - 1),
          (0, 0, 0),
        ),
      )
      for i in range(kh)
      for j in range(kw)
    ],
    axis=3,
  ).reshape(-1, kh * kw * cout)
  dx = None
  if input_gradient:
    taps_kernel = kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    dx = lax.dot_general(per_tap, taps_kernel, (((1,), (1,)), ((), ())), precision=precision)
    dx = dx.reshape(batch, hp, wp, cin)[:, top : top + x.shape[1], left : left + x.shape[2]]
  dw = lax.dot_general(
    padded.reshape(-1, cin), per_tap, (((0,), (0,)), ((), ())), precision=precision
  )
  return dx, dw.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


def _winograd_faster(x: Array, kernel: Array, strides: tuple[int, int], padding: Pads) -> bool:
  return (
    kernel.shape[:2] == (3, 3)
    and strides == (1, 1)
    and padding == ((1, 1), (1, 1))
    and x.dtype == kernel.dtype
    and winograd.is_faster(x.shape, kernel.shape, x.dtype)
  )


def _winograd_by_image(x: Array, kernel: Array, precision: Any, shards: int) -> Array:
  """`winograd.conv3x3` over one image per device at a time, whose transformed tiles stay in cache
  (1.3-1.6x faster than the whole batch at once at VGG's conv3_2, 3-12 images). The batch is viewed
  as (devices, images per device), as in `_weight_grad_by_image`.

  The loop writes into an output that starts as the first images' result broadcast: a zero-filled
  start, as `lax.map` makes, is one constant that XLA shares between all such loops and copies into
  each, keeping a full-size buffer alive from the first loop to the last (+1.5 GB at VGG's 512x512
  layers, RESULTS.md 32).
  """
  batch = x.shape[0]
  if batch == shards or batch % shards:
    return winograd.conv3x3(x, kernel, precision)
  # Images of one device along axis 0, or (devices, images per device) along axis 1. (A (1, images,
  # ...) view for one device costs XLA:CPU a layout copy.)
  axis = 0 if shards == 1 else 1
  view = x if shards == 1 else x.reshape((shards, batch // shards) + x.shape[1:])

  def convolve(i):
    image = lax.dynamic_index_in_dim(view, i, axis, keepdims=axis == 0)
    return winograd.conv3x3(image, kernel, precision)

  first = convolve(0)
  start = jnp.broadcast_to(
    jnp.expand_dims(first, axis) if axis else first, view.shape[:-3] + first.shape[-3:]
  )
  y = lax.fori_loop(
    1,
    view.shape[axis],
    lambda i, y: lax.dynamic_update_index_in_dim(y, convolve(i), i, axis),
    start,
  )
  return y.reshape((batch,) + y.shape[-3:])


def _weight_grad_by_image(
  x: Array, kernel: Array, g: Array, conv: Any, shards: int, max_chunks: int = 8
) -> Array:
  """Sum of `conv`'s weight gradients over chunks of one image per device (at most `max_chunks`).

  The batch is viewed as (shards, images per device): chunk j takes image j of every device, so it
  stays split over the same devices and each device convolves only its own images."""
  per_device = x.shape[0] // shards
  chunks = max(n for n in range(1, min(per_device, max_chunks) + 1) if per_device % n == 0)
  size = per_device // chunks
  xs, gs = (a.reshape((shards, chunks, size) + a.shape[1:]) for a in (x, g))

  def chunk_gradient(j):
    images, grads = xs[:, j].reshape((-1,) + x.shape[1:]), gs[:, j].reshape((-1,) + g.shape[1:])
    return jax.vjp(lambda k: conv(images, k), kernel)[1](grads)[0]

  return sum(chunk_gradient(j) for j in range(chunks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(
  x: Array, kernel: Array, strides: tuple[int, int], padding: Pads, precision: Any, shards: int
) -> Array:
  if _few_outputs(kernel):
    return _output_side_conv(x, kernel, strides, padding, precision)
  if _winograd_faster(x, kernel, strides, padding):
    return _winograd_by_image(x, kernel, precision, shards)
  return _xla_conv(x, kernel, strides, padding, precision)


def _conv_fwd(
  x: Array, kernel: Array, strides: tuple[int, int], padding: Pads, precision: Any, shards: int
) -> tuple[Array, tuple[Array, Array]]:
  return _conv(x, kernel, strides, padding, precision, shards), (x, kernel)


def _conv_bwd(
  strides: tuple[int, int],
  padding: Pads,
  precision: Any,
  shards: int,
  residuals: tuple[Array, Array],
  g: Array,
) -> tuple[Array, Array]:
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  positions = g.shape[1] * g.shape[2]
  xla_conv, matmul = (
    functools.partial(conv, strides=strides, padding=padding, precision=precision)
    for conv in (_xla_conv, _matmul_conv)
  )
  if _few_outputs(kernel):
    return _output_side_gradients(x, kernel, g, strides, padding, precision)
  input_grad = matmul if strides != (1, 1) or positions <= 16 * 16 else xla_conv
  # XLA:CPU's weight gradient of an even-sized kernel is pathologically slow (2x2: 2.9 s against 13
  # ms).
  weight_grad = matmul if positions <= 8 * 8 or kh % 2 == 0 or kw % 2 == 0 else xla_conv
  gradient_kernel = winograd.input_gradient_kernel(kernel)
  if _winograd_faster(g, gradient_kernel, strides, padding):
    dx = _winograd_by_image(g, gradient_kernel, precision, shards)
  else:
    dx = jax.vjp(lambda x: input_grad(x, kernel), x)[1](g)[0]
  batch = x.shape[0]
  if (
    weight_grad is xla_conv and strides == (1, 1) and kh * kw * cout <= 3 * cin and batch == shards
  ):
    dw = _output_side_gradients(x, kernel, g, strides, padding, precision, input_gradient=False)[1]
  elif weight_grad is xla_conv and positions >= 64 * 64 and batch % shards == 0 and batch > shards:
    dw = _weight_grad_by_image(x, kernel, g, xla_conv, shards)
  else:
    dw = jax.vjp(lambda k: weight_grad(x, k), kernel)[1](g)[0]
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _phase_kernels(kernel: Array) -> Array:
  """(3, 3, C, K) -> (2, 2, C, 4K): the kernels of the four output phases (p, q) = (row, column
  parity) of a 3x3 'SAME' convolution of a x2 nearest-upsampled input, as 2x2 kernels over the input
  padded by one, stacked along the outputs in the order (0, 0), (0, 1), (1, 0), (1, 1). Phase 0
  reads rows i-1 and i (taps 0 and 1 + 2), phase 1 rows i and i+1 (taps 0 + 1 and 2); the same for
  columns."""
  wide = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  phases = []
  for rows in ((wide[0], wide[1] + wide[2]), (wide[0] + wide[1], wide[2])):
    rows = jnp.stack(rows)
    for cols in ((rows[:, 0], rows[:, 1] + rows[:, 2]), (rows[:, 0] + rows[:, 1], rows[:, 2])):
      phases.append(jnp.stack(cols, axis=1))
  return jnp.concatenate(phases, axis=-1).astype(kernel.dtype)


def _interleave_phases(by_phase: Array, height: int, width: int) -> Array:
  """(B, H+1, W+1, 4K) per-phase outputs (see `_phase_kernels`) -> the (B, 2H, 2W, K) output."""
  outputs = by_phase.shape[-1] // 4
  p00, p01, p10, p11 = (
    by_phase[:, p : p + height, q : q + width, (2 * p + q) * outputs : (2 * p + q + 1) * outputs]
    for p in (0, 1)
    for q in (0, 1)
  )
  interleaved = jnp.stack([jnp.stack([p00, p01], axis=3), jnp.stack([p10, p11], axis=3)], axis=2)
  return interleaved.reshape(by_phase.shape[0], 2 * height, 2 * width, outputs)


# --------------------------------------------------------------------------------------------------
# VGG's pooling and the style loss's Gram matrices.


def _windows(x: Array) -> Array:
  """(B, H, W, C) -> (B, H/2, 2, W/2, 2, C), without an odd last row or column (VALID pooling)."""
  b, h, w, c = x.shape
  return x[:, : h - h % 2, : w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
  """2x2, stride-2 max pooling whose gradient goes to the first maximum of each window (row-major).

  The same values and gradients as the plain `nn.max_pool` and PyTorch's `max_pool2d`, ties
  included, without the index arrays XLA:CPU builds for `reduce_window`'s gradient: the gradient is
  one element-wise pass (7x faster and a twentieth of the temporary memory at VGG's pool1,
  measured). The values are the maximum of the windows' four strided corners, not a reduction:
  XLA:CPU fuses a reduction into the preceding convolution, which then runs at a third of its speed
  (RESULTS.md, optimisation 24).
  """
  h, w = x.shape[1] - x.shape[1] % 2, x.shape[2] - x.shape[2] % 2
  top_left, top_right, bottom_left, bottom_right = (
    x[:, i:h:2, j:w:2] for i in (0, 1) for j in (0, 1)
  )
  return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


def _max_pool_2x2_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array]:
  x, y = residuals
  hit = _windows(x) == y[:, :, None, :, None, :]
  h00, h01, h10, h11 = (
    hit[:, :, 0, :, 0],
    hit[:, :, 0, :, 1],
    hit[:, :, 1, :, 0],
    hit[:, :, 1, :, 1],
  )
  first = (h00, h01 & ~h00, h10 & ~(h00 | h01), h11 & ~(h00 | h01 | h10))
  g00, g01, g10, g11 = (jnp.where(f, g, jnp.zeros_like(g)) for f in first)
  grad = jnp.stack([jnp.stack([g00, g01], axis=3), jnp.stack([g10, g11], axis=3)], axis=2)
  b, h, w, c = x.shape
  grad = grad.reshape(b, h - h % 2, w - w % 2, c)
  return (jnp.pad(grad, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


@jax.custom_vjp
def feature_products(features: Array) -> Array:
  """features^T features per image, (B, C, C), in float32 or wider, whose gradient comes out in the
  features' layout: autodiff's transposed product gives (B, C, H*W) and a transpose back
  (RESULTS.md, optimisation 21)."""
  return xla.XlaKernels().feature_products(features)


def _feature_products_fwd(features: Array) -> tuple[Array, Array]:
  return feature_products(features), features


def _feature_products_bwd(features: Array, g: Array) -> tuple[Array]:
  # d(F^T F) = F (g + g^T), contracted so that the result has F's (B, H, W, C) layout.
  symmetric = (g + jnp.swapaxes(g, 1, 2)).astype(features.dtype)
  grad = jnp.einsum(
    "bhwd,bdc->bhwc",
    features,
    symmetric,
    precision=lax.Precision.HIGHEST,
    preferred_element_type=g.dtype,
  )
  return (grad.astype(features.dtype),)


feature_products.defvjp(_feature_products_fwd, _feature_products_bwd)
