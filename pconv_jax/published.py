"""The published PConv U-Nets of other projects: how each one's weights map onto `PUNet`.

A `Layout` recognises its project's weight names, reads depth, widths and kernel sizes from the
weights, sets the project's fixed semantics as `PUNet` variant fields (output activation, biases,
BatchNorm, input range, channel order), and converts every array exactly:

- PyTorch's OIHW kernels become HWIO;
- kernels are rescaled where the project's renormalisation differs from NVIDIA's
  `sum(1) / sum(M)` (naoto0804 divides by `sum(M)` alone: the kernel over `Cin * kh * kw`;
  PConv-Keras multiplies by `kh * kw / sum(M)`: the kernel over `Cin`);
- the input channels of decoder kernels are permuted where the project concatenates
  [skip, upsampled] rather than [upsampled, skip] (PConv-Keras): the same sums in another order.

`MODELS` lists the trained networks that can be downloaded (`python -m pconv_jax.convert fetch`).
"""

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

import flax
import jax
import numpy as np

from pconv_jax import checkpoints, models, vgg, weights
from pconv_jax.errors import UserError

Arrays = dict[str, np.ndarray]
VariablePath = tuple[str, ...]  # A Flax variable: (collection, module, [block, layer,] leaf).


class ConversionError(UserError, ValueError):
  """Weights that are not a known PConv U-Net layout, or that do not fit one."""


# PyTorch module leaves and Keras weight names -> (collection, Flax leaf).
_TORCH_LEAVES = {
  ("conv", "weight"): ("params", "kernel"),
  ("conv", "bias"): ("params", "bias"),
  ("bn", "weight"): ("params", "scale"),
  ("bn", "bias"): ("params", "bias"),
  ("bn", "running_mean"): ("batch_stats", "mean"),
  ("bn", "running_var"): ("batch_stats", "var"),
}
_KERAS_LEAVES = {
  "img_kernel": ("params", "kernel"),
  "kernel": ("params", "kernel"),
  "bias": ("params", "bias"),
  "gamma": ("params", "scale"),
  "beta": ("params", "bias"),
  "moving_mean": ("batch_stats", "mean"),
  "moving_variance": ("batch_stats", "var"),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """One project's checkpoint layout and network semantics.

  `identifier` matches a weight name that only this layout has; `read(arrays)` returns {Flax path:
  array} (kernels HWIO, as stored otherwise) and the names it could not place; `variant` holds the
  PUNet fields; `kernel_divisor(kernel)` the number a kernel (HWIO) is divided by; `skip_first`:
  the decoder concatenates [skip, upsampled].
  """

  name: str
  project: str
  container: str  # "torch" (.pth) or "keras" (.h5)
  example_key: str  # For messages.
  identifier: str
  read: Callable[[Arrays], tuple[dict[VariablePath, np.ndarray], list[str]]]
  variant: Mapping[str, Any]
  kernel_divisor: Callable[[np.ndarray], float] = lambda kernel: 1.0
  skip_first: bool = False
  train_size: int = 256  # The image size its published networks were trained at.

  def matches(self, arrays: Arrays) -> bool:
    return any(re.fullmatch(self.identifier, key) for key in arrays)

  def convert(self, arrays: Arrays, dtype: Any = np.float32) -> tuple[dict, dict]:
    """(model config, Flax variables) for the weights in `arrays` (names as `clean` leaves them).

    Raises a ConversionError listing every unexpected, missing or wrongly shaped weight.
    """
    flat, unexpected = self.read(arrays)
    if not flat:
      raise ConversionError(
        f"None of the weights is in the layout of {self.project} (e.g. {self.example_key}); "
        f"found {len(unexpected)} others such as {sorted(unexpected)[:4]}."
      )
    config = self.model_config(flat)
    features = config["features"]
    converted = {}
    for path, value in flat.items():
      value = np.asarray(value, np.float64)
      if path[-1] == "kernel" and path[1] != "head":
        value = value / self.kernel_divisor(value)
        if self.skip_first and path[1] == "decoder":
          level = int(path[2].removeprefix("block_"))
          skip = value.shape[2] - features[level - 1]  # The upsampled block has level's width.
          value = np.concatenate([value[:, :, skip:], value[:, :, :skip]], axis=2)
      converted[path] = value.astype(dtype)
    return config, _assemble(config, converted, unexpected, self.project)

  def model_config(self, flat: Mapping[VariablePath, np.ndarray]) -> dict[str, Any]:
    """Depth, widths and kernel sizes read from the encoder's kernels, plus the variant fields."""
    kernels = {
      int(path[2].removeprefix("block_")): value
      for path, value in flat.items()
      if path[:2] == ("params", "encoder") and path[-2:] == ("conv", "kernel")
    }
    depth = len(kernels)
    if depth == 0 or sorted(kernels) != list(range(1, depth + 1)):
      raise ConversionError(
        f"Not a complete {self.project} PConv U-Net: found encoder levels {sorted(kernels)}."
      )
    return {
      "depth": depth,
      "features": [int(kernels[i].shape[-1]) for i in range(1, depth + 1)],
      "kernel_sizes": [int(kernels[i].shape[0]) for i in range(1, depth + 1)],
      "partial": True,
      **self.variant,
    }


def clean(arrays: Mapping[str, Any]) -> Arrays:
  """NumPy values without BatchNorm step counters and the `module.` (DataParallel) prefix; of an
  mmagic inpaintor's state dict, only its `generator.` (without the prefix: its losses' VGG-16 is
  not part of the network)."""
  cleaned = {}
  for key, value in arrays.items():
    if key.endswith("num_batches_tracked"):
      continue
    key = key.removeprefix("module.")
    if hasattr(value, "detach"):  # A torch tensor; torch itself is never imported here.
      value = value.detach().cpu().numpy()
    cleaned[key] = np.asarray(value)
  if any(key.startswith("generator.") for key in cleaned):
    cleaned = {
      key.removeprefix("generator."): value
      for key, value in cleaned.items()
      if key.startswith("generator.")
    }
  return cleaned


def _assemble(
  config: Mapping[str, Any],
  flat: dict[VariablePath, np.ndarray],
  unexpected: list[str],
  project: str,
) -> dict:
  """The Flax variables of `config`'s PUNet from `flat`, every one present and of its shape."""
  model = models.create_model(config)
  expected = flax.traverse_util.flatten_dict(
    checkpoints.abstract_variables(model, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  )
  problems = []
  if unexpected:
    problems.append(f"unexpected weights {sorted(unexpected)}")
  wrong = [
    f"{'/'.join(path)} {value.shape} (expected {expected[path].shape})"
    for path, value in flat.items()
    if path in expected and value.shape != expected[path].shape
  ]
  if wrong:
    problems.append(f"wrong shapes {wrong}")
  extra = sorted("/".join(path) for path in flat if path not in expected)
  if extra:
    problems.append(f"weights this network does not have: {extra}")
  missing = sorted("/".join(path) for path in expected if path not in flat)
  if missing:
    problems.append(f"nothing for {missing}")
  if problems:
    raise ConversionError(
      f"The weights do not fit {project}'s PConv U-Net of depth {config['depth']}: "
      + "; ".join(problems)
    )
  return flax.traverse_util.unflatten_dict(flat)


def _torch_reader(
  pattern: str, block: Callable[[str, int, int], tuple[str, int]], all_ones: str | None = None
) -> Callable[[Arrays], tuple[dict[VariablePath, np.ndarray], list[str]]]:
  """A reader of PyTorch keys matching `pattern` (groups side, number, layer, leaf).

  `block(side, number, count)` gives the (module, level) of a block, `count` being the number of
  distinct (side, number) blocks; keys matching `all_ones` are the layer's fixed mask kernels,
  checked to be all ones and dropped.
  """
  key_re = re.compile(pattern)
  ones_re = re.compile(all_ones) if all_ones else None

  def read(arrays: Arrays) -> tuple[dict[VariablePath, np.ndarray], list[str]]:
    matched, unexpected = {}, []
    for key, value in arrays.items():
      if ones_re and ones_re.fullmatch(key):
        if not np.all(value == 1):
          raise ConversionError(
            f"{key} is not all ones: the weights use another mask convolution than this layout's "
            "partial convolution."
          )
      elif (m := key_re.fullmatch(key)) and (m["layer"], m["leaf"]) in _TORCH_LEAVES:
        matched[key] = (m["side"] or "", int(m["number"]), m["layer"], m["leaf"], value)
      else:
        unexpected.append(key)
    count = len({(side, number) for side, number, *_ in matched.values()})
    flat = {}
    for side, number, layer, leaf, value in matched.values():
      module, level = block(side, number, count)
      collection, name = _TORCH_LEAVES[(layer, leaf)]
      flat[(collection, module, f"block_{level}", layer, name)] = (
        value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
      )
    return flat, unexpected

  return read


def _by_side(side: str, number: int, count: int) -> tuple[str, int]:
  return ("encoder" if side.startswith("e") else "decoder"), number


def _numbered_in_order(side: str, number: int, count: int) -> tuple[str, int]:
  """conv1..convN encode, convN+1..conv2N decode from the deepest level (jacobaustin123)."""
  depth = count // 2
  return ("encoder", number) if number <= depth else ("decoder", 2 * depth + 1 - number)


def _read_keras(arrays: Arrays) -> tuple[dict[VariablePath, np.ndarray], list[str]]:
  """PConv-Keras' layers by kind and creation order: 2N `PConv2D` (img_kernel, bias; N encoder
  levels then the decoder from the deepest), N-1 `EncBN<i>`, N-1 decoder BatchNormalizations, and
  the 1x1 output convolution."""
  layers: dict[str, dict[str, np.ndarray]] = {}
  for key, value in arrays.items():
    layer, _, weight = key.rpartition("/")
    layers.setdefault(layer, {})[weight] = value
  pconvs = sorted((n for n, w in layers.items() if "img_kernel" in w), key=weights.keras_counter)
  norms = [n for n, w in layers.items() if "moving_variance" in w]
  # PConv-Keras names them itself: EncBN2 ... EncBN<N>.
  encoder_norms = sorted(
    (n for n in norms if n.startswith("EncBN")), key=lambda n: int(re.sub(r"\D", "", n) or 0)
  )
  decoder_norms = sorted((n for n in norms if not n.startswith("EncBN")), key=weights.keras_counter)
  heads = [n for n, w in layers.items() if "kernel" in w]
  depth = len(pconvs) // 2
  if len(pconvs) % 2 or len(encoder_norms) != depth - 1 or len(decoder_norms) != depth - 1:
    raise ConversionError(
      f"Not PConv-Keras' U-Net: {len(pconvs)} PConv2D layers, {len(encoder_norms)} EncBN and "
      f"{len(decoder_norms)} decoder BatchNormalization layers (2N, N-1 and N-1 for N levels)."
    )
  if len(heads) != 1:
    raise ConversionError(f"Not PConv-Keras' U-Net: expected one output Conv2D, found {heads}.")
  blocks = {name: ("encoder", i, "conv") for i, name in enumerate(pconvs[:depth], start=1)}
  blocks |= {name: ("decoder", depth - i, "conv") for i, name in enumerate(pconvs[depth:])}
  blocks |= {name: ("encoder", i, "bn") for i, name in enumerate(encoder_norms, start=2)}
  blocks |= {name: ("decoder", depth - i, "bn") for i, name in enumerate(decoder_norms)}
  flat, unexpected = {}, []
  for name, layer_weights in layers.items():
    for weight, value in layer_weights.items():
      if weight not in _KERAS_LEAVES:
        unexpected.append(f"{name}/{weight}")
      elif name == heads[0]:
        flat[(_KERAS_LEAVES[weight][0], "head", _KERAS_LEAVES[weight][1])] = value
      elif name in blocks:
        module, level, layer = blocks[name]
        collection, leaf = _KERAS_LEAVES[weight]
        flat[(collection, module, f"block_{level}", layer, leaf)] = value
      else:
        unexpected.append(f"{name}/{weight}")
  return flat, unexpected


LAYOUTS = {
  layout.name: layout
  for layout in (
    Layout(
      name="blog",
      project="the blog post's PyTorch PUNet (this project's seed)",
      container="torch",
      example_key="ec_images_1.conv.weight",
      identifier=r"ec_images_1\.conv\.weight",
      read=_torch_reader(
        r"(?P<side>ec|dc)_images_(?P<number>\d+)\.(?P<layer>conv|bn)\.(?P<leaf>\w+)", _by_side
      ),
      variant={},
    ),
    Layout(
      name="naoto",
      project="naoto0804/pytorch-inpainting-with-partial-conv",
      container="torch",
      example_key="enc_1.conv.input_conv.weight",
      identifier=r"enc_1\.conv\.input_conv\.weight",
      read=_torch_reader(
        r"(?P<side>enc|dec)_(?P<number>\d+)\.(?P<layer>conv|bn)(?:\.input_conv)?\.(?P<leaf>\w+)",
        _by_side,
        all_ones=r"(enc|dec)_\d+\.conv\.mask_conv\.weight",
      ),
      variant={
        "output_activation": "linear",
        "input_mean": vgg.TORCHVISION_MEAN,
        "input_std": vgg.TORCHVISION_STD,
      },
      kernel_divisor=lambda kernel: float(np.prod(kernel.shape[:3])),  # kh * kw * Cin
    ),
    Layout(
      name="mmagic",
      project="open-mmlab/mmagic (mmediting)",
      container="torch",
      example_key="encoder.enc1.conv.weight",
      identifier=r"encoder\.enc1\.conv\.weight",
      read=_torch_reader(
        r"(?P<side>encoder|decoder)\.(?:enc|dec)(?P<number>\d+)\.(?P<layer>conv|bn)\.(?P<leaf>\w+)",
        _by_side,
        all_ones=r"(encoder|decoder)\.(enc|dec)\d+\.conv\.weight_mask_updater",
      ),
      variant={"output_activation": "linear", "conv_bias": "without_bn", "channel_order": "BGR"},
    ),
    Layout(
      name="keras",
      project="MathiasGruber/PConv-Keras",
      container="keras",
      example_key="p_conv2d_1/img_kernel",
      identifier=r"p_conv2d(_\d+)?/img_kernel",  # Keras numbers layers per session.
      read=_read_keras,
      variant={
        "output_activation": "sigmoid",
        "conv_bias": "all",
        "hole_bias": True,
        "bn_epsilon": 1e-3,
        "head": True,
        "input_mean": (0.0, 0.0, 0.0),
        "input_std": (1.0, 1.0, 1.0),
      },
      kernel_divisor=lambda kernel: float(kernel.shape[2]),  # Cin
      skip_first=True,
      train_size=512,
    ),
    Layout(
      name="jacob",
      project="jacobaustin123/pytorch-inpainting-partial-conv",
      container="torch",
      example_key="conv1.conv.weight",
      identifier=r"conv1\.conv\.weight",
      read=_torch_reader(
        r"(?P<side>)conv(?P<number>\d+)\.(?P<layer>conv|bn)\.(?P<leaf>\w+)", _numbered_in_order
      ),
      variant={
        "conv_bias": "without_bn",
        "first_bn": True,
        "input_mean": vgg.TORCHVISION_MEAN,
        "input_std": vgg.TORCHVISION_STD,
      },
    ),
  )
}


def detect(arrays: Arrays, container: str) -> Layout:
  """The layout whose identifying key `arrays` holds; a ConversionError naming the known ones."""
  for layout in LAYOUTS.values():
    if layout.container == container and layout.matches(arrays):
      return layout
  known = "; ".join(
    f"{layout.name} ({layout.project}: {layout.example_key}, ...)" for layout in LAYOUTS.values()
  )
  raise ConversionError(
    f"Not a PConv U-Net layout this converter knows; it knows {known}. Found {len(arrays)} "
    f"weights such as {sorted(arrays)[:6]}."
  )


@dataclasses.dataclass(frozen=True)
class PublishedModel:
  """A trained network that its authors published."""

  layout: str
  data: str
  licence: str  # As the repository states it.
  url: str
  sha256_prefix: str | None = None  # Published in the file name, as torch hub's are.
  direct: bool = True  # False: a page to download it from by hand (Google Drive).


MODELS = {
  "naoto-places2": PublishedModel(
    layout="naoto",
    data="Places2 (challenge data_large), 256x256, 1M iterations including fine-tuning",
    licence="MIT",
    url="https://github.com/naoto0804/pytorch-inpainting-with-partial-conv/releases/download/"
    "v0.0.0/1000000.pth",
  ),
  "mmagic-places": PublishedModel(
    layout="mmagic",
    data="Places365, 256x256, stage 2",
    licence="Apache-2.0",
    url="https://download.openmmlab.com/mmediting/inpainting/pconv/"
    "pconv_256x256_stage2_4x2_places_20200619-1ffed0e8.pth",
    sha256_prefix="1ffed0e8",
  ),
  "mmagic-celeba": PublishedModel(
    layout="mmagic",
    data="CelebA, 256x256, stage 2",
    licence="Apache-2.0",
    url="https://download.openmmlab.com/mmediting/inpainting/pconv/"
    "pconv_256x256_stage2_4x2_celeba_20200619-860f8b95.pth",
    sha256_prefix="860f8b95",
  ),
  "keras-imagenet": PublishedModel(
    layout="keras",
    data="ImageNet, 512x512",
    licence="MIT",
    url="https://drive.google.com/open?id=1OdbuNJj4gV9KUoknQG063jJrJ1srhBvU",
    direct=False,
  ),
  "jacob-imagenet": PublishedModel(
    layout="jacob",
    data="a small ImageNet subset, 256x256",
    licence="none stated",
    url="https://drive.google.com/file/d/1Xbhh1H9CwDjVpsuVldxbWC9UGMelGlCA/view?usp=sharing",
    direct=False,
  ),
}
