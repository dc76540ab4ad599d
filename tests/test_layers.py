"""PartialConv against an independent float64 NumPy oracle of NVIDIA's PartialConv2d formula."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pconv_jax import layers, winograd


def conv2d_nchw(x, w, stride, pads, dilation):
  """Naive cross-correlation in float64, NCHW input, OIHW kernel, pads ((top, bottom), (left, right))."""
  (pt, pb), (pl, pr) = pads
  x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
  n, _, h, wd = x.shape
  cout, _, kh, kw = w.shape
  oh = (h - dilation * (kh - 1) - 1) // stride + 1
  ow = (wd - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros((n, cout, oh, ow))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i * dilation: i * dilation + stride * (oh - 1) + 1: stride,
                j * dilation: j * dilation + stride * (ow - 1) + 1: stride]
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


def assert_matches_oracle(x, mask, kernel, bias, stride, padding, dilation, multi_channel):
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
      to_nchw(x).astype(np.float64), ref_mask, np.transpose(kernel, (3, 2, 0, 1)).astype(np.float64),
      None if bias is None else bias.astype(np.float64), stride, pads, dilation, multi_channel)

  got, got_mask = layers.partial_conv(
      jnp.asarray(x), None if mask is None else jnp.asarray(mask), jnp.asarray(kernel),
      None if bias is None else jnp.asarray(bias), strides=(stride, stride), padding=padding,
      dilation=(dilation, dilation), multi_channel=multi_channel)
  got, got_mask = to_nchw(np.asarray(got)), to_nchw(np.asarray(got_mask))

  assert got.shape == want.shape
  scale = np.abs(want).max() + 1e-12
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  # Masks are exact. The reference's mask channels are all equal; we return one channel of it.
  assert np.all(want_mask == want_mask[:, :1])
  np.testing.assert_array_equal(got_mask, np.broadcast_to(want_mask[:, :1], got_mask.shape))


PADDINGS = ["half", 0, ((1, 2), (0, 3)), "SAME"]


@pytest.mark.parametrize("kernel_size,stride,dilation,padding",
                         list(itertools.product([1, 3, 5, 7], [1, 2], [1, 2], PADDINGS)))
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
  for (name, mask), use_bias, multi in itertools.product(masks.items(), [True, False], [True, False]):
    if name == "binary_per_channel" and not multi:
      continue
    assert_matches_oracle(x, mask, kernel, bias if use_bias else None, stride, padding, dilation, multi)


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


def test_fast_mask_path_equals_full_ones_convolution():
  """Channel sum + single-channel window sum == the reference's (Cout, Cin, k, k) all-ones convolution."""
  rng = np.random.default_rng(1)
  cin, cout = 6, 5
  mask = (rng.random((2, 17, 15, cin)) > 0.5).astype(np.float32)
  for k, s, d, p in itertools.product([1, 3, 7], [1, 2], [1, 2], [0, 3, "SAME"]):
    fast = layers.valid_count(jnp.asarray(mask), (k, k), (s, s), p, (d, d), cin, multi_channel=True)
    full = lax.conv_general_dilated(
        jnp.asarray(mask), jnp.ones((k, k, cin, cout)), (s, s), layers.normalize_padding(p),
        rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
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
  grads = jax.grad(lambda v: jnp.sum(layer.apply(v, jnp.asarray(x, jnp.bfloat16), mask)[0]))(variables)
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
  no_bias = layers.PartialConv(7, 3, use_bias=False).init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  assert set(no_bias["params"]) == {"kernel"}


@pytest.mark.parametrize("mask_shape,multi,match", [
    ((1, 8, 8, 3), False, "multi_channel=True"),
    ((1, 8, 7, 1), True, "height and width"),
    ((2, 8, 8, 2), True, "1 or 3 channels"),
    ((3, 8, 8, 1), True, "batch 1 or 2"),
])
def test_bad_mask_shapes_are_explained(mask_shape, multi, match):
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=match):
    layers.partial_conv(x, jnp.ones(mask_shape), jnp.ones((3, 3, 3, 4)), None, padding=1, multi_channel=multi)


@pytest.mark.parametrize("padding", ["FULL", (1, 2, 3), ((1, 2), (3,))])
def test_bad_padding_is_explained(padding):
  with pytest.raises(ValueError, match="padding must be"):
    layers.normalize_padding(padding)


def conv_oracle(x, w, stride, pads):
  """conv(x, w) in float64, NHWC / HWIO, from the definition (a sum over the kernel's taps)."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride],
                       w[i, j]) for i, j in itertools.product(range(kh), range(kw)))


def conv_gradients_oracle(x, w, g, stride, pads):
  """Input and kernel gradients of sum(g * conv(x, w)) in float64, NHWC / HWIO, from the definition."""
  (pt, pb), (pl, pr) = pads
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = g.shape[1:3]
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for i, j in itertools.product(range(kh), range(kw)):
    window = (slice(None), slice(i, i + stride * (oh - 1) + 1, stride), slice(j, j + stride * (ow - 1) + 1, stride))
    dw[i, j] = np.einsum("nhwc,nhwo->co", xp[window], g)
    dxp[window] += np.einsum("nhwo,co->nhwc", g, w[i, j])
  return dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2]], dw


# Covering both ways each gradient is computed on CPU (XLA's convolution, or matrix products over the taps),
# and the forward against its own oracle.
@pytest.mark.parametrize("size,kernel_size,stride,padding,cin,cout", [
    (20, 3, 1, "SAME", 5, 4), (12, 3, 1, 1, 5, 4), (6, 3, 1, ((0, 2), (1, 1)), 5, 4), (20, 5, 2, 2, 5, 4),
    (9, 7, 2, ((3, 2), (1, 3)), 5, 4), (4, 3, 2, "SAME", 5, 4), (20, 3, 1, 1, 40, 3), (11, 3, 2, "SAME", 40, 3),
    (12, 3, 1, ((2, 0), (1, 1)), 12, 4), (8, 3, 1, ((2, 0), (0, 1)), 40, 3), (18, 2, 1, 1, 5, 12)])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv2d_gradients_match_oracle(size, kernel_size, stride, padding, cin, cout, batch):
  rng = np.random.default_rng([size, kernel_size, stride, cin])
  x = rng.normal(size=(batch, size, size + 1, cin))
  w = rng.normal(size=(kernel_size, kernel_size, cin, cout))
  pads = layers.normalize_padding(padding)
  if isinstance(pads, str):
    pads = tuple(lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride, stride), pads))
  with jax.enable_x64(True):
    y, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, (stride, stride), padding), jnp.asarray(x), jnp.asarray(w))
    g = rng.normal(size=y.shape)
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == dx.dtype == dw.dtype == jnp.float64
  want_dx, want_dw = conv_gradients_oracle(x, w, g, stride, pads)
  np.testing.assert_allclose(y, conv_oracle(x, w, stride, pads), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-10, atol=1e-10)
  # Layers with taps x outputs < inputs compute their forward without a convolution.
  forward = jax.jit(lambda x, w: layers.conv2d(x, w, (stride, stride), padding)).lower(x, w).as_text()
  assert forward.count("stablehlo.convolution") == (0 if kernel_size ** 2 * cout < cin else 1)


def test_few_output_conv2d_in_bfloat16_rounds_once():
  """The per-tap forward of few-output layers accumulates bfloat16 inputs in float32 and rounds once at the end."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 67)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 67, 3)) * 0.1, jnp.bfloat16)
  y = layers.conv2d(x, w, (1, 1), "SAME")
  assert y.dtype == jnp.bfloat16
  exact = conv_oracle(np.asarray(x, np.float64), np.asarray(w, np.float64), 1, ((1, 1), (1, 1)))
  rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), rounded, rtol=2.0 ** -7, atol=1e-6)


@pytest.mark.parametrize("devices", [1, 2])
def test_conv2d_weight_gradient_by_image_matches_oracle(devices):
  """With the batch declared split over `devices`, large layers' weight gradients are summed image by image."""
  rng = np.random.default_rng(devices)
  x, w = rng.normal(size=(4, 64, 64, 3)), rng.normal(size=(3, 3, 3, 2))
  g = rng.normal(size=(4, 64, 64, 2))
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def grads(x, w, g):
    with layers.batch_shards(devices):
      return jax.vjp(lambda x, w: layers.conv2d(x, w, (1, 1), "SAME"), x, w)[1](g)

  with jax.enable_x64(True):
    step = jax.jit(grads, in_shardings=(batch, None, batch))
    dx, dw = step(*(jnp.asarray(a) for a in (x, w, g)))
    # One input-gradient convolution, and one weight-gradient convolution per image of each device.
    assert step.lower(x, w, g).as_text().count("stablehlo.convolution") == 1 + 4 // devices
  want_dx, want_dw = conv_gradients_oracle(x, w, g, 1, ((1, 1), (1, 1)))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch,height,width,cin,cout", [(1, 4, 4, 1, 1), (2, 7, 10, 3, 5), (1, 13, 8, 4, 6)])
def test_winograd_conv3x3_is_exact_in_float64(batch, height, width, cin, cout):
  """F(4x4, 3x3) is an exact algorithm: in float64 it equals the convolution's definition to rounding, for sizes
  that are and are not multiples of the 4x4 tile."""
  rng = np.random.default_rng([batch, height, width])
  x, w = rng.normal(size=(batch, height, width, cin)), rng.normal(size=(3, 3, cin, cout))
  with jax.enable_x64(True):
    y = winograd.conv3x3(jnp.asarray(x), jnp.asarray(w))
    assert y.dtype == jnp.float64
  np.testing.assert_allclose(y, conv_oracle(x, w, 1, ((1, 1), (1, 1))), rtol=1e-12, atol=1e-12)


def test_winograd_applies_to_wide_float32_layers_only():
  assert winograd.is_faster((3, 64, 64, 256), (3, 3, 256, 256), jnp.float32)  # VGG's conv3 block.
  assert winograd.is_faster((2, 128, 128, 64), (3, 3, 64, 128), jnp.float32)  # conv2_1.
  assert not winograd.is_faster((2, 256, 256, 64), (3, 3, 64, 64), jnp.float32)  # conv1_2: too few channels.
  assert not winograd.is_faster((2, 16, 16, 512), (3, 3, 512, 512), jnp.float32)  # Too few positions.
  assert not winograd.is_faster((3, 64, 64, 256), (3, 3, 256, 256), jnp.bfloat16)


@pytest.mark.parametrize("devices,batch", [(1, 1), (1, 3), (2, 4)])
def test_winograd_conv2d_and_gradients_match_oracle(devices, batch):
  """float32 layers that conv2d computes by Winograd (forward and input gradient, one image per device at a
  time) against the float64 definition, to float32 rounding."""
  rng = np.random.default_rng([devices, batch])
  x, w = rng.normal(size=(batch, 34, 37, 64)), rng.normal(size=(3, 3, 64, 128)) / 24
  g = rng.normal(size=(batch, 34, 37, 128))
  assert winograd.is_faster(x.shape, w.shape, jnp.float32) and winograd.is_faster(g.shape, w.shape[:2] + (128, 64),
                                                                                     jnp.float32)
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def forward_and_gradients(x, w, g):
    with layers.batch_shards(devices):
      y, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, (1, 1), "SAME"), x, w)
      return (y,) + vjp(g)

  step = jax.jit(forward_and_gradients, in_shardings=(sharded, None, sharded))
  y, dx, dw = step(*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
  # Only the weight gradient is a convolution.
  assert step.lower(x, w, g).as_text().count("stablehlo.convolution") == 1
  want_dx, want_dw = conv_gradients_oracle(x, w, g, 1, ((1, 1), (1, 1)))
  for got, want in ((y, conv_oracle(x, w, 1, ((1, 1), (1, 1)))), (dx, want_dx), (dw, want_dw)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_channel_blocks_equal_the_concatenated_input_and_mask():
  rng = np.random.default_rng(5)
  up, skip = rng.normal(size=(2, 12, 10, 4)), rng.normal(size=(2, 12, 10, 3))
  up_mask = (rng.random((2, 12, 10, 1)) > 0.3).astype(np.float64)
  kernel, bias = rng.normal(size=(3, 3, 7, 5)), rng.normal(size=(5,))
  for skip_mask in (None, (rng.random((2, 12, 10, 1)) > 0.5) * 1.0, (rng.random((1, 12, 10, 3)) > 0.5) * 1.0):
    whole_mask = np.concatenate([np.broadcast_to(up_mask, up.shape), np.broadcast_to(
        np.ones((1, 12, 10, 1)) if skip_mask is None else skip_mask, skip.shape)], axis=-1)
    with jax.enable_x64(True):
      def blocks(up, skip, kernel):
        return layers.partial_conv([up, skip], [up_mask, skip_mask], kernel, bias, padding=1, multi_channel=True)

      def whole(up, skip, kernel):
        return layers.partial_conv(jnp.concatenate([up, skip], -1), whole_mask, kernel, bias, padding=1,
                                   multi_channel=True)

      for fn in (blocks, whole):  # Each against the oracle; their gradients against each other.
        out, new_mask = fn(up, skip, kernel)
        want, want_mask = reference_partial_conv(
            np.concatenate([up, skip], -1).transpose(0, 3, 1, 2), whole_mask.transpose(0, 3, 1, 2),
            kernel.transpose(3, 2, 0, 1), bias, 1, ((1, 1), (1, 1)), 1, True)
        np.testing.assert_allclose(out, want.transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(new_mask[..., 0], want_mask.transpose(0, 2, 3, 1)[..., 0])
      loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0]))  # noqa: E731
      for got, want in zip(jax.grad(loss(blocks), (0, 1, 2))(up, skip, kernel),
                           jax.grad(loss(whole), (0, 1, 2))(up, skip, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size,cin,cout,convolutions", [(20, 6, 5, 2), (8, 6, 5, 1), (20, 16, 2, 0)])
def test_upsample_first_equals_the_upsampled_blocks(size, cin, cout, convolutions):
  """A half-resolution first block (and mask) upsampled by the layer: the same values and gradients as upsampling
  it first. On CPU, layers with more than 16x16 outputs convolve it at its own resolution (two convolutions, no
  upsampled input); smaller or few-output layers (one convolution, or none) upsample it."""
  rng = np.random.default_rng(size)
  low, skip = rng.normal(size=(2, size // 2, size // 2 + 1, cin)), rng.normal(size=(2, size, size + 2, 3))
  low_mask = (rng.random((2, size // 2, size // 2 + 1, 1)) > 0.3).astype(np.float64)
  skip_mask = (rng.random((1, size, size + 2, 3)) > 0.5).astype(np.float64)
  kernel, bias = rng.normal(size=(3, 3, cin + 3, cout)), rng.normal(size=(cout,))
  with jax.enable_x64(True):
    def first(low, skip, kernel):
      return layers.partial_conv([low, skip], [low_mask, skip_mask], kernel, bias, padding=1, multi_channel=True,
                                 upsample_first=True)

    def upsampled(low, skip, kernel):
      return layers.partial_conv([layers.upsample2x(low), skip], [layers.upsample2x(low_mask), skip_mask], kernel,
                                 bias, padding=1, multi_channel=True)

    (out, new_mask), (want, want_mask) = first(low, skip, kernel), upsampled(low, skip, kernel)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(new_mask, want_mask)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0]))  # noqa: E731
    for got, expected in zip(jax.grad(loss(first), (0, 1, 2))(low, skip, kernel),
                             jax.grad(loss(upsampled), (0, 1, 2))(low, skip, kernel)):
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    lowered = jax.jit(lambda *a: first(*a)[0]).lower(low, skip, kernel).as_text()
    assert lowered.count("stablehlo.convolution") == convolutions


def test_bad_channel_blocks_are_explained():
  x, kernel = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 4, 1))
  with pytest.raises(ValueError, match="multi_channel=True"):
    layers.partial_conv([x, x], [None, None], kernel, None, padding=1)
  with pytest.raises(ValueError, match="takes 4 input channels"):
    layers.partial_conv([x, x, x], [None, None, None], jnp.ones((3, 3, 4, 1)), None, padding=1, multi_channel=True)
  with pytest.raises(ValueError, match="does not fit"):
    layers.partial_conv([x, x], [None, jnp.ones((1, 4, 4, 1))], kernel, None, padding=1, multi_channel=True)
  with pytest.raises(ValueError, match="list of input channel blocks"):
    layers.partial_conv(jnp.ones((1, 8, 8, 4)), [None, None], kernel, None, padding=1, multi_channel=True)
  with pytest.raises(ValueError, match="same height and width"):
    layers.partial_conv([x, jnp.ones((1, 4, 4, 2))], [None, None], kernel, None, padding=1, multi_channel=True)
  with pytest.raises(ValueError, match=r"the first at half of them, with upsample_first"):
    layers.partial_conv([x, x], [None, None], kernel, None, padding=1, multi_channel=True, upsample_first=True)
  with pytest.raises(ValueError, match="at least two channel blocks"):
    layers.partial_conv([jnp.ones((1, 4, 4, 4))], [None], kernel, None, padding=1, multi_channel=True,
                        upsample_first=True)
