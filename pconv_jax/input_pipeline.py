"""Input pipeline: image sources -> decode, crop (zoom, flip, turn) -> with a hole mask -> batches.

Sources (config.data.source):
  tfds    a tensorflow-datasets dataset prepared with file_format="array_record", read through
          `tfds.data_source`-style random access without TensorFlow (e.g. places365_small,
          celeb_a_hq/256, imagenet2012);
  folder  every image file under a directory (recursively, sorted by path);
  demo    natural photos shipped inside installed packages (no network), two held out for eval.

Determinism: training example at global position g (= step * global_batch + i) is record
perm_e(g mod N) of epoch e = g div N, with grain's per-epoch index shuffle seeded from `seed`; its
crop (with its zoom, flip and turn) and mask use `np.random.default_rng([seed, g, stream])`. Process
p of P takes positions [p b, (p + 1) b) of every global batch (b = global_batch / P). A batch is
therefore a function of (seed, step) alone: independent of restarts, of the worker count, and
(globally) of the process count. The iterator state is the step; `TrainIterator.get_state()` /
`set_state()` save and restore it.

Unreadable images (corrupt, truncated, not an image) are replaced by the next readable record,
logged and counted (`TrainIterator.num_skipped`); only many consecutive failures raise.

Batches: {'image': float32 (b, H, W, 3) in [-1, 1] RGB, 'mask': float32 (b, H, W, 1), 1 = valid, 0 =
hole}.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import pathlib
from typing import Any, Protocol

from absl import flags, logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from pconv_jax import images
from pconv_jax import masks as masks_lib
from pconv_jax.errors import ConfigError, DataError, MissingDataError

# Every natural colour photo that the pinned packages ship, as (package, folder in it, file); they
# load without a network. Not taken: scikit-image's microscopy and astronomy images (retina, ihc,
# hubble_deep_field), grey photos and drawings. The motorcycle stereo pair stays on one side of the
# split so that the held-out photos are unseen.
DEMO_TRAIN_PHOTOS = (
  ("skimage", "data", "astronaut.png"),
  ("skimage", "data", "motorcycle_left.png"),
  ("skimage", "data", "motorcycle_right.png"),
  ("skimage", "data", "rocket.jpg"),
  ("sklearn", "datasets/images", "china.jpg"),
  ("sklearn", "datasets/images", "flower.jpg"),
  ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
)
DEMO_EVAL_PHOTOS = (("skimage", "data", "chelsea.png"), ("skimage", "data", "coffee.png"))
_DEMO_PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}

_MAX_CONSECUTIVE_SKIPS = 100
_STATE_VERSION = 1

_PREPARE_HELP = (
  "Prepare it once with file_format='array_record' (TensorFlow-free reading needs that format). "
  "The tfds CLI and the builders of places365_small, imagenet2012 and celeb_a_hq import "
  "TensorFlow, so run the preparation where it is installed, e.g. in a separate environment: `pip "
  "install tensorflow-cpu tensorflow-datasets==4.9.10 array_record importlib_resources`, then "
  "`tfds build {name} --file_format=array_record --data_dir={data_dir}` (imagenet2012 and "
  "celeb_a_hq also need --manual_dir=<downloaded archives>). See the README. Or use "
  "config.data.source='folder'."
)


class ImageSource(Protocol):
  """Random access to encoded images."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> bytes: ...

  def describe(self, index: int) -> str:
    """Names record `index` in log messages."""
    ...


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Image files, read on access."""

  paths: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> bytes:
    return pathlib.Path(self.paths[index]).read_bytes()

  def describe(self, index: int) -> str:
    return self.paths[index]


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """The encoded `image_key` feature of a tfds array_record data source."""

  data_source: Any
  image_key: str
  name: str

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> bytes:
    return self.data_source[index][self.image_key]

  def describe(self, index: int) -> str:
    return f"{self.name} record {index}"


def folder_source(folder: str | pathlib.Path) -> FileSource:
  """All files with an image extension under `folder`, sorted by relative path."""
  root = pathlib.Path(folder).expanduser()
  if not root.is_dir():
    raise MissingDataError(
      f"Image folder {root} does not exist (config.data.folder / eval_folder)."
    )
  paths = sorted(
    (p for p in root.rglob("*") if p.suffix.lower() in images.IMAGE_SUFFIXES and p.is_file()),
    key=lambda p: p.relative_to(root).as_posix(),
  )
  if not paths:
    raise DataError(
      f"Image folder {root} holds no image files ({', '.join(images.IMAGE_SUFFIXES)})."
    )
  return FileSource(tuple(str(p) for p in paths))


def demo_source(*, train: bool) -> FileSource:
  """The natural photos shipped inside installed packages: DEMO_TRAIN_PHOTOS or the held-out
  DEMO_EVAL_PHOTOS."""
  paths = []
  for package, folder, name in DEMO_TRAIN_PHOTOS if train else DEMO_EVAL_PHOTOS:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise DataError(
        f"config.data.source='demo' needs {_DEMO_PACKAGES[package]}, which ships its photo "
        f"{name}: pip install -r requirements.txt."
      )
    path = pathlib.Path(spec.submodule_search_locations[0], folder, name)
    if not path.is_file():
      raise MissingDataError(f"Demo photo {path} is missing from this {package} install.")
    paths.append(str(path))
  return FileSource(tuple(paths))


def tfds_source(
  name: str, split: str, *, data_dir: str | None = None, image_key: str = "image"
) -> TfdsSource:
  """Random access to a prepared array_record tfds dataset, images left encoded (no TensorFlow)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise DataError(
      f"Unknown tensorflow-datasets dataset {name!r} (config.data.tfds_name); e.g. "
      "places365_small, celeb_a_hq/256 or imagenet2012."
    ) from e
  prepare_help = _PREPARE_HELP.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
  if not builder.is_prepared():
    raise MissingDataError(
      f"tfds dataset {name!r} is not prepared in {builder.data_dir}. {prepare_help}"
    )
  if image_key not in builder.info.features:
    raise DataError(
      f"tfds dataset {name!r} has no feature {image_key!r} (config.data.image_key); it has "
      f"{sorted(builder.info.features.keys())}."
    )
  try:
    data_source = builder.as_data_source(
      split=split, decoders={image_key: tfds.decode.SkipDecoding()}
    )
  except NotImplementedError as e:  # Prepared in the default tfrecord format.
    raise DataError(
      f"tfds dataset {name!r} in {builder.data_dir} was prepared as "
      f"{builder.info.file_format}, which needs TensorFlow to read. {prepare_help}"
    ) from e
  return TfdsSource(data_source, image_key, f"{name}/{split}")


def create_image_source(config: ml_collections.ConfigDict, *, train: bool) -> ImageSource:
  """The training or evaluation images described by `config.data`."""
  if config.source == "tfds":
    return tfds_source(
      config.tfds_name,
      config.train_split if train else config.eval_split,
      data_dir=config.tfds_data_dir,
      image_key=config.image_key,
    )
  if config.source == "folder":
    if not config.folder:
      raise ConfigError("config.data.source='folder' needs config.data.folder.")
    if train or config.eval_folder:
      return folder_source(config.folder if train else config.eval_folder)
    logging.warning(
      "config.data.eval_folder is not set: evaluating on the training folder %s.", config.folder
    )
    return folder_source(config.folder)
  if config.source == "demo":
    return demo_source(train=train)
  raise ConfigError(
    f"Unknown config.data.source {config.source!r}; use 'tfds', 'folder' or 'demo'."
  )


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB; transparency composited over white, 16-bit greyscale scaled to 8 bits."""
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert(
      "RGB"
    )
  return images.to_8bit(image).convert("RGB")


def decode_image(
  data: bytes, *, image_size: int, resize_shorter_side: int | None = None
) -> Image.Image:
  """Decodes an image to RGB with its shorter side >= image_size (and = resize_shorter_side if set).

  Applies the EXIF orientation. Images smaller than image_size are resized up (bicubic); with
  `resize_shorter_side`, JPEGs are decoded at a reduced scale first (PIL draft mode) when that is
  enough. Raises one of `images.DECODE_ERRORS` for unreadable data.
  """
  with Image.open(io.BytesIO(data)) as image:
    if resize_shorter_side and image.format == "JPEG":
      scale = resize_shorter_side / min(image.size)
      image.draft("RGB", (max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    image = _to_rgb(image)
  shorter = min(image.size)
  target = max(image_size, resize_shorter_side or shorter)
  if target != shorter:
    scale = target / shorter
    image = image.resize(
      (max(target, round(image.width * scale)), max(target, round(image.height * scale))),
      Image.Resampling.BICUBIC,
    )
  return image


def random_crop(
  image: Image.Image,
  rng: np.random.Generator,
  size: int,
  *,
  flip: bool,
  rotate90: bool = False,
  max_zoom_out: float = 1.0,
) -> np.ndarray:
  """A random size x size crop as uint8 (size, size, 3).

  With `max_zoom_out` > 1 the crop is a square of side size * z (at most the shorter side), z
  log-uniform in [1, max_zoom_out], resized down to size (bicubic, antialiased). Mirrored with
  probability 1/2 if `flip`; turned by a uniformly random multiple of 90 degrees if `rotate90` (with
  `flip`: all 8 symmetries of the square). Without zoom and rotation, the draws are those of a
  plain crop.
  """
  side = size
  if max_zoom_out > 1:
    side = min(round(size * max_zoom_out ** rng.random()), image.width, image.height)
  left = int(rng.integers(0, image.width - side + 1))
  top = int(rng.integers(0, image.height - side + 1))
  mirror = rng.random() < 0.5
  box = (left, top, left + side, top + side)
  crop = (
    image.crop(box) if side == size else image.resize((size, size), Image.Resampling.BICUBIC, box)
  )
  if flip and mirror:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  array = np.asarray(crop)
  if rotate90:
    array = np.ascontiguousarray(np.rot90(array, int(rng.integers(4))))
  return array


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """The central size x size crop as uint8 (size, size, 3)."""
  left, top = (image.width - size) // 2, (image.height - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


def read_image(
  source: ImageSource, index: int, *, image_size: int, resize_shorter_side: int | None = None
) -> tuple[Image.Image, int]:
  """Decodes record `index`, or the next readable one; returns
  (image, number of records skipped)."""
  for skipped in range(_MAX_CONSECUTIVE_SKIPS):
    position = (index + skipped) % len(source)
    try:
      return decode_image(
        source[position], image_size=image_size, resize_shorter_side=resize_shorter_side
      ), skipped
    except images.DECODE_ERRORS as e:
      logging.warning("Skipping unreadable image %s: %s", source.describe(position), e)
  raise DataError(
    f"{_MAX_CONSECUTIVE_SKIPS} consecutive unreadable images from "
    f"{source.describe(index)} on; the data set looks corrupt."
  )


@dataclasses.dataclass(frozen=True)
class _ExampleLoader:
  """(global position, record index) -> one uint8 training example; picklable for grain's workers.

  Batches stay uint8 until `TrainIterator.__next__` converts them (`_batch_to_model`) in the main
  process: four times less memory traffic, above all through the shared memory between grain's
  workers and the main process (measured: +18% images/s with 2 workers at 256x256).
  """

  source: ImageSource
  mask_sampler: masks_lib.MaskSampler
  seed: int
  image_size: int
  resize_shorter_side: int | None
  random_flip: bool
  random_rotate90: bool
  max_zoom_out: float

  def __call__(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    position, record = element
    image_rng, mask_rng = (
      np.random.default_rng([self.seed, position, stream]) for stream in (0, 1)
    )
    image, skipped = read_image(
      self.source, record, image_size=self.image_size, resize_shorter_side=self.resize_shorter_side
    )
    return {
      "image": random_crop(
        image,
        image_rng,
        self.image_size,
        flip=self.random_flip,
        rotate90=self.random_rotate90,
        max_zoom_out=self.max_zoom_out,
      ),
      "mask": self.mask_sampler(mask_rng, self.image_size),
      "num_skipped": np.int32(skipped),
    }


def _with_position(position: int, record: int) -> tuple[int, int]:
  return position, record


def _batch_to_model(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {
    "image": images.to_model_range(batch["image"]),
    "mask": batch["mask"].astype(np.float32),
    "num_skipped": batch["num_skipped"],
  }


class TrainIterator:
  """Infinite iterator over this process's training batches, with a checkpointable state.

  The state (`get_state()`: JSON bytes, like grain's `DataLoaderIterator`) is the next step plus the
  skipped-image count. Save and restore it with orbax through grain's handler, as a
  CheckpointManager item: `grain.checkpoint.CheckpointSave(iterator)` /
  `grain.checkpoint.CheckpointRestore(iterator)`. Worker processes start on the first `next()`; call
  `close()` to stop them.
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    worker_count: int,
    buffer_size: int,
    read_threads: int,
    fingerprint: dict[str, int],
  ):
    self._batches = batches
    self._worker_count = worker_count
    self._buffer_size = buffer_size
    self._read_threads = read_threads
    self._fingerprint = fingerprint
    self._step = 0
    self._num_skipped = 0
    self._iterator: grain.DatasetIterator | None = None

  @property
  def step(self) -> int:
    """Index of the batch the next `next()` returns."""
    return self._step

  @property
  def num_skipped(self) -> int:
    """Unreadable records met so far in the batches returned (a
    record counts each time it is drawn)."""
    return self._num_skipped

  def _ensure_started(self) -> grain.DatasetIterator:
    if self._iterator is None:
      dataset = self._batches[self._step :].to_iter_dataset(
        grain.ReadOptions(num_threads=self._read_threads, prefetch_buffer_size=self._buffer_size)
      )
      if self._worker_count:
        if not flags.FLAGS.is_parsed():
          # grain 0.2.18 reads an absl flag when it starts workers, which fails outside absl.app
          # (google/grain#1355, fixed after 0.2.18); unparsed flags only ever have their defaults.
          flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(
            num_workers=self._worker_count, per_worker_buffer_size=self._buffer_size
          )
        )
      self._iterator = iter(dataset)
    return self._iterator

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = _batch_to_model(next(self._ensure_started()))
    skipped = int(batch.pop("num_skipped").sum())
    if skipped:
      self._num_skipped += skipped
      logging.warning(
        "Batch %d: %d unreadable image(s) replaced by the next readable ones (%d so far).",
        self._step,
        skipped,
        self._num_skipped,
      )
    self._step += 1
    return batch

  def get_state(self) -> bytes:
    return json.dumps(
      {
        "version": _STATE_VERSION,
        "step": self._step,
        "num_skipped": self._num_skipped,
        **self._fingerprint,
      }
    ).encode()

  def set_state(self, state: bytes) -> None:
    """Continues from a `get_state()` result; batches then equal those of an uninterrupted run."""
    values = json.loads(state)
    if values.get("version") != _STATE_VERSION:
      raise ValueError(f"Unsupported input pipeline state {values!r}.")
    changed = {k: (values.get(k), v) for k, v in self._fingerprint.items() if values.get(k) != v}
    if changed:
      logging.warning(
        "Input pipeline restored with changed settings (saved, now): %s; batches will "
        "differ from the run that saved the state.",
        changed,
      )
    self.close()
    self._step, self._num_skipped = int(values["step"]), int(values["num_skipped"])

  def seek(self, step: int) -> None:
    """Makes the next batch the one of `step`, e.g. when a saved state cannot be read on this
    topology.

    `num_skipped` keeps its value: the skips in the batches passed over are not known.
    """
    if step < 0:
      raise ValueError(f"Cannot seek to step {step}.")
    self.close()
    self._step = step

  def start_prefetch(self) -> None:
    """Starts preparing batches from the current step (grain's checkpoint
    handler calls it after `set_state`)."""
    self._ensure_started().start_prefetch()

  def close(self) -> None:
    """Stops worker processes; a later `next()` restarts them at the current step."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def _validate(config: ml_collections.ConfigDict) -> None:
  if config.image_size <= 0:
    raise ConfigError(f"config.data.image_size must be positive, got {config.image_size}.")
  if config.resize_shorter_side is not None and config.resize_shorter_side < config.image_size:
    raise ConfigError(
      f"config.data.resize_shorter_side ({config.resize_shorter_side}) must be at least "
      f"image_size ({config.image_size})."
    )
  if not config.max_zoom_out >= 1:
    raise ConfigError(
      f"config.data.max_zoom_out must be at least 1 (1 = crops at the photo's scale), got "
      f"{config.max_zoom_out}."
    )


def create_train_iter(
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> TrainIterator:
  """This process's infinite iterator of training batches of global_batch_size / process_count
  images.

  Args:
    config: `config.data`.
    global_batch_size: images per step over all processes.
    seed: non-negative; with the step, it fixes every batch.
    process_index: this process; None means `jax.process_index()`.
    process_count: None means `jax.process_count()`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
      f"The global batch size ({global_batch_size}) must be a positive multiple of the "
      f"process count ({process_count})."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if seed < 0:
    raise ValueError(f"The seed must be non-negative, got {seed}.")
  _validate(config)
  source = create_image_source(config, train=True)
  if len(source) == 0:
    raise DataError(
      f"No training images (config.data.source={config.source!r}, train_split="
      f"{config.train_split!r}, folder={config.folder!r})."
    )
  loader = _ExampleLoader(
    source,
    masks_lib.create_mask_sampler(config.masks),
    seed,
    config.image_size,
    config.resize_shorter_side,
    config.random_flip,
    config.random_rotate90,
    config.max_zoom_out,
  )
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  batches = (
    grain.MapDataset.range(len(source))
    .shuffle(seed=shuffle_seed)  # Reshuffled per epoch: grain folds the epoch into the seed.
    .repeat()
    .map_with_index(_with_position)
    .map(loader)
    .batch(global_batch_size // process_count, drop_remainder=True)[process_index::process_count]
  )
  return TrainIterator(
    batches,
    worker_count=config.worker_count,
    buffer_size=config.worker_buffer_size,
    read_threads=config.read_threads,
    fingerprint={"seed": seed, "global_batch_size": global_batch_size, "num_records": len(source)},
  )


def load_eval_images(
  config: ml_collections.ConfigDict, num_images: int | None = None
) -> np.ndarray:
  """A fixed array of evaluation images, float32 (n, H, W, 3) in [-1, 1].

  Takes `num_images` records evenly spaced over the eval split / eval folder / held-out demo photos
  (all of them for None), resized as in training and centre-cropped to image_size, unflipped. An
  unreadable record is replaced by the next readable one.
  """
  _validate(config)
  source = create_image_source(config, train=False)
  count = len(source) if num_images is None else num_images
  if not 0 < count <= len(source):
    raise ConfigError(
      f"Asked for {count} evaluation images; the evaluation source has {len(source)}."
    )
  crops = []
  for index in (np.arange(count) * len(source)) // count:
    image, _ = read_image(
      source,
      int(index),
      image_size=config.image_size,
      resize_shorter_side=config.resize_shorter_side,
    )
    crops.append(images.to_model_range(center_crop(image, config.image_size)))
  return np.stack(crops)
