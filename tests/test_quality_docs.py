"""The scripts behind docs/quality.md, on a tiny finished run: the report's merged table and target
check, and the colour-cast measurements."""

import json
import math
import sys

import numpy as np
import pytest
import tiny_config

from docs import boundary_band, colour_cast, quality_report
from pconv_jax import evaluate, train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config.get_config()
  config.eval.update(at_end=True, every_steps=6, num_images=None, masks_per_bin=1)
  train.train_and_evaluate(config, workdir)
  (workdir / "train.log").write_text("the run's console output\n")
  return workdir


def test_report_puts_conv_beside_pconv_and_checks_the_target_bins(
  finished_run, tmp_path, monkeypatch
):
  argv = ["quality_report", "--pconv", str(finished_run), "--conv", str(finished_run)]
  monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path)])
  quality_report.main()
  lines = (tmp_path / "results.md").read_text().splitlines()
  # The same run as both: the Conv row follows PConv's with the same numbers.
  for label in ("L1 (%)", "PSNR (dB)", "SSIM"):
    i = lines.index(next(line for line in lines if line.startswith(f"| {label} | PConv")))
    assert lines[i + 1].startswith("|  | Conv (ablation) |")
    assert lines[i].split("|")[3:] == lines[i + 1].split("|")[3:]
  results = json.loads((finished_run / "eval" / "step_6" / "results.json").read_text())
  rows = {(r["method"], r["mask_set"], r["bin_index"]): r for r in results["rows"]}
  for mask_set in ("no_border", "border"):
    for i in quality_report.TARGET_BINS:
      best = {
        k: max(rows[(b, mask_set, i)][k] for b in ("telea", "navier_stokes"))
        for k in ("psnr", "ssim")
      }
      margin = {k: rows[("pconv", mask_set, i)][k] - best[k] for k in best}
      ahead = "yes" if margin["psnr"] > 0 and margin["ssim"] > 0 else "**no**"
      expected = (
        f"| {mask_set} | {evaluate.bin_label(i)} | {margin['psnr']:+.2f} | "
        f"{margin['ssim']:+.4f} | {ahead} |"
      )
      assert expected in lines
  # ... so Conv's margins over OpenCV are PConv's and it is better in no cell.
  pconv_check, conv_check = "\n".join(lines).split("The margin of the Conv ablation")
  assert "\n".join(quality_report.target_check(results)) in pconv_check
  assert "\n".join(quality_report.target_check(results)) in conv_check
  assert "| border | (0.5, 0.6] | +0.000 | +0.00 | +0.0000 |" in lines
  assert (
    "PConv is better than Conv in L1 (%) in 0 of 12, PSNR (dB) in 0 of 12, SSIM in 0 of 12 cells."
    in lines
  )
  assert {p.name for p in tmp_path.iterdir()} == {
    "results.md",
    *(f"learning_curve_{m}.png" for m in ("pconv", "conv")),
    *(f"samples_{s}_{m}.png" for s in ("no_border", "border") for m in ("pconv", "conv")),
    *(f"train_{m}.log" for m in ("pconv", "conv")),
  }


def test_report_without_conv_has_pconv_rows_only(finished_run, tmp_path, monkeypatch):
  argv = ["quality_report", "--pconv", str(finished_run), "--out", str(tmp_path)]
  monkeypatch.setattr(sys, "argv", argv)
  quality_report.main()
  text = (tmp_path / "results.md").read_text()
  assert "| PSNR (dB) | PConv" in text and "Conv (ablation)" not in text
  assert "| border | (0.5, 0.6] |" in text
  assert {p.name for p in tmp_path.iterdir()} == {
    "results.md",
    "learning_curve_pconv.png",
    "samples_no_border_pconv.png",
    "samples_border_pconv.png",
    "train_pconv.log",
  }


def test_report_of_the_self_ensemble_adds_the_plain_margins(finished_run, tmp_path, monkeypatch):
  config = tiny_config.get_config()
  config.eval.update(num_images=None, masks_per_bin=1, self_ensemble=True)
  ensemble = evaluate.evaluate(config, finished_run)
  plain = json.loads((finished_run / "eval" / "step_6" / "results.json").read_text())
  assert (finished_run / "eval" / "step_6_self_ensemble" / "results.json").is_file()
  assert ensemble["method_names"]["pconv"] == "PConv (this model, x8 self-ensemble)"
  by_method = {}
  for results in (plain, ensemble):
    for row in results["rows"]:
      by_method.setdefault(row["method"], []).append(row["psnr"])
  assert by_method["telea"][:12] == by_method["telea"][12:]  # The same pairs ...
  assert by_method["pconv"][:12] != by_method["pconv"][12:]  # ... another model output.
  argv = ["quality_report", "--pconv", str(finished_run), "--self_ensemble"]
  monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path)])
  quality_report.main()
  text = (tmp_path / "results.md").read_text()
  assert "| PSNR (dB) | PConv (this model, x8 self-ensemble) |" in text
  ensemble_check, plain_check = text.split("Without the self-ensemble (one network pass):")
  assert "\n".join(quality_report.target_check(ensemble)) in ensemble_check
  assert "\n".join(quality_report.target_check(plain)) in plain_check


def test_ablation_check_subtracts_conv_from_pconv_in_every_bin():
  def row(method, mask_set, i, l1, psnr, ssim):
    return dict(method=method, mask_set=mask_set, bin_index=i, l1_percent=l1, psnr=psnr, ssim=ssim)

  results = {
    "pairs": {"no_border": [1, 1], "border": [1, 1]},
    "rows": [
      row("pconv", "no_border", 0, 1.0, 30.0, 0.9),
      row("pconv", "no_border", 1, 2.0, 25.0, 0.8),
      row("pconv", "border", 0, 1.5, 28.0, 0.85),
      row("pconv", "border", 1, 2.5, 24.0, 0.75),
      row("conv", "no_border", 0, 1.25, 29.5, 0.875),  # Worse in all three.
      row("conv", "no_border", 1, 1.5, 25.25, 0.8125),  # Better in all three.
      row("conv", "border", 0, 1.5, 27.0, 0.9),  # Equal L1, lower PSNR, higher SSIM.
      row("conv", "border", 1, 3.0, 23.0, 0.5),
    ],
  }
  assert quality_report.ablation_check(results) == [
    "| mask set | bin | L1 (%) | PSNR (dB) | SSIM |",
    "|---|---|---:|---:|---:|",
    "| no_border | (0.01, 0.1] | -0.250 | +0.50 | +0.0250 |",
    "| no_border | (0.1, 0.2] | +0.500 | -0.25 | -0.0125 |",
    "| border | (0.01, 0.1] | +0.000 | +1.00 | -0.0500 |",
    "| border | (0.1, 0.2] | -0.500 | +1.00 | +0.2500 |",
    "",
    "PConv is better than Conv in L1 (%) in 2 of 4, PSNR (dB) in 3 of 4, SSIM in 2 of 4 cells.",
  ]


def test_report_refuses_an_unfinished_run(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["quality_report", "--pconv", str(tmp_path), "--conv", "x"])
  with pytest.raises(SystemExit, match="has no eval/step_"):
    quality_report.main()


def test_checkerboard_energy_in_closed_form():
  board = np.indices((4, 6)).sum(axis=0) % 2 * 2.0 - 1  # +-1, alternating.
  x = np.repeat(board[None, :, :, None], 3, axis=3)
  holes = np.ones((1, 4, 6, 1), bool)
  assert colour_cast.checkerboard(x, holes) == 1.0  # |1 - (-1) - (-1) + 1| / 4
  assert colour_cast.checkerboard(np.full_like(x, 0.3), holes) == 0.0
  holes[0, 0, 0] = False  # The first 2x2 block no longer lies wholly in the holes.
  x[0, :2, :2] = 5.0 * board[:2, :2, None]
  assert colour_cast.checkerboard(x, holes) == 1.0


def test_colour_cast_psnr_is_the_evaluations(finished_run):
  rows = colour_cast.measure(str(finished_run))
  assert [mode for mode, *_ in rows] == ["running averages", "batch statistics"]
  results = json.loads((finished_run / "eval" / "step_6" / "results.json").read_text())
  psnrs = [
    r["psnr"] for r in results["rows"] if r["method"] == "pconv" and r["mask_set"] == "no_border"
  ]
  assert all(math.isfinite(p) for p in psnrs)  # Every bin has two pairs: means of equal weight.
  np.testing.assert_allclose(rows[0][3], np.mean(psnrs), rtol=1e-4)
  assert all(np.isfinite(bias).all() and ratio > 0 for _, bias, ratio, _ in rows)


def test_boundary_band_is_the_ring_of_hole_pixels_next_to_known_ones():
  mask = np.ones((1, 11, 11, 1), np.float32)
  mask[0, 2:9, 2:9] = 0  # A 7x7 hole.
  band = boundary_band.boundary_band(mask, 2)[0, ..., 0]
  expected = np.zeros((11, 11), bool)
  expected[2:9, 2:9] = True
  expected[4:7, 4:7] = False  # The 3x3 interior is more than 2 pixels from a known pixel.
  np.testing.assert_array_equal(band, expected)
  mask[0, :, :5] = 0  # A hole touching the image border: the border is not a known pixel.
  assert not boundary_band.boundary_band(mask, 1)[0, 5, 0, 0]


def test_boundary_band_table_has_a_row_per_mask_set_and_bin(finished_run, monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["boundary_band", str(finished_run), "--bins", "2", "5"])
  boundary_band.main()
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| no_border |")]
  assert [row.split(" | ")[1] for row in rows] == ["(0.2, 0.3]", "(0.5, 0.6]"]
