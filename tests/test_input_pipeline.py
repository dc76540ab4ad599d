"""Tests for pconv_jax.input_pipeline: sources, determinism, resumption, sharding, bad input."""

import importlib.util
import io
import pathlib

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import default
from pconv_jax import input_pipeline
from pconv_jax.errors import DataError

SIZE = 32
NUM_COLOURS = 12


def _colour(i: int) -> tuple[int, int, int]:
  return (20 * i, 255 - 20 * i, (37 * i) % 256)


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def _record_ids(images: np.ndarray) -> list[int]:
  """Which solid-colour record each image came from (crops and flips keep the colour)."""
  pixels = np.round((images[:, 0, 0] + 1) * 127.5).astype(int)
  return [[_colour(i) for i in range(NUM_COLOURS)].index(tuple(p)) for p in pixels]


@pytest.fixture(name="colour_folder")
def fixture_colour_folder(tmp_path) -> pathlib.Path:
  """NUM_COLOURS solid-colour PNGs of assorted sizes, in nested folders."""
  for i in range(NUM_COLOURS):
    folder = tmp_path / "images" / f"sub{i % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    shape = (SIZE + 3 * i, SIZE + 5, 3)
    (folder / f"{i:02d}.png").write_bytes(_png(np.full(shape, _colour(i), np.uint8)))
  return tmp_path / "images"


def _config(**overrides):
  config = default.get_config().data
  config.source = "demo"
  config.image_size = SIZE
  config.update(overrides)
  return config


def _take(iterator, steps: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(steps)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


class PconvTinyImages(tfds.core.GeneratorBasedBuilder):
  """A tiny tfds image dataset, built like places365_small: encoded image bytes + a label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=NUM_COLOURS),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      "train": self._generate_examples(range(8)),
      "validation": self._generate_examples(range(8, 12)),
    }

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"image": _png(np.full((SIZE + i, SIZE + 2, 3), _colour(i), np.uint8)), "label": i}


@pytest.fixture(name="tfds_dir", scope="module")
def fixture_tfds_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  PconvTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_batch_shapes_dtypes_and_ranges():
  with input_pipeline.create_train_iter(
    _config(), global_batch_size=4, seed=0, process_index=0, process_count=1
  ) as iterator:
    for batch in _take(iterator, 3):
      assert sorted(batch) == ["image", "mask"]
      assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
      assert batch["mask"].shape == (4, SIZE, SIZE, 1) and batch["mask"].dtype == np.float32
      assert -1 <= batch["image"].min() and batch["image"].max() <= 1
      assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
      assert np.all(batch["mask"].mean(axis=(1, 2, 3)) < 0.99)  # Every example has holes.


def test_same_seed_same_batches_other_seed_other_batches():
  def run(seed):
    with input_pipeline.create_train_iter(
      _config(), global_batch_size=3, seed=seed, process_index=0, process_count=1
    ) as iterator:
      return _take(iterator, 4)

  first = run(5)
  _assert_same(first, run(5))
  assert not np.array_equal(first[0]["mask"], run(6)[0]["mask"])


def test_restored_state_continues_like_an_uninterrupted_run(colour_folder):
  config = _config(source="folder", folder=str(colour_folder))
  kwargs = {"global_batch_size": 5, "seed": 1, "process_index": 0, "process_count": 1}
  with input_pipeline.create_train_iter(config, **kwargs) as iterator:
    uninterrupted = _take(iterator, 7)  # 35 examples: crosses two epoch boundaries of 12.
  with input_pipeline.create_train_iter(config, **kwargs) as iterator:
    _take(iterator, 3)
    state = iterator.get_state()
  with input_pipeline.create_train_iter(config, **kwargs) as resumed:
    resumed.set_state(state)
    assert resumed.step == 3
    _assert_same(_take(resumed, 4), uninterrupted[3:])
  with input_pipeline.create_train_iter(config, **kwargs) as sought:
    sought.seek(5)
    _assert_same(_take(sought, 2), uninterrupted[5:])
  # Each epoch is reshuffled: the first 12 examples and the next 12 are each a permutation, but
  # differ.
  ids = sum((_record_ids(b["image"]) for b in uninterrupted), [])
  assert sorted(ids[:12]) == sorted(ids[12:24]) == list(range(NUM_COLOURS))
  assert ids[:12] != ids[12:24]


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(tmp_path, colour_folder):
  config = _config(source="folder", folder=str(colour_folder))
  kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1}
  with input_pipeline.create_train_iter(config, **kwargs) as iterator:
    expected = _take(iterator, 5)[2:]
  with (
    ocp.CheckpointManager(tmp_path / "ckpt") as manager,
    input_pipeline.create_train_iter(config, **kwargs) as iterator,
  ):
    _take(iterator, 2)
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    _take(iterator, 1)  # Moving on right after `save` must not change what was saved.
    manager.wait_until_finished()
  with (
    ocp.CheckpointManager(tmp_path / "ckpt") as manager,
    input_pipeline.create_train_iter(config, **kwargs) as restored,
  ):
    manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)),
    )
    _assert_same(_take(restored, 3), expected)


def test_processes_read_disjoint_shards_that_cover_the_epoch(colour_folder):
  config = _config(source="folder", folder=str(colour_folder))
  per_process = []
  for index in range(2):
    with input_pipeline.create_train_iter(
      config, global_batch_size=4, seed=3, process_index=index, process_count=2
    ) as iterator:
      per_process.append(_take(iterator, 3))  # 3 steps x 4 = one epoch of 12.
  ids = [sum((_record_ids(b["image"]) for b in batches), []) for batches in per_process]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(NUM_COLOURS))
  # The global batch does not depend on the process count.
  with input_pipeline.create_train_iter(
    config, global_batch_size=4, seed=3, process_index=0, process_count=1
  ) as iterator:
    single = _take(iterator, 3)
  for step, batch in enumerate(single):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([p[step][key] for p in per_process]))


def test_tiny_tfds_dataset_flows_through_the_places2_path(tfds_dir):
  config = _config(source="tfds", tfds_name="pconv_tiny_images", tfds_data_dir=tfds_dir)
  with input_pipeline.create_train_iter(
    config, global_batch_size=4, seed=0, process_index=0, process_count=1
  ) as iterator:
    batches = _take(iterator, 2)
  assert sorted(sum((_record_ids(b["image"]) for b in batches), [])) == list(range(8))
  evaluation = input_pipeline.load_eval_images(config)
  assert evaluation.shape == (4, SIZE, SIZE, 3)
  assert sorted(_record_ids(evaluation)) == [8, 9, 10, 11]
  config.train_split = "train[:50%]"
  assert len(input_pipeline.create_image_source(config, train=True)) == 4


def test_worker_processes_give_the_same_batches(tfds_dir):
  config = _config(source="tfds", tfds_name="pconv_tiny_images", tfds_data_dir=tfds_dir)
  kwargs = {"global_batch_size": 3, "seed": 0, "process_index": 0, "process_count": 1}
  with input_pipeline.create_train_iter(config, **kwargs) as iterator:
    in_process = _take(iterator, 4)
  config.worker_count = 2
  with input_pipeline.create_train_iter(config, **kwargs) as iterator:
    _assert_same(_take(iterator, 4), in_process)


def test_eval_images_are_fixed_centre_crops_of_held_out_photos():
  first = input_pipeline.load_eval_images(_config())
  assert first.shape == (len(input_pipeline.DEMO_EVAL_PHOTOS), SIZE, SIZE, 3)
  np.testing.assert_array_equal(first, input_pipeline.load_eval_images(_config()))
  assert not set(input_pipeline.DEMO_EVAL_PHOTOS) & set(input_pipeline.DEMO_TRAIN_PHOTOS)
  np.testing.assert_array_equal(input_pipeline.load_eval_images(_config(), 1), first[:1])
  with pytest.raises(ValueError, match="evaluation source has 2"):
    input_pipeline.load_eval_images(_config(), 3)


def test_grey_alpha_palette_16bit_and_small_images_become_rgb_crops():
  pixels = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
  transparent = np.zeros((20, 30, 4), np.uint8)  # Fully transparent: composited over white.
  images = [
    Image.fromarray(pixels),
    Image.fromarray(transparent),
    Image.fromarray(pixels).convert("P"),
    Image.fromarray(pixels.astype(np.uint16) * 257),
  ]
  for image in images:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    decoded = input_pipeline.decode_image(buffer.getvalue(), image_size=SIZE)
    assert decoded.mode == "RGB" and min(decoded.size) == SIZE  # 20 px -> resized up to 32.
  transparent_png = io.BytesIO()
  images[1].save(transparent_png, "PNG")
  white = input_pipeline.decode_image(transparent_png.getvalue(), image_size=SIZE)
  assert np.all(np.asarray(white) == 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: stored sideways, shown rotated by 90 degrees.
  rotated = io.BytesIO()
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).convert("CMYK").save(rotated, "JPEG", exif=exif)
  decoded = input_pipeline.decode_image(rotated.getvalue(), image_size=SIZE)
  assert decoded.mode == "RGB" and decoded.size == (40, 60)


def test_resize_shorter_side_scales_whole_jpegs(tmp_path):
  pixels = np.zeros((300, 200, 3), np.uint8)
  pixels[:, 100:] = 255
  Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
  config = _config(source="folder", folder=str(tmp_path), resize_shorter_side=SIZE)
  image = input_pipeline.load_eval_images(config)[0]
  # The whole 200 px width now spans 32 px: left half dark, right half bright.
  assert image[:, :14].max() < -0.8 and image[:, 18:].min() > 0.8
  with pytest.raises(ValueError, match="resize_shorter_side"):
    input_pipeline.load_eval_images(_config(resize_shorter_side=SIZE - 1))


def test_rotations_and_flips_give_the_eight_symmetries_of_the_square():
  pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
  symmetries = [np.rot90(p, k) for p in (pixels, pixels[:, ::-1]) for k in range(4)]
  found = set()
  for seed in range(64):
    crop = input_pipeline.random_crop(
      Image.fromarray(pixels), np.random.default_rng(seed), SIZE, flip=True, rotate90=True
    )
    found.add([np.array_equal(crop, s) for s in symmetries].index(True))
  assert found == set(range(8))


@pytest.mark.parametrize(("height", "max_zoom_out", "largest"), [(200, 2.0, 2.0), (40, 4.0, 1.25)])
def test_zoomed_out_crops_shrink_by_up_to_max_zoom_out(height, max_zoom_out, largest):
  """A horizontal ramp of slope 1 keeps its slope through a plain crop, and has slope z after a
  crop of side z * SIZE resized to SIZE; z is capped by the shorter side (40 / SIZE = 1.25)."""
  ramp = Image.fromarray(
    np.broadcast_to(np.arange(250, dtype=np.uint8)[None, :, None], (height, 250, 3))
  )
  slopes = []
  for seed in range(100):
    rng = np.random.default_rng(seed)
    crop = input_pipeline.random_crop(ramp, rng, SIZE, flip=False, max_zoom_out=max_zoom_out)
    assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
    interior = crop[SIZE // 2, 4:-4, 0].astype(float)
    slopes.append((interior[-1] - interior[0]) / (len(interior) - 1))
  assert 0.99 < min(slopes) < 1.1 and largest - 0.1 < max(slopes) < largest + 0.03
  plain = input_pipeline.random_crop(ramp, np.random.default_rng(0), SIZE, flip=False)
  assert np.all(np.diff(plain[0, :, 0].astype(int)) == 1)
  with pytest.raises(ValueError, match="max_zoom_out must be at least 1"):
    input_pipeline.create_train_iter(
      _config(max_zoom_out=0.5), global_batch_size=1, seed=0, process_index=0, process_count=1
    )


def test_corrupt_images_are_skipped_and_counted(colour_folder):
  (colour_folder / "garbage.jpg").write_bytes(b"this is not an image")
  truncated = _png(np.full((40, 40, 3), 9, np.uint8))
  (colour_folder / "sub1" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
  config = _config(source="folder", folder=str(colour_folder))
  with input_pipeline.create_train_iter(
    config, global_batch_size=14, seed=0, process_index=0, process_count=1
  ) as iterator:
    batch = next(iterator)  # One epoch: both bad files are drawn once and replaced.
    assert iterator.num_skipped == 2
    ids = _record_ids(batch["image"])
    assert len(ids) == 14 and set(ids) == set(range(NUM_COLOURS))
    assert b'"num_skipped": 2' in iterator.get_state()


def test_only_unreadable_images_raise(tmp_path):
  (tmp_path / "a.png").write_bytes(b"broken")
  config = _config(source="folder", folder=str(tmp_path))
  with input_pipeline.create_train_iter(
    config, global_batch_size=1, seed=0, process_index=0, process_count=1
  ) as iterator:
    with pytest.raises(DataError, match="consecutive unreadable images"):
      next(iterator)


def test_bad_sources_raise_clear_errors(tmp_path, tfds_dir):
  def source(**overrides):
    return input_pipeline.create_image_source(_config(**overrides), train=True)

  with pytest.raises(ValueError, match="holds no image files"):
    source(source="folder", folder=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    source(source="folder", folder=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="needs config.data.folder"):
    source(source="folder")
  with pytest.raises(ValueError, match="Unknown config.data.source"):
    source(source="imagenet")
  with pytest.raises(ValueError, match="Unknown tensorflow-datasets dataset"):
    source(source="tfds", tfds_name="no_such_dataset_xyz")
  with pytest.raises(FileNotFoundError, match="array_record"):
    source(source="tfds", tfds_name="pconv_tiny_images", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="has no feature 'picture'"):
    source(
      source="tfds", tfds_name="pconv_tiny_images", tfds_data_dir=tfds_dir, image_key="picture"
    )
  with pytest.raises(ValueError, match="multiple of the process count"):
    input_pipeline.create_train_iter(
      _config(), global_batch_size=3, seed=0, process_index=0, process_count=2
    )


def test_demo_photos_are_natural_colour_photos_and_a_missing_package_is_named(monkeypatch):
  for train in (True, False):
    for path in input_pipeline.demo_source(train=train).paths:
      with Image.open(path) as photo:
        assert photo.mode == "RGB" and min(photo.size) >= 256, path
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name: None if name == "sklearn" else find_spec(name)
  )
  with pytest.raises(DataError, match="needs scikit-learn, which ships its photo"):
    input_pipeline.demo_source(train=True)
  input_pipeline.demo_source(train=False)  # The held-out photos are scikit-image's.
