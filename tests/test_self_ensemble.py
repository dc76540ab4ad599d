"""Tests for pconv_jax.self_ensemble against a NumPy oracle and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np

from pconv_jax import self_ensemble


def _symmetries(x: np.ndarray) -> list[tuple]:
  """(g, g^-1) for the 8 symmetries of the square, on (N, H, W, C) arrays, written independently."""
  pairs = []
  for k in range(4):
    pairs.append((lambda a, k=k: np.rot90(a, k, (1, 2)), lambda a, k=k: np.rot90(a, -k, (1, 2))))
    pairs.append(
      (
        lambda a, k=k: np.rot90(np.flip(a, 2), k, (1, 2)),
        lambda a, k=k: np.flip(np.rot90(a, -k, (1, 2)), 2),
      )
    )
  return pairs


def test_mean_over_symmetries_matches_a_numpy_oracle_on_a_non_square_input():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 5, 7, 3))
  masks = (rng.random((2, 5, 7, 1)) > 0.3).astype(float)
  weights = rng.normal(size=(3, 3))

  def predict(x, m, xp=jnp):  # Not equivariant: a cumulative sum along W and a ramp along H.
    return xp.cumsum(x @ weights * m, axis=2) + xp.arange(x.shape[1])[None, :, None, None]

  expected = np.mean(
    [inv(predict(g(images), g(masks), np)) for g, inv in _symmetries(images)], axis=0
  )
  with jax.enable_x64(True):
    got = jax.jit(lambda x, m: self_ensemble.mean_over_symmetries(predict, x, m))(images, masks)
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
  assert got.shape == images.shape


def test_closed_forms():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 3)))
  m = jnp.ones((1, 6, 6, 1))
  # An equivariant network (pointwise) is its own ensemble.
  np.testing.assert_allclose(
    self_ensemble.mean_over_symmetries(lambda a, b: jnp.tanh(a * b), x, m), jnp.tanh(x), atol=1e-6
  )
  # A horizontal ramp 0..1 added by the network averages, over the 8 orientations of a square, to
  # the mean of x, 1 - x, y and 1 - y: 1/2 everywhere.
  ramp = jnp.linspace(0.0, 1.0, 6)[None, None, :, None]
  out = self_ensemble.mean_over_symmetries(lambda a, b: a + ramp, x, m)
  np.testing.assert_allclose(out, x + 0.5, atol=1e-6)
