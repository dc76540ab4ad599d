"""The evaluation run on a tiny real checkpoint, and the classical baselines."""

import csv
import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import default
from pconv_jax import baselines, checkpoints, evaluate, inception, masks, models

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {
  "depth": 3,
  "features": [8, 8, 8],
  "kernel_sizes": [3, 3, 3],
  "partial": True,
  "dtype": "float32",
}


def save_tiny_checkpoint(directory: Path, step: int = 7, **meta) -> Path:
  model = models.create_model(MODEL_CONFIG)
  variables = jax.jit(model.init)(
    jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32, 32, 1))
  )
  checkpoints.save_model(directory, variables, MODEL_CONFIG, step=step, **meta)
  return directory


def tiny_config(**eval_overrides):
  config = default.get_config()
  config.data.source = "demo"  # Two held-out photos shipped with scikit-image.
  config.data.image_size = 32
  config.eval.num_images = None
  config.eval.masks_per_bin = 3
  config.eval.batch_size = 8
  config.eval.inception = False
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return config


def random_inception_npz(path: Path) -> Path:
  rng = np.random.default_rng(0)
  params = {}
  for conv_path, (kh, kw, cin, cout) in inception.conv_shapes().items():
    node = params
    for part in conv_path:
      node = node.setdefault(part, {})
    node["kernel"] = rng.normal(0, np.sqrt(2 / (kh * kw * cin)), (kh, kw, cin, cout)).astype(
      np.float32
    )
    node["bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
  params["fc"] = {
    "kernel": rng.normal(0, 0.05, (2048, 1000)).astype(np.float32),
    "bias": np.zeros(1000, np.float32),
  }
  inception.save_npz(
    inception.Inception("keras", {"params": params}), path, origin_sha256="random test weights"
  )
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("eval_workdir")
  save_tiny_checkpoint(directory / "checkpoints", step=7, vgg_losses=False)
  return directory


def test_eval_run_writes_every_table_bin_and_baseline(workdir, monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "empty_cache"))
  results = evaluate.evaluate(tiny_config(inception=True), workdir)
  out = workdir / "eval" / "step_7"
  assert sorted(p.name for p in out.iterdir()) == [
    "results.csv",
    "results.json",
    "results.md",
    "samples_border.png",
    "samples_no_border.png",
  ]

  methods = ["pconv", "telea", "navier_stokes", "mean_fill"]
  bins = [evaluate.bin_label(i) for i in range(len(masks.HOLE_RATIO_BINS))]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["method"], r["mask_set"], r["bin"]) for r in rows} == {
    (m, s, b) for m in methods for s in ("no_border", "border") for b in bins
  }
  assert len(rows) == len(methods) * 2 * 6
  for row in rows:
    assert row["pairs"] == "3"  # max(2 images, 3 masks).
    assert (
      0 <= float(row["l1_percent"]) < 100
      and float(row["psnr"]) > 0
      and -1 <= float(row["ssim"]) <= 1
    )
    # No Inception weights in the cache: no made-up numbers.
    assert row["inception_score"] == row["fid"] == ""

  saved = json.loads((out / "results.json").read_text())
  assert saved["step"] == 7 and saved["num_images"] == 2 and saved["inception"] is None
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))
  by_key = {(r["method"], r["mask_set"], r["bin_index"]): r for r in results["rows"]}
  # Larger holes are harder for every method: PSNR falls from the first to the last bin.
  for method in methods:
    assert by_key[(method, "no_border", 0)]["psnr"] > by_key[(method, "no_border", 5)]["psnr"]

  table = (out / "results.md").read_text()
  assert table in capsys.readouterr().out
  for text in [
    "| L1 (%) | PConv (this model) |",
    "|  | Telea (OpenCV) |",
    "Navier-Stokes (OpenCV)",
    "Mean colour",
    "(0.01, 0.1] N",
    "(0.5, 0.6] B",
    "| IScore |",
    "| FID |",
    "python -m pconv_jax.inception fetch fid",
    "without the perceptual and style losses",
  ]:
    assert text in table
  assert "n/a" in table

  grid = np.asarray(Image.open(out / "samples_no_border.png"))
  assert grid.shape == (6 * 32, (len(methods) + 2) * 32, 3)


def test_the_model_row_is_named_as_the_paper_names_it():
  names = evaluate.method_names(True, ("pconv", "telea"))
  assert names == {"pconv": "PConv (this model)", "telea": "Telea (OpenCV)"}
  assert evaluate.method_names(False, ("pconv",)) == {"pconv": "Conv (this model)"}


def test_eval_is_deterministic_and_independent_of_the_batch_size(workdir, tmp_path):
  # 10 pairs per bin: batches of 8 + 2 (padded).
  config = tiny_config(baselines=("mean_fill",), masks_per_bin=10)
  runs = [
    evaluate.evaluate(config, tmp_path / name, checkpoint=workdir / "checkpoints") for name in "ab"
  ]
  csv_a, csv_b = (
    (tmp_path / name / "eval" / "step_7" / "results.csv").read_text() for name in "ab"
  )
  assert csv_a == csv_b
  config.eval.batch_size = 16  # One padded batch.
  runs.append(evaluate.evaluate(config, tmp_path / "c", checkpoint=workdir / "checkpoints"))
  for a, c in zip(runs[0]["rows"], runs[2]["rows"], strict=True):
    assert a["pairs"] == c["pairs"] == 10
    for key in ("l1_percent", "psnr", "ssim"):
      np.testing.assert_allclose(a[key], c[key], rtol=1e-6)


def test_eval_on_a_mask_directory_with_inception_weights(workdir, tmp_path):
  """NVIDIA-style test masks (PNG, white = hole): one mask in bin (0.1, 0.2], so the other bins are
  n/a; random Inception weights fill the IScore and FID cells of that bin."""
  hole = np.zeros((32, 32), np.uint8)
  hole[8:20, 4:18] = 255  # 168 / 1024 = 16% hole.
  (tmp_path / "masks").mkdir()
  Image.fromarray(hole).save(tmp_path / "masks" / "00001.png")
  config = tiny_config(
    inception=True,
    inception_weights=str(random_inception_npz(tmp_path / "inception.npz")),
    baselines=("mean_fill",),
  )
  config.data.masks.test_dir = str(tmp_path / "masks")
  results = evaluate.evaluate(config, tmp_path, checkpoint=workdir / "checkpoints")
  assert results["pairs"] == {"test": {evaluate.bin_label(i): 2 if i == 1 else 0 for i in range(6)}}
  for row in results["rows"]:
    if row["bin_index"] == 1:
      assert row["inception_score"] >= 1.0 - 1e-9 and row["fid"] >= -1e-6 and row["ssim"] > 0
    else:
      assert row["pairs"] == 0 and row["psnr"] is None and row["fid"] is None
  assert results["inception"] == "keras" and any("Keras" in note for note in results["notes"])
  table = (tmp_path / "eval" / "step_7" / "results.md").read_text()
  assert "| (0.1, 0.2] |" in table and "Some bins have no masks" in table


def test_bad_eval_config_and_missing_checkpoint_are_explained(tmp_path):
  with pytest.raises(evaluate.EvalConfigError, match="config.eval.baselines"):
    evaluate.evaluate(tiny_config(baselines=("photoshop",)), tmp_path)
  with pytest.raises(evaluate.EvalConfigError, match="evaluation images number 2"):
    save_tiny_checkpoint(tmp_path / "checkpoints")
    evaluate.evaluate(tiny_config(num_images=5), tmp_path)
  with pytest.raises(checkpoints.CheckpointError, match="No checkpoint directory"):
    evaluate.evaluate(tiny_config(), tmp_path / "elsewhere")
  with pytest.raises(inception.InceptionWeightsError, match="does not exist"):
    evaluate.evaluate(
      tiny_config(inception=True, inception_weights=str(tmp_path / "none.npz")), tmp_path
    )


def test_module_cli_runs_eval(workdir, tmp_path):
  config_file = tmp_path / "tiny_eval.py"
  config_file.write_text(
    "from configs import default\n\n\ndef get_config():\n  config = default.get_config()\n"
    "  config.data.source = 'demo'\n  config.data.image_size = 32\n  config.eval.num_images = "
    "None\n"
    "  config.eval.masks_per_bin = 1\n  config.eval.baselines = ()\n  config.eval.inception = "
    "False\n"
    "  return config\n"
  )
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pconv_jax.evaluate",
      f"--config={config_file}",
      f"--workdir={tmp_path}",
      f"--checkpoint={workdir / 'checkpoints'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=os.environ
    | {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PCONV_JAX_CACHE": str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr
  assert "| SSIM | PConv (this model) |" in result.stdout
  assert (tmp_path / "eval" / "step_7" / "results.json").is_file()


# --------------------------------------------------------------------------------------------------
# Baselines.


def photo_and_mask(size=48):
  from skimage import data  # pylint: disable=import-outside-toplevel

  image = data.chelsea()[100 : 100 + size, 150 : 150 + size].copy()
  mask = np.ones((1, size, size, 1), np.float32)
  mask[0, 10:30, 15:35] = 0
  return image[None], mask


@pytest.mark.parametrize("method", baselines.METHODS)
def test_baselines_keep_known_pixels_and_fill_holes(method):
  images, mask = photo_and_mask()
  out = baselines.inpaint(method, images, mask)
  assert out.dtype == np.uint8 and out.shape == images.shape
  known = mask[..., 0] == 1
  np.testing.assert_array_equal(out[known], images[known])
  hole_error = np.abs(out[~known].astype(float) - images[~known]).mean()
  assert hole_error < 60  # A plausible fill of a cat's fur, not noise.


def test_baselines_on_a_constant_image():
  images = np.full((2, 20, 24, 3), (10, 200, 90), np.uint8)
  mask = np.ones((2, 20, 24, 1), np.float32)
  mask[:, 5:12, 6:15] = 0
  for method in ("navier_stokes", "mean_fill"):
    np.testing.assert_array_equal(baselines.inpaint(method, images, mask), images)
  # OpenCV's Telea is not exact on flat images (its gradient weighting adds +-2 levels of noise).
  assert np.abs(baselines.inpaint("telea", images, mask).astype(int) - images).max() <= 2


def test_mean_fill_is_the_mean_of_known_pixels():
  images = np.zeros((1, 4, 4, 3), np.uint8)
  images[0, 0, :] = (100, 50, 7)  # Known: one row of this colour, one row of zeros.
  mask = np.zeros((1, 4, 4, 1), np.float32)
  mask[0, :2] = 1
  out = baselines.inpaint("mean_fill", images, mask)
  np.testing.assert_array_equal(
    out[0, 2:], np.broadcast_to(np.array([50, 25, 4], np.uint8), (2, 4, 3))
  )


def test_unknown_baseline_is_refused():
  with pytest.raises(ValueError, match="Unknown baseline"):
    baselines.inpaint("photoshop", *photo_and_mask())
