"""Input pipeline throughput: images/s per process at 256 and 512, by stage and end to end.

Builds an array_record tfds dataset of 1024 JPEGs cut from scikit-image's photos (256x256 like
places365_small; 512x683 like Places2's large images) in a temporary directory, then times, on one
core:
  decode          array_record read + JPEG decode (pconv_jax.input_pipeline.read_image)
  crop            random crop + flip + scaling to [-1, 1] of decoded images
  mask            one procedural irregular mask (pconv_jax.masks.random_mask, hole ratio 0.01-0.6)
and the whole pipeline (create_train_iter: all of the above + batching) with worker_count 0 (main
process only) and 2 (grain worker processes), read_threads 0 so that no stage runs on a hidden extra
thread. Reports wall-clock images/s and images per CPU-second (CPU time of the main process and the
workers), the per-core rate, which other jobs on shared cores disturb far less than wall time.

From the repository root:  python -m benchmarks.input_pipeline [--sizes=256,512] [--seconds=2]
"""

import io
import itertools
import multiprocessing
import os
import pathlib
import tempfile
import time
from typing import Callable

from absl import app, flags, logging
import numpy as np
import tensorflow_datasets as tfds

from configs import default
from pconv_jax import images, input_pipeline, masks

_SIZES = flags.DEFINE_list("sizes", ["256", "512"], "Image sizes to measure.")
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Length of each of the three timed windows per row.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Per-process batch size of the end-to-end runs.")
# grain's index shuffle costs about 23 ms / (number of records) per example: keep the set large
# enough.
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1024, "JPEGs in the generated dataset.")

_SHAPES = {256: (256, 256), 512: (512, 683)}  # (height, width) of the stored JPEGs per image size.


class PconvBenchmarkImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Random crops of the demo photos, stored as JPEG bytes (quality 90) like places365_small.

  Not registered, so `tfds.builder` reads the prepared files back with tfds's own ReadOnlyBuilder,
  which pickles into grain's worker processes (a builder class defined in __main__ does not).
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=str(size)) for size in _SHAPES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")}
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(int(self.builder_config.name))}

  def _generate_examples(self, size):
    height, width = _SHAPES[size]
    rng = np.random.default_rng(0)
    photos = [
      input_pipeline.decode_image(
        pathlib.Path(p).read_bytes(), image_size=size, resize_shorter_side=max(_SHAPES[size])
      )
      for p in input_pipeline.demo_source(train=True).paths
    ]
    for i in range(_NUM_IMAGES.value):
      photo = photos[i % len(photos)]
      left = int(rng.integers(0, photo.width - width + 1))
      top = int(rng.integers(0, photo.height - height + 1))
      buffer = io.BytesIO()
      photo.crop((left, top, left + width, top + height)).save(buffer, "JPEG", quality=90)
      yield i, {"image": buffer.getvalue()}


def _cpu_seconds() -> float:
  """CPU time of this process (all threads) and its live child processes (grain's workers)."""
  total = time.process_time()
  for child in multiprocessing.active_children():
    fields = pathlib.Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime.
  return total


def _rate(step: Callable[[], int]) -> tuple[float, float]:
  """(images/s, images per CPU-second) of `step`, which returns the images it made.

  Best of three windows after a warm-up call: the best window is the least disturbed by other jobs
  on the shared cores, and CPU time (unlike wall time) does not count time spent waiting for a core.
  """
  step()
  wall_rates, cpu_rates = [], []
  for _ in range(3):
    count, start, cpu_start = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < _SECONDS.value:
      count += step()
    wall_rates.append(count / (time.perf_counter() - start))
    cpu_rates.append(count / (_cpu_seconds() - cpu_start))
  return max(wall_rates), max(cpu_rates)


def _measure(size: int, data_dir: str) -> list[tuple[str, tuple[float, float]]]:
  """(stage, (images/s, images per CPU-second)) rows for one image size."""
  config = default.get_config().data
  config.update(
    source="tfds",
    tfds_name=f"pconv_benchmark_images/{size}",
    tfds_data_dir=data_dir,
    image_size=size,
    read_threads=0,
  )
  source = input_pipeline.create_image_source(config, train=True)
  rng = np.random.default_rng(0)
  indices = itertools.cycle(range(len(source)))
  decoded = [input_pipeline.read_image(source, i, image_size=size)[0] for i in range(32)]
  photos = itertools.cycle(decoded)

  def decode() -> int:
    input_pipeline.read_image(source, next(indices), image_size=size)
    return 1

  def crop() -> int:
    images.to_model_range(input_pipeline.random_crop(next(photos), rng, size, flip=True))
    return 1

  def mask() -> int:
    masks.random_mask(rng, size)
    return 1

  rows = [("decode", _rate(decode)), ("crop + flip + scale", _rate(crop)), ("mask", _rate(mask))]
  for workers in (0, 2):
    config.worker_count = workers
    with input_pipeline.create_train_iter(
      config, global_batch_size=_BATCH.value, seed=0, process_index=0, process_count=1
    ) as iterator:
      next(iterator)  # Starts the workers.
      rows.append((f"all, worker_count={workers}", _rate(lambda: len(next(iterator)["image"]))))
  return rows


def main(argv: list[str]) -> None:
  del argv
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.WARNING)
  cores = len(os.sched_getaffinity(0))
  print(
    f"{cores} CPU cores; per-process batch {_BATCH.value}; best of 3 x {_SECONDS.value:g} s per "
    "row.\n"
  )
  print("| size | stage | images/s | images per CPU-second | CPU ms/image |")
  print("|---|---|---:|---:|---:|")
  with tempfile.TemporaryDirectory() as data_dir:
    for size in map(int, _SIZES.value):
      PconvBenchmarkImages(
        config=str(size), data_dir=data_dir, file_format="array_record"
      ).download_and_prepare()
      for stage, (wall, cpu) in _measure(size, data_dir):
        print(f"| {size} | {stage} | {wall:.0f} | {cpu:.0f} | {1000 / cpu:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
