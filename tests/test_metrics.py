"""L1, PSNR and SSIM (and its gradient) against scikit-image and dm-pix; FID and the Inception
score against float64 oracles."""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from skimage import data, filters
from skimage import metrics as skmetrics

from pconv_jax import metrics


def skimage_ssim(a, b):
  return skmetrics.structural_similarity(
    a,
    b,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=1.0,
    channel_axis=-1,
  )


def image_pairs():
  """(name, prediction, target) on [0, 1], float64: random images and
  natural photos with typical distortions."""
  rng = np.random.default_rng(0)
  astronaut = data.astronaut()[60:188, 150:278] / 255.0
  coffee = data.coffee()[100:197, 200:331] / 255.0  # Odd sizes: 97 x 131.
  hole = np.zeros(coffee.shape[:2], bool)
  hole[30:60, 40:90] = True
  yield "random", rng.uniform(0, 1, (37, 41, 3)), rng.uniform(0, 1, (37, 41, 3))
  uniform = rng.uniform(0, 1, (64, 64, 3))
  yield "random_close", np.clip(uniform + rng.normal(0, 0.02, uniform.shape), 0, 1), uniform
  yield "noise", np.clip(astronaut + rng.normal(0, 0.1, astronaut.shape), 0, 1), astronaut
  yield "blur", filters.gaussian(astronaut, sigma=2, channel_axis=-1), astronaut
  yield "contrast", astronaut * 0.5 + 0.25, astronaut
  yield "inpainted", np.where(hole[..., None], coffee.mean(axis=(0, 1)), coffee), coffee
  # Bright and nearly flat: the hardest case for float32 variances.
  flat = np.full((48, 48, 3), 0.98)
  yield "bright_flat", np.clip(flat - 0.01 + rng.normal(0, 0.01, flat.shape), 0, 1), flat


PAIRS = list(image_pairs())


@pytest.mark.parametrize("name,prediction,target", PAIRS, ids=[p[0] for p in PAIRS])
def test_psnr_and_ssim_match_scikit_image(name, prediction, target):
  del name
  got = jax.jit(metrics.image_metrics)(
    jnp.asarray(prediction[None], jnp.float32), jnp.asarray(target[None], jnp.float32)
  )
  # The metrics see float32 inputs; so does the reference, for a like-for-like comparison.
  prediction, target = (
    prediction.astype(np.float32).astype(np.float64),
    target.astype(np.float32).astype(np.float64),
  )
  assert (
    abs(
      float(got["psnr"][0]) - skmetrics.peak_signal_noise_ratio(target, prediction, data_range=1.0)
    )
    < 1e-4
  )
  assert abs(float(got["ssim"][0]) - skimage_ssim(prediction, target)) < 1e-4
  assert abs(float(got["l1_percent"][0]) - 100 * np.abs(prediction - target).mean()) < 1e-4


def test_ssim_gradient_matches_dm_pix_in_float64():
  # The loss trains on SSIM: its float32 gradient through the banded-matrix blur equals, to float32
  # rounding, the float64 gradient through dm-pix's own Gaussian filter.
  _, prediction, target = PAIRS[2]  # Noise on a photo.
  got = jax.grad(lambda p: metrics.ssim(p, jnp.asarray(target[None], jnp.float32)).sum())(
    jnp.asarray(prediction[None], jnp.float32)
  )
  with jax.enable_x64(True):
    expected = jax.grad(
      lambda p: dm_pix.ssim(
        p,
        jnp.asarray(target[None]),
        max_val=1.0,
        filter_size=11,
        filter_sigma=1.5,
        k1=0.01,
        k2=0.03,
      ).sum()
    )(jnp.asarray(prediction[None]))
    expected = np.asarray(expected)
  scale = np.abs(expected).max()
  assert scale > 0.0
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=1e-3 * scale)


def test_batched_metrics_are_per_image():
  _, a, b = PAIRS[2]
  _, c, d = PAIRS[3]
  compute = jax.jit(metrics.image_metrics)
  batch = compute(
    jnp.asarray(np.stack([a, c]), jnp.float32), jnp.asarray(np.stack([b, d]), jnp.float32)
  )
  for key, values in batch.items():
    assert values.shape == (2,)
    single = compute(jnp.asarray(c[None], jnp.float32), jnp.asarray(d[None], jnp.float32))[key]
    np.testing.assert_allclose(values[1], single[0], rtol=1e-6)


def test_identity_gives_zero_l1_infinite_psnr_unit_ssim():
  image = jnp.asarray(data.chelsea()[None, :64, :80] / 255.0, jnp.float32)
  got = metrics.image_metrics(image, image)
  assert float(got["l1_percent"][0]) == 0.0
  assert float(got["psnr"][0]) == np.inf
  assert float(got["ssim"][0]) == pytest.approx(1.0, abs=1e-6)


def test_unit_range():
  np.testing.assert_allclose(metrics.to_unit_range(jnp.asarray([-1.0, 0.0, 1.0])), [0.0, 0.5, 1.0])


# --------------------------------------------------------------------------------------------------
# FID and Inception score.


def oracle_fid(features1, features2):
  """The reference computation (pytorch-fid / TTUR): scipy's sqrtm
  of sigma1 @ sigma2, real part, float64."""
  mu1, mu2 = features1.mean(0), features2.mean(0)
  s1, s2 = np.cov(features1, rowvar=False), np.cov(features2, rowvar=False)
  covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n1,n2,dim", [(200, 150, 16), (300, 300, 64)])
def test_fid_matches_scipy_sqrtm_oracle(n1, n2, dim):
  rng = np.random.default_rng(n1)
  mixing = rng.normal(size=(dim, dim))
  features1 = rng.normal(size=(n1, dim)) @ mixing
  features2 = rng.normal(0.3, 1.2, size=(n2, dim)) @ mixing + 0.5
  got, want = metrics.fid(features1, features2), oracle_fid(features1, features2)
  assert got == pytest.approx(want, rel=1e-7, abs=1e-8)


def test_fid_of_gaussians_in_closed_form_and_of_identical_sets():
  """Commuting covariances: tr sqrt(s1 s2) = sum sqrt(eigenvalues
  products); identical sets give 0."""
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
  want = 1 + 0 + 4 + (1 + 4 + 9) + (4 + 1 + 1) - 2 * (2 + 2 + 3)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, abs=1e-12)
  features = np.random.default_rng(3).normal(size=(50, 8))
  assert abs(metrics.fid(features, features)) < 1e-9


def test_fid_with_fewer_samples_than_dimensions_is_finite_and_close_to_oracle():
  rng = np.random.default_rng(4)
  features1, features2 = rng.normal(size=(20, 64)), rng.normal(0.2, 1.0, size=(25, 64))
  got = metrics.fid(features1, features2)
  assert np.isfinite(got) and got == pytest.approx(oracle_fid(features1, features2), rel=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    metrics.fid(features1[:1], features2)


def oracle_inception_score(logits, splits):
  """Salimans et al.'s formula with an explicit softmax and KL, per split, float64."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.array_split(p, splits):
    py = part.mean(0)
    scores.append(np.exp(np.mean([np.sum(px * (np.log(px) - np.log(py))) for px in part])))
  return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("splits", [1, 5])
def test_inception_score_matches_numpy_oracle(splits):
  logits = np.random.default_rng(5).normal(0, 3, (100, 1008))
  mean, std = metrics.inception_score(logits, splits)
  want_mean, want_std = oracle_inception_score(logits, splits)
  assert mean == pytest.approx(want_mean, rel=1e-10) and std == pytest.approx(
    want_std, rel=1e-8, abs=1e-12
  )


def test_inception_score_limits():
  # Each image sure of a different class: IS = number of classes.
  confident_distinct = np.eye(10) * 50.0
  assert metrics.inception_score(confident_distinct)[0] == pytest.approx(10.0, rel=1e-9)
  # All predictions equal: IS = 1.
  same = np.tile(np.random.default_rng(6).normal(size=(1, 10)), (8, 1))
  assert metrics.inception_score(same)[0] == pytest.approx(1.0, abs=1e-12)
  with pytest.raises(ValueError, match="num_splits"):
    metrics.inception_score(same, num_splits=20)
