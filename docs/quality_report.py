"""The tables and pictures of docs/quality.md from the runs of the CPU quality recipe.

    python -m docs.quality_report --pconv WORKDIR [--conv WORKDIR] [--self_ensemble]
        [--out docs/quality]

Reads each run's final evaluation (`eval/step_<N>/results.json`; with `--self_ensemble`, the one
of `python -m pconv_jax.evaluate ... --config.eval.self_ensemble=True`, in
`eval/step_<N>_self_ensemble/`), prints and writes `<out>/results.md`: the paper's table with
PConv's rows, the Conv ablation's beside them when `--conv` is given, and the baselines', and
whether PConv beats Telea and Navier-Stokes in PSNR and SSIM in every bin of TARGET_BINS of both
mask sets (with `--self_ensemble`, also without it); with `--conv`, the same for Conv and PConv's
differences from Conv in every bin. Copies beside it each run's learning curve,
final sample grids and `train.log` (the run's console output).
"""

import argparse
import json
import pathlib
import re
import shutil
from typing import Any

from pconv_jax import evaluate

TARGET_BINS = (2, 3, 4, 5)  # (0.2, 0.3] ... (0.5, 0.6]
BASELINES = ("telea", "navier_stokes")
CONV = "conv"


def final_results(
  workdir: pathlib.Path, self_ensemble: bool = False
) -> tuple[pathlib.Path, dict[str, Any]]:
  """The newest evaluation directory of a workdir (plain or self-ensemble) and its results."""
  pattern = re.compile(r"step_(\d+)" + ("_self_ensemble" if self_ensemble else "") + "$")
  steps = sorted(
    (int(match[1]), path)
    for path in workdir.glob("eval/step_*/results.json")
    if (match := pattern.match(path.parent.name))
  )
  if not steps:
    name = evaluate.eval_dir_name(0, self_ensemble).replace("step_0", "step_<N>")
    raise SystemExit(f"error: {workdir} has no eval/{name}/results.json: is the run finished?")
  path = steps[-1][1]
  return path.parent, json.loads(path.read_text())


def merged(pconv: dict[str, Any], conv: dict[str, Any]) -> dict[str, Any]:
  """PConv's results with the Conv run's model rows added as method CONV."""
  conv_rows = [
    {**row, "method": CONV} for row in conv["rows"] if row["method"] == evaluate.MODEL_METHOD
  ]
  names = pconv["method_names"] | {CONV: "Conv (ablation)"}
  methods = [evaluate.MODEL_METHOD, CONV] + [
    m for m in names if m not in (evaluate.MODEL_METHOD, CONV)
  ]
  rows = sorted(pconv["rows"] + conv_rows, key=lambda r: methods.index(r["method"]))
  return pconv | {"rows": rows, "method_names": {m: names[m] for m in methods}}


def target_check(results: dict[str, Any], method: str = evaluate.MODEL_METHOD) -> list[str]:
  """Per mask set and target bin: a model's PSNR and SSIM margins over the better baseline."""
  rows = {(r["method"], r["mask_set"], r["bin_index"]): r for r in results["rows"]}
  lines = [
    "| mask set | bin | PSNR margin (dB) | SSIM margin | ahead in both |",
    "|---|---|---:|---:|---|",
  ]
  for mask_set in results["pairs"]:
    for i in TARGET_BINS:
      model = rows[(method, mask_set, i)]
      margins = {
        key: model[key] - max(rows[(b, mask_set, i)][key] for b in BASELINES)
        for key in ("psnr", "ssim")
      }
      ahead = "yes" if min(margins.values()) > 0 else "**no**"
      lines.append(
        f"| {mask_set} | {evaluate.bin_label(i)} | {margins['psnr']:+.2f} | "
        f"{margins['ssim']:+.4f} | {ahead} |"
      )
  return lines


def ablation_check(results: dict[str, Any]) -> list[str]:
  """Per mask set and bin: PConv's L1, PSNR and SSIM minus the Conv ablation's, and a count of the
  cells where PConv is better (lower L1, higher PSNR and SSIM)."""
  rows = {(r["method"], r["mask_set"], r["bin_index"]): r for r in results["rows"]}
  keys = {"l1_percent": "L1 (%)", "psnr": "PSNR (dB)", "ssim": "SSIM"}
  lines = ["| mask set | bin | " + " | ".join(keys.values()) + " |", "|---|---|---:|---:|---:|"]
  better = dict.fromkeys(keys, 0)
  for mask_set in results["pairs"]:
    for i in sorted({r["bin_index"] for r in results["rows"] if r["mask_set"] == mask_set}):
      pconv, conv = rows[(evaluate.MODEL_METHOD, mask_set, i)], rows[(CONV, mask_set, i)]
      diffs = {key: pconv[key] - conv[key] for key in keys}
      for key, diff in diffs.items():
        better[key] += diff < 0 if key == "l1_percent" else diff > 0
      lines.append(
        f"| {mask_set} | {evaluate.bin_label(i)} | {diffs['l1_percent']:+.3f} | "
        f"{diffs['psnr']:+.2f} | {diffs['ssim']:+.4f} |"
      )
  cells = len(lines) - 2
  counts = ", ".join(f"{keys[key]} in {n} of {cells}" for key, n in better.items())
  return lines + ["", f"PConv is better than Conv in {counts} cells."]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pconv", required=True, type=pathlib.Path)
  parser.add_argument("--conv", type=pathlib.Path, help="the model.partial=False run, if any")
  parser.add_argument(
    "--self_ensemble", action="store_true", help="report the x8 self-ensemble's evaluation"
  )
  parser.add_argument("--out", default="docs/quality", type=pathlib.Path)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  runs = {"pconv": args.pconv} | ({"conv": args.conv} if args.conv else {})
  finals = {name: final_results(workdir, args.self_ensemble) for name, workdir in runs.items()}
  results = finals["pconv"][1]
  if "conv" in finals:
    results = merged(results, finals["conv"][1])
  lines = [
    evaluate.markdown_table(results),
    "The margin of PConv over the better of Telea and Navier-Stokes in the target bins:",
    "",
    *target_check(results),
    "",
  ]
  if args.self_ensemble:
    lines += [
      "Without the self-ensemble (one network pass):",
      "",
      *target_check(final_results(args.pconv)[1]),
      "",
    ]
  if "conv" in finals:
    lines += [
      "The margin of the Conv ablation over the better of Telea and Navier-Stokes:",
      "",
      *target_check(results, CONV),
      "",
      "PConv minus the Conv ablation (L1: negative is PConv better):",
      "",
      *ablation_check(results),
      "",
    ]
    if args.self_ensemble:
      plain = merged(final_results(args.pconv)[1], final_results(args.conv)[1])
      lines += [
        "PConv minus the Conv ablation without the self-ensemble (one network pass each):",
        "",
        *ablation_check(plain),
        "",
      ]
  text = "\n".join(lines)
  (args.out / "results.md").write_text(text)
  print(text)
  for name, workdir in runs.items():
    eval_dir = finals[name][0]
    shutil.copy(workdir / "eval" / "learning_curve.png", args.out / f"learning_curve_{name}.png")
    for grid in sorted(eval_dir.glob("samples_*.png")):
      shutil.copy(grid, args.out / f"{grid.stem}_{name}.png")
    shutil.copy(workdir / "train.log", args.out / f"train_{name}.log")


if __name__ == "__main__":
  main()
