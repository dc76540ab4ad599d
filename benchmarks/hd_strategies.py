"""The inpaint CLI's high-resolution strategies side by side: wall time and peak memory.

For each photo size, a JPEG (scikit-image's coffee, upscaled) with one rectangular hole (800x400 in
the 4000x3000 photo, the same share of a 512x512 one) goes through `python -m pconv_jax.inpaint`
once per `--hd_strategy`, each in its own process (huge pages on, as the README runs CPU commands),
as a user would run it: start-up, checkpoint loading and compilation included; then `crop` again
with `--compilation_cache_dir`, once to fill the cache and once timed. Peak memory is the
process's RSS high-water mark. Each output PNG is checked: its known pixels must equal the decoded
JPEG's exactly. The network is the paper's (7 levels, 256x256 training size) with random weights
unless --checkpoint names a trained one: the time does not depend on the weights.

From the repository root:
  python -m benchmarks.hd_strategies [--sizes=4000x3000,512x512] [--checkpoint=DIR]
"""

from collections.abc import Sequence
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import cv2
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from skimage import data

from pconv_jax import checkpoints, hd, hugepages, inpaint, models

_SIZES = flags.DEFINE_list("sizes", ["4000x3000", "512x512"], "photo sizes, WIDTHxHEIGHT")
_STRATEGIES = flags.DEFINE_list("strategies", list(hd.STRATEGIES), "strategies to time")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a checkpoint (default: the paper's network)")

HOLE_SHARE = (800 / 4000, 400 / 3000)  # The hole's width and height as shares of the photo's.


def paper_checkpoint(directory: Path) -> Path:
  """The paper's network, random weights, recorded as trained at 256x256."""
  config = {"depth": 7}
  model = models.create_model(config)
  variables = jax.jit(model.init)(
    jax.random.key(0), jnp.zeros((1, 128, 128, 3)), jnp.ones((1, 128, 128, 1))
  )
  return checkpoints.save_model(directory, variables, config, train_size=256).parent


def write_case(directory: Path, width: int, height: int) -> tuple[Path, Path]:
  """A JPEG photo and its PNG mask (white = hole), one hole left of centre."""
  photo = cv2.resize(data.coffee(), (width, height), interpolation=cv2.INTER_CUBIC)
  image_path = directory / f"photo_{width}x{height}.jpg"
  Image.fromarray(photo).save(image_path, quality=95)
  hole = np.zeros((height, width), np.uint8)
  w, h = round(width * HOLE_SHARE[0]), round(height * HOLE_SHARE[1])
  top, left = (height - h) // 2, width // 3 - w // 2
  hole[top : top + h, left : left + w] = 255
  mask_path = directory / f"mask_{width}x{height}.png"
  Image.fromarray(hole).save(mask_path)
  return image_path, mask_path


def run(args: list[str]) -> tuple[float, float, str]:
  """Runs the CLI; (wall seconds, peak RSS MB, output)."""
  start = time.perf_counter()
  process = subprocess.Popen(
    [sys.executable, "-m", "pconv_jax.inpaint", *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=hugepages.with_huge_pages(os.environ),
  )
  output = process.stdout.read()
  process.stdout.close()
  _, status, usage = os.wait4(process.pid, 0)  # The child's own peak memory.
  wall = time.perf_counter() - start
  process.returncode = os.waitstatus_to_exitcode(status)
  if process.returncode:
    raise RuntimeError(f"inpaint {' '.join(args)} failed:\n{output}")
  return wall, usage.ru_maxrss / 1024, output


def main(argv: Sequence[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    checkpoint = Path(_CHECKPOINT.value) if _CHECKPOINT.value else paper_checkpoint(tmp / "ckpt")
    rows = []
    for size in _SIZES.value:
      width, height = (int(v) for v in size.split("x"))
      image_path, mask_path = write_case(tmp, width, height)
      photo = inpaint.read_image(image_path)
      hole, _ = inpaint.read_hole_mask(mask_path)
      times = {}
      # Each strategy cold; then crop twice more with a compilation cache, the second run timed.
      cached = ["--compilation_cache_dir", str(tmp / f"cache_{size}")]
      runs = [(strategy, strategy, []) for strategy in _STRATEGIES.value]
      if "crop" in _STRATEGIES.value:
        runs += [("crop", None, cached), ("crop", "crop, cached compilation", cached)]
      for strategy, label, extra in runs:
        out = tmp / f"out_{size}_{strategy}.png"
        args = ["--checkpoint", str(checkpoint), "--image", str(image_path), "--mask"]
        args += [str(mask_path), "--output", str(out), "--hd_strategy", strategy, *extra]
        wall, peak, _ = run(args)
        if label is None:  # Fills the cache.
          continue
        result = np.asarray(Image.open(out))
        exact = np.array_equal(result[~hole], photo[~hole])
        times[label] = wall
        rows.append((size, label, wall, peak, exact, times.get("original")))
        print(f"{size} {label}: {wall:.1f} s, {peak:.0f} MB, known pixels exact: {exact}")
  print(f"\nCheckpoint: {_CHECKPOINT.value or 'the paper network (random weights)'}; CPU cores:")
  print(f"{os.cpu_count()}. `python -m pconv_jax.inpaint --hd_strategy S`, one process each.\n")
  print("| photo | hole | strategy | wall s | speed-up | peak RSS MB | known pixels exact |")
  print("|---|---|---|---|---|---|---|")
  for size, strategy, wall, peak, exact, original in rows:
    width, height = (int(v) for v in size.split("x"))
    hole = f"{round(width * HOLE_SHARE[0])}x{round(height * HOLE_SHARE[1])}"
    speedup = f"{original / wall:.1f}x" if original else ""
    print(f"| {size} | {hole} | {strategy} | {wall:.1f} | {speedup} | {peak:.0f} | {exact} |")


if __name__ == "__main__":
  app.run(main)
