"""The inpainting API and CLI on a tiny real checkpoint and real PNG/JPEG files."""

import os
from pathlib import Path
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from skimage import data

from pconv_jax import checkpoints, images, inpaint, models

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {
  "depth": 3,
  "features": [8, 8, 8],
  "kernel_sizes": [3, 3, 3],
}  # Sizes: multiples of 8.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("inpaint_workdir")
  model = models.create_model(MODEL_CONFIG)
  variables = jax.jit(model.init)(
    jax.random.key(1), jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 16, 16, 1))
  )
  checkpoints.save_model(workdir / "checkpoints", variables, MODEL_CONFIG, step=3)
  return workdir


@pytest.fixture(scope="module")
def inpainter(checkpoint):
  return inpaint.Inpainter.from_checkpoint(checkpoint, batch_size=2)


def photo(height=37, width=53, top=80, left=120):
  return data.astronaut()[top : top + height, left : left + width].copy()


def hole_for(height, width, seed=0):
  hole = np.zeros((height, width), bool)
  rng = np.random.default_rng(seed)
  y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
  hole[y : y + height // 3, x : x + width // 3] = True
  return hole


def write_mask(hole, path, polarity="white_hole"):
  white = hole if polarity == "white_hole" else ~hole
  Image.fromarray(np.where(white, 255, 0).astype(np.uint8)).save(path)
  return path


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "pconv_jax.inpaint", *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
  )


# --------------------------------------------------------------------------------------------------
# API.


def test_odd_size_keeps_known_pixels_and_equals_padded_network(inpainter):
  image, hole = photo(), hole_for(37, 53)
  result = inpainter(image, hole)
  assert result.shape == image.shape and result.dtype == np.uint8
  np.testing.assert_array_equal(result[~hole], image[~hole])
  # What the network computes on the 40x56 padded input, padding marked as hole, cropped back.
  padded = np.zeros((1, 40, 56, 3), np.float32)
  padded[0, :37, :53] = images.to_model_range(image)
  valid = np.zeros((1, 40, 56, 1), np.float32)
  valid[0, :37, :53, 0] = ~hole
  output = np.asarray(
    inpainter.model.apply(inpainter.variables, jnp.asarray(padded), jnp.asarray(valid))
  )
  expected = images.to_uint8(output[0, :37, :53])
  np.testing.assert_array_equal(result[hole], expected[hole])


def test_float_images_and_batches_of_mixed_sizes(inpainter):
  images = [photo(37, 53), photo(16, 16, 10, 10), photo(40, 29, 200, 200)]
  holes = [hole_for(*image.shape[:2], seed=i) for i, image in enumerate(images)]
  batched = inpainter.inpaint_many(images, holes)
  for image, hole, result in zip(images, holes, batched, strict=True):
    np.testing.assert_array_equal(result, inpainter(image, hole))  # Batching changes nothing.
    as_float = image.astype(np.float64) / 255.0
    float_result = inpainter(as_float, hole[..., None])
    assert float_result.dtype == np.float64
    np.testing.assert_array_equal(float_result[~hole], as_float[~hole])
    np.testing.assert_allclose(float_result[hole], result[hole] / 255.0, atol=0.5 / 255 + 1e-6)


def test_self_ensemble_is_the_mean_over_flipped_and_turned_inputs(checkpoint, inpainter):
  ensemble = inpaint.Inpainter.from_checkpoint(checkpoint, batch_size=2, self_ensemble=True)
  image = photo(40, 56).astype(np.float64) / 255.0  # No padding; turned, it is 56x40.
  hole = hole_for(40, 56)

  def turn(a, k, mirror):
    return np.rot90(a[:, ::-1] if mirror else a, k)

  def undo(a, k, mirror):
    a = np.rot90(a, -k)
    return a[:, ::-1] if mirror else a

  expected = np.mean(
    [
      undo(inpainter(turn(image, k, m), turn(hole, k, m)), k, m)
      for m in (False, True)
      for k in range(4)
    ],
    axis=0,
  )
  result = ensemble(image, hole)
  np.testing.assert_array_equal(result[~hole], image[~hole])
  np.testing.assert_allclose(result, expected, atol=1e-6)
  assert np.abs(result - inpainter(image, hole)).max() > 1e-3


@pytest.mark.parametrize(
  "hole,match",
  [
    (np.zeros((37, 53), bool), "no hole"),
    (np.ones((37, 53), bool), "all hole"),
    (np.zeros((30, 53), bool), "the image is 53x37 pixels but the mask is 53x30"),
  ],
)
def test_api_refuses_unusable_masks(inpainter, hole, match):
  with pytest.raises(inpaint.InpaintError, match=match):
    inpainter(photo(), hole)


def test_api_refuses_out_of_range_float_images(inpainter):
  with pytest.raises(inpaint.InpaintError, match=r"\[0, 1\]"):
    inpainter(photo() / 127.5 - 1.0, hole_for(37, 53))


# --------------------------------------------------------------------------------------------------
# CLI.


def test_cli_single_image_jpeg_in_png_out(checkpoint, tmp_path):
  Image.fromarray(photo(45, 61)).save(tmp_path / "photo.jpg", quality=90)
  hole = hole_for(45, 61)
  write_mask(hole, tmp_path / "mask.png")
  result = run_cli(
    "--checkpoint",
    checkpoint,
    "--image",
    tmp_path / "photo.jpg",
    "--mask",
    tmp_path / "mask.png",
    "--output",
    tmp_path / "out.png",
  )
  assert result.returncode == 0, result.stderr
  out = np.asarray(Image.open(tmp_path / "out.png"))
  decoded = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))
  assert out.shape == (45, 61, 3)
  np.testing.assert_array_equal(out[~hole], decoded[~hole])
  assert np.any(out[hole] != decoded[hole])


def test_cli_error_is_one_line_without_traceback(checkpoint, tmp_path):
  Image.fromarray(photo()).save(tmp_path / "photo.png")
  write_mask(np.zeros((37, 53), bool), tmp_path / "mask.png")
  result = run_cli(
    "--checkpoint",
    checkpoint,
    "--image",
    tmp_path / "photo.png",
    "--mask",
    tmp_path / "mask.png",
    "--output",
    tmp_path / "out.png",
  )
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "no hole" in errors[0] and "--mask_polarity black_hole" in errors[0]
  assert not (tmp_path / "out.png").exists()


def test_cli_black_hole_polarity(checkpoint, tmp_path, capsys):
  image, hole = photo(), hole_for(37, 53)
  Image.fromarray(image).save(tmp_path / "photo.png")
  write_mask(hole, tmp_path / "mask.png", polarity="black_hole")
  assert (
    inpaint.main(
      [
        "--checkpoint",
        str(checkpoint / "checkpoints"),
        "--image",
        str(tmp_path / "photo.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--output",
        str(tmp_path / "out.png"),
        "--mask_polarity",
        "black_hole",
      ]
    )
    == 0
  )
  out = np.asarray(Image.open(tmp_path / "out.png"))
  np.testing.assert_array_equal(out, inpaint.Inpainter.from_checkpoint(checkpoint)(image, hole))
  assert "Wrote" in capsys.readouterr().out


def test_a_mask_of_the_other_polarity_is_named_in_a_warning(
  checkpoint, inpainter, tmp_path, capsys
):
  """A hole beyond the paper's 60% (a black-hole mask read as white-hole: 90% here) still inpaints,
  with a warning naming the fix: the other --mask_polarity, or the inverse mask in Python."""
  image, hole = photo(), hole_for(37, 53)
  with pytest.warns(inpaint.HoleShareWarning, match=r"image 0: 90% of the image is hole.*~hole"):
    inpainter(image, ~hole)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    inpainter(image, hole)  # 10%: no warning.
  Image.fromarray(image).save(tmp_path / "photo.png")
  write_mask(hole, tmp_path / "mask.png", polarity="black_hole")
  args = ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "photo.png")]
  args += ["--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "out.png")]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert inpaint.main(args) == 0
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("warning: ")
  assert "90% of the image is hole" in err and "pass --mask_polarity black_hole" in err


def test_cli_folder_mode(checkpoint, tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  sizes = {
    "a": (37, 53),
    "b": (24, 24),
    "c": (37, 50),
    "d": (19, 41),
  }  # a and c batch together (40x56).
  for name, (h, w) in sizes.items():
    Image.fromarray(photo(h, w)).save(tmp_path / "images" / f"{name}.png")
    write_mask(hole_for(h, w, seed=ord(name)), tmp_path / "masks" / f"{name}.png")
  assert (
    inpaint.main(
      [
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(tmp_path / "images"),
        "--mask",
        str(tmp_path / "masks"),
        "--output",
        str(tmp_path / "out"),
        "--batch_size",
        "2",
      ]
    )
    == 0
  )
  single = inpaint.Inpainter.from_checkpoint(checkpoint)
  for name, (h, w) in sizes.items():
    out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
    np.testing.assert_array_equal(out, single(photo(h, w), hole_for(h, w, seed=ord(name))))


def test_cli_folder_mode_reports_missing_masks(checkpoint, tmp_path, capsys):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  Image.fromarray(photo()).save(tmp_path / "images" / "a.png")
  Image.fromarray(photo()).save(tmp_path / "images" / "b.jpg")
  write_mask(hole_for(37, 53), tmp_path / "masks" / "a.png")
  assert (
    inpaint.main(
      [
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(tmp_path / "images"),
        "--mask",
        str(tmp_path / "masks"),
        "--output",
        str(tmp_path / "out"),
      ]
    )
    == 1
  )
  assert "b.jpg: no mask named b.*" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def _bad_input(kind, tmp_path):
  """(image, mask, polarity, expected message) for one bad input."""
  image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
  Image.fromarray(photo()).save(image)
  hole = hole_for(37, 53)
  if kind == "mismatched_size":
    write_mask(hole[:30], mask)
    return image, mask, "white_hole", "the image is 53x37 pixels but the mask is 53x30"
  if kind == "no_hole":
    write_mask(np.zeros_like(hole), mask)
    return image, mask, "white_hole", "has no hole (no white pixel"
  if kind == "all_hole_black":
    write_mask(np.ones_like(hole), mask, polarity="black_hole")
    return image, mask, "black_hole", "is all hole (every pixel black"
  if kind == "unreadable_image":
    image.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_mask(hole, mask)
    return image, mask, "white_hole", "cannot read it as an image"
  if kind == "unreadable_mask":
    mask.write_text("not a png")
    return image, mask, "white_hole", "cannot read it as a mask image"
  write_mask(hole, mask)
  return tmp_path / "missing.jpg", mask, "white_hole", "no such file"


@pytest.mark.parametrize(
  "kind",
  [
    "mismatched_size",
    "no_hole",
    "all_hole_black",
    "unreadable_image",
    "unreadable_mask",
    "missing_image",
  ],
)
def test_cli_bad_inputs_give_clear_errors(checkpoint, tmp_path, capsys, kind):
  image, mask, polarity, message = _bad_input(kind, tmp_path)
  code = inpaint.main(
    [
      "--checkpoint",
      str(checkpoint),
      "--image",
      str(image),
      "--mask",
      str(mask),
      "--output",
      str(tmp_path / "out.png"),
      "--mask_polarity",
      polarity,
    ]
  )
  err = capsys.readouterr().err
  assert code == 1 and message in err and err.startswith("error: ")
  assert not (tmp_path / "out.png").exists()


def test_cli_missing_checkpoint_and_bad_output_format(tmp_path, capsys):
  Image.fromarray(photo()).save(tmp_path / "photo.png")
  write_mask(hole_for(37, 53), tmp_path / "mask.png")
  args = ["--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")]
  assert (
    inpaint.main(
      ["--checkpoint", str(tmp_path / "nowhere"), *args, "--output", str(tmp_path / "o.png")]
    )
    == 1
  )
  assert "No checkpoint directory" in capsys.readouterr().err
  assert (
    inpaint.main(["--checkpoint", str(tmp_path), *args, "--output", str(tmp_path / "o.xyz")]) == 1
  )
  assert "unknown image format '.xyz'" in capsys.readouterr().err


def test_cli_thresholds_non_binary_masks_with_a_warning(checkpoint, tmp_path, capsys):
  """A JPEG-compressed mask: grey >= 128 is white; the result equals that of the binarised mask."""
  image, hole = photo(), hole_for(37, 53)
  Image.fromarray(image).save(tmp_path / "photo.png")
  grey = np.where(hole, 255, 0).astype(np.uint8)
  grey[hole] = 200  # Light grey inside the hole, dark grey specks outside.
  grey[0, :5] = 60
  Image.fromarray(grey).save(tmp_path / "mask.png")
  assert (
    inpaint.main(
      [
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(tmp_path / "photo.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--output",
        str(tmp_path / "out.png"),
      ]
    )
    == 0
  )
  err = capsys.readouterr().err
  assert "warning:" in err and "not a binary mask" in err and "thresholded at 128" in err
  np.testing.assert_array_equal(
    np.asarray(Image.open(tmp_path / "out.png")),
    inpaint.Inpainter.from_checkpoint(checkpoint)(image, hole),
  )
