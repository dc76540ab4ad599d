"""High-resolution strategies: which part of a photo the network sees, and at which scale.

A network trained on 256x256 crops sees a hole in a 4000x3000 photo at a scale it never learned, and
running it on the whole photo costs minutes on a CPU. As in IOPaint (lama-cleaner):

- `original`: the whole image at full resolution;
- `resize`: the image downscaled (area averaging) so that its long side is `resize_limit` (default:
  the training size) and inpainted; the composite is upscaled (bicubic) over the holes' bounding
  box and fills the holes only. A small pixel is a hole if any pixel it averages is one, so no hole
  value leaks in;
- `crop` (default): for each group of holes (holes closer than twice `crop_margin` form one group),
  a full-resolution crop of the group's bounding box plus `crop_margin` pixels of context on every
  side, grown to at least the training size and to a multiple of the network's size multiple where
  the image allows; each crop writes only its own group's holes, and groups whose crops coincide
  share one network input.

In every strategy only hole pixels are written, so the known pixels stay the input's bit for bit.
An image that fits in one crop, or whose long side is within `resize_limit`, is inpainted whole,
exactly as `original` does.
"""

import dataclasses

import cv2
import numpy as np

STRATEGIES = ("original", "resize", "crop")


@dataclasses.dataclass(frozen=True)
class HDStrategy:
  """How a large image is inpainted (module docstring); `resize_limit` None = the training size."""

  name: str = "crop"
  crop_margin: int = 128
  resize_limit: int | None = None

  def problem(self) -> str | None:
    """What is wrong with the settings, if anything, in words a user can act on."""
    if self.name not in STRATEGIES:
      return f"Unknown HD strategy {self.name!r}; use one of {', '.join(STRATEGIES)}."
    if self.crop_margin < 0:
      return f"The crop margin must be 0 or more pixels, got {self.crop_margin}."
    if self.resize_limit is not None and self.resize_limit < 1:
      return f"The resize limit must be a positive number of pixels, got {self.resize_limit}."
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
  """One network input cut from an image. The network's output for (`image`, `hole`) goes into the
  rectangle `box` of the full image where `write` (box-shaped) is true. `affine` (2x3) is set when
  the input is a downscaled copy of the whole image: it maps box pixels to input pixels."""

  image: np.ndarray  # float32 (h, w, 3) on [-1, 1]
  hole: np.ndarray  # bool (h, w)
  box: tuple[slice, slice]
  write: np.ndarray
  affine: np.ndarray | None = None

  def to_box(self, output: np.ndarray) -> np.ndarray:
    """The network's output (h, w, 3) at the box's size and position. A downscaled input's
    composite (its known pixels kept) is upscaled, bicubic, over the box only."""
    if self.affine is None:
      return output
    composite = np.where(self.hole[..., None], output, self.image)
    return cv2.warpAffine(
      composite,
      self.affine,
      (self.write.shape[1], self.write.shape[0]),
      flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
      borderMode=cv2.BORDER_REPLICATE,
    )


def pieces(
  image: np.ndarray, hole: np.ndarray, strategy: HDStrategy, training_size: int, size_multiple: int
) -> list[Piece]:
  """The network inputs that inpaint `image` (float32 on [-1, 1]) at `hole` (bool, some true)."""
  if strategy.name == "resize":
    limit = strategy.resize_limit or training_size
    if max(hole.shape) > limit:
      return [_resized(image, hole, limit)]
  if strategy.name == "crop":
    return _crops(image, hole, strategy.crop_margin, training_size, size_multiple)
  whole = (slice(0, hole.shape[0]), slice(0, hole.shape[1]))
  return [Piece(image, hole, whole, hole)]


def _resized(image: np.ndarray, hole: np.ndarray, limit: int) -> Piece:
  """The whole image, its long side downscaled to `limit`; the box is the holes' bounding box."""
  height, width = hole.shape
  scale = limit / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  small_hole = cv2.resize(hole.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0
  small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
  rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
  box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  # Pixel centres as cv2.resize maps them: input x = (x + 0.5) * sx - 0.5 for image column x.
  sx, sy = size[0] / width, size[1] / height
  affine = np.array(
    [[sx, 0.0, (cols[0] + 0.5) * sx - 0.5], [0.0, sy, (rows[0] + 0.5) * sy - 0.5]], np.float64
  )
  return Piece(small, small_hole, box, hole[box], affine)


def _crops(
  image: np.ndarray, hole: np.ndarray, margin: int, min_size: int, multiple: int
) -> list[Piece]:
  """One crop per group of holes (connected after dilating by `margin`); groups whose grown boxes
  coincide (e.g. all of them, in an image that fits in one crop) share one network input."""
  holes = hole.astype(np.uint8)
  if margin:
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * margin + 1, 2 * margin + 1))
    holes = cv2.dilate(holes, kernel)
  count, groups, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=8)
  writes: dict[tuple[tuple[int, int], tuple[int, int]], np.ndarray] = {}
  for group in range(1, count):  # 0 is the background.
    x, y, w, h = (int(v) for v in stats[group, :4])
    rows = _grow(y, y + h, hole.shape[0], min_size, multiple)
    cols = _grow(x, x + w, hole.shape[1], min_size, multiple)
    ours = hole[slice(*rows), slice(*cols)] & (groups[slice(*rows), slice(*cols)] == group)
    writes[rows, cols] = writes[rows, cols] | ours if (rows, cols) in writes else ours
  result = []
  for rows, cols in writes:
    box = (slice(*rows), slice(*cols))
    result.append(Piece(image[box], hole[box], box, writes[rows, cols]))
  return result


def _grow(start: int, stop: int, limit: int, min_size: int, multiple: int) -> tuple[int, int]:
  """[start, stop) grown about its centre to at least `min_size`, then to a multiple of `multiple`,
  shifted to lie within [0, limit); the whole range where `limit` is smaller."""
  size = max(stop - start, min_size)
  size = -(-size // multiple) * multiple
  if size >= limit:
    return 0, limit
  start = max(0, min((start + stop - size) // 2, limit - size))
  return start, start + size
