"""Irregular hole masks: a procedural generator, the paper's hole-ratio bins, fixed evaluation sets
and NVIDIA's Irregular Mask Dataset (Liu et al., ECCV 2018, Sec. 4.1).

Every mask array here is uint8 in NHWC layout with one channel, 1 = valid pixel and 0 = hole (the
paper's M): one mask is (H, W, 1), a set is (n, H, W, 1). PNG files follow NVIDIA's convention
instead: white = hole, black = valid; `save_mask_set` writes and `load_mask_set` reads that
convention, so the same loader reads NVIDIA's test masks and our saved evaluation sets. Masks are
only ever resized with nearest neighbour, so they stay binary.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Callable, Sequence

from absl import logging
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from pconv_jax import images
from pconv_jax.errors import ConfigError, DataError, MissingDataError

# The paper's hole-to-image area ratio bins: (0.01, 0.1], (0.1, 0.2], ..., (0.5, 0.6].
HOLE_RATIO_BINS: tuple[tuple[float, float], ...] = (
  (0.01, 0.1),
  (0.1, 0.2),
  (0.2, 0.3),
  (0.3, 0.4),
  (0.4, 0.5),
  (0.5, 0.6),
)

NVIDIA_MASKS_URL = "https://nv-adlr.github.io/publication/partialconv-inpainting"

Size = int | tuple[int, int]
# (rng, size) -> one mask (H, W, 1) uint8, 1 = valid.
MaskSampler = Callable[[np.random.Generator, Size], np.ndarray]

_MAX_SHAPES = 100  # Shapes tried per procedural mask before giving up on reaching the target ratio.
_MAX_EVAL_ATTEMPTS = 20  # Fresh procedural masks tried per evaluation mask to land in its bin.
_MAX_NVIDIA_DRAWS = 10  # Augmented NVIDIA masks tried per training mask to land in the ratio range.


def _pair(size: Size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def hole_ratio(mask: np.ndarray) -> float:
  """Fraction of hole pixels (value < 0.5) in a mask with 1 = valid, 0 = hole."""
  mask = np.asarray(mask)
  return float(np.count_nonzero(mask < 0.5)) / mask.size


def hole_ratio_bin(mask: np.ndarray) -> int | None:
  """Index into HOLE_RATIO_BINS of the mask's hole ratio, or None outside (0.01, 0.6]."""
  ratio = hole_ratio(mask)
  for index, (low, high) in enumerate(HOLE_RATIO_BINS):
    if low < ratio <= high:
      return index
  return None


def _draw_stroke(
  draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, scale: float
) -> None:
  """A brush stroke: a wandering polyline with round joints and caps."""
  line_width = max(2, round(rng.uniform(0.02, 0.08) * scale))
  x, y = rng.uniform(0, width), rng.uniform(0, height)
  angle = rng.uniform(0, 2 * math.pi)
  points = [(x, y)]
  for _ in range(int(rng.integers(2, 9))):
    angle += rng.uniform(-1.2, 1.2)
    step = rng.uniform(0.05, 0.25) * scale
    if not (0 <= x + step * math.cos(angle) < width and 0 <= y + step * math.sin(angle) < height):
      angle += math.pi  # Turn back instead of leaving the canvas.
    x, y = x + step * math.cos(angle), y + step * math.sin(angle)
    points.append((x, y))
  draw.line(points, fill=255, width=line_width, joint="curve")
  radius = line_width / 2
  for px, py in (points[0], points[-1]):
    draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)


def _draw_ellipse(
  draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, scale: float
) -> None:
  """A rotated ellipse, drawn as a 20-gon."""
  cx, cy = rng.uniform(0, width), rng.uniform(0, height)
  a = rng.uniform(0.03, 0.15) * scale
  b = a * rng.uniform(0.3, 1.0)
  tilt = rng.uniform(0, math.pi)
  t = np.linspace(0, 2 * math.pi, 20, endpoint=False)
  xs = cx + a * np.cos(t) * math.cos(tilt) - b * np.sin(t) * math.sin(tilt)
  ys = cy + a * np.cos(t) * math.sin(tilt) + b * np.sin(t) * math.cos(tilt)
  draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)


def _draw_circle(
  draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, scale: float
) -> None:
  cx, cy = rng.uniform(0, width), rng.uniform(0, height)
  radius = rng.uniform(0.02, 0.1) * scale
  draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)


_SHAPES = (_draw_stroke, _draw_ellipse, _draw_circle)
_SHAPE_PROBABILITIES = (0.6, 0.2, 0.2)


def random_mask(
  rng: np.random.Generator,
  size: Size,
  min_hole_ratio: float = 0.01,
  max_hole_ratio: float = 0.6,
  *,
  margin: int = 0,
) -> np.ndarray:
  """Draws strokes, ellipses and circles until the hole ratio reaches a target drawn from the range.

  A shape that would push the ratio above `max_hole_ratio` is undone and later shapes are drawn
  smaller, so the result never exceeds the maximum; it reaches a ratio >= the target (hence >
  `min_hole_ratio`) unless `_MAX_SHAPES` shapes were not enough, which is rare.

  Args:
    rng: the only source of randomness.
    size: side or (height, width) of the mask.
    min_hole_ratio: lower end of the target hole ratio (of the whole image).
    max_hole_ratio: upper end of the target hole ratio.
    margin: pixels along each border that stay valid (the border constraint).

  Returns:
    (H, W, 1) uint8, 1 = valid, 0 = hole.
  """
  height, width = _pair(size)
  inner_h, inner_w = height - 2 * margin, width - 2 * margin
  if not 0 <= min_hole_ratio < max_hole_ratio <= 1:
    raise ValueError(
      f"Need 0 <= min_hole_ratio < max_hole_ratio <= 1, got {min_hole_ratio}, {max_hole_ratio}."
    )
  total = height * width
  low, high = min_hole_ratio * total, min(max_hole_ratio * total, inner_h * inner_w)
  if inner_h <= 0 or inner_w <= 0 or low >= high:
    raise ValueError(
      f"A margin of {margin} px leaves no room for a hole ratio above "
      f"{min_hole_ratio} in a {height}x{width} mask."
    )
  target = rng.uniform(low, high)
  canvas = Image.new("L", (inner_w, inner_h), 0)
  holes, shrink = 0, 1.0
  for _ in range(_MAX_SHAPES):
    if holes >= target and holes > low:
      break
    # Big shapes while far from the target, small ones close to it: few shapes, few overshoots.
    grow = min(3.0, max(0.5, math.sqrt((target - holes) / total / 0.05)))
    before = canvas.copy()
    shape = _SHAPES[rng.choice(len(_SHAPES), p=_SHAPE_PROBABILITIES)]
    shape(ImageDraw.Draw(canvas), rng, inner_w, inner_h, min(height, width) * grow * shrink)
    drawn = canvas.histogram()[255]
    if drawn > high:
      canvas, shrink = before, shrink * 0.7
    else:
      holes = drawn
  valid = np.ones((height, width, 1), np.uint8)
  valid[margin : margin + inner_h, margin : margin + inner_w, 0] = np.asarray(canvas) == 0
  return valid


@dataclasses.dataclass(frozen=True)
class ProceduralMasks:
  """Training mask sampler: `random_mask` with the hole ratio drawn uniformly from the range."""

  min_hole_ratio: float = 0.01
  max_hole_ratio: float = 0.6

  def __call__(self, rng: np.random.Generator, size: Size) -> np.ndarray:
    return random_mask(rng, size, self.min_hole_ratio, self.max_hole_ratio)


def eval_mask_set(
  size: Size, per_bin: int, *, seed: int = 0, margin: int = 0
) -> dict[int, np.ndarray]:
  """A fixed evaluation set: `per_bin` procedural masks in each of HOLE_RATIO_BINS.

  Mask j of bin k depends only on (seed, k, j, margin), so the set is identical on every run and a
  larger `per_bin` extends a smaller one.

  Args:
    size: side or (height, width) of the masks.
    per_bin: masks per bin.
    seed: non-negative seed.
    margin: pixels along each border with no hole (0: no border constraint).

  Returns:
    {bin index: (per_bin, H, W, 1) uint8}, 1 = valid.
  """
  masks_by_bin = {}
  for index, (low, high) in enumerate(HOLE_RATIO_BINS):
    masks = []
    for j in range(per_bin):
      for attempt in range(_MAX_EVAL_ATTEMPTS):
        rng = np.random.default_rng([seed, index, j, margin, attempt])
        mask = random_mask(rng, size, low, high, margin=margin)
        if hole_ratio_bin(mask) == index:
          break
      else:
        raise RuntimeError(
          f"No mask of bin {low}-{high} with margin {margin} after "
          f"{_MAX_EVAL_ATTEMPTS} attempts; use a smaller margin."
        )
      masks.append(mask)
    masks_by_bin[index] = np.stack(masks) if masks else np.zeros((0, *_pair(size), 1), np.uint8)
  return masks_by_bin


def _bin_dirname(index: int) -> str:
  low, high = HOLE_RATIO_BINS[index]
  return f"{low:.2f}-{high:.2f}"


def save_mask_set(masks_by_bin: dict[int, np.ndarray], directory: str | pathlib.Path) -> None:
  """Writes masks as PNGs (white = hole) to `directory/<bin low>-<bin high>/<j:05d>.png`."""
  root = pathlib.Path(directory)
  for index, masks in masks_by_bin.items():
    bin_dir = root / _bin_dirname(index)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for j, mask in enumerate(masks):
      Image.fromarray(np.where(mask[..., 0] == 0, 255, 0).astype(np.uint8)).save(
        bin_dir / f"{j:05d}.png"
      )


def list_mask_files(
  directory: str | pathlib.Path, *, check_readable: bool = True
) -> tuple[str, ...]:
  """Sorted paths of the PNG files under `directory` (recursively).

  Raises FileNotFoundError for a missing directory and ValueError when it holds no PNG file or (with
  `check_readable`, which reads only the file headers) a file that is not an image.
  """
  root = pathlib.Path(directory).expanduser()
  if not root.is_dir():
    raise MissingDataError(
      f"Mask directory {root} does not exist. Download NVIDIA's Irregular Mask Dataset from "
      f"{NVIDIA_MASKS_URL} (see the README), unzip it and point config.data.masks.dir (training "
      "masks) or config.data.masks.test_dir (test masks) at it."
    )
  paths = tuple(
    sorted(str(p) for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
  )
  if not paths:
    raise DataError(
      f"Mask directory {root} holds no .png files; expected the unzipped Irregular Mask "
      f"Dataset from {NVIDIA_MASKS_URL}."
    )
  if check_readable:
    for path in paths:
      try:
        with Image.open(path) as image:
          image.size  # pylint: disable=pointless-statement
      except images.DECODE_ERRORS as e:
        raise DataError(
          f"Unreadable mask file {path}: {e}. Remove it or re-download the dataset."
        ) from e
  return paths


def read_mask_png(path: str | pathlib.Path) -> np.ndarray:
  """Reads a PNG mask with white = hole as (H, W, 1) uint8 with 1 = valid (`images.read_mask`)."""
  try:
    white, _ = images.read_mask(path)
  except images.DECODE_ERRORS as e:
    raise DataError(
      f"Unreadable mask file {path}: {e}. Remove it or re-download the dataset."
    ) from e
  return (~white).astype(np.uint8)[..., None]


def _resize_nearest(mask: np.ndarray, size: Size) -> np.ndarray:
  """Centre-crops a (H, W, 1) mask to a square if `size` is,
  then resizes it with nearest neighbour."""
  height, width = _pair(size)
  image = Image.fromarray(mask[..., 0])
  if height == width and image.width != image.height:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
  if image.size != (width, height):
    image = image.resize((width, height), Image.Resampling.NEAREST)
  return np.asarray(image)[..., None]


def load_mask_set(
  directory: str | pathlib.Path, size: Size, *, per_bin: int | None = None
) -> dict[int, np.ndarray]:
  """Loads PNG masks (white = hole) and groups them by their hole ratio recomputed at `size`.

  Reads NVIDIA's test masks or a set written by `save_mask_set`. Files are read in sorted path
  order; masks outside (0.01, 0.6] are left out. With `per_bin`, stops once every bin holds that
  many.

  Returns:
    {bin index: (n, H, W, 1) uint8}, 1 = valid, for all six bins (possibly with n = 0).
  """
  paths = list_mask_files(directory, check_readable=False)
  grouped: dict[int, list[np.ndarray]] = {index: [] for index in range(len(HOLE_RATIO_BINS))}
  outside = 0
  for path in paths:
    if per_bin is not None and all(len(masks) >= per_bin for masks in grouped.values()):
      break
    mask = _resize_nearest(read_mask_png(path), size)
    index = hole_ratio_bin(mask)
    if index is None:
      outside += 1
    elif per_bin is None or len(grouped[index]) < per_bin:
      grouped[index].append(mask)
  if outside:
    logging.info(
      "%d masks in %s have a hole ratio outside (0.01, 0.6] and were left out.", outside, directory
    )
  empty = np.zeros((0, *_pair(size), 1), np.uint8)
  return {index: np.stack(masks) if masks else empty for index, masks in grouped.items()}


def _dilate(hole: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of a boolean (H, W) array by a (2 radius + 1)^2 square, as two 1-D passes."""
  out = hole
  for axis in (0, 1):
    src, out = out, out.copy()
    for shift in range(1, radius + 1):
      lead = [slice(None)] * 2
      lag = [slice(None)] * 2
      lead[axis], lag[axis] = slice(shift, None), slice(None, -shift)
      out[tuple(lead)] |= src[tuple(lag)]
      out[tuple(lag)] |= src[tuple(lead)]
  return out


def augment_mask(mask: np.ndarray, rng: np.random.Generator, size: Size) -> np.ndarray:
  """The paper's training-mask augmentation: random rotation, cropping and dilation.

  Rotates by a uniform angle (corners filled as valid), crops a random square of 50-100% of the
  shorter side, resizes it with nearest neighbour to `size`, and dilates the holes by a random
  radius of 0..max(1, side // 64) pixels.

  Args:
    mask: (H, W, 1) uint8, 1 = valid.
    rng: the only source of randomness.
    size: side or (height, width) of the result.

  Returns:
    (H', W', 1) uint8 with values in {0, 1}.
  """
  height, width = _pair(size)
  hole = Image.fromarray(np.where(mask[..., 0] == 0, 255, 0).astype(np.uint8))
  hole = hole.rotate(rng.uniform(0, 360), resample=Image.Resampling.NEAREST, fillcolor=0)
  crop = max(1, round(rng.uniform(0.5, 1.0) * min(hole.size)))
  left = int(rng.integers(0, hole.width - crop + 1))
  top = int(rng.integers(0, hole.height - crop + 1))
  hole = hole.crop((left, top, left + crop, top + crop)).resize(
    (width, height), Image.Resampling.NEAREST
  )
  radius = int(rng.integers(0, max(1, min(height, width) // 64) + 1))
  return (~_dilate(np.asarray(hole) > 127, radius)).astype(np.uint8)[..., None]


@dataclasses.dataclass(frozen=True)
class NvidiaMasks:
  """Training mask sampler over NVIDIA's Irregular Mask Dataset: a random file, augmented.

  Draws up to `_MAX_NVIDIA_DRAWS` augmented masks and returns the first whose hole ratio lies in
  [min_hole_ratio, max_hole_ratio], else the one closest to that range.
  """

  paths: tuple[str, ...]
  min_hole_ratio: float = 0.01
  max_hole_ratio: float = 0.6

  @classmethod
  def from_dir(
    cls, directory: str | pathlib.Path, min_hole_ratio: float = 0.01, max_hole_ratio: float = 0.6
  ) -> NvidiaMasks:
    return cls(list_mask_files(directory), min_hole_ratio, max_hole_ratio)

  def __call__(self, rng: np.random.Generator, size: Size) -> np.ndarray:
    best, best_distance = None, math.inf
    for _ in range(_MAX_NVIDIA_DRAWS):
      mask = augment_mask(read_mask_png(self.paths[rng.integers(len(self.paths))]), rng, size)
      ratio = hole_ratio(mask)
      distance = max(self.min_hole_ratio - ratio, ratio - self.max_hole_ratio, 0.0)
      if distance == 0.0:
        return mask
      if distance < best_distance:
        best, best_distance = mask, distance
    return best


def create_mask_sampler(config: ml_collections.ConfigDict) -> MaskSampler:
  """The training mask sampler described by `config.data.masks`."""
  if not 0 <= config.min_hole_ratio < config.max_hole_ratio <= 1:
    raise ConfigError(
      "config.data.masks needs 0 <= min_hole_ratio < max_hole_ratio <= 1, got "
      f"{config.min_hole_ratio} and {config.max_hole_ratio}."
    )
  if config.source == "procedural":
    return ProceduralMasks(config.min_hole_ratio, config.max_hole_ratio)
  if config.source == "nvidia":
    if not config.dir:
      raise ConfigError(
        "config.data.masks.source='nvidia' needs config.data.masks.dir: the unzipped "
        f"training masks of NVIDIA's Irregular Mask Dataset ({NVIDIA_MASKS_URL})."
      )
    return NvidiaMasks.from_dir(config.dir, config.min_hole_ratio, config.max_hole_ratio)
  raise ConfigError(
    f"Unknown config.data.masks.source {config.source!r}; use 'procedural' or 'nvidia'."
  )


def load_eval_masks(
  config: ml_collections.ConfigDict, per_bin: int, *, seed: int = 0
) -> dict[str, dict[int, np.ndarray]]:
  """Evaluation masks for `config.data`, as {set name: {bin index: (n, H, W, 1) uint8}}.

  Without `config.data.masks.test_dir`: procedural sets 'no_border' and 'border' (no hole within
  `masks.border_margin` * image_size pixels of the border) from `eval_mask_set`. With it: the masks
  there, grouped by `load_mask_set`; a directory with `border/` and `no_border/` subdirectories (as
  `save_mask_set` on both sets writes) gives those two sets, any other directory (e.g. NVIDIA's test
  set) one set named 'test'.
  """
  size = config.image_size
  test_dir = config.masks.test_dir
  if test_dir is None:
    margin = round(config.masks.border_margin * size)
    return {
      "no_border": eval_mask_set(size, per_bin, seed=seed),
      "border": eval_mask_set(size, per_bin, seed=seed, margin=margin),
    }
  root = pathlib.Path(test_dir).expanduser()
  names: Sequence[str] = ("no_border", "border")
  if all((root / name).is_dir() for name in names):
    return {name: load_mask_set(root / name, size, per_bin=per_bin) for name in names}
  return {"test": load_mask_set(root, size, per_bin=per_bin)}
