"""The demo's coloured checkerboard, measured (docs/quality.md, "Diagnosis").

    python -m docs.colour_cast [--training_photos] WORKDIR [WORKDIR ...]

For the newest checkpoint of each training workdir, runs the network on every held-out evaluation
pair of the no-border mask set (as `pconv_jax.evaluate` pairs them; with --training_photos, on
centre crops of the demo's training photos instead) and prints, inside the holes:
the mean signed error per channel in 8-bit grey levels (a colour cast), the 2x2 checkerboard
energy of the output relative to the ground truth's (1 = as textured as the photo), and the
composite's PSNR. Each checkpoint runs twice: with BatchNorm's running averages (how it is
evaluated and served) and with the batch's own statistics.
"""

import argparse
import os
import tempfile

import jax
import ml_collections
import numpy as np

from pconv_jax import checkpoints, images, input_pipeline, masks, metrics


def checkerboard(x: np.ndarray, holes: np.ndarray) -> float:
  """Mean |a - b - c + d| / 4 over the 2x2 blocks (a b / c d) that lie wholly in the holes."""
  h, w = (s // 2 * 2 for s in x.shape[1:3])
  blocks = x[:, :h, :w].reshape(len(x), h // 2, 2, w // 2, 2, 3)
  energy = (
    np.abs(
      blocks[:, :, 0, :, 0] - blocks[:, :, 0, :, 1] - blocks[:, :, 1, :, 0] + blocks[:, :, 1, :, 1]
    )
    / 4
  )
  inside = holes[:, :h, :w, 0].reshape(len(x), h // 2, 2, w // 2, 2).all(axis=(2, 4))
  return float(energy[inside].mean())


def measure(
  workdir: str, training_photos: bool = False
) -> list[tuple[str, np.ndarray, float, float]]:
  """(BatchNorm mode, colour bias RGB, checkerboard ratio, PSNR) of the newest checkpoint."""
  model, variables, meta = checkpoints.load_model(f"{workdir}/checkpoints")
  config = ml_collections.ConfigDict(meta["config"])
  if training_photos:
    with tempfile.TemporaryDirectory() as folder:
      for i, path in enumerate(input_pipeline.demo_source(train=True).paths):
        os.symlink(path, f"{folder}/{i}_{os.path.basename(path)}")
      config.data.update(source="folder", folder=folder, eval_folder=folder)
      targets = input_pipeline.load_eval_images(config.data)
  else:
    targets = input_pipeline.load_eval_images(config.data, config.eval.num_images)
  by_bin = masks.load_eval_masks(config.data, config.eval.masks_per_bin, seed=config.eval.seed)
  pairs = [
    (targets[j % len(targets)], bin_masks[j % len(bin_masks)])
    for bin_masks in by_bin["no_border"].values()
    for j in range(max(len(targets), len(bin_masks)))
  ]
  x = np.stack([target for target, _ in pairs])
  m = np.stack([mask for _, mask in pairs]).astype(np.float32)
  holes = m < 0.5
  rows = []
  for mode in ("running averages", "batch statistics"):
    if mode == "running averages":
      output = model.apply(variables, x, m, train=False)
    else:
      unfrozen = model.clone(freeze_encoder_bn=False)
      output, _ = unfrozen.apply(variables, x, m, train=True, mutable=["batch_stats"])
    output = np.asarray(jax.device_get(output), np.float64)
    error = (output - x) * 127.5  # [-1, 1] -> 8-bit grey levels.
    bias = np.array([error[..., c][holes[..., 0]].mean() for c in range(3)])
    ratio = checkerboard(output, holes) / checkerboard(x.astype(np.float64), holes)
    composite = images.composite(output, x, m)
    psnr = float(np.mean(metrics.psnr(metrics.to_unit_range(composite), metrics.to_unit_range(x))))
    rows.append((mode, bias, ratio, psnr))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--training_photos", action="store_true", help="Centre crops of these.")
  args = parser.parse_args()
  print("| workdir | BatchNorm | bias R | bias G | bias B | checkerboard / truth | PSNR (dB) |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for workdir in args.workdirs:
    for mode, bias, ratio, psnr in measure(workdir, args.training_photos):
      print(
        f"| {workdir} | {mode} | {bias[0]:+.1f} | {bias[1]:+.1f} | {bias[2]:+.1f} | "
        f"{ratio:.2f} | {psnr:.2f} |"
      )


if __name__ == "__main__":
  main()
