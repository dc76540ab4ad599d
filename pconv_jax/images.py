"""Image helpers shared by the data pipeline, training, evaluation and inference.

Model images are float32 on [-1, 1], RGB; masks have 1 = valid pixel, 0 = hole. Mask files follow
NVIDIA's convention instead: white = hole, black = valid, grey >= `MASK_THRESHOLD` counting as
white.
"""

from collections.abc import Sequence
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MASK_THRESHOLD = 128
# What PIL raises for a file that is not a readable image (UnidentifiedImageError and truncated
# files are OSErrors).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], any shape."""
  scaled = image.astype(np.float32)
  scaled /= 127.5
  scaled -= 1.0
  return scaled


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8, rounded (exact for images that came from uint8)."""
  return np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def composite(output: Any, target: Any, mask: Any) -> Any:
  """The output inside the holes, the target elsewhere (NumPy or JAX arrays; mask 1 = valid)."""
  return mask * target + (1.0 - mask) * output


def with_white_holes(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """A model image with its holes white, as sample grids show the input."""
  return mask * image + (1.0 - mask)


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
  """Model images (H, W, 3) laid out in rows -> one uint8 (H', W', 3) image."""
  return to_uint8(np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0))


def to_8bit(image: Image.Image) -> Image.Image:
  """16- and 32-bit greyscale scaled to 8 bits ("L"); other images unchanged."""
  if not image.mode.startswith("I"):
    return image
  return Image.fromarray(np.clip(np.asarray(image) / 257, 0, 255).astype(np.uint8))


def load(path: str | os.PathLike) -> Image.Image:
  """An image file, decoded, EXIF orientation applied, 16-bit greyscale scaled to 8 bits.

  Raises FileNotFoundError, or one of DECODE_ERRORS for a file that is not a readable image.
  """
  with Image.open(path) as image:
    image.load()
    return to_8bit(ImageOps.exif_transpose(image))


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """A mask file as bool (H, W), True where white (>= MASK_THRESHOLD as 8-bit grey, colour by ITU-R
  601 luma, alpha ignored), and the number of pixels that were neither black nor white."""
  grey = np.asarray(load(path).convert("L"))
  return grey >= MASK_THRESHOLD, int(np.count_nonzero((grey != 0) & (grey != 255)))
