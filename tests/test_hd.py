"""High-resolution strategies: where each network input comes from and what it may write."""

import os
from pathlib import Path
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from skimage import data

from pconv_jax import checkpoints, hd, images, inpaint, models

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {"depth": 3, "features": [8, 8, 8], "kernel_sizes": [3, 3, 3]}  # Multiples of 8.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny network, recorded as trained at 32x32."""
  model = models.create_model(MODEL_CONFIG)
  variables = jax.jit(model.init)(
    jax.random.key(2), jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 16, 16, 1))
  )
  directory = tmp_path_factory.mktemp("hd") / "checkpoint"
  checkpoints.save_model(directory, variables, MODEL_CONFIG, train_size=32)
  return directory


@pytest.fixture(scope="module")
def inpainter(checkpoint):
  inpainter = inpaint.Inpainter.from_checkpoint(checkpoint, batch_size=2)
  assert inpainter.training_size == 32
  return inpainter


def photo(height=240, width=360):
  return cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA)


def network(inpainter, image, hole):
  """The network's composite for one whole image (its size a multiple of 8), as uint8."""
  output = inpainter._apply(
    inpainter.variables,
    jnp.asarray(images.to_model_range(image)[None]),
    jnp.asarray((~hole)[None, ..., None].astype(np.float32)),
  )
  return np.where(hole[..., None], images.to_uint8(np.asarray(output[0])), image)


def test_crop_inpaints_each_group_of_holes_in_its_own_crop(inpainter):
  image = photo()
  hole = np.zeros(image.shape[:2], bool)
  hole[20:30, 40:52] = True  # Group A: with a margin of 8, rows 12-38 and columns 32-60.
  hole[35:37, 60:70] = True  # Within 2 margins of A: the same group.
  hole[150:200, 250:340] = True  # Group B: rows 142-208, columns 242-348.
  strategy = hd.HDStrategy("crop", crop_margin=8)
  pieces = hd.pieces(images.to_model_range(image), hole, strategy, 32, 8)
  # A's box: rows 12-45 (33 rows, grown to 40 about its centre: 8-48), columns 32-78 (46: 48,
  # 31-79); B's: rows 142-208 (66: 72, 139-211), columns 242-348 (106: 112, 239-351).
  assert [p.box for p in pieces] == [
    (slice(8, 48), slice(31, 79)),
    (slice(139, 211), slice(239, 351)),
  ]
  result = inpainter(image, hole, strategy)
  np.testing.assert_array_equal(result[~hole], image[~hole])
  for box in [p.box for p in pieces]:
    expected = network(inpainter, image[box], hole[box])
    np.testing.assert_array_equal(result[box][hole[box]], expected[hole[box]])
  assert not np.array_equal(result[hole], image[hole])


def test_a_crop_writes_only_its_own_group(inpainter):
  """A minimum crop size reaching over another group's hole treats it as hole but leaves it to
  that group's crop."""
  image = photo()
  hole = np.zeros(image.shape[:2], bool)
  hole[100:104, 100:104] = True
  hole[100:104, 130:134] = True
  pieces = hd.pieces(images.to_model_range(image), hole, hd.HDStrategy("crop", 4), 64, 8)
  assert len(pieces) == 2
  for piece, columns in zip(pieces, [slice(100, 104), slice(130, 134)]):
    assert piece.hole[:, :].sum() == 32  # Both holes lie in each 64x64 crop ...
    written = np.zeros_like(hole)
    written[piece.box] = piece.write
    assert written.sum() == 16 and written[100:104, columns].all()  # ... each writes its own.


def test_an_image_that_fits_in_one_crop_is_inpainted_whole(inpainter):
  image = photo(40, 56)
  hole = np.zeros((40, 56), bool)
  hole[10:20, 5:50] = True
  crop = inpainter(image, hole, hd.HDStrategy("crop"))
  np.testing.assert_array_equal(crop, inpainter(image, hole, hd.HDStrategy("original")))
  np.testing.assert_array_equal(crop, network(inpainter, image, hole))


def test_resize_inpaints_a_downscaled_copy_and_fills_only_the_holes(inpainter):
  image = photo(240, 360)
  hole = np.zeros(image.shape[:2], bool)
  hole[100:140, 200:260] = True
  hole[10:12, 5:9] = True
  result = inpainter(image, hole, hd.HDStrategy("resize", resize_limit=48))
  np.testing.assert_array_equal(result[~hole], image[~hole])
  # Independently: area-downscale to 48x32, any touched pixel is a hole, bicubic upscale.
  small = cv2.resize(image.astype(np.float32) / 127.5 - 1, (48, 32), interpolation=cv2.INTER_AREA)
  small_hole = np.zeros((32, 48), bool)
  for y, x in zip(*np.nonzero(hole)):  # Pixel y covers [y / 7.5, (y + 1) / 7.5) of the small image.
    rows, cols = (range(int(v / 7.5), int(np.ceil((v + 1) / 7.5))) for v in (y, x))
    small_hole[np.ix_(rows, cols)] = True
  output = inpainter._apply(
    inpainter.variables,
    jnp.asarray(small[None]),
    jnp.asarray((~small_hole)[None, ..., None].astype(np.float32)),
  )
  composite = np.where(small_hole[..., None], np.asarray(output[0]), small)
  upscaled = cv2.resize(composite, (360, 240), interpolation=cv2.INTER_CUBIC)
  # hd upscales the box only, with OpenCV's warp (sub-pixel positions in 1/32 steps).
  difference = np.abs(result[hole].astype(int) - images.to_uint8(upscaled)[hole])
  assert difference.max() <= 1 and difference.mean() < 0.05
  # Within the limit, resize is the whole image.
  np.testing.assert_array_equal(
    inpainter(image, hole, hd.HDStrategy("resize", resize_limit=360)),
    inpainter(image, hole, hd.HDStrategy("original")),
  )


def test_groups_sharing_one_crop_run_once():
  hole = np.zeros((200, 200), bool)
  hole[20, 20] = hole[20, 180] = hole[180, 20] = hole[180, 180] = True
  image = np.zeros((200, 200, 3), np.float32)
  (piece,) = hd.pieces(image, hole, hd.HDStrategy("crop", 8), 256, 8)  # Grown to the whole image.
  assert piece.box == (slice(0, 200), slice(0, 200))
  np.testing.assert_array_equal(piece.write, hole)


@pytest.mark.parametrize("name", hd.STRATEGIES)
def test_borders_small_images_and_float_images(inpainter, name):
  """A hole on the border with no margin, an image smaller than the size multiple (8) and float
  pixels: the known pixels stay exact in every strategy."""
  strategy = hd.HDStrategy(name, crop_margin=0, resize_limit=40)
  for image, hole in [
    (photo(), np.pad(np.ones((10, 30), bool), ((0, 230), (330, 0)))),  # The top right corner.
    (photo(5, 7), np.eye(5, 7, dtype=bool)),
  ]:
    for pixels in (image, image / 255.0):
      result = inpainter(pixels, hole[..., None], strategy)
      assert result.dtype == pixels.dtype and result.shape == pixels.shape
      np.testing.assert_array_equal(result[~hole], pixels[~hole])
      assert np.isfinite(result).all()


@pytest.mark.parametrize(
  "strategy,match",
  [
    (hd.HDStrategy("resize", resize_limit=40), "a resize network input is all hole.*resize limit"),
    (hd.HDStrategy("crop", crop_margin=0), "a crop network input is all hole.*crop margin"),
  ],
)
def test_a_network_input_without_known_pixels_is_refused(inpainter, strategy, match):
  """Holes on every third column vanish into one hole when downscaled 3x or more; a crop without
  margin around a solid block is all hole too."""
  hole = np.zeros((120, 240), bool)
  hole[:, ::3] = strategy.name == "resize"
  hole[40:80, 40:80] = True
  with pytest.raises(inpaint.InpaintError, match=match):
    inpainter(photo(120, 240), hole, strategy)


def test_progress_counts_network_inputs(inpainter):
  image = photo()
  hole = np.zeros(image.shape[:2], bool)
  hole[10:20, 10:20] = hole[200:220, 300:320] = True
  calls = []
  inpainter.inpaint_many(
    [image, image[:64, :64]],
    [hole, hole[:64, :64]],
    hd.HDStrategy("crop", 8),
    progress=lambda done, total: calls.append((done, total)),
  )
  # Three network inputs: two crops of the photo (one batch: equal size) and the small image.
  assert calls == [(0, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
  "strategy,match",
  [
    (hd.HDStrategy("tiles"), "Unknown HD strategy 'tiles'"),
    (hd.HDStrategy("crop", crop_margin=-1), "crop margin must be 0 or more"),
    (hd.HDStrategy("resize", resize_limit=0), "resize limit must be a positive"),
  ],
)
def test_bad_strategies_are_refused(inpainter, strategy, match):
  with pytest.raises(inpaint.InpaintError, match=match):
    inpainter(photo(), np.eye(240, 360, dtype=bool), strategy)


def test_training_size_comes_from_the_checkpoint():
  assert inpaint.training_size({}) == 256
  assert inpaint.training_size({"config": {"data": {"image_size": 128}}}) == 128
  assert inpaint.training_size({"train_size": 512}) == 512


def test_cli_strategies_match_the_api(checkpoint, inpainter, tmp_path, capsys):
  image = photo()
  hole = np.zeros(image.shape[:2], bool)
  hole[50:90, 100:180] = True
  Image.fromarray(image).save(tmp_path / "photo.png")
  Image.fromarray(np.where(hole, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
  args = ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "photo.png")]
  args += ["--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")]
  for flags, strategy in [
    ([], hd.HDStrategy("crop")),
    (["--hd_strategy", "crop", "--crop_margin", "8"], hd.HDStrategy("crop", 8)),
    (["--hd_strategy", "resize", "--resize_limit", "64"], hd.HDStrategy("resize", 128, 64)),
    (["--hd_strategy", "original"], hd.HDStrategy("original")),
  ]:
    assert inpaint.main(args + flags) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(out, inpainter(image, hole, strategy))
  assert inpaint.main(args + ["--crop_margin", "-1"]) == 1
  err = capsys.readouterr().err
  assert err == "error: The crop margin must be 0 or more pixels, got -1.\n"


def test_cli_reuses_compiled_networks_from_a_cache_dir(checkpoint, inpainter, tmp_path):
  """A run with --compilation_cache_dir fills it; a second run compiles nothing new and gives the
  same result (separate processes: JAX's cache is per process)."""
  image = photo(64, 96)
  hole = np.zeros((64, 96), bool)
  hole[20:30, 30:60] = True
  Image.fromarray(image).save(tmp_path / "photo.png")
  Image.fromarray(np.where(hole, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
  cache = tmp_path / "cache"
  command = [sys.executable, "-m", "pconv_jax.inpaint", "--checkpoint", str(checkpoint)]
  command += ["--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")]
  command += ["--output", str(tmp_path / "out.png"), "--compilation_cache_dir", str(cache)]
  entries = []
  for _ in range(2):
    subprocess.run(
      command, check=True, capture_output=True, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}
    )
    entries.append(sorted(p.name for p in cache.iterdir()))
    np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "out.png")), inpainter(image, hole)
    )
  assert entries[0] and entries[1] == entries[0]
