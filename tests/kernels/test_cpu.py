"""The CPU engine against the float64 oracles and the plain path: values, gradients, and which of
XLA:CPU's slow operations each rule avoids (counted in the lowered program)."""

from conv_oracles import conv_gradients_oracle, conv_oracle
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from pconv_jax import layers
from pconv_jax.kernels import XLA, CpuKernels

CPU = CpuKernels()
IMPLEMENTATIONS = {"xla": XLA, "cpu": CPU}


def pads_of(x_shape, kernel_size, stride, padding):
  pads = layers.normalize_padding(padding)
  if isinstance(pads, str):
    pads = lax.padtype_to_pads(x_shape[1:3], (kernel_size, kernel_size), (stride, stride), pads)
  return tuple(tuple(p) for p in pads)


def convolutions(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")


# Each way a gradient is computed on CPU (XLA's convolution, or matrix products over the taps), and
# the forward against its own oracle.
@pytest.mark.parametrize(
  "size,kernel_size,stride,padding,cin,cout",
  [
    (20, 3, 1, "SAME", 5, 4),
    (12, 3, 1, 1, 5, 4),
    (6, 3, 1, ((0, 2), (1, 1)), 5, 4),
    (20, 5, 2, 2, 5, 4),
    (9, 7, 2, ((3, 2), (1, 3)), 5, 4),
    (4, 3, 2, "SAME", 5, 4),
    (20, 3, 1, 1, 40, 3),
    (11, 3, 2, "SAME", 40, 3),
    (12, 3, 1, ((2, 0), (1, 1)), 12, 4),
    (8, 3, 1, ((2, 0), (0, 1)), 40, 3),
    (18, 2, 1, 1, 5, 12),
  ],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_conv2d_and_gradients_match_oracle(size, kernel_size, stride, padding, cin, cout, batch):
  rng = np.random.default_rng([size, kernel_size, stride, cin])
  x = rng.normal(size=(batch, size, size + 1, cin))
  w = rng.normal(size=(kernel_size, kernel_size, cin, cout))
  pads = pads_of(x.shape, kernel_size, stride, padding)

  def conv(x, w):
    return CPU.conv2d(x, w, (stride, stride), layers.normalize_padding(padding))

  with jax.enable_x64(True):
    y, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(w))
    g = rng.normal(size=y.shape)
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == dx.dtype == dw.dtype == jnp.float64
  want_dx, want_dw = conv_gradients_oracle(x, w, g, stride, pads)
  np.testing.assert_allclose(y, conv_oracle(x, w, stride, pads), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-10, atol=1e-10)
  # Layers with taps x outputs < inputs compute their forward without a convolution.
  assert convolutions(conv, x, w) == (0 if kernel_size**2 * cout < cin else 1)


def test_few_output_conv2d_in_bfloat16_rounds_once():
  """The per-tap forward of few-output layers accumulates bfloat16 in float32 and rounds once."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 67)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 67, 3)) * 0.1, jnp.bfloat16)
  y = CPU.conv2d(x, w, (1, 1), "SAME")
  assert y.dtype == jnp.bfloat16
  exact = conv_oracle(np.asarray(x, np.float64), np.asarray(w, np.float64), 1, ((1, 1), (1, 1)))
  rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), rounded, rtol=2.0**-7, atol=1e-6)


def test_widened_and_dilated_convolutions_take_the_plain_path():
  """A bfloat16 convolution accumulated into float32 (VGG's) and
  a dilated one are XLA's, bit for bit."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 67)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 67, 3)), jnp.bfloat16)
  for args in (((1, 1), "SAME", (1, 1), None, jnp.float32), ((1, 1), "SAME", (2, 2))):
    got, want = CPU.conv2d(x, w, *args), XLA.conv2d(x, w, *args)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("devices", [1, 2])
def test_weight_gradient_by_image_matches_oracle(devices):
  """With the batch split over `devices`, large layers' weight
  gradients are summed image by image."""
  rng = np.random.default_rng(devices)
  x, w = rng.normal(size=(4, 64, 64, 3)), rng.normal(size=(3, 3, 3, 2))
  g = rng.normal(size=(4, 64, 64, 2))
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  kernels = CpuKernels(batch_shards=devices)

  def grads(x, w, g):
    return jax.vjp(lambda x, w: kernels.conv2d(x, w, (1, 1), "SAME"), x, w)[1](g)

  with jax.enable_x64(True):
    step = jax.jit(grads, in_shardings=(batch, None, batch))
    dx, dw = step(*(jnp.asarray(a) for a in (x, w, g)))
    # One input-gradient convolution, and one weight-gradient convolution per image of each device.
    assert step.lower(x, w, g).as_text().count("stablehlo.convolution") == 1 + 4 // devices
  want_dx, want_dw = conv_gradients_oracle(x, w, g, 1, ((1, 1), (1, 1)))
  np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
  "size,cin,cout,convolutions_wanted", [(20, 6, 5, 2), (8, 6, 5, 1), (20, 16, 2, 0)]
)
def test_upsampled_conv2d_equals_the_plain_path(size, cin, cout, convolutions_wanted):
  """Layers with more than 16x16 outputs convolve the low-resolution block at its own resolution by
  phases (two convolutions, no upsampled input): values and gradients as
  upsample-concatenate-convolve. Smaller layers (one convolution) and few-output layers (none)
  upsample it."""
  rng = np.random.default_rng(size)
  low = rng.normal(size=(2, size // 2, size // 2 + 1, cin))
  rest = rng.normal(size=(2, size, size + 2, 3))
  kernel = rng.normal(size=(3, 3, cin + 3, cout))
  pads = ((1, 1), (1, 1))

  def loss(kernels):
    return lambda *a: jnp.sum(jnp.sin(kernels.upsampled_conv2d(*a, (1, 1), pads)))

  with jax.enable_x64(True):
    got = CPU.upsampled_conv2d(low, rest, kernel, (1, 1), pads)
    np.testing.assert_allclose(
      got, XLA.upsampled_conv2d(low, rest, kernel, (1, 1), pads), rtol=1e-10, atol=1e-10
    )
    for got, want in zip(
      jax.grad(loss(CPU), (0, 1, 2))(low, rest, kernel),
      jax.grad(loss(XLA), (0, 1, 2))(low, rest, kernel),
    ):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    forward = lambda *a: CPU.upsampled_conv2d(*a, (1, 1), pads)  # noqa: E731
    assert convolutions(forward, low, rest, kernel) == convolutions_wanted


def max_pool_oracle(x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """2x2 stride-2 VALID max pooling and its gradient, sent to each
  window's first maximum in row-major order."""
  y, dx = np.zeros(g.shape), np.zeros(x.shape)
  for n, i, j, k in np.ndindex(*g.shape):
    window = [(2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1)]
    values = [x[n, r, s, k] for r, s in window]
    r, s = window[int(np.argmax(values))]  # argmax returns the first maximum.
    y[n, i, j, k], dx[n, r, s, k] = x[n, r, s, k], g[n, i, j, k]
  return y, dx


# Even, and odd (last row/column dropped).
@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2)])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_max_pool_values_and_gradient_with_ties(shape, impl):
  kernels = IMPLEMENTATIONS[impl]
  rng = np.random.default_rng(0)
  # ReLU-like: many exact ties, at 0 and above.
  x = np.round(rng.normal(size=shape) * 1.5).clip(0, None)
  out_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  g = rng.normal(size=out_shape)
  y, vjp = jax.vjp(kernels.max_pool_2x2, jnp.asarray(x, jnp.float32))
  (dx,) = vjp(jnp.asarray(g, jnp.float32))
  want_y, want_dx = max_pool_oracle(x, g)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-6)
  if kernels is CPU:  # No reduction: XLA:CPU would fuse one into the preceding convolution.
    lowered = jax.jit(kernels.max_pool_2x2).lower(jnp.asarray(x, jnp.float32)).as_text()
    assert "stablehlo.reduce" not in lowered
  torch = pytest.importorskip("torch")  # PyTorch's max_pool2d breaks ties the same way.
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  torch.nn.functional.max_pool2d(xt, 2).backward(torch.tensor(g.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6)
