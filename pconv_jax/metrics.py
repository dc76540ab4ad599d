"""Image-quality metrics of the paper's evaluation: L1, PSNR, SSIM per image, Inception score and
FID per set.

Per-image metrics take batches (B, H, W, C) on [0, 1] and return one value per image; they are pure
and jit-able. PSNR and SSIM come from dm-pix (DeepMind's JAX image library):

  * PSNR: 10 log10(1 / MSE), data range 1; identical images give +inf (no cap).
  * SSIM: Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
    range 1, over the 'valid' window positions (no padding), averaged over pixels and channels. This
    equals scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)`, which crops the same 5-pixel
    border before averaging. The Gaussian window is applied as two banded matrix products (dm-pix's
    `filter_fn`), which is much faster with gradients on CPU, for the loss's SSIM term.
  * L1: mean absolute error over all pixels and channels, in percent of the data range.

The paper reports them on the composite (the network's output in the holes, the known pixels of the
input elsewhere): `images.composite`.

The set-level metrics (Inception score from classifier logits, FID from pool features) run on the
host in float64 NumPy: they are reductions over a whole evaluation set, not per-batch quantities.
"""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def to_unit_range(images: Array) -> Array:
  """Model images on [-1, 1] -> [0, 1]."""
  return (images + 1.0) / 2.0


def l1_percent(predictions: Array, targets: Array) -> Array:
  """Per-image mean absolute error in percent, images on [0, 1]: (B, H, W, C) -> (B,)."""
  return 100.0 * jnp.mean(jnp.abs(predictions - targets), axis=(-3, -2, -1))


def psnr(predictions: Array, targets: Array) -> Array:
  """Per-image PSNR in dB, data range 1: (B, H, W, C) -> (B,); +inf for identical images."""
  return dm_pix.psnr(predictions, targets)


def _gaussian_band(size: int) -> np.ndarray:
  """The (size - 10, size) matrix that applies the 11-tap SSIM Gaussian at each 'valid' position."""
  taps = np.exp(-0.5 * ((np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2) / SSIM_SIGMA) ** 2)
  band = np.zeros((size - SSIM_WINDOW + 1, size))
  for row in range(band.shape[0]):
    band[row, row : row + SSIM_WINDOW] = taps / taps.sum()
  return band


def _gaussian_blur(images: Array) -> Array:
  """The SSIM window's 'valid' Gaussian blur of (B, H, W, C) images as two banded matrix products:
  the same values as dm-pix's default filter, about 10x faster with gradients on CPU."""
  highest = jax.lax.Precision.HIGHEST
  rows = jnp.asarray(_gaussian_band(images.shape[-3]), images.dtype)
  cols = jnp.asarray(_gaussian_band(images.shape[-2]), images.dtype)
  images = jnp.einsum("ih,bhwc->biwc", rows, images, precision=highest)
  return jnp.einsum("jw,biwc->bijc", cols, images, precision=highest)


def ssim(predictions: Array, targets: Array) -> Array:
  """Per-image SSIM (Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, data range 1): (B, H, W, C)
  -> (B,).

  Images must be at least 11 pixels high and wide.
  """
  return dm_pix.ssim(
    predictions,
    targets,
    max_val=1.0,
    filter_size=SSIM_WINDOW,
    filter_sigma=SSIM_SIGMA,
    k1=SSIM_K1,
    k2=SSIM_K2,
    filter_fn=_gaussian_blur,
  )


def image_metrics(predictions: Array, targets: Array) -> dict[str, Array]:
  """{'l1_percent', 'psnr', 'ssim'}: per-image values (B,) for images on [0, 1]."""
  predictions = predictions.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  return {
    "l1_percent": l1_percent(predictions, targets),
    "psnr": psnr(predictions, targets),
    "ssim": ssim(predictions, targets),
  }


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (unbiased, as in the FID reference code) of (N,
  D) features, float64. Needs N >= 2."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"FID needs at least 2 feature vectors (N, D); got shape {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)). The trace of the matrix
  square root is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
  s1^(1/2) sigma2 s1^(1/2) (same eigenvalues as sigma1 sigma2), which stays real and stable for the
  rank-deficient covariances of fewer samples than dimensions.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
  root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
  product = root1 @ sigma2 @ root1
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2.0), 0.0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two sets of Inception pool features, (N1, D) and (N2, D)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits: np.ndarray, num_splits: int = 1) -> tuple[float, float]:
  """Inception score exp(E_x KL(p(y|x) || p(y))) from classifier logits (N, classes): (mean, std)
  over splits.

  As in Salimans et al. (2016): the N images are cut into `num_splits` consecutive chunks, p(y) is
  the chunk's mean prediction, and the mean and standard deviation of the chunks' scores are
  returned.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not 1 <= num_splits <= logits.shape[0]:
    raise ValueError(
      f"Inception score needs logits (N, classes) with N >= num_splits={num_splits}; "
      f"got shape {logits.shape}."
    )
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for chunk in np.array_split(log_p, num_splits):
    log_marginal = np.log(np.exp(chunk).mean(axis=0))
    kl = (np.exp(chunk) * (chunk - log_marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
