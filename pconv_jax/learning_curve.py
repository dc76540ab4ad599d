"""The learning curve: held-out PSNR and SSIM per hole-ratio bin against training steps, with the
classical baselines as horizontal lines.

During training (`config.eval.every_steps`) each evaluation's rows become scalars named
`eval/<metric>/<mask set>/<bin>/<method>` (TensorBoard, where a custom-scalars layout puts each
bin's methods in one chart, and the JSON lines of `metric_writer`), and `draw` redraws them all
from those JSON lines into `<workdir>/eval/learning_curve.png`. Also from the shell:

    python -m pconv_jax.learning_curve WORKDIR [--output PNG]
"""

import argparse
from collections.abc import Mapping, Sequence
import json
import math
import sys
from typing import Any

from etils import epath
import matplotlib

matplotlib.use("Agg")  # No display: draw into files.
from matplotlib import pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from pconv_jax import evaluate, masks  # noqa: E402
from pconv_jax.metric_writer import read_metrics  # noqa: E402

PREFIX = "eval"
METRICS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"))


def _bin(bin_index: int) -> str:
  low, high = masks.HOLE_RATIO_BINS[bin_index]
  return f"{low:g}-{high:g}"


def tag(metric: str, mask_set: str, bin_index: int, method: str) -> str:
  abbreviation = evaluate.SET_ABBREVIATIONS.get(mask_set, mask_set)
  return f"{PREFIX}/{metric}/{abbreviation}/{_bin(bin_index)}/{method}"


def scalars(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """An evaluation's rows (`evaluate.Evaluator.evaluate`) as scalars; empty bins are left out."""
  return {
    tag(metric, row["mask_set"], row["bin_index"], row["method"]): row[metric]
    for row in rows
    if row["pairs"]
    for metric, _ in METRICS
  }


def layout(scalar_tags: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
  """TensorBoard custom scalars: one chart per metric, mask set and bin with every method's line."""
  charts: dict[str, dict[str, list[Any]]] = {}
  for name in scalar_tags:
    _, metric, mask_set, bin_, _ = name.split("/")
    chart = charts.setdefault(f"{PREFIX} {metric}", {}).setdefault(
      f"{metric} {mask_set} {bin_}", ["Multiline", []]
    )
    chart[1].append(name)
  return charts


def plot(
  metrics_by_step: Mapping[int, Mapping[str, float]],
  path: str | epath.Path,
  names: Mapping[str, str],
  title: str,
) -> None:
  """Draws every `eval/...` scalar of `metrics_by_step` (`metric_writer.read_metrics`) into a PNG:
  a row per metric and mask set, a column per bin; the model's values against steps, each
  baseline as a horizontal line at its value. `names`: display names of the methods. The y-axis
  spans the baselines and the model from its second evaluation on: the untrained network's first
  value would flatten the part that matters."""
  series: dict[tuple[str, str, str], dict[str, list[tuple[int, float]]]] = {}
  for step in sorted(metrics_by_step):
    for name, value in metrics_by_step[step].items():
      if name.startswith(PREFIX + "/"):
        _, metric, mask_set, bin_, method = name.split("/")
        series.setdefault((metric, mask_set, bin_), {}).setdefault(method, []).append((step, value))
  rows = [(m, s) for m, _ in METRICS for s in sorted({k[1] for k in series}, key="NB".find)]
  bins = [
    _bin(i) for i in range(len(masks.HOLE_RATIO_BINS)) if any(k[2] == _bin(i) for k in series)
  ]
  labels = dict(METRICS)
  figure, axes = plt.subplots(
    len(rows), len(bins), figsize=(2.6 * len(bins), 2.3 * len(rows)), squeeze=False, sharex=True
  )
  styles = ("--", ":", "-.")
  for r, (metric, mask_set) in enumerate(rows):
    for c, bin_ in enumerate(bins):
      ax = axes[r][c]
      lines = series.get((metric, mask_set, bin_), {})
      shown = []
      if evaluate.MODEL_METHOD in lines:
        steps, values = zip(*lines[evaluate.MODEL_METHOD])
        ax.plot(steps, values, "o-", color="C0", markersize=3, label=names[evaluate.MODEL_METHOD])
        shown += values[1:]
      baseline_methods = [m for m in lines if m != evaluate.MODEL_METHOD]
      for k, method in enumerate(baseline_methods):
        value = lines[method][-1][1]
        ax.axhline(value, color=f"C{k + 1}", linestyle=styles[k % 3], label=names[method])
        shown.append(value)
      shown = [v for v in shown if math.isfinite(v)]  # +inf PSNR: an exact reconstruction.
      if shown:
        low, high = min(shown), max(shown)
        pad = 0.08 * (high - low) or 0.01 * abs(high) or 0.01
        ax.set_ylim(low - pad, high + pad)
      ax.set_title(f"{bin_} {mask_set}", fontsize=9)
      ax.tick_params(labelsize=7)
      if c == 0:
        ax.set_ylabel(labels[metric], fontsize=8)
      if r == len(rows) - 1:
        ax.set_xlabel("step", fontsize=8)
  handles, legend_labels = axes[0][0].get_legend_handles_labels()
  top = 1 - 0.75 / figure.get_figheight()  # Room for the title and the legend.
  figure.suptitle(title, fontsize=10, y=1 - 0.1 / figure.get_figheight(), va="top")
  figure.legend(
    handles,
    legend_labels,
    loc="upper center",
    ncol=len(handles),
    fontsize=9,
    bbox_to_anchor=(0.5, 1 - 0.35 / figure.get_figheight()),
  )
  figure.tight_layout(rect=(0, 0, 1, top))
  with epath.Path(path).open("wb") as f:
    figure.savefig(f, format="png", dpi=110)
  plt.close(figure)


def draw(workdir: str | epath.Path, output: str | epath.Path | None = None) -> epath.Path:
  """Redraws a training workdir's curve from its logs (default output:
  `<workdir>/eval/learning_curve.png`) and returns the PNG's path."""
  workdir = epath.Path(workdir)
  config = json.loads((workdir / "logs" / "hparams.json").read_text())
  methods = (evaluate.MODEL_METHOD,) + tuple(config["eval"]["baselines"])
  size = config["data"]["image_size"]
  title = (
    f"{workdir.name}: held-out evaluation at {size}x{size}, "
    f"{config['eval']['masks_per_bin']} masks per bin and mask set"
  )
  output = epath.Path(output) if output else workdir / "eval" / "learning_curve.png"
  output.parent.mkdir(parents=True, exist_ok=True)
  names = evaluate.method_names(
    config["model"]["partial"], methods, config["eval"].get("self_ensemble", False)
  )
  plot(read_metrics(workdir / "logs"), output, names, title)
  return output


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Redraws a training run's learning curve.")
  parser.add_argument("workdir", help="A training workdir trained with config.eval.every_steps.")
  parser.add_argument("--output", help="The PNG (default: WORKDIR/eval/learning_curve.png).")
  args = parser.parse_args(argv)
  workdir = epath.Path(args.workdir)
  if not (workdir / "logs" / "hparams.json").exists():
    sys.exit(f"error: {workdir} has no logs/hparams.json: is it a training workdir?")
  print(draw(workdir, args.output))


if __name__ == "__main__":
  main()
