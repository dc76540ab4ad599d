"""The loss of Liu et al. (ECCV 2018), eqs. 1-7: pure, jit-able functions, one per term, and their
weighted sum.

With output I_out, ground truth I_gt, mask M (1 = valid, 0 = hole), composite
I_comp = M I_gt + (1 - M) I_out, and Psi_p the VGG-16 features pool1, pool2, pool3:

  valid       = mean |M (I_out - I_gt)|                  (mean over all B*H*W*C elements)
  hole        = mean |(1 - M)(I_out - I_gt)|
  perceptual  = sum_p mean |Psi_p(I_out) - Psi_p(I_gt)| + sum_p mean |Psi_p(I_comp) - Psi_p(I_gt)|
  style_out   = sum_p mean |G_p(I_out) - G_p(I_gt)|,
                G_p = Psi_p^T Psi_p / (C_p H_p W_p), per image (C_p x C_p)
  style_comp  = sum_p mean |G_p(I_comp) - G_p(I_gt)|
  tv          = sum over neighbouring pixel pairs both inside P of |I_comp difference|, / B*H*W*C,
                P = the hole region dilated by one pixel (3x3 square)
  ssim        = 1 - mean over images of SSIM(I_comp, I_gt) on [0, 1], the evaluation's SSIM
                (`metrics.ssim`); not in the paper
  total       = sum_t weights[t] * t
                (paper: valid 1, hole 6, perceptual 0.05, style 120 + 120, tv 0.1, ssim 0)

Pixel terms are float32 (float64 for float64 outputs). VGG activations use the output's dtype
(bfloat16 output -> bfloat16 VGG) with float32 accumulation in convolutions, Gram matrices and
means. With `vgg_variables=None` the perceptual and style terms are reported as 0.0 and add nothing
to the total; so is the ssim term when its weight is 0 (the paper's loss does not pay for it). The
terms dict always has the same keys.
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from pconv_jax import images, metrics, vgg
from pconv_jax.kernels import XLA, Kernels

Array = jax.Array
TERMS = ("valid", "hole", "perceptual", "style_out", "style_comp", "tv", "ssim")


def valid_loss(output: Array, target: Array, mask: Array) -> Array:
  """mean |M (out - gt)| over all elements (the mask broadcasts over channels)."""
  return jnp.mean(jnp.abs(jnp.broadcast_to(mask, output.shape) * (output - target)))


def hole_loss(output: Array, target: Array, mask: Array) -> Array:
  """mean |(1 - M)(out - gt)| over all elements."""
  return jnp.mean(jnp.abs(jnp.broadcast_to(1.0 - mask, output.shape) * (output - target)))


def _wide(x: Array) -> Array:
  """x in float32, or float64 if it is."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mean_abs_diff(a: Array, b: Array) -> Array:
  return jnp.mean(jnp.abs(_wide(a) - _wide(b)))


def perceptual_loss(features: Sequence[Array], target_features: Sequence[Array]) -> Array:
  """sum over layers of mean |features - target features|."""
  return sum(_mean_abs_diff(f, g) for f, g in zip(features, target_features, strict=True))


def gram(features: Array, kernels: Kernels = XLA) -> Array:
  """(B, C, C) Gram matrices of (B, H, W, C) features divided by C*H*W, in float32 or wider."""
  _, h, w, c = features.shape
  return kernels.feature_products(features) / (c * h * w)


def style_loss(
  features: Sequence[Array], target_grams: Sequence[Array], kernels: Kernels = XLA
) -> Array:
  """sum over layers of mean |gram(features) - target Gram|."""
  pairs = zip(features, target_grams, strict=True)
  return sum(_mean_abs_diff(gram(f, kernels), g) for f, g in pairs)


def dilated_holes(mask: Array) -> Array:
  """The hole region (1 - M) dilated by one pixel with a 3x3 square, same shape as the mask."""
  return lax.reduce_window(1.0 - mask, 0.0, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")


def tv_loss(composite_image: Array, mask: Array) -> Array:
  """Total variation of the composite over pixel pairs both inside the
  dilated hole region, / number of elements."""
  region = dilated_holes(mask)
  dx = (
    jnp.abs(composite_image[:, :, 1:] - composite_image[:, :, :-1])
    * region[:, :, 1:]
    * region[:, :, :-1]
  )
  dy = jnp.abs(composite_image[:, 1:] - composite_image[:, :-1]) * region[:, 1:] * region[:, :-1]
  return (jnp.sum(dx) + jnp.sum(dy)) / composite_image.size


def ssim_loss(composite_image: Array, target: Array) -> Array:
  """1 - the mean SSIM of the composite against the ground truth, both mapped to [0, 1]."""
  unit = metrics.to_unit_range
  return 1.0 - jnp.mean(metrics.ssim(unit(composite_image), unit(target)))


def feature_losses(
  output: Array,
  composite_image: Array,
  target: Array,
  vgg_variables: Any,
  dtype: Any = jnp.float32,
  kernels: Kernels = XLA,
) -> dict[str, Array]:
  """perceptual, style_out and style_comp. The ground truth's features are computed once, without
  gradient; output and composite share one batched VGG pass."""
  model = vgg.VGG16Features(dtype=dtype, kernels=kernels)
  variables = jax.tree.map(lax.stop_gradient, vgg_variables)
  target_features = lax.stop_gradient(model.apply(variables, target))
  target_grams = [gram(f, kernels) for f in target_features]
  batch = output.shape[0]
  both = model.apply(variables, jnp.concatenate([output, composite_image]))
  output_features = [f[:batch] for f in both]
  composite_features = [f[batch:] for f in both]
  return {
    "perceptual": perceptual_loss(output_features, target_features)
    + perceptual_loss(composite_features, target_features),
    "style_out": style_loss(output_features, target_grams, kernels),
    "style_comp": style_loss(composite_features, target_grams, kernels),
  }


def _check_shapes(output: Array, target: Array, mask: Array) -> None:
  if output.ndim != 4 or output.shape != target.shape:
    raise ValueError(
      f"output and target must be NHWC of the same shape, got {output.shape} and {target.shape}"
    )
  if (
    mask.ndim != 4
    or mask.shape[:3] != output.shape[:3]
    or mask.shape[-1] not in (1, output.shape[-1])
  ):
    raise ValueError(
      f"mask must be (B, H, W, 1) or (B, H, W, C) matching output {output.shape}, got {mask.shape}"
    )


def _weight(weights: Any, name: str) -> Any:
  try:
    return weights[name]
  except KeyError as e:
    raise KeyError(f"loss weights need the keys {TERMS}; {name!r} is missing") from e


def inpainting_loss(
  output: Array,
  target: Array,
  mask: Array,
  vgg_variables: Any | None,
  weights: Any,
  kernels: Kernels = XLA,
) -> tuple[Array, dict[str, Array]]:
  """The paper's total loss and its unweighted terms.

  Args:
    output: the network's output (B, H, W, 3) in [-1, 1], RGB; its dtype sets the VGG activation
      dtype.
    target: the ground truth, same shape.
    mask: (B, H, W, 1) or (B, H, W, 3), 1 = valid pixel, 0 = hole; no gradient flows into it.
    vgg_variables: from `vgg.resolve_weights`, or None to switch the perceptual and style terms off
      (reported as 0.0).
    weights: a mapping (dict, ConfigDict such as `config.loss`) with the keys in TERMS; other keys
      are ignored.
    kernels: computes VGG-16 and the Gram matrices (`pconv_jax.kernels`).

  Returns:
    (total, {term: scalar}) with the keys of TERMS, float32 (float64 for a float64 output).
  """
  _check_shapes(output, target, mask)
  vgg_dtype = output.dtype
  output = _wide(output)
  target = lax.stop_gradient(target.astype(output.dtype))
  mask = lax.stop_gradient(mask.astype(output.dtype))
  comp = images.composite(output, target, mask)
  terms = {
    "valid": valid_loss(output, target, mask),
    "hole": hole_loss(output, target, mask),
    "tv": tv_loss(comp, mask),
    "ssim": ssim_loss(comp, target) if _weight(weights, "ssim") else jnp.zeros((), output.dtype),
  }
  if vgg_variables is None:
    terms.update(
      dict.fromkeys(("perceptual", "style_out", "style_comp"), jnp.zeros((), output.dtype))
    )
  else:
    terms.update(feature_losses(output, comp, target, vgg_variables, vgg_dtype, kernels))
  terms = {name: terms[name] for name in TERMS}
  total = sum(_weight(weights, name) * value for name, value in terms.items())
  return total, terms
