"""Tests for pconv_jax.masks: procedural masks, hole-ratio bins,
evaluation sets, NVIDIA mask loading."""

import pathlib

import numpy as np
from PIL import Image
import pytest

from configs import default
from pconv_jax import masks


def _write_hole_png(path: pathlib.Path, size: int, hole_rows: int, mode: str = "L") -> None:
  """A PNG with white (hole) in its first `hole_rows` rows, as NVIDIA's masks are stored."""
  pixels = np.zeros((size, size), np.uint8)
  pixels[:hole_rows] = 255
  Image.fromarray(pixels).convert(mode).save(path)


def test_random_mask_ratios_cover_all_bins():
  rng = np.random.default_rng(0)
  generated = [masks.random_mask(rng, 48) for _ in range(120)]
  for mask in generated:
    assert mask.shape == (48, 48, 1) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert 0.01 < masks.hole_ratio(mask) <= 0.6
  assert {masks.hole_ratio_bin(m) for m in generated} == set(range(6))


@pytest.mark.parametrize("bin_index", range(6))
def test_random_mask_hits_a_narrow_target_range(bin_index):
  low, high = masks.HOLE_RATIO_BINS[bin_index]
  rng = np.random.default_rng(bin_index)
  ratios = [masks.hole_ratio(masks.random_mask(rng, (40, 56), low, high)) for _ in range(10)]
  assert all(low < r <= high for r in ratios), ratios


def test_random_mask_is_a_function_of_the_rng():
  first = masks.random_mask(np.random.default_rng([3, 4]), 32)
  np.testing.assert_array_equal(first, masks.random_mask(np.random.default_rng([3, 4]), 32))
  assert not np.array_equal(first, masks.random_mask(np.random.default_rng([3, 5]), 32))


def test_hole_ratio_bin_edges():
  def mask_with_holes(count):
    mask = np.ones((10, 10, 1), np.float32)
    mask.reshape(-1)[:count] = 0
    return mask

  expected = {0: None, 1: None, 2: 0, 10: 0, 11: 1, 20: 1, 21: 2, 50: 4, 51: 5, 60: 5, 61: None}
  assert {n: masks.hole_ratio_bin(mask_with_holes(n)) for n in expected} == expected


def test_eval_mask_set_is_reproducible_with_n_per_bin():
  first = masks.eval_mask_set(32, 3, seed=1)
  second = masks.eval_mask_set(32, 3, seed=1)
  assert sorted(first) == list(range(6))
  for index in range(6):
    assert first[index].shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(first[index], second[index])
    assert all(masks.hole_ratio_bin(m) == index for m in first[index])
  assert not np.array_equal(first[2], masks.eval_mask_set(32, 3, seed=2)[2])
  # A bigger set extends a smaller one.
  np.testing.assert_array_equal(masks.eval_mask_set(32, 4, seed=1)[5][:3], first[5])


def test_border_constrained_masks_have_no_hole_in_the_margin():
  margin = 4
  for index, batch in masks.eval_mask_set(48, 3, seed=0, margin=margin).items():
    assert all(masks.hole_ratio_bin(m) == index for m in batch)
    inner = np.zeros_like(batch, dtype=bool)
    inner[:, margin:-margin, margin:-margin] = True
    assert np.all(batch[~inner] == 1)


def test_random_mask_rejects_impossible_margins():
  with pytest.raises(ValueError, match="margin"):
    masks.random_mask(np.random.default_rng(0), 32, 0.5, 0.6, margin=10)


def test_save_and_load_mask_set_round_trip(tmp_path):
  saved = masks.eval_mask_set(24, 2, seed=0)
  masks.save_mask_set(saved, tmp_path)
  png = np.asarray(Image.open(tmp_path / "0.50-0.60" / "00000.png"))
  np.testing.assert_array_equal(png == 255, saved[5][0, ..., 0] == 0)  # White = hole on disk.
  loaded = masks.load_mask_set(tmp_path, 24)
  for index in range(6):
    np.testing.assert_array_equal(loaded[index], saved[index])


def test_nvidia_polarity_and_binning_by_recomputed_ratio(tmp_path):
  # 64 rows; holes in the first k rows -> ratio k / 64, recomputed after resizing to 32.
  rows = {"a.png": 4, "b.png": 10, "c.png": 16, "d.png": 35, "e.png": 50, "f.png": 0}
  for name, hole_rows in rows.items():
    _write_hole_png(tmp_path / name, 64, hole_rows, mode="RGB")
  mask = masks.read_mask_png(tmp_path / "c.png")
  assert mask.shape == (64, 64, 1) and mask.dtype == np.uint8
  assert np.all(mask[:16] == 0) and np.all(mask[16:] == 1)
  loaded = masks.load_mask_set(tmp_path, 32)
  assert {i: len(m) for i, m in loaded.items()} == {0: 1, 1: 1, 2: 1, 3: 0, 4: 0, 5: 1}
  np.testing.assert_array_equal(loaded[2][0, :8], 0)  # c.png: 16 / 64 = 0.25, top quarter is hole.
  assert {
    i: len(m) for i, m in masks.load_mask_set(tmp_path, 32, per_bin=0).items()
  } == dict.fromkeys(range(6), 0)


def test_nvidia_training_masks_stay_binary_and_deterministic(tmp_path):
  for i, hole_rows in enumerate((12, 20, 28)):
    _write_hole_png(tmp_path / f"{i:05d}.png", 64, hole_rows)
  sampler = masks.NvidiaMasks.from_dir(tmp_path, 0.05, 0.6)
  for seed in range(10):
    mask = sampler(np.random.default_rng(seed), 32)
    assert mask.shape == (32, 32, 1) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
  np.testing.assert_array_equal(
    sampler(np.random.default_rng(7), 32), sampler(np.random.default_rng(7), 32)
  )
  augmented = masks.augment_mask(
    masks.read_mask_png(tmp_path / "00001.png"), np.random.default_rng(0), (24, 40)
  )
  assert augmented.shape == (24, 40, 1) and set(np.unique(augmented)) <= {0, 1}


def test_nvidia_directory_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nv-adlr"):
    masks.list_mask_files(tmp_path / "missing")
  with pytest.raises(ValueError, match="no .png files"):
    masks.list_mask_files(tmp_path)
  _write_hole_png(tmp_path / "good.png", 16, 4)
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png"):
    masks.NvidiaMasks.from_dir(tmp_path)
  with pytest.raises(ValueError, match="broken.png"):
    masks.load_mask_set(tmp_path, 16)


def test_create_mask_sampler_from_config(tmp_path):
  config = default.get_config().data.masks
  assert isinstance(masks.create_mask_sampler(config), masks.ProceduralMasks)
  config.source = "nvidia"
  with pytest.raises(ValueError, match="masks.dir"):
    masks.create_mask_sampler(config)
  _write_hole_png(tmp_path / "m.png", 16, 4)
  config.dir = str(tmp_path)
  assert isinstance(masks.create_mask_sampler(config), masks.NvidiaMasks)
  config.source = "bogus"
  with pytest.raises(ValueError, match="Unknown"):
    masks.create_mask_sampler(config)


def test_load_eval_masks_procedural_and_saved(tmp_path):
  config = default.get_config().data
  config.image_size = 32
  sets = masks.load_eval_masks(config, 2, seed=0)
  assert sorted(sets) == ["border", "no_border"]
  margin = round(config.masks.border_margin * 32)
  for batch in sets["border"].values():
    assert batch.shape == (2, 32, 32, 1)
    assert np.all(batch[:, :margin] == 1) and np.all(batch[:, :, -margin:] == 1)
  for name, by_bin in sets.items():
    masks.save_mask_set(by_bin, tmp_path / name)
  config.masks.test_dir = str(tmp_path)
  reloaded = masks.load_eval_masks(config, 2)
  for name in sets:
    for index in range(6):
      np.testing.assert_array_equal(reloaded[name][index], sets[name][index])
  config.masks.test_dir = str(tmp_path / "border")
  assert sorted(masks.load_eval_masks(config, 1)) == ["test"]
