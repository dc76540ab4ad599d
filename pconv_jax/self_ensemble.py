"""Geometric self-ensemble (Lim et al. 2017, "EDSR+"): a network's output averaged over the 8
symmetries of the square.

Each symmetry g (a turn by a multiple of 90 degrees, mirrored or not) is applied to the input image
and its mask, the network runs on that, and g is undone on its output; the mean of the 8 is the
prediction. It costs 8 network passes and is worth most for a network trained on the same
symmetries (`config.data.random_rotate90` and `random_flip`). An inference option, not the paper's.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Predict = Callable[[jax.Array, jax.Array], jax.Array]


def _transform(x: jax.Array, turns: int, mirror: bool) -> jax.Array:
  """g(x) for (N, H, W, C): mirror left-right if `mirror`, then turn by `turns` x 90 degrees."""
  return jnp.rot90(x[:, :, ::-1] if mirror else x, turns, axes=(1, 2))


def _inverse(x: jax.Array, turns: int, mirror: bool) -> jax.Array:
  x = jnp.rot90(x, -turns, axes=(1, 2))
  return x[:, :, ::-1] if mirror else x


def mean_over_symmetries(predict: Predict, images: jax.Array, masks: jax.Array) -> jax.Array:
  """(1/8) sum over g of g^-1(predict(g(images), g(masks))) for (N, H, W, C) arrays; H may differ
  from W (the turned inputs are W x H). Traceable: jit the caller once."""
  total = None
  for mirror in (False, True):
    for turns in range(4):
      out = _inverse(
        predict(_transform(images, turns, mirror), _transform(masks, turns, mirror)), turns, mirror
      )
      total = out if total is None else total + out
  return total / 8
