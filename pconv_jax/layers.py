"""Partial convolution (Liu et al., ECCV 2018) as a Flax linen module and pure functions.

Semantics follow NVIDIA's reference `PartialConv2d`: for input X, mask M (1 = valid, 0 = hole), kernel W, bias b,

    count  = conv(M, ones)                    # valid inputs under each window
    ratio  = window_size / (count + eps) * clip(count, 0, 1)
    output = (conv(X * M, W) * ratio + b) * clip(count, 0, 1)     (bias)
    output =  conv(X * M, W) * ratio                              (no bias)
    new_mask = clip(count, 0, 1)

where the reference's multi-channel mask update convolves M with a (Cout, Cin, k, k) all-ones kernel. Every
output channel of that convolution is the same number, so here the mask is summed over channels once and
window-summed with a single-channel kernel: identical counts at a (Cout * Cin)-th of the cost, and the new mask
is returned with one channel (it broadcasts against the Cout-channel output).

The mask path runs in float32 (float64 for float64 inputs) at full precision whatever the activation dtype,
carries no gradient, and divides only where the count is positive, so bfloat16 activations never see NaN or Inf
at holes.
"""

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from pconv_jax import winograd

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]
Array = jax.Array

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2 or not all(isinstance(v, int) for v in value):
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
  return value


def normalize_padding(padding: Padding) -> str | tuple[tuple[int, int], tuple[int, int]]:
  """Returns 'SAME'/'VALID' or ((top, bottom), (left, right)) from an int, a per-dimension pair, or pairs."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID', an int or per-side pairs, got {padding!r}")
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  padding = tuple(padding)
  if len(padding) == 2 and all(isinstance(p, int) for p in padding):
    return ((padding[0], padding[0]), (padding[1], padding[1]))
  if len(padding) == 2 and all(isinstance(p, Sequence) and len(p) == 2 for p in padding):
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  raise ValueError(
      f"padding must be 'SAME', 'VALID', an int, (pad_h, pad_w) or ((top, bottom), (left, right)); got {padding!r}")


def valid_count(
    mask: Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: Padding,
    dilation: tuple[int, int],
    in_features: int,
    multi_channel: bool,
    dtype: Any = jnp.float32,
) -> Array:
  """Number of valid input elements under each output window, shape (B, H', W', 1), exact in `dtype`.

  Equals any channel of the reference's `conv(mask, ones(Cout, Cin, kh, kw))` (multi-channel) or
  `conv(mask, ones(1, 1, kh, kw))` (single-channel). A one-channel mask given to a multi-channel layer stands
  for the same mask on all `in_features` channels.
  """
  return _window_sum(_channel_sum(mask, in_features, multi_channel, dtype), kernel_size, strides, padding,
                     dilation)


def _channel_sum(mask: Array, channels: int, multi_channel: bool, dtype: Any) -> Array:
  """Valid elements per pixel, (B, H, W, 1), of a mask covering `channels` input channels."""
  channel_sum = jnp.sum(lax.stop_gradient(mask).astype(dtype), axis=-1, keepdims=True)
  return channel_sum * channels if multi_channel and mask.shape[-1] == 1 else channel_sum


def _window_sum(channel_sum: Array, kernel_size: tuple[int, int], strides: tuple[int, int], padding: Padding,
                dilation: tuple[int, int]) -> Array:
  """Sum of `channel_sum` (B, H, W, 1) over each output's kernel window (zero padding), (B, H', W', 1).

  A box filter, separable: sums of shifted strided slices along H, then along W. Exact for the integer counts
  it sees (float32 up to 2^24), and 10-30x faster on CPU than a convolution with a ones kernel.
  """
  if isinstance(padding := normalize_padding(padding), str):
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
    padding = lax.padtype_to_pads(channel_sum.shape[1:3], window, strides, padding)
  summed = jnp.pad(channel_sum, ((0, 0), *padding, (0, 0)))
  for axis, taps, stride, step in zip((1, 2), kernel_size, strides, dilation):
    out = (summed.shape[axis] - (taps - 1) * step - 1) // stride + 1
    summed = sum(lax.slice_in_dim(summed, i * step, i * step + stride * (out - 1) + 1, stride, axis)
                 for i in range(taps))
  return summed


def mask_update(count: Array, window_size: int, eps: float = 1e-8) -> tuple[Array, Array]:
  """Returns (ratio, new_mask) from window counts: the reference's renormalisation, without NaN or Inf."""
  new_mask = jnp.clip(count, 0.0, 1.0)
  safe = jnp.where(count > 0, count, 1.0)
  ratio = jnp.where(count > 0, window_size / (safe + eps), 0.0) * new_mask
  return ratio, new_mask


_BATCH_SHARDS: contextvars.ContextVar[int | None] = contextvars.ContextVar("batch_shards", default=None)


@contextlib.contextmanager
def batch_shards(shards: int) -> Iterator[None]:
  """Declares, while tracing, that the batch is split over `shards` devices (1: not split).

  On CPU, `conv2d` then computes the weight gradients of layers with at least 64x64 outputs one image per device
  at a time and sums them: XLA:CPU's weight-gradient convolution slows down with the batch there (1.3-4.4x at
  batch 6, benchmarks/RESULTS.md). Without this declaration the batch's layout is unknown, and the gradient is
  one batched convolution.
  """
  token = _BATCH_SHARDS.set(shards)
  try:
    yield
  finally:
    _BATCH_SHARDS.reset(token)


def conv2d(x: Array, kernel: Array, strides: tuple[int, int], padding: Padding,
           dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
  """`lax.conv_general_dilated` on NHWC `x` and HWIO `kernel`, with a faster backward (and some forwards) on CPU.

  The values and gradients are the convolution's. On the CPU backend (undilated kernels), what XLA:CPU's
  convolutions compute slowly is computed as matrix products over the kernel's taps instead: the input gradient
  of strided layers and of layers with at most 16x16 output positions, the weight gradient of layers with at most
  8x8 or with an even-sized kernel and, for one image per device, of stride-1 layers with taps x outputs <= 3 x
  inputs, and the forward and both gradients of layers with few outputs; float32 3x3 'SAME' stride-1 layers with
  wide enough channels and at least 32x32 outputs compute their forward and input gradient by Winograd's F(4x4,
  3x3), one image per device at a time (`winograd.is_faster`; benchmarks/RESULTS.md, optimisations 8-9, 18, 22-23,
  28, 32).
  """
  padding = normalize_padding(padding)
  if dilation != (1, 1) or jax.default_backend() != "cpu":
    return _xla_conv(x, kernel, strides, padding, dilation, precision)
  if isinstance(padding, str):
    padding = tuple(map(tuple, lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)))
  return _conv_cpu(x, kernel, strides, padding, precision)


def _xla_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: str | tuple[tuple[int, int], ...],
              dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
                                  dimension_numbers=_DIMENSION_NUMBERS, precision=precision)


def _matmul_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
                 precision: Any = None) -> Array:
  """The same convolution as one matrix product of the kernel with the input's patches (taps x channels)."""
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (top, bottom), (left, right) = strides, padding[0], padding[1]
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
  taps = [lax.slice(padded, (0, i, j, 0), (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return lax.dot_general(jnp.concatenate(taps, axis=-1), kernel.reshape(kh * kw * cin, cout),
                         (((3,), (0,)), ((), ())), precision=precision)


def _few_outputs(kernel: Array) -> bool:
  """Whether taps x outputs < inputs (the U-Net's last layer: 9 x 3 < 67), where per-tap products win."""
  kh, kw, cin, cout = kernel.shape
  return kh * kw * cout < cin


def _output_side_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
                      precision: Any = None) -> Array:
  """The same convolution as one product of the input with every tap's kernel, (positions, taps x outputs),
  then a sum of that product's shifted slices (accumulated in float32 or wider): for few outputs, about 2x faster
  than XLA:CPU's convolution."""
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (top, bottom), (left, right) = strides, padding[0], padding[1]
  per_tap = lax.dot_general(x, kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout),
                            (((3,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  per_tap = lax.pad(per_tap, jnp.zeros((), per_tap.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  batch, hp, wp, _ = per_tap.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  return sum(lax.slice(per_tap, (0, i, j, (i * kw + j) * cout),
                       (batch, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, (i * kw + j + 1) * cout), (1, sh, sw, 1))
             for i in range(kh) for j in range(kw)).astype(x.dtype)


def _output_side_gradients(x: Array, kernel: Array, g: Array, strides: tuple[int, int],
                           padding: tuple[tuple[int, int], ...], precision: Any = None,
                           input_gradient: bool = True) -> tuple[Array | None, Array]:
  """Input (unless not asked for) and weight gradients through per-tap products.

  `g` is placed, for each kernel tap, at the padded input positions that tap reads: a (positions, taps x outputs)
  matrix, narrow when taps x outputs < inputs. Both gradients are then one matrix product each with it, instead
  of products over the wide input patches (the U-Net's last layer: 67 inputs, 9 x 3 taps x outputs). The weight
  gradient alone also beats XLA:CPU's for one image of the decoders' 3x3 layers (taps x outputs = 3 x inputs).
  """
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (top, bottom), (left, right) = strides, padding[0], padding[1]
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  batch, hp, wp, _ = padded.shape
  ho, wo = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  per_tap = jnp.stack([
      lax.pad(g, zero, ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1), (j, wp - j - sw * (wo - 1) - 1, sw - 1),
                        (0, 0, 0)))
      for i in range(kh) for j in range(kw)], axis=3).reshape(-1, kh * kw * cout)
  dx = None
  if input_gradient:
    taps_kernel = kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    dx = lax.dot_general(per_tap, taps_kernel, (((1,), (1,)), ((), ())), precision=precision)
    dx = dx.reshape(batch, hp, wp, cin)[:, top:top + x.shape[1], left:left + x.shape[2]]
  dw = lax.dot_general(padded.reshape(-1, cin), per_tap, (((0,), (0,)), ((), ())), precision=precision)
  return dx, dw.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_cpu(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
              precision: Any) -> Array:
  if _few_outputs(kernel):
    return _output_side_conv(x, kernel, strides, padding, precision)
  if _winograd_faster(x, kernel, strides, padding):
    return _winograd_by_image(x, kernel, precision)
  return _xla_conv(x, kernel, strides, padding, precision=precision)


def _winograd_faster(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> bool:
  return (kernel.shape[:2] == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
          and x.dtype == kernel.dtype and winograd.is_faster(x.shape, kernel.shape, x.dtype))


def _winograd_by_image(x: Array, kernel: Array, precision: Any) -> Array:
  """`winograd.conv3x3` over one image per device at a time, whose transformed tiles stay in cache (1.3-1.6x
  faster than the whole batch at once at VGG's conv3_2, 3-12 images). The batch is viewed as (devices, images per
  device) as in `_weight_grad_by_image`; the device count is `batch_shards`' (1 if undeclared).

  The loop writes into an output that starts as the first images' result broadcast: a zero-filled start, as
  `lax.map` makes, is one constant that XLA shares between all such loops and copies into each, keeping a
  full-size buffer alive from the first loop to the last (+1.5 GB at VGG's 512x512 layers, RESULTS.md 32).
  """
  shards = _BATCH_SHARDS.get() or 1
  batch = x.shape[0]
  if batch == shards or batch % shards:
    return winograd.conv3x3(x, kernel, precision)
  # Images of one device along axis 0, or (devices, images per device) along axis 1. (A (1, images, ...) view
  # for one device costs XLA:CPU a layout copy.)
  axis = 0 if shards == 1 else 1
  view = x if shards == 1 else x.reshape((shards, batch // shards) + x.shape[1:])
  convolve = lambda i: winograd.conv3x3(lax.dynamic_index_in_dim(view, i, axis, keepdims=axis == 0), kernel,
                                        precision)
  first = convolve(0)
  start = jnp.broadcast_to(jnp.expand_dims(first, axis) if axis else first, view.shape[:-3] + first.shape[-3:])
  y = lax.fori_loop(1, view.shape[axis],
                    lambda i, y: lax.dynamic_update_index_in_dim(y, convolve(i), i, axis), start)
  return y.reshape((batch,) + y.shape[-3:])


def _conv_cpu_fwd(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
                  precision: Any) -> tuple[Array, tuple[Array, Array]]:
  return _conv_cpu(x, kernel, strides, padding, precision), (x, kernel)


def _conv_cpu_bwd(strides: tuple[int, int], padding: tuple[tuple[int, int], ...], precision: Any,
                  residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  positions = g.shape[1] * g.shape[2]
  xla, matmul = (functools.partial(conv, strides=strides, padding=padding, precision=precision)
                 for conv in (_xla_conv, _matmul_conv))
  if _few_outputs(kernel):
    return _output_side_gradients(x, kernel, g, strides, padding, precision)
  input_grad = matmul if strides != (1, 1) or positions <= 16 * 16 else xla
  # XLA:CPU's weight gradient of an even-sized kernel is pathologically slow (2x2: 2.9 s against 13 ms).
  weight_grad = matmul if positions <= 8 * 8 or kh % 2 == 0 or kw % 2 == 0 else xla
  gradient_kernel = winograd.input_gradient_kernel(kernel)
  if _winograd_faster(g, gradient_kernel, strides, padding):
    dx = _winograd_by_image(g, gradient_kernel, precision)
  else:
    dx = jax.vjp(lambda x: input_grad(x, kernel), x)[1](g)[0]
  shards = _BATCH_SHARDS.get()
  if weight_grad is xla and strides == (1, 1) and kh * kw * cout <= 3 * cin and x.shape[0] == (shards or 1):
    dw = _output_side_gradients(x, kernel, g, strides, padding, precision, input_gradient=False)[1]
  elif weight_grad is xla and positions >= 64 * 64 and shards and x.shape[0] % shards == 0 and x.shape[0] > shards:
    dw = _weight_grad_by_image(x, kernel, g, xla, shards)
  else:
    dw = jax.vjp(lambda k: weight_grad(x, k), kernel)[1](g)[0]
  return dx, dw


def _weight_grad_by_image(x: Array, kernel: Array, g: Array, conv: Any, shards: int,
                          max_chunks: int = 8) -> Array:
  """Sum of `conv`'s weight gradients over chunks of one image per device (at most `max_chunks` chunks).

  The batch is viewed as (shards, images per device): chunk j takes image j of every device, so it stays split
  over the same devices and each device convolves only its own images."""
  per_device = x.shape[0] // shards
  chunks = max(n for n in range(1, min(per_device, max_chunks) + 1) if per_device % n == 0)
  size = per_device // chunks
  xs, gs = (a.reshape((shards, chunks, size) + a.shape[1:]) for a in (x, g))
  grads = [jax.vjp(lambda k: conv(xs[:, j].reshape((-1,) + x.shape[1:]), k), kernel)[1](
      gs[:, j].reshape((-1,) + g.shape[1:]))[0] for j in range(chunks)]
  return sum(grads)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def upsample2x(x: Array) -> Array:
  """Nearest-neighbour x2 upsampling of an NHWC array (PyTorch's `interpolate(scale_factor=2)`)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsampled_conv2d(low: Array, rest: Array, kernel: Array, strides: tuple[int, int], padding: Padding,
                     dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
  """`conv2d(concatenate([upsample2x(low), rest]), kernel, ...)`, a U-Net decoder's convolution.

  On CPU, a 3x3 'SAME' stride-1 layer with more than 16x16 outputs convolves `low` at its own resolution instead:
  each of the four output phases (row and column parity) of a 3x3 kernel over a x2 nearest-upsampled input is a
  2x2 kernel over the input itself, 2.25x fewer multiplications for those channels (benchmarks/RESULTS.md,
  optimisation 27), in the forward and, through conv2d's rules, the backward.
  """
  padding = normalize_padding(padding)
  same_3x3 = kernel.shape[:2] == (3, 3) and strides == dilation == (1, 1) and padding in ("SAME", ((1, 1), (1, 1)))
  large = rest.shape[1] * rest.shape[2] > 16 * 16
  if jax.default_backend() == "cpu" and same_3x3 and large and not _few_outputs(kernel):
    channels = low.shape[-1]
    by_phase = conv2d(low, _phase_kernels(kernel[:, :, :channels]), (1, 1), 1, precision=precision)
    return _interleave_phases(by_phase, *low.shape[1:3]) + conv2d(rest, kernel[:, :, channels:], (1, 1), 1,
                                                                  precision=precision)
  return conv2d(jnp.concatenate([upsample2x(low), rest], axis=-1), kernel, strides, padding, dilation, precision)


def _phase_kernels(kernel: Array) -> Array:
  """(3, 3, C, K) -> (2, 2, C, 4K): the kernels of the four output phases (p, q) = (row, column parity) of a 3x3
  'SAME' convolution of a x2 nearest-upsampled input, as 2x2 kernels over the input padded by one, stacked along
  the outputs in the order (0, 0), (0, 1), (1, 0), (1, 1). Phase 0 reads rows i-1 and i (taps 0 and 1 + 2),
  phase 1 rows i and i+1 (taps 0 + 1 and 2); the same for columns."""
  wide = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  phases = []
  for rows in ((wide[0], wide[1] + wide[2]), (wide[0] + wide[1], wide[2])):
    rows = jnp.stack(rows)
    for cols in ((rows[:, 0], rows[:, 1] + rows[:, 2]), (rows[:, 0] + rows[:, 1], rows[:, 2])):
      phases.append(jnp.stack(cols, axis=1))
  return jnp.concatenate(phases, axis=-1).astype(kernel.dtype)


def _interleave_phases(by_phase: Array, height: int, width: int) -> Array:
  """(B, H+1, W+1, 4K) per-phase outputs (see `_phase_kernels`) -> the (B, 2H, 2W, K) output they interleave to."""
  outputs = by_phase.shape[-1] // 4
  p00, p01, p10, p11 = (by_phase[:, p:p + height, q:q + width, (2 * p + q) * outputs:(2 * p + q + 1) * outputs]
                        for p in (0, 1) for q in (0, 1))
  interleaved = jnp.stack([jnp.stack([p00, p01], axis=3), jnp.stack([p10, p11], axis=3)], axis=2)
  return interleaved.reshape(by_phase.shape[0], 2 * height, 2 * width, outputs)


def partial_conv(
    x: Array | Sequence[Array],
    mask: Array | None | Sequence[Array | None],
    kernel: Array,
    bias: Array | None,
    *,
    strides: tuple[int, int] = (1, 1),
    padding: Padding = 0,
    dilation: tuple[int, int] = (1, 1),
    multi_channel: bool = False,
    eps: float = 1e-8,
    precision: Any = None,
    upsample_first: bool = False,
) -> tuple[Array, Array]:
  """Partial convolution of NHWC `x` with HWIO `kernel`; returns (output, new_mask with one channel).

  `mask=None` means every input pixel is valid (the window counts still see the zero padding as holes, as in
  the reference). The output has x's dtype; the mask path runs in float32, or float64 for float64 inputs.

  With `multi_channel`, `x` may be a list of channel blocks and `mask` the list of their masks (each one-channel,
  per-channel or None): the same result as concatenating the blocks and their per-channel masks, without
  building that wide mask (a U-Net decoder's upsampled features and skip connection). With `upsample_first`,
  the first block and its mask are given at half the others' height and width and stand for their x2
  nearest-neighbour upsampling (`upsample2x`), which is then never built (see `upsampled_conv2d`).
  """
  kh, kw, in_features, _ = kernel.shape
  is_blocks = isinstance(x, (list, tuple))
  if isinstance(mask, (list, tuple)) and not is_blocks:
    raise ValueError("a list of masks needs a list of input channel blocks, one per mask")
  blocks = list(x) if is_blocks else [x]
  masks = ([None] * len(blocks) if mask is None else list(mask)) if is_blocks else [mask]
  if len(blocks) > 1 and not multi_channel:
    raise ValueError("channel blocks (a list of inputs and masks) need multi_channel=True")
  if len(masks) != len(blocks) or sum(b.shape[-1] for b in blocks) != in_features:
    raise ValueError(f"the kernel takes {in_features} input channels; got inputs of shapes "
                     f"{[b.shape for b in blocks]} with {len(masks)} mask(s)")
  if upsample_first and len(blocks) < 2:
    raise ValueError("upsample_first needs at least two channel blocks: the one to upsample, then the others")
  for block, block_mask in zip(blocks, masks):
    _check_shapes(block, block_mask, block.shape[-1], multi_channel)
  sizes = [tuple(2 * n for n in b.shape[1:3]) if upsample_first and i == 0 else b.shape[1:3]
           for i, b in enumerate(blocks)]
  if len(set(sizes)) > 1:
    half = " (the first at half of them, with upsample_first)" if upsample_first else ""
    raise ValueError(f"channel blocks must have the same height and width{half}; got shapes "
                     f"{[b.shape for b in blocks]}")
  window_size = kh * kw * (in_features if multi_channel else 1)
  padding = normalize_padding(padding)

  mask_dtype = jnp.promote_types(blocks[0].dtype, jnp.float32)
  channel_sums = [_channel_sum(jnp.ones((1,) + b.shape[1:3] + (1,), mask_dtype) if m is None else m,
                               b.shape[-1], multi_channel, mask_dtype) for b, m in zip(blocks, masks)]
  if upsample_first:
    channel_sums[0] = upsample2x(channel_sums[0])
  channel_sum = sum(channel_sums)
  count = _window_sum(channel_sum, (kh, kw), strides, padding, dilation)
  ratio, new_mask = mask_update(count, window_size, eps)

  masked = [b if m is None else b * lax.stop_gradient(m).astype(b.dtype) for b, m in zip(blocks, masks)]
  if upsample_first:
    rest = masked[1] if len(masked) == 2 else jnp.concatenate(masked[1:], axis=-1)
    raw = upsampled_conv2d(masked[0], rest, kernel, strides, padding, dilation, precision)
  else:
    raw = conv2d(masked[0] if len(masked) == 1 else jnp.concatenate(masked, axis=-1), kernel, strides, padding,
                 dilation, precision)
  out = raw.astype(mask_dtype) * ratio
  if bias is not None:
    out = (out + bias.astype(mask_dtype)) * new_mask
  new_mask = jnp.broadcast_to(new_mask, (raw.shape[0],) + new_mask.shape[1:])
  return out.astype(raw.dtype), new_mask


def _check_shapes(x: Array, mask: Array | None, in_features: int, multi_channel: bool) -> None:
  if x.ndim != 4 or x.shape[-1] != in_features:
    raise ValueError(f"PartialConv expects NHWC input with {in_features} channels, got shape {x.shape}")
  if mask is None:
    return
  allowed = (1, in_features) if multi_channel else (1,)
  if mask.ndim != 4 or mask.shape[1:3] != x.shape[1:3] or mask.shape[0] not in (1, x.shape[0]) \
      or mask.shape[-1] not in allowed:
    kind = f"1 or {in_features}" if multi_channel else "1 (use multi_channel=True for per-channel masks)"
    raise ValueError(
        f"mask shape {mask.shape} does not fit input shape {x.shape}: the mask must be NHWC with the input's "
        f"height and width, batch 1 or {x.shape[0]}, and {kind} channels")


class PartialConv(nn.Module):
  """Partial convolution layer, NHWC. Called as `y, new_mask = layer(x, mask=None)`, or with lists of channel
  blocks and their masks (multi-channel layers; see `partial_conv`).

  Attributes:
    features: number of output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw).
    padding: 'SAME', 'VALID', an int, (pad_h, pad_w) or ((top, bottom), (left, right)).
    dilation: int or (dh, dw) kernel dilation.
    use_bias: add a bias (renormalised as in the reference).
    multi_channel: the mask has one value per input channel (the reference's `multi_channel=True`); otherwise
      one mask channel shared by all input channels.
    eps: the reference's 1e-8 in `window_size / (count + eps)`.
    dtype: computation dtype of the convolution (e.g. bfloat16); the mask path stays float32 or wider.
    param_dtype: dtype of kernel and bias.
    precision: precision of the data convolution.
    upsample_first: the first channel block and its mask come at half resolution, to be upsampled x2 (nearest)
      before the convolution (a U-Net decoder; see `partial_conv`).
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = 0
  dilation: int | Sequence[int] = 1
  use_bias: bool = True
  multi_channel: bool = False
  eps: float = 1e-8
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  upsample_first: bool = False
  kernel_init: Any = nn.initializers.kaiming_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array | Sequence[Array],
               mask: Array | None | Sequence[Array | None] = None) -> tuple[Array, Array]:
    kernel_size = _pair(self.kernel_size, "kernel_size")
    blocks = list(x) if isinstance(x, (list, tuple)) else [x]
    in_features = sum(b.shape[-1] for b in blocks)
    kernel = self.param("kernel", self.kernel_init, kernel_size + (in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    *blocks, kernel, bias = promote_dtype(*blocks, kernel, bias, dtype=self.dtype)
    x = blocks if isinstance(x, (list, tuple)) else blocks[0]
    return partial_conv(
        x, mask, kernel, bias, strides=_pair(self.strides, "strides"), padding=self.padding,
        dilation=_pair(self.dilation, "dilation"), multi_channel=self.multi_channel, eps=self.eps,
        precision=self.precision, upsample_first=self.upsample_first)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's `BatchNorm2d` semantics, so imported weights and statistics
  behave identically in both modes: training normalises with the biased batch variance and updates the running
  variance with the unbiased one; `momentum` is PyTorch's (running = (1 - m) running + m batch).

  Statistics are float32 (float64 for float64 inputs) whatever the activation dtype. Under `jax.jit` with the
  batch sharded over devices, the means are over the global batch. Variables: params `scale`, `bias`;
  batch_stats `mean`, `var`.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      count = x.size // features
      if count < 2:
        raise ValueError(f"BatchNorm in training needs more than one value per channel, got input {x.shape}: "
                         "use a larger batch.")
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * count / (count - 1)
    y = (x32 - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype or x.dtype)
