"""BatchNorm as PyTorch computes it (the U-Net's normalisation; imported statistics stay exact)."""

from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's `BatchNorm2d` semantics, so imported weights and
  statistics behave identically in both modes: training normalises with the biased batch variance
  and updates the running variance with the unbiased one; `momentum` is PyTorch's (running = (1 - m)
  running + m batch).

  Statistics are float32 (float64 for float64 inputs) whatever the activation dtype. Under `jax.jit`
  with the batch sharded over devices, the means are over the global batch. Variables: params
  `scale`, `bias`; batch_stats `mean`, `var`.
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
        raise ValueError(
          f"BatchNorm in training needs more than one value per channel, got input {x.shape}: "
          "use a larger batch."
        )
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (
          1 - self.momentum
        ) * running_var.value + self.momentum * var * count / (count - 1)
    y = (x32 - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype or x.dtype)
