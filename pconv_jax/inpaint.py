"""Inpaint your own images with a trained checkpoint: a small Python API and a command-line tool.

    python -m pconv_jax.inpaint --checkpoint WORKDIR_OR_CHECKPOINT_DIR --image photo.jpg \
        --mask mask.png --output out.png [--mask_polarity white_hole|black_hole] \
        [--hd_strategy crop|resize|original --crop_margin 128 --resize_limit 256] \
        [--self_ensemble] [--compilation_cache_dir ~/.cache/pconv_jax/xla]
    python -m pconv_jax.inpaint --checkpoint DIR --image photos/ --mask masks/ --output results/

In Python (load once, inpaint many):

    inpainter = Inpainter.from_checkpoint("workdir")
    result = inpainter(image, hole)  # image (H, W, 3) uint8 or float on [0, 1]; hole (H, W) bool
    results = inpainter.inpaint_many(images, holes)

Large photos: by default only a crop around each group of holes goes through the network
(`--hd_strategy crop`); `resize` inpaints a downscaled copy, `original` the whole photo
(`pconv_jax.hd`). Any size: each network input is padded at the bottom and right to the next
multiple of the network's size multiple (2**depth), the padding is marked as hole, and the result is
cropped back. A partial-convolution network never reads image values under a hole, so the values
under the padding do not matter (zeros are used). The known pixels of the result are the input's,
bit for bit; with a lossy output format (JPEG) they are re-encoded.

Mask files: white = hole (NVIDIA's convention) by default, `--mask_polarity black_hole` for the
opposite. A mask is read as 8-bit greyscale (colour by ITU-R 601 luma, alpha ignored) and
thresholded: grey >= 128 is white. A mask with other grey values than 0 and 255 (e.g. saved as JPEG)
is thresholded with a warning. A hole over 60% of the image (more than the paper's masks; usually a
mask of the other polarity) gets a warning naming the flag (`HoleShareWarning` in Python). Folder
mode pairs `photos/NAME.*` with `masks/NAME.*` and writes `results/NAME.png`; network inputs of
equal padded size are batched. `--self_ensemble` (`Inpainter(self_ensemble=True)`) averages the
network's outputs over the 8 flips and 90-degree turns of each input (`pconv_jax.self_ensemble`): 8x
the network time, better fills from a network trained with those symmetries.
"""

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
from pathlib import Path
import sys
from typing import Any
import warnings

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pconv_jax import checkpoints, hd, images, kernels, masks, models
from pconv_jax import self_ensemble as self_ensemble_lib
from pconv_jax.errors import UserError

POLARITIES = ("white_hole", "black_hole")
# zlib level of PNG results, OpenCV's default: for a 12-megapixel photo 4x faster than Pillow's 6
# (0.7 against 2.9 s here) for a 20% larger file.
PNG_COMPRESS_LEVEL = 1
DEFAULT_TRAINING_SIZE = 256  # The paper's, for checkpoints that do not record theirs.


class InpaintError(UserError, ValueError):
  """An input cannot be inpainted; the message says which and why."""


class HoleShareWarning(UserWarning):
  """A hole larger than any the network was trained on: often a mask of the other polarity."""


def hole_share_problem(hole: np.ndarray, name: str, fix: str) -> str | None:
  """A warning's text where the hole covers more of the image than the paper's masks (60%)."""
  share, trained = float(np.mean(hole)), masks.HOLE_RATIO_BINS[-1][1]
  if share <= trained:
    return None
  return (
    f"{name}: {share:.0%} of the image is hole, more than the network was trained on (at most "
    f"{trained:.0%}); if the mask marks the known pixels instead, {fix}."
  )


def training_size(meta: dict) -> int:
  """The image size a checkpoint's network was trained at: recorded by conversion (`train_size`) or
  in a training run's config, else the paper's 256."""
  config = meta.get("config") or {}
  return int(
    meta.get("train_size") or (config.get("data") or {}).get("image_size") or DEFAULT_TRAINING_SIZE
  )


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainter:
  """A loaded network that inpaints arrays of any size. Build it with `from_checkpoint`.

  `strategy` is the high-resolution strategy used unless a call passes another (`pconv_jax.hd`);
  `training_size` the image size the network was trained at, which sets the smallest crop and the
  default resize limit.
  """

  model: models.PUNet
  variables: Any
  batch_size: int = 4
  strategy: hd.HDStrategy = hd.HDStrategy()
  training_size: int = DEFAULT_TRAINING_SIZE
  meta: dict = dataclasses.field(default_factory=dict)
  self_ensemble: bool = False

  @classmethod
  def from_checkpoint(
    cls,
    path: str | epath.Path,
    step: int | None = None,
    batch_size: int = 4,
    conv_impl: str = "auto",
    strategy: hd.HDStrategy = hd.HDStrategy(),
    self_ensemble: bool = False,
  ) -> "Inpainter":
    """Loads a checkpoint directory, or a workdir holding one in `checkpoints/` (newest readable
    step by default); local or on an object store (gs://). `conv_impl` as
    `config.model.conv_impl`."""
    path = epath.Path(path).expanduser()
    if (path / "checkpoints").is_dir():
      path = path / "checkpoints"
    model, variables, meta = checkpoints.load_model(path, step)
    model = model.clone(kernels=kernels.select(conv_impl, jax.devices()[:1]))
    return cls(model, variables, batch_size, strategy, training_size(meta), meta, self_ensemble)

  @functools.cached_property
  def _apply(self):
    def network(variables, images, masks):
      predict = functools.partial(self.model.apply, variables, train=False)
      if self.self_ensemble:
        return self_ensemble_lib.mean_over_symmetries(predict, images, masks)
      return predict(images, masks)

    return jax.jit(network)

  def __call__(
    self, image: np.ndarray, hole: np.ndarray, strategy: hd.HDStrategy | None = None
  ) -> np.ndarray:
    """Inpaints one image: (H, W, 3) uint8, or float on [0, 1]; `hole` (H, W) or (H, W, 1), true/1 =
    inpaint; `strategy` overrides the inpainter's.

    Returns an array like `image` (same shape and dtype) whose pixels outside the hole are
    `image`'s.
    """
    return self._inpaint([image], [hole], strategy, None, warning_stacklevel=3)[0]

  def inpaint_many(
    self,
    images: Sequence[np.ndarray],
    holes: Sequence[np.ndarray],
    strategy: hd.HDStrategy | None = None,
    progress: Callable[[int, int], None] | None = None,
  ) -> list[np.ndarray]:
    """Inpaints many images (sizes may differ): network inputs (whole images or their crops) of
    equal padded size run together, `batch_size` at a time. `progress(done, total)` is called with
    the number of network inputs before the first and after each batch."""
    return self._inpaint(images, holes, strategy, progress, warning_stacklevel=3)

  def _inpaint(
    self,
    images: Sequence[np.ndarray],
    holes: Sequence[np.ndarray],
    strategy: hd.HDStrategy | None,
    progress: Callable[[int, int], None] | None,
    warning_stacklevel: int,
  ) -> list[np.ndarray]:
    strategy = strategy or self.strategy
    if problem := strategy.problem():
      raise InpaintError(problem)
    if len(images) != len(holes):
      raise InpaintError(f"Got {len(images)} images but {len(holes)} hole masks.")
    checked = [
      _check(image, hole, f"image {i}") for i, (image, hole) in enumerate(zip(images, holes))
    ]
    for i, (_, hole) in enumerate(checked):
      if problem := hole_share_problem(hole, f"image {i}", "pass its inverse (~hole)"):
        warnings.warn(problem, HoleShareWarning, stacklevel=warning_stacklevel)
    work = [
      (i, piece)
      for i, (image, hole) in enumerate(checked)
      for piece in hd.pieces(image, hole, strategy, self.training_size, self.model.size_multiple)
    ]
    for i, piece in work:
      if piece.hole.all():
        fix = "a larger crop margin" if strategy.name == "crop" else "a larger resize limit or crop"
        raise InpaintError(
          f"image {i}: a {strategy.name} network input is all hole, so no known pixel is left to "
          f"fill it from; use {fix}."
        )
    groups: dict[tuple[int, int], list[tuple[int, hd.Piece]]] = {}
    for i, piece in work:
      groups.setdefault(self._padded_size(piece.hole.shape), []).append((i, piece))
    results = [np.array(image, copy=True) for image in images]
    done = 0
    if progress:
      progress(done, len(work))
    for size, members in groups.items():
      for start in range(0, len(members), self.batch_size):
        chunk = members[start : start + self.batch_size]
        outputs = self._predict([p.image for _, p in chunk], [p.hole for _, p in chunk], size)
        for (i, piece), output in zip(chunk, outputs):
          filled = _in_dtype(piece.to_box(output), results[i].dtype)
          region = results[i][piece.box]
          region[piece.write] = filled[piece.write]
        done += len(chunk)
        if progress:
          progress(done, len(work))
    return results

  def _padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
    m = self.model.size_multiple
    return (-(-size[0] // m) * m, -(-size[1] // m) * m)

  def _predict(
    self, images: list[np.ndarray], holes: list[np.ndarray], size: tuple[int, int]
  ) -> list[np.ndarray]:
    """Network outputs on [-1, 1] for images on [-1, 1], each cropped to its image's size. Each
    (size, number of images) compiles once; the batch is not padded, so one image costs one."""
    batch = np.zeros((len(images), *size, 3), np.float32)
    valid = np.zeros((len(images), *size, 1), np.float32)  # Padding rows and columns are holes.
    for k, (image, hole) in enumerate(zip(images, holes)):
      h, w = hole.shape
      batch[k, :h, :w] = image
      valid[k, :h, :w, 0] = ~hole
    outputs = np.asarray(self._apply(self.variables, jnp.asarray(batch), jnp.asarray(valid)))
    return [outputs[k, : hole.shape[0], : hole.shape[1]] for k, hole in enumerate(holes)]


def _check(image: np.ndarray, hole: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(image as float32 on [-1, 1], hole as bool (H, W)); raises InpaintError for unusable inputs."""
  image, hole = np.asarray(image), np.asarray(hole)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise InpaintError(f"{name}: expected an RGB image of shape (H, W, 3), got {image.shape}.")
  if hole.ndim == 3 and hole.shape[-1] == 1:
    hole = hole[..., 0]
  if hole.ndim != 2:
    raise InpaintError(f"{name}: expected a mask of shape (H, W) or (H, W, 1), got {hole.shape}.")
  if hole.shape != image.shape[:2]:
    raise InpaintError(
      f"{name}: the image is {image.shape[1]}x{image.shape[0]} pixels but the mask is "
      f"{hole.shape[1]}x{hole.shape[0]}: the mask must have the image's size."
    )
  hole = hole.astype(bool)
  if not hole.any():
    raise InpaintError(f"{name}: the mask has no hole, so there is nothing to inpaint.")
  if hole.all():
    raise InpaintError(f"{name}: the mask is all hole, so no known pixel is left to inpaint from.")
  if image.dtype == np.uint8:
    return images.to_model_range(image), hole
  if not np.issubdtype(image.dtype, np.floating):
    raise InpaintError(f"{name}: expected uint8 or float pixels, got {image.dtype}.")
  if not (np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0):
    raise InpaintError(
      f"{name}: float images must lie on [0, 1]; got values in [{image.min()}, {image.max()}]."
    )
  return image.astype(np.float32) * 2.0 - 1.0, hole


def _in_dtype(output: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """A network output (on [-1, 1]) as pixels of an image of `dtype`: uint8, or float on [0, 1]."""
  if dtype == np.uint8:
    return images.to_uint8(output)
  return np.clip((output + 1.0) / 2.0, 0.0, 1.0).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Files.


def read_image(path: Path) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3), EXIF orientation applied, alpha dropped."""
  try:
    return np.asarray(images.load(path).convert("RGB"))
  except FileNotFoundError as e:
    raise InpaintError(f"{path}: no such file.") from e
  except images.DECODE_ERRORS as e:
    raise InpaintError(f"{path}: cannot read it as an image ({e}).") from e


def read_hole_mask(path: Path, polarity: str = "white_hole") -> tuple[np.ndarray, int]:
  """A mask file as bool (H, W), True = hole, and the number of pixels that were neither black nor
  white (`images.read_mask`: EXIF orientation applied, grey >= 128 is white)."""
  if polarity not in POLARITIES:
    raise InpaintError(f"Unknown mask polarity {polarity!r}; use one of {POLARITIES}.")
  try:
    white, grey_pixels = images.read_mask(path)
  except FileNotFoundError as e:
    raise InpaintError(f"{path}: no such file.") from e
  except images.DECODE_ERRORS as e:
    raise InpaintError(f"{path}: cannot read it as a mask image ({e}).") from e
  return (white if polarity == "white_hole" else ~white), grey_pixels


def write_image(image: np.ndarray, path: Path) -> None:
  """Writes an image file (PNG at `PNG_COMPRESS_LEVEL`), creating its folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    Image.fromarray(image).save(path, compress_level=PNG_COMPRESS_LEVEL)
  except (ValueError, OSError) as e:  # PIL: unknown extension, or the file cannot be written.
    raise InpaintError(
      f"{path}: cannot write the result there ({e}); use a .png (lossless) path."
    ) from e


def _pairs(image_arg: Path, mask_arg: Path, output_arg: Path) -> list[tuple[Path, Path, Path]]:
  """(image, mask, output) paths: one pair, or every image of a
  folder with the mask of the same name."""
  if not image_arg.is_dir():
    if mask_arg.is_dir() or output_arg.is_dir():
      raise InpaintError(
        f"--image {image_arg} is a file, so --mask and --output must be files too."
      )
    if output_arg.suffix.lower() not in Image.registered_extensions():
      raise InpaintError(
        f"--output {output_arg}: unknown image format {output_arg.suffix!r}; use e.g. a .png path."
      )
    return [(image_arg, mask_arg, output_arg)]
  if not mask_arg.is_dir():
    raise InpaintError(
      f"--image {image_arg} is a folder, so --mask must be a folder of masks named like the "
      f"images; {mask_arg} is not a folder."
    )
  if output_arg.exists() and not output_arg.is_dir():
    raise InpaintError(
      f"--image is a folder, so --output must be a folder; {output_arg} is a file."
    )
  photos = sorted(
    p for p in image_arg.iterdir() if p.suffix.lower() in images.IMAGE_SUFFIXES and p.is_file()
  )
  if not photos:
    raise InpaintError(f"{image_arg} holds no images ({', '.join(images.IMAGE_SUFFIXES)}).")
  masks_by_stem: dict[str, list[Path]] = {}
  for p in sorted(mask_arg.iterdir()):
    if p.suffix.lower() in images.IMAGE_SUFFIXES and p.is_file():
      masks_by_stem.setdefault(p.stem, []).append(p)
  pairs, problems = [], []
  for image in photos:
    candidates = masks_by_stem.get(image.stem, [])
    if len(candidates) != 1:
      problems.append(
        f"{image.name}: {'no mask' if not candidates else 'several masks'} named {image.stem}.* in "
        f"{mask_arg}"
      )
    else:
      pairs.append((image, candidates[0], output_arg / f"{image.stem}.png"))
  if problems:
    raise InpaintError("; ".join(problems))
  return pairs


def _load_pairs(
  pairs: list[tuple[Path, Path, Path]], polarity: str
) -> tuple[list, list, list[str], list[str]]:
  """Reads and checks every pair before any inference: (images, holes, warnings, problems)."""
  photos, holes, cautions, problems = [], [], [], []
  flip = "black_hole" if polarity == "white_hole" else "white_hole"
  for image_path, mask_path, _ in pairs:
    try:
      image = read_image(image_path)
      hole, grey_pixels = read_hole_mask(mask_path, polarity)
      if grey_pixels:
        cautions.append(
          f"{mask_path}: not a binary mask ({grey_pixels} pixels are neither black nor white); "
          f"thresholded at {images.MASK_THRESHOLD}: lighter pixels count as white."
        )
      colour = "white" if polarity == "white_hole" else "black"
      if hole.shape == image.shape[:2] and not hole.any():
        raise InpaintError(
          f"{mask_path}: the mask has no hole (no {colour} pixel with --mask_polarity "
          f"{polarity}), so there is nothing to inpaint. If holes are the other colour, pass "
          f"--mask_polarity {flip}."
        )
      if hole.shape == image.shape[:2] and hole.all():
        raise InpaintError(
          f"{mask_path}: the mask is all hole (every pixel {colour} with --mask_polarity "
          f"{polarity}), so no known pixel is left. If holes are the other colour, pass "
          f"--mask_polarity {flip}."
        )
      _check(image, hole, f"{image_path} with mask {mask_path}")
      if problem := hole_share_problem(hole, str(mask_path), f"pass --mask_polarity {flip}"):
        cautions.append(problem)
      photos.append(image)
      holes.append(hole)
    except InpaintError as e:
      problems.append(str(e))
  return photos, holes, cautions, problems


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m pconv_jax.inpaint",
    description="Inpaint images with a trained PConv checkpoint.",
    epilog="Masks: white = hole by default (NVIDIA's convention); grey >= 128 counts as white.",
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    type=epath.Path,
    help="a workdir (its checkpoints/ is used) or a checkpoint directory",
  )
  parser.add_argument("--step", type=int, help="checkpoint step (default: the newest readable one)")
  parser.add_argument(
    "--image", required=True, type=Path, help="an image file, or a folder of images"
  )
  parser.add_argument(
    "--mask",
    required=True,
    type=Path,
    help="a mask file, or a folder of masks named like the images",
  )
  parser.add_argument(
    "--output",
    required=True,
    type=Path,
    help="output file (.png keeps known pixels exact), or folder",
  )
  parser.add_argument(
    "--mask_polarity",
    choices=POLARITIES,
    default="white_hole",
    help="which colour marks the hole (default: white_hole)",
  )
  parser.add_argument(
    "--batch_size", type=int, default=4, help="network inputs (images or crops) per network call"
  )
  parser.add_argument(
    "--hd_strategy",
    choices=hd.STRATEGIES,
    default="crop",
    help="large images: the whole image at full resolution (original), a copy downscaled to "
    "--resize_limit (resize), or a full-resolution crop around each group of holes (crop, the "
    "default); known pixels stay exact in all three",
  )
  parser.add_argument(
    "--crop_margin",
    type=int,
    default=hd.HDStrategy.crop_margin,
    help="crop: pixels of context around each group of holes (default: %(default)s)",
  )
  parser.add_argument(
    "--resize_limit",
    type=int,
    help="resize: the long side of the downscaled copy (default: the network's training size)",
  )
  parser.add_argument(
    "--self_ensemble",
    action="store_true",
    help="average the network's outputs over the 8 flips and 90-degree turns of each input (8x "
    "the network time; for networks trained with those symmetries)",
  )
  parser.add_argument(
    "--compilation_cache_dir",
    type=Path,
    help="keep the compiled network there (JAX's persistent cache): later runs at the same sizes "
    "skip compiling (2.5 of the 6.5 s of a 4000x3000 crop run on a 2-core CPU)",
  )
  args = parser.parse_args(argv)
  strategy = hd.HDStrategy(args.hd_strategy, args.crop_margin, args.resize_limit)
  if args.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    if args.batch_size < 1:
      raise InpaintError(f"--batch_size must be positive, got {args.batch_size}.")
    if problem := strategy.problem():
      raise InpaintError(problem)
    pairs = _pairs(args.image, args.mask, args.output)
    photos, holes, cautions, problems = _load_pairs(pairs, args.mask_polarity)
    for caution in cautions:
      print(f"warning: {caution}", file=sys.stderr)
    if problems:
      raise InpaintError("\nerror: ".join(problems))
    inpainter = Inpainter.from_checkpoint(
      args.checkpoint,
      args.step,
      args.batch_size,
      strategy=strategy,
      self_ensemble=args.self_ensemble,
    )
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", HoleShareWarning)  # Printed above, with the CLI's flag.
      results = inpainter.inpaint_many(photos, holes)
    for (_, _, output_path), result in zip(pairs, results):
      write_image(result, output_path)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"Wrote {len(pairs)} images to {args.output}" if args.image.is_dir() else f"Wrote {args.output}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
