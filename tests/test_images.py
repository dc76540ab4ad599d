"""Image helpers: value ranges, composites, grids and reading mask files."""

import numpy as np
from PIL import Image

from pconv_jax import images


def test_uint8_and_model_range_round_trip_exactly():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
  scaled = images.to_model_range(pixels)
  assert scaled.dtype == np.float32 and scaled.min() == -1.0 and scaled.max() == 1.0
  np.testing.assert_array_equal(images.to_uint8(scaled), pixels)
  np.testing.assert_array_equal(images.to_uint8(np.array([-3.0, 3.0])), [0, 255])  # Clipped.


def test_composite_keeps_known_pixels():
  rng = np.random.default_rng(1)
  target, output = rng.uniform(-1, 1, (2, 2, 8, 8, 3)).astype(np.float32)
  mask = (rng.uniform(size=(2, 8, 8, 1)) > 0.5).astype(np.float32)
  comp = images.composite(output, target, mask)
  np.testing.assert_array_equal(np.where(mask == 1, comp, 0), np.where(mask == 1, target, 0))
  np.testing.assert_array_equal(np.where(mask == 0, comp, 0), np.where(mask == 0, output, 0))


def test_grid_lays_out_rows_with_white_holes():
  image = np.full((2, 3, 3), -1.0, np.float32)  # Black.
  mask = np.array([[[1.0], [0.0], [1.0]], [[1.0], [1.0], [1.0]]], np.float32)
  grid = images.grid([[images.with_white_holes(image, mask), image]] * 2)
  assert grid.shape == (4, 6, 3) and grid.dtype == np.uint8
  assert (
    grid[0, 1].tolist() == [255] * 3 and grid[0, 0].tolist() == [0] * 3 and grid[:, 3:].max() == 0
  )


def test_mask_files_are_thresholded_at_128_and_16_bit_masks_scaled(tmp_path):
  grey = np.array([[0, 127, 128, 255]], np.uint8)
  Image.fromarray(grey).save(tmp_path / "mask.png")
  white, grey_pixels = images.read_mask(tmp_path / "mask.png")
  assert white.tolist() == [[False, False, True, True]] and grey_pixels == 2
  Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "mask16.png")
  assert Image.open(tmp_path / "mask16.png").mode.startswith("I")
  np.testing.assert_array_equal(images.read_mask(tmp_path / "mask16.png")[0], white)
