"""Winograd's F(4x4, 3x3): exact in float64, and the CPU engine's
use of it against the float64 oracle."""

from conv_oracles import conv_gradients_oracle, conv_oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pconv_jax.kernels import CpuKernels, winograd


@pytest.mark.parametrize(
  "batch,height,width,cin,cout", [(1, 4, 4, 1, 1), (2, 7, 10, 3, 5), (1, 13, 8, 4, 6)]
)
def test_conv3x3_is_exact_in_float64(batch, height, width, cin, cout):
  """F(4x4, 3x3) is an exact algorithm: in float64 it equals the convolution's definition to
  rounding, for sizes that are and are not multiples of the 4x4 tile."""
  rng = np.random.default_rng([batch, height, width])
  x, w = rng.normal(size=(batch, height, width, cin)), rng.normal(size=(3, 3, cin, cout))
  with jax.enable_x64(True):
    y = winograd.conv3x3(jnp.asarray(x), jnp.asarray(w))
    assert y.dtype == jnp.float64
  np.testing.assert_allclose(y, conv_oracle(x, w, 1, ((1, 1), (1, 1))), rtol=1e-12, atol=1e-12)


def test_applies_to_wide_float32_layers_only():
  assert winograd.is_faster((3, 64, 64, 256), (3, 3, 256, 256), jnp.float32)  # VGG's conv3 block.
  assert winograd.is_faster((2, 128, 128, 64), (3, 3, 64, 128), jnp.float32)  # conv2_1.
  # conv1_2: too narrow.
  assert not winograd.is_faster((2, 256, 256, 64), (3, 3, 64, 64), jnp.float32)
  # Too few positions.
  assert not winograd.is_faster((2, 16, 16, 512), (3, 3, 512, 512), jnp.float32)
  assert not winograd.is_faster((3, 64, 64, 256), (3, 3, 256, 256), jnp.bfloat16)


@pytest.mark.parametrize("devices,batch", [(1, 1), (1, 3), (2, 4)])
def test_cpu_conv2d_and_gradients_match_oracle(devices, batch):
  """float32 layers that the CPU engine computes by Winograd (forward and input gradient, one image
  per device at a time) against the float64 definition, to float32 rounding."""
  rng = np.random.default_rng([devices, batch])
  x, w = rng.normal(size=(batch, 34, 37, 64)), rng.normal(size=(3, 3, 64, 128)) / 24
  g = rng.normal(size=(batch, 34, 37, 128))
  assert winograd.is_faster(x.shape, w.shape, jnp.float32)
  assert winograd.is_faster(g.shape, w.shape[:2] + (128, 64), jnp.float32)
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  kernels = CpuKernels(batch_shards=devices)

  def forward_and_gradients(x, w, g):
    y, vjp = jax.vjp(lambda x, w: kernels.conv2d(x, w, (1, 1), "SAME"), x, w)
    return (y,) + vjp(g)

  step = jax.jit(forward_and_gradients, in_shardings=(sharded, None, sharded))
  y, dx, dw = step(*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
  # Only the weight gradient is a convolution.
  assert step.lower(x, w, g).as_text().count("stablehlo.convolution") == 1
  want_dx, want_dw = conv_gradients_oracle(x, w, g, 1, ((1, 1), (1, 1)))
  for got, want in ((y, conv_oracle(x, w, 1, ((1, 1), (1, 1)))), (dx, want_dx), (dw, want_dw)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
