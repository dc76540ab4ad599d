"""Where a model loses SSIM against Telea: the band along the hole boundary or the hole's interior
(docs/quality.md, "What limits SSIM").

    python -m docs.boundary_band WORKDIR [--bins 2 5] [--width 2]

For the newest checkpoint of a training workdir and its held-out evaluation pairs (both mask sets,
paired as its run's evaluation pairs them), prints the mean PSNR and SSIM of four composites: the
model's, Telea's, the model's with Telea's pixels in the band of `width` hole pixels next to the
known ones, and Telea's with the model's pixels in that band.
"""

import argparse

import cv2
import jax.numpy as jnp
import ml_collections
import numpy as np

from pconv_jax import baselines, checkpoints, evaluate, images, input_pipeline, masks, metrics


def boundary_band(hole_masks: np.ndarray, width: int) -> np.ndarray:
  """The hole pixels within `width` pixels (chessboard distance) of a known pixel, as booleans."""
  kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
  holes = (hole_masks[..., 0] < 0.5).astype(np.uint8)
  interior = np.stack([cv2.erode(h, kernel, borderType=cv2.BORDER_REPLICATE) for h in holes])
  return ((holes > 0) & (interior == 0))[..., None]


def _scores(output: np.ndarray, targets: np.ndarray, hole_masks: np.ndarray) -> tuple[float, float]:
  composite = images.composite(output, targets, hole_masks)
  values = metrics.image_metrics(
    jnp.asarray(metrics.to_unit_range(composite)), jnp.asarray(metrics.to_unit_range(targets))
  )
  return float(np.mean(values["psnr"])), float(np.mean(values["ssim"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--bins", type=int, nargs="+", default=[2, 5])
  parser.add_argument("--width", type=int, default=2)
  args = parser.parse_args()
  model, variables, meta = checkpoints.load_model(f"{args.workdir}/checkpoints")
  config = ml_collections.ConfigDict(meta["config"])
  targets = input_pipeline.load_eval_images(config.data, config.eval.num_images)
  mask_sets = masks.load_eval_masks(config.data, config.eval.masks_per_bin, seed=config.eval.seed)
  print(f"step {meta['step']}; PSNR (dB) / SSIM; band: {args.width} hole pixels along the boundary")
  print("| mask set | bin | model | Telea | model, Telea in the band | Telea, model in the band |")
  print("|---|---|---|---|---|---|")
  for set_name, by_bin in mask_sets.items():
    for bin_index in args.bins:
      bin_masks = by_bin[bin_index].astype(np.float32)
      pair = np.arange(max(len(targets), len(bin_masks)))
      x, m = targets[pair % len(targets)], bin_masks[pair % len(bin_masks)]
      model_output = np.asarray(model.apply(variables, x, m, train=False))
      telea = images.to_model_range(baselines.inpaint("telea", images.to_uint8(x), m))
      band = boundary_band(m, args.width)
      cells = [
        _scores(output, x, m)
        for output in (
          model_output,
          telea,
          np.where(band, telea, model_output),
          np.where(band, model_output, telea),
        )
      ]
      print(
        f"| {set_name} | {evaluate.bin_label(bin_index)} | "
        + " | ".join(f"{psnr:.2f} / {ssim:.4f}" for psnr, ssim in cells)
        + " |"
      )


if __name__ == "__main__":
  main()
