"""PartialConv against an independent float64 NumPy oracle of NVIDIA's PartialConv2d formula."""

import itertools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from pconv_jax import layers
from pconv_jax.kernels import XLA, CpuKernels


def conv2d_nchw(x, w, stride, pads, dilation):
  """Naive cross-correlation in float64, NCHW input, OIHW kernel,
  pads ((top, bottom), (left, right))."""
  (pt, pb), (pl, pr) = pads
  x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
  n, _, h, wd = x.shape
  cout, _, kh, kw = w.shape
  oh = (h - dilation * (kh - 1) - 1) // stride + 1
  ow = (wd - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros((n, cout, oh, ow))
  for i in range(kh):
    for j in range(kw):
      patch = x[
        :,
        :,
        i * dilation : i * dilation + stride * (oh - 1) + 1 : stride,
        j * dilation : j * dilation + stride * (ow - 1) + 1 : stride,
      ]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def reference_partial_conv(x, mask, w, b, stride, pads, dilation, multi_channel):
  """NVIDIA PartialConv2d.forward (return_mask=True) transcribed to NumPy float64, NCHW."""
  cout, cin, kh, kw = w.shape
  given = mask is not None
  if not given:
    mask = np.ones(x.shape if multi_channel else (1, 1) + x.shape[2:])
  ones = np.ones((cout, cin, kh, kw)) if multi_channel else np.ones((1, 1, kh, kw))
  slide_winsize = ones.shape[1] * ones.shape[2] * ones.shape[3]
  update = conv2d_nchw(mask, ones, stride, pads, dilation)
  ratio = slide_winsize / (update + 1e-8)
  update = np.clip(update, 0, 1)
  ratio = ratio * update
  raw = conv2d_nchw(x * mask if given else x, w, stride, pads, dilation)
  if b is not None:
    raw = raw + b.reshape(1, -1, 1, 1)
    out = ((raw - b.reshape(1, -1, 1, 1)) * ratio + b.reshape(1, -1, 1, 1)) * update
  else:
    out = raw * ratio
  return out, update


def same_pads(size, k, s, d):
  out = -(-size // s)
  total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
  return (total // 2, total - total // 2)


def to_nchw(a):
  return np.transpose(a, (0, 3, 1, 2))


def assert_matches_oracle(
  x, mask, kernel, bias, stride, padding, dilation, multi_channel, kernels=XLA
):
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  if padding == "SAME":
    pads = (same_pads(h, k, stride, dilation), same_pads(w, k, stride, dilation))
  else:
    pads = layers.normalize_padding(padding)
  ref_mask = None
  if mask is not None:
    ref_mask = to_nchw(np.broadcast_to(mask, x.shape[:3] + (mask.shape[-1],)))
    if multi_channel and mask.shape[-1] == 1:
      ref_mask = np.repeat(ref_mask, x.shape[-1], axis=1)
  want, want_mask = reference_partial_conv(
    to_nchw(x).astype(np.float64),
    ref_mask,
    np.transpose(kernel, (3, 2, 0, 1)).astype(np.float64),
    None if bias is None else bias.astype(np.float64),
    stride,
    pads,
    dilation,
    multi_channel,
  )

  got, got_mask = layers.partial_conv(
    jnp.asarray(x),
    None if mask is None else jnp.asarray(mask),
    jnp.asarray(kernel),
    None if bias is None else jnp.asarray(bias),
    strides=(stride, stride),
    padding=padding,
    dilation=(dilation, dilation),
    multi_channel=multi_channel,
    kernels=kernels,
  )
  got, got_mask = to_nchw(np.asarray(got)), to_nchw(np.asarray(got_mask))

  assert got.shape == want.shape
  scale = np.abs(want).max() + 1e-12
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  # Masks are exact. The reference's mask channels are all equal; we return one channel of it.
  assert np.all(want_mask == want_mask[:, :1])
  np.testing.assert_array_equal(got_mask, np.broadcast_to(want_mask[:, :1], got_mask.shape))


PADDINGS = ["half", 0, ((1, 2), (0, 3)), "SAME"]


@pytest.mark.parametrize(
  "kernel_size,stride,dilation,padding",
  list(itertools.product([1, 3, 5, 7], [1, 2], [1, 2], PADDINGS)),
)
def test_partial_conv_matches_reference(kernel_size, stride, dilation, padding):
  if padding == "half":
    padding = (kernel_size // 2) * dilation
  rng = np.random.default_rng([kernel_size, stride, dilation, len(str(padding))])
  batch, h, w, cin, cout = 2, 14, 17, 3, 4
  x = rng.normal(size=(batch, h, w, cin)).astype(np.float32)
  kernel = rng.normal(size=(kernel_size, kernel_size, cin, cout)).astype(np.float32)
  bias = rng.normal(size=(cout,)).astype(np.float32)
  masks = {
    "none": None,
    "ones": np.ones((batch, h, w, 1), np.float32),
    "binary_1ch": (rng.random((batch, h, w, 1)) > 0.4).astype(np.float32),
    "binary_per_channel": (rng.random((batch, h, w, cin)) > 0.5).astype(np.float32),
  }
  for (name, mask), use_bias, multi in itertools.product(
    masks.items(), [True, False], [True, False]
  ):
    if name == "binary_per_channel" and not multi:
      continue
    assert_matches_oracle(
      x, mask, kernel, bias if use_bias else None, stride, padding, dilation, multi
    )


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, 1), (5, 2, "SAME")])
def test_partial_conv_with_the_cpu_engine_matches_reference(kernel_size, stride, padding):
  rng = np.random.default_rng([kernel_size, stride])
  x = rng.normal(size=(2, 20, 17, 40)).astype(np.float32)
  mask = (rng.random((2, 20, 17, 1)) > 0.4).astype(np.float32)
  for outputs in (3, 16):  # Few outputs (per-tap products on CPU) and many.
    kernel = rng.normal(size=(kernel_size, kernel_size, 40, outputs)).astype(np.float32)
    bias = rng.normal(size=(outputs,)).astype(np.float32)
    assert_matches_oracle(x, mask, kernel, bias, stride, padding, 1, True, kernels=CpuKernels())


def test_conv_baseline_is_a_plain_convolution_of_the_upsampled_blocks():
  rng = np.random.default_rng(6)
  low, skip = (
    rng.normal(size=(2, 6, 5, 4)).astype(np.float32),
    rng.normal(size=(2, 12, 10, 3)).astype(np.float32),
  )
  layer = layers.Conv(5, 3, padding=1, upsample_first=True)
  variables = layer.init(jax.random.key(0), [low, skip])
  assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 7, 5), "bias": (5,)}}
  # Masks are ignored.
  out, mask = layer.apply(variables, [low, skip], [None, jnp.zeros((2, 12, 10, 1))])
  assert mask is None
  want = nn.Conv(5, (3, 3), padding=1).apply(
    variables, jnp.concatenate([layers.upsample2x(low), skip], -1)
  )
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_large_holes_give_zero_output_and_mask():
  x = np.random.default_rng(0).normal(size=(1, 16, 16, 2)).astype(np.float32)
  mask = np.ones((1, 16, 16, 1), np.float32)
  mask[:, 2:12, 3:13] = 0
  kernel = np.ones((3, 3, 2, 5), np.float32)
  bias = np.full((5,), 3.0, np.float32)
  out, new_mask = layers.partial_conv(x, mask, kernel, bias, padding=1, multi_channel=True)
  inner = np.asarray(new_mask)[0, 3:11, 4:12, 0]
  assert np.all(inner == 0)
  assert np.all(np.asarray(out)[0, 3:11, 4:12] == 0)  # No bias leaks into holes.
  assert_matches_oracle(x, mask, kernel, bias, 1, 1, 1, True)


def test_hole_bias_adds_the_bias_in_all_hole_windows_too():
  """PConv-Keras' layer: conv(X*M)*ratio + b everywhere; elsewhere the same as NVIDIA's."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 16, 16, 2)).astype(np.float32)
  mask = np.ones((1, 16, 16, 1), np.float32)
  mask[:, 2:12, 3:13] = 0
  kernel = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
  bias = rng.normal(size=(5,)).astype(np.float32)
  nvidia, new_mask = layers.partial_conv(x, mask, kernel, bias, padding=1, multi_channel=True)
  keras, keras_mask = layers.partial_conv(
    x, mask, kernel, bias, padding=1, multi_channel=True, hole_bias=True
  )
  valid = np.asarray(new_mask)[..., 0] == 1
  np.testing.assert_array_equal(np.asarray(keras_mask), np.asarray(new_mask))
  np.testing.assert_array_equal(np.asarray(keras)[valid], np.asarray(nvidia)[valid])
  np.testing.assert_array_equal(
    np.asarray(keras)[~valid], np.broadcast_to(bias, ((~valid).sum(), 5))
  )


def test_fast_mask_path_equals_full_ones_convolution():
  """Channel sum + single-channel window sum == the reference's (Cout,
  Cin, k, k) all-ones convolution."""
  rng = np.random.default_rng(1)
  cin, cout = 6, 5
  mask = (rng.random((2, 17, 15, cin)) > 0.5).astype(np.float32)
  for k, s, d, p in itertools.product([1, 3, 7], [1, 2], [1, 2], [0, 3, "SAME"]):
    channel_sum = layers.channel_sum(jnp.asarray(mask), cin, True, jnp.float32)
    fast = layers.window_sum(channel_sum, (k, k), (s, s), p, (d, d))
    full = lax.conv_general_dilated(
      jnp.asarray(mask),
      jnp.ones((k, k, cin, cout)),
      (s, s),
      layers.normalize_padding(p),
      rhs_dilation=(d, d),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST,
    )
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(fast), full.shape), np.asarray(full))


def test_bfloat16_activations_have_no_nan_and_exact_masks():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 32, 32, 8)).astype(np.float32)
  mask = np.ones((2, 32, 32, 1), np.float32)
  mask[:, 4:28, 4:28] = 0
  mask[1] = 0  # An all-hole image.
  layer = layers.PartialConv(16, 3, strides=2, padding=1, multi_channel=True, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x, mask)
  out, new_mask = layer.apply(variables, jnp.asarray(x, jnp.bfloat16), mask)
  _, want_mask = layer.apply(variables, x, mask)
  assert out.dtype == jnp.bfloat16 and new_mask.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  np.testing.assert_array_equal(np.asarray(new_mask), np.asarray(want_mask))
  # Gradients through an all-hole image stay finite too.
  grads = jax.grad(lambda v: jnp.sum(layer.apply(v, jnp.asarray(x, jnp.bfloat16), mask)[0]))(
    variables
  )
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))


def test_no_gradient_through_mask_path():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 2)), jnp.float32)
  mask = jnp.asarray(rng.random((1, 8, 8, 2)) > 0.3, jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)

  def f(m):
    out, new_mask = layers.partial_conv(x, m, kernel, None, padding=1, multi_channel=True)
    return jnp.sum(out) + jnp.sum(new_mask)

  assert np.all(np.asarray(jax.grad(f)(mask)) == 0)


def test_module_parameters_and_output_shapes():
  x = jnp.zeros((3, 20, 24, 5))
  layer = layers.PartialConv(7, (5, 3), strides=2, padding=((2, 2), (1, 1)), multi_channel=True)
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["kernel"].shape == (5, 3, 5, 7)
  assert variables["params"]["bias"].shape == (7,)
  out, mask = layer.apply(variables, x)
  assert out.shape == (3, 10, 12, 7) and mask.shape == (3, 10, 12, 1)
  no_bias = layers.PartialConv(7, 3, use_bias=False).init(
    jax.random.key(0), jnp.zeros((1, 4, 4, 1))
  )
  assert set(no_bias["params"]) == {"kernel"}


@pytest.mark.parametrize(
  "mask_shape,multi,match",
  [
    ((1, 8, 8, 3), False, "multi_channel=True"),
    ((1, 8, 7, 1), True, "height and width"),
    ((2, 8, 8, 2), True, "1 or 3 channels"),
    ((3, 8, 8, 1), True, "batch 1 or 2"),
  ],
)
def test_bad_mask_shapes_are_explained(mask_shape, multi, match):
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=match):
    layers.partial_conv(
      x, jnp.ones(mask_shape), jnp.ones((3, 3, 3, 4)), None, padding=1, multi_channel=multi
    )


@pytest.mark.parametrize("padding", ["FULL", (1, 2, 3), ((1, 2), (3,))])
def test_bad_padding_is_explained(padding):
  with pytest.raises(ValueError, match="padding must be"):
    layers.normalize_padding(padding)


def test_channel_blocks_equal_the_concatenated_input_and_mask():
  rng = np.random.default_rng(5)
  up, skip = rng.normal(size=(2, 12, 10, 4)), rng.normal(size=(2, 12, 10, 3))
  up_mask = (rng.random((2, 12, 10, 1)) > 0.3).astype(np.float64)
  kernel, bias = rng.normal(size=(3, 3, 7, 5)), rng.normal(size=(5,))
  for skip_mask in (
    None,
    (rng.random((2, 12, 10, 1)) > 0.5) * 1.0,
    (rng.random((1, 12, 10, 3)) > 0.5) * 1.0,
  ):
    whole_mask = np.concatenate(
      [
        np.broadcast_to(up_mask, up.shape),
        np.broadcast_to(np.ones((1, 12, 10, 1)) if skip_mask is None else skip_mask, skip.shape),
      ],
      axis=-1,
    )
    with jax.enable_x64(True):

      def blocks(up, skip, kernel):
        return layers.partial_conv(
          [up, skip], [up_mask, skip_mask], kernel, bias, padding=1, multi_channel=True
        )

      def whole(up, skip, kernel):
        return layers.partial_conv(
          jnp.concatenate([up, skip], -1), whole_mask, kernel, bias, padding=1, multi_channel=True
        )

      for fn in (blocks, whole):  # Each against the oracle; their gradients against each other.
        out, new_mask = fn(up, skip, kernel)
        want, want_mask = reference_partial_conv(
          np.concatenate([up, skip], -1).transpose(0, 3, 1, 2),
          whole_mask.transpose(0, 3, 1, 2),
          kernel.transpose(3, 2, 0, 1),
          bias,
          1,
          ((1, 1), (1, 1)),
          1,
          True,
        )
        np.testing.assert_allclose(out, want.transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(new_mask[..., 0], want_mask.transpose(0, 2, 3, 1)[..., 0])
      loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0]))  # noqa: E731
      for got, want in zip(
        jax.grad(loss(blocks), (0, 1, 2))(up, skip, kernel),
        jax.grad(loss(whole), (0, 1, 2))(up, skip, kernel),
      ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size,cin,cout", [(20, 6, 5), (8, 6, 5), (20, 16, 2)])
def test_upsample_first_equals_the_upsampled_blocks(size, cin, cout):
  """A half-resolution first block (and mask) upsampled by the layer: the same values and gradients
  as upsampling it first (the CPU engine's phases against the plain path:
  tests/kernels/test_cpu.py)."""
  rng = np.random.default_rng(size)
  low, skip = (
    rng.normal(size=(2, size // 2, size // 2 + 1, cin)),
    rng.normal(size=(2, size, size + 2, 3)),
  )
  low_mask = (rng.random((2, size // 2, size // 2 + 1, 1)) > 0.3).astype(np.float64)
  skip_mask = (rng.random((1, size, size + 2, 3)) > 0.5).astype(np.float64)
  kernel, bias = rng.normal(size=(3, 3, cin + 3, cout)), rng.normal(size=(cout,))
  with jax.enable_x64(True):

    def first(low, skip, kernel):
      return layers.partial_conv(
        [low, skip],
        [low_mask, skip_mask],
        kernel,
        bias,
        padding=1,
        multi_channel=True,
        upsample_first=True,
      )

    def upsampled(low, skip, kernel):
      return layers.partial_conv(
        [layers.upsample2x(low), skip],
        [layers.upsample2x(low_mask), skip_mask],
        kernel,
        bias,
        padding=1,
        multi_channel=True,
      )

    (out, new_mask), (want, want_mask) = first(low, skip, kernel), upsampled(low, skip, kernel)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(new_mask, want_mask)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0]))  # noqa: E731
    for got, expected in zip(
      jax.grad(loss(first), (0, 1, 2))(low, skip, kernel),
      jax.grad(loss(upsampled), (0, 1, 2))(low, skip, kernel),
    ):
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_bad_channel_blocks_are_explained():
  x, kernel = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 4, 1))
  with pytest.raises(ValueError, match="multi_channel=True"):
    layers.partial_conv([x, x], [None, None], kernel, None, padding=1)
  with pytest.raises(ValueError, match="takes 4 input channels"):
    layers.partial_conv(
      [x, x, x], [None, None, None], jnp.ones((3, 3, 4, 1)), None, padding=1, multi_channel=True
    )
  with pytest.raises(ValueError, match="does not fit"):
    layers.partial_conv(
      [x, x], [None, jnp.ones((1, 4, 4, 1))], kernel, None, padding=1, multi_channel=True
    )
  with pytest.raises(ValueError, match="list of input channel blocks"):
    layers.partial_conv(
      jnp.ones((1, 8, 8, 4)), [None, None], kernel, None, padding=1, multi_channel=True
    )
  with pytest.raises(ValueError, match="same height and width"):
    layers.partial_conv(
      [x, jnp.ones((1, 4, 4, 2))], [None, None], kernel, None, padding=1, multi_channel=True
    )
  with pytest.raises(ValueError, match=r"the first at half of them, with upsample_first"):
    layers.partial_conv(
      [x, x], [None, None], kernel, None, padding=1, multi_channel=True, upsample_first=True
    )
  with pytest.raises(ValueError, match="at least two channel blocks"):
    layers.partial_conv(
      [jnp.ones((1, 4, 4, 4))],
      [None],
      kernel,
      None,
      padding=1,
      multi_channel=True,
      upsample_first=True,
    )
