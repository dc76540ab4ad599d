"""The paper's loss terms against an independent float64 NumPy oracle,
known cases, gradients and compilation."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

# Helpers and fixtures (network, weight_files) of the VGG tests.
from test_vgg import FORMATS, _path, network, oracle_for_format, weight_files  # noqa: F401

from pconv_jax import losses, vgg
from pconv_jax.kernels import XLA, CpuKernels

PAPER_WEIGHTS = {
  "valid": 1.0,
  "hole": 6.0,
  "perceptual": 0.05,
  "style_out": 120.0,
  "style_comp": 120.0,
  "tv": 0.1,
  "ssim": 0.0,
}


def default_config():
  spec = importlib.util.spec_from_file_location(
    "default_config", Path(__file__).parents[1] / "configs/default.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def random_batch(seed: int, shape=(2, 32, 32, 3), mask_channels: int = 1):
  """(output, target, mask) float32: images in [-1, 1]; a mask
  with a few rectangular holes, 1 = valid."""
  rng = np.random.default_rng(seed)
  output = rng.uniform(-1, 1, shape).astype(np.float32)
  target = rng.uniform(-1, 1, shape).astype(np.float32)
  mask = np.ones(shape[:3] + (mask_channels,), np.float32)
  for b in range(shape[0]):
    for c in range(mask_channels):
      for _ in range(3):
        top, left = rng.integers(0, shape[1] - 6), rng.integers(0, shape[2] - 6)
        height, width = rng.integers(2, 9, size=2)
        mask[b, top : top + height, left : left + width, c] = 0.0
  return output, target, mask


# --------------------------------------------------------------------------------------------------
# The oracle: float64, loops where that keeps it obviously right, nothing from pconv_jax.


def oracle_dilated_holes(mask: np.ndarray) -> np.ndarray:
  """P[b, i, j, c] = 1 if any pixel of the 3x3 neighbourhood (inside the image) is a hole."""
  b_size, h, w, c_size = mask.shape
  region = np.zeros(mask.shape, bool)
  for b in range(b_size):
    for c in range(c_size):
      for i in range(h):
        for j in range(w):
          window = mask[b, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, c]
          region[b, i, j, c] = bool(np.any(window == 0))
  return region


def oracle_tv(comp: np.ndarray, mask: np.ndarray) -> float:
  region = np.broadcast_to(oracle_dilated_holes(mask), comp.shape)
  total = 0.0
  b_size, h, w, c_size = comp.shape
  for b in range(b_size):
    for c in range(c_size):
      for i in range(h):
        for j in range(w):
          if j + 1 < w and region[b, i, j, c] and region[b, i, j + 1, c]:
            total += abs(comp[b, i, j + 1, c] - comp[b, i, j, c])
          if i + 1 < h and region[b, i, j, c] and region[b, i + 1, j, c]:
            total += abs(comp[b, i + 1, j, c] - comp[b, i, j, c])
  return total / comp.size


def oracle_ssim_loss(comp: np.ndarray, target: np.ndarray) -> float:
  """1 - mean SSIM on [0, 1] from scikit-image (Gaussian window, sigma 1.5, population moments)."""
  scores = [
    structural_similarity(
      (c + 1) / 2,
      (t + 1) / 2,
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
      data_range=1.0,
      channel_axis=-1,
    )
    for c, t in zip(comp, target, strict=True)
  ]
  return 1.0 - float(np.mean(scores))


def oracle_gram(features: np.ndarray) -> np.ndarray:
  b, h, w, c = features.shape
  flat = features.reshape(b, h * w, c)
  return np.stack([f.T @ f for f in flat]) / (c * h * w)


def oracle_terms(output, target, mask, features) -> dict[str, float]:
  """The paper's terms from their definitions; `features(images)
  -> [pool1, pool2, pool3]` or None."""
  out, gt = output.astype(np.float64), target.astype(np.float64)
  m = np.broadcast_to(mask.astype(np.float64), out.shape)
  comp = m * gt + (1 - m) * out
  terms = {
    "valid": np.mean(np.abs(m * (out - gt))),
    "hole": np.mean(np.abs((1 - m) * (out - gt))),
    "tv": oracle_tv(comp, mask),
    "ssim": 0.0,  # Weight 0 in PAPER_WEIGHTS: not computed.
  }
  if features is None:
    return terms | {"perceptual": 0.0, "style_out": 0.0, "style_comp": 0.0}
  f_out, f_comp, f_gt = features(out), features(comp), features(gt)
  terms["perceptual"] = sum(np.mean(np.abs(a - g)) for a, g in zip(f_out, f_gt)) + sum(
    np.mean(np.abs(a - g)) for a, g in zip(f_comp, f_gt)
  )
  terms["style_out"] = sum(
    np.mean(np.abs(oracle_gram(a) - oracle_gram(g))) for a, g in zip(f_out, f_gt)
  )
  terms["style_comp"] = sum(
    np.mean(np.abs(oracle_gram(a) - oracle_gram(g))) for a, g in zip(f_comp, f_gt)
  )
  return terms


def assert_terms_close(terms, expected, rtol=2e-4):
  assert set(terms) == set(losses.TERMS) == set(expected)
  for name in losses.TERMS:
    assert terms[name].dtype == jnp.float32 and terms[name].shape == ()
    np.testing.assert_allclose(
      float(terms[name]), expected[name], rtol=rtol, atol=1e-7, err_msg=name
    )


@pytest.fixture(scope="module")
def variables(weight_files):  # noqa: F811
  return vgg.load_variables(weight_files["npz"])


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_terms_match_float64_oracle(network, weight_files, fmt):  # noqa: F811
  output, target, mask = random_batch(seed=0)
  total, terms = losses.inpainting_loss(
    output, target, mask, vgg.load_variables(_path(weight_files, fmt)), PAPER_WEIGHTS
  )
  expected = oracle_terms(output, target, mask, oracle_for_format(network, fmt))
  assert_terms_close(terms, expected)
  np.testing.assert_allclose(
    float(total), sum(PAPER_WEIGHTS[k] * v for k, v in expected.items()), rtol=2e-4
  )


def test_terms_with_the_cpu_engine_match_float64_oracle(network, variables):  # noqa: F811
  output, target, mask = random_batch(seed=0)
  _, terms = losses.inpainting_loss(output, target, mask, variables, PAPER_WEIGHTS, CpuKernels())
  assert_terms_close(terms, oracle_terms(output, target, mask, oracle_for_format(network, "npz")))


def test_per_channel_mask_matches_oracle(network, variables):  # noqa: F811
  output, target, mask = random_batch(seed=1, mask_channels=3)
  _, terms = losses.inpainting_loss(output, target, mask, variables, PAPER_WEIGHTS)
  assert_terms_close(terms, oracle_terms(output, target, mask, oracle_for_format(network, "npz")))


def test_one_channel_mask_equals_the_same_mask_on_three_channels(variables):
  output, target, mask = random_batch(seed=2)
  _, one = losses.inpainting_loss(output, target, mask, variables, PAPER_WEIGHTS)
  _, three = losses.inpainting_loss(
    output, target, np.repeat(mask, 3, axis=-1), variables, PAPER_WEIGHTS
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), one, three)


def test_default_config_holds_the_papers_weights_and_works_as_weights(variables):
  config = default_config()
  assert {name: config.loss[name] for name in losses.TERMS} == PAPER_WEIGHTS
  output, target, mask = random_batch(seed=3)
  # Extra keys are ignored.
  total, _ = losses.inpainting_loss(output, target, mask, variables, config.loss)
  expected, _ = losses.inpainting_loss(output, target, mask, variables, PAPER_WEIGHTS)
  assert float(total) == float(expected)


def test_output_equal_to_target_leaves_only_the_targets_tv(variables):
  _, target, mask = random_batch(seed=4)
  total, terms = losses.inpainting_loss(target, target, mask, variables, PAPER_WEIGHTS)
  for name in ("valid", "hole", "perceptual", "style_out", "style_comp"):
    assert float(terms[name]) == 0.0, name
  np.testing.assert_allclose(
    float(terms["tv"]), oracle_tv(target.astype(np.float64), mask), rtol=1e-5
  )
  assert float(terms["tv"]) > 0.0
  np.testing.assert_allclose(float(total), 0.1 * float(terms["tv"]), rtol=1e-6)


def test_a_hole_only_change_moves_hole_not_valid(variables):
  output, target, mask = random_batch(seed=5)
  changed = output + 0.5 * (1.0 - mask)  # Only hole pixels change.
  _, before = losses.inpainting_loss(output, target, mask, variables, PAPER_WEIGHTS)
  _, after = losses.inpainting_loss(changed, target, mask, variables, PAPER_WEIGHTS)
  assert float(after["valid"]) == float(before["valid"])
  assert float(after["hole"]) != float(before["hole"])
  # And the converse: a valid-only change moves valid, not hole, and leaves the composite (so TV and
  # style_comp).
  changed = output + 0.5 * mask
  _, after = losses.inpainting_loss(changed, target, mask, variables, PAPER_WEIGHTS)
  assert float(after["hole"]) == float(before["hole"]) and float(after["valid"]) != float(
    before["valid"]
  )
  assert float(after["tv"]) == float(before["tv"]) and float(after["style_comp"]) == float(
    before["style_comp"]
  )


def test_tv_ignores_pixels_outside_the_dilated_holes():
  output, target, mask = random_batch(seed=6)
  mask[:] = 1.0
  mask[:, 10:14, 12:18] = 0.0  # One hole; its one-pixel dilation is rows 9..14, columns 11..18.
  region = np.zeros(mask.shape, bool)
  region[:, 9:15, 11:19] = True

  def tv(t):
    return float(losses.inpainting_loss(output, t, mask, None, PAPER_WEIGHTS)[1]["tv"])

  outside = target.copy()
  outside[~np.broadcast_to(region, target.shape)] = (
    0.7  # Changes every ground-truth pixel outside the region.
  )
  assert tv(outside) == tv(target)
  ring = target.copy()
  ring[:, 9, 11] += (
    0.5  # A pixel of the dilation ring (valid, so the composite shows the ground truth).
  )
  assert tv(ring) != tv(target)


def test_without_vgg_the_feature_terms_are_zero_and_the_keys_stay(variables):
  output, target, mask = random_batch(seed=7)
  total, terms = losses.inpainting_loss(output, target, mask, None, PAPER_WEIGHTS)
  assert_terms_close(terms, oracle_terms(output, target, mask, None))
  _, with_vgg = losses.inpainting_loss(output, target, mask, variables, PAPER_WEIGHTS)
  assert jax.tree.structure(terms) == jax.tree.structure(with_vgg)
  expected = terms["valid"] + 6.0 * terms["hole"] + 0.1 * terms["tv"]
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


@pytest.mark.parametrize("kernels", [XLA, CpuKernels()], ids=["xla", "cpu"])
def test_gram_and_its_gradient_match_the_float64_oracle(kernels):
  """gram(F) = F^T F / (C H W); d sum(W * gram(F)) / dF = F (W + W^T)
  / (C H W), in every dtype's precision."""
  rng = np.random.default_rng(3)
  features, weights = rng.normal(size=(2, 5, 6, 4)), rng.normal(size=(2, 4, 4))
  want = np.einsum("bhwd,bdc->bhwc", features, weights + weights.transpose(0, 2, 1)) / (4 * 5 * 6)
  weighted_gram = lambda f: jnp.sum(losses.gram(f, kernels) * weights)  # noqa: E731
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(weighted_gram)(jnp.asarray(features))
    assert grad.dtype == jnp.float64
  np.testing.assert_allclose(value, np.sum(oracle_gram(features) * weights), rtol=1e-12)
  np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-14)
  grad32 = jax.grad(weighted_gram)(jnp.asarray(features, jnp.float32))
  assert grad32.dtype == jnp.float32
  np.testing.assert_allclose(grad32, want, rtol=1e-5, atol=1e-6)


def test_gradient_is_finite_nonzero_and_only_flows_into_the_output(variables):
  output, target, mask = random_batch(seed=8)
  grads = jax.jit(
    jax.grad(
      lambda o, t, m: losses.inpainting_loss(o, t, m, variables, PAPER_WEIGHTS)[0],
      argnums=(0, 1, 2),
    )
  )(output, target, mask)
  d_output, d_target, d_mask = (np.asarray(g) for g in grads)
  assert np.all(np.isfinite(d_output))
  holes = np.broadcast_to(mask == 0, output.shape)
  assert np.all(d_output[holes] != 0) and np.any(d_output[~holes] != 0)
  assert not np.any(d_target) and not np.any(d_mask)


def test_loss_and_gradient_compile_once(variables):
  config = default_config()
  traces = []

  def loss(params, vgg_variables, target, mask):
    traces.append(1)
    return losses.inpainting_loss(params, target, mask, vgg_variables, config.loss)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  for seed in range(3):
    output, target, mask = random_batch(seed=10 + seed)
    (total, terms), grad = step(output, variables, target, mask)
    assert (
      np.isfinite(float(total)) and np.all(np.isfinite(grad)) and set(terms) == set(losses.TERMS)
    )
  assert len(traces) == 1

  no_vgg = jax.jit(lambda o, t, m: losses.inpainting_loss(o, t, m, None, config.loss))
  for seed in range(2):
    no_vgg(*random_batch(seed=20 + seed))
  assert no_vgg._cache_size() == 1  # pylint: disable=protected-access


def test_bfloat16_output(variables):
  output, target, mask = random_batch(seed=9)
  rounded = np.asarray(jnp.asarray(output, jnp.bfloat16).astype(jnp.float32))
  step = jax.jit(
    jax.value_and_grad(
      lambda o: losses.inpainting_loss(o, target, mask, variables, PAPER_WEIGHTS), has_aux=True
    )
  )
  (total, terms), grad = step(jnp.asarray(output, jnp.bfloat16))
  _, reference = losses.inpainting_loss(rounded, target, mask, variables, PAPER_WEIGHTS)
  assert total.dtype == jnp.float32
  for name in losses.TERMS:
    assert terms[name].dtype == jnp.float32
    np.testing.assert_allclose(float(terms[name]), float(reference[name]), rtol=3e-2, err_msg=name)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_bad_inputs_raise(variables):
  output, target, mask = random_batch(seed=11)
  with pytest.raises(ValueError, match="mask"):
    losses.inpainting_loss(output, target, mask[:, :16], variables, PAPER_WEIGHTS)
  with pytest.raises(ValueError, match="same shape"):
    losses.inpainting_loss(output, target[:1], mask, variables, PAPER_WEIGHTS)
  with pytest.raises(KeyError, match="style_comp"):
    losses.inpainting_loss(
      output,
      target,
      mask,
      variables,
      {k: PAPER_WEIGHTS[k] for k in PAPER_WEIGHTS if k != "style_comp"},
    )


def test_the_ssim_term_matches_scikit_image_adds_its_weight_and_trains_only_the_holes():
  output, target, mask = random_batch(seed=12)
  weights = PAPER_WEIGHTS | {"ssim": 2.0}
  total, terms = losses.inpainting_loss(output, target, mask, None, weights)
  paper_total, paper_terms = losses.inpainting_loss(output, target, mask, None, PAPER_WEIGHTS)
  assert float(paper_terms["ssim"]) == 0.0  # Weight 0: not computed.
  comp = np.where(mask == 1.0, target, output).astype(np.float64)
  np.testing.assert_allclose(float(terms["ssim"]), oracle_ssim_loss(comp, target), rtol=1e-4)
  np.testing.assert_allclose(
    float(total), float(paper_total) + 2.0 * float(terms["ssim"]), rtol=1e-6
  )
  only_ssim = dict.fromkeys(losses.TERMS, 0.0) | {"ssim": 1.0}
  grad = jax.grad(lambda o: losses.inpainting_loss(o, target, mask, None, only_ssim)[0])(output)
  holes = np.broadcast_to(mask == 0.0, grad.shape)
  assert np.all(np.asarray(grad)[~holes] == 0.0) and np.any(np.asarray(grad)[holes] != 0.0)
