"""Classical inpainting baselines a user would otherwise reach for, run on the same images and masks
as the model.

  * telea:         OpenCV's fast-marching method (Telea, 2004), `cv2.INPAINT_TELEA`;
  * navier_stokes: OpenCV's fluid-dynamics method (Bertalmio et al., 2001), `cv2.INPAINT_NS`;
  * mean_fill:     every hole pixel gets the mean colour of the image's known pixels.

All take uint8 RGB images (B, H, W, 3) and masks (B, H, W, 1) with 1 = valid, 0 = hole, and return
uint8 images whose known pixels are the input's, bit for bit.
"""

from collections.abc import Callable

import cv2
import numpy as np

INPAINT_RADIUS = (
  3  # Pixels of neighbourhood OpenCV's methods use around each hole pixel (OpenCV's example value).
)

METHODS = ("telea", "navier_stokes", "mean_fill")
DISPLAY_NAMES = {
  "telea": "Telea (OpenCV)",
  "navier_stokes": "Navier-Stokes (OpenCV)",
  "mean_fill": "Mean colour",
}


def _opencv(flag: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  def fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    return cv2.inpaint(np.ascontiguousarray(image), hole.astype(np.uint8), INPAINT_RADIUS, flag)

  return fill


def _mean_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
  known = image[hole == 0]
  colour = np.round(known.astype(np.float64).mean(axis=0)) if len(known) else np.full(3, 127.0)
  return np.broadcast_to(colour.astype(np.uint8), image.shape)


_FILLS = {
  "telea": _opencv(cv2.INPAINT_TELEA),
  "navier_stokes": _opencv(cv2.INPAINT_NS),
  "mean_fill": _mean_fill,
}


def inpaint(method: str, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Fills the holes of uint8 `images` (B, H, W, 3) given `masks` (B,
  H, W, 1), 1 = valid, with `method`."""
  if method not in _FILLS:
    raise ValueError(f"Unknown baseline {method!r}; choose from {METHODS}.")
  if images.dtype != np.uint8 or images.ndim != 4 or masks.shape != images.shape[:3] + (1,):
    raise ValueError(
      f"Baselines take uint8 images (B, H, W, 3) and masks (B, H, W, 1); got {images.dtype} "
      f"{images.shape} and {masks.shape}."
    )
  holes = (np.asarray(masks)[..., 0] < 0.5).astype(np.uint8)
  filled = np.stack([_FILLS[method](image, hole) for image, hole in zip(images, holes)])
  return np.where(holes[..., None].astype(bool), filled, images)
