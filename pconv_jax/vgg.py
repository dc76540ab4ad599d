"""VGG-16 features up to pool3 for the perceptual and style losses, and loading of pretrained
weights.

The loss needs conv1_1 ... conv3_3 of VGG-16 and the pooled outputs pool1, pool2, pool3. Weights
come from:

  * torchvision `vgg16-397923af.pth` (read with PyTorch, imported only when such a file is read),
  * Keras `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (read with h5py),
  * the project's compact `.npz` file, written by `python -m pconv_jax.vgg fetch` or `convert`.

The variables are a plain pytree that fully determines the features:

    {"params": {"conv1_1": {"kernel": (3, 3, 3, 64), "bias": (64,)}, ..., "conv3_3": {...}},
     "normalization": {"scale": (3,), "offset": (3,)}}

Kernels are HWIO with the input channels of conv1_1 in RGB order. `images * scale + offset` maps the
model's images ([-1, 1], RGB) to the input the source network was trained on: torchvision's ImageNet
mean/std on [0, 1], or Keras/Caffe's mean subtraction on [0, 255] (whose BGR channel order is folded
into conv1_1's kernel at loading). So features are right whichever file was loaded, and the pytree
can be a jit argument.

Cache: `$PCONV_JAX_CACHE`, else `$XDG_CACHE_HOME/pconv_jax`, else `~/.cache/pconv_jax`, holding
`vgg16_pool3_torchvision.npz` and/or `vgg16_pool3_keras.npz`.

    python -m pconv_jax.vgg fetch torchvision      # or: fetch keras
    python -m pconv_jax.vgg convert path/to/vgg16-397923af.pth
"""

from collections.abc import Mapping, Sequence
import importlib.util
import os
from pathlib import Path
import sys
import tempfile
from typing import Any, NoReturn

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pconv_jax import weights
from pconv_jax.kernels import XLA, Kernels

Array = jax.Array
Variables = dict[str, dict[str, Any]]

# (name, input channels, output channels) of VGG-16's convolutions up to conv3_3, one tuple per
# pooling block.
BLOCKS = (
  (("conv1_1", 3, 64), ("conv1_2", 64, 64)),
  (("conv2_1", 64, 128), ("conv2_2", 128, 128)),
  (("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)),
)
CONVS = tuple(conv for block in BLOCKS for conv in block)
NORMALIZATION = "normalization"  # The variable collection holding the input normalisation.

# Position of each convolution in torchvision's `vgg16().features` (ReLU and max-pool layers in
# between).
_TORCHVISION_INDEX = dict(zip((name for name, _, _ in CONVS), (0, 2, 5, 7, 10, 12, 14)))

TORCHVISION_MEAN = (0.485, 0.456, 0.406)  # RGB, on [0, 1].
TORCHVISION_STD = (0.229, 0.224, 0.225)
# Keras "caffe" preprocessing: BGR, on [0, 255], no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


SOURCES = {
  # torch.hub names files `<name>-<first 8+ hex digits of the SHA-256>.pth`; the full digest
  # (553,433,881 bytes) is the one recorded by several independent projects and starts with that
  # prefix.
  "torchvision": weights.Source(
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
    checksums={"sha256": "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"},
  ),
  # keras.applications.vgg16 publishes only an MD5 (`file_hash`) for this file.
  "keras": weights.Source(
    url=(
      "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
      "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ),
    checksums={"md5": "6d6bbae143d832006294945121d1f1fc"},
  ),
}


class VGGWeightsError(weights.WeightsError):
  """VGG-16 weights are missing, corrupt or not in the expected
  layout; the message says what to run."""


def fetch_command(source: str = "torchvision") -> str:
  return f"python -m pconv_jax.vgg fetch {source}"


# --------------------------------------------------------------------------------------------------
# The network.


def _no_random_init(*_: Any) -> NoReturn:
  raise VGGWeightsError(
    "VGG16Features is never randomly initialised: pass variables from "
    "pconv_jax.vgg.resolve_weights or load_variables to `apply`"
  )


class _Conv3x3(nn.Module):
  """3x3 'SAME' convolution + bias + ReLU, accumulating in float32 or wider whatever the dtype."""

  features: int
  dtype: Any
  kernels: Kernels

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # `apply` traces the initialiser only to check the loaded shapes; `init` never gets here (the
    # normalisation variables refuse first), so these zeros are never used as weights.
    kernel = self.param("kernel", nn.initializers.zeros_init(), (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    accumulator = jnp.promote_types(self.dtype, jnp.float32)
    y = self.kernels.conv2d(
      x, kernel.astype(self.dtype), (1, 1), "SAME", preferred_element_type=accumulator
    )
    return nn.relu(y + bias.astype(accumulator)).astype(self.dtype)


class VGG16Features(nn.Module):
  """VGG-16 up to pool3. Maps images (B, H, W, 3) in [-1, 1], RGB, to (pool1, pool2, pool3) in
  `dtype`.

  The input normalisation (from the `normalization` collection) is applied in float32 or wider;
  convolutions take `dtype` inputs (e.g. bfloat16) and accumulate in float32 or wider. There is no
  random initialisation: use `load_variables` or `resolve_weights`. `kernels` computes the
  convolutions and the pooling (`pconv_jax.kernels`).
  """

  dtype: Any = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array, Array]:
    scale = self.variable(NORMALIZATION, "scale", _no_random_init).value
    offset = self.variable(NORMALIZATION, "offset", _no_random_init).value
    x = images.astype(jnp.promote_types(images.dtype, jnp.float32))
    x = (x * scale + offset).astype(self.dtype)
    pooled = []
    for block in BLOCKS:
      for name, _, features in block:
        x = _Conv3x3(features, self.dtype, self.kernels, name=name)(x)
      x = self.kernels.max_pool_2x2(x)
      pooled.append(x)
    return tuple(pooled)


# --------------------------------------------------------------------------------------------------
# Building and checking variables.


def input_normalization(source: str) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), RGB order, such that `images * scale + offset`
  is the input `source`'s weights expect."""
  if source == "torchvision":  # ((x + 1) / 2 - mean) / std
    mean, std = np.array(TORCHVISION_MEAN), np.array(TORCHVISION_STD)
    return (0.5 / std).astype(np.float32), ((0.5 - mean) / std).astype(np.float32)
  if source == "keras":  # 127.5 * (x + 1) - mean; the BGR order lives in conv1_1's kernel.
    mean_rgb = np.array(CAFFE_MEAN_BGR[::-1])
    return np.full(3, 127.5, np.float32), (127.5 - mean_rgb).astype(np.float32)
  raise ValueError(f"unknown VGG-16 weight source {source!r}; expected one of {sorted(SOURCES)}")


def _error(where: str, problem: str, source: str = "torchvision") -> VGGWeightsError:
  return VGGWeightsError(
    f"{where}: {problem}. These are not usable VGG-16 weights; create the weights file with "
    f"`{fetch_command(source)}` (or point config.loss.vgg_weights at a valid file)."
  )


def _expect_shape(
  array: np.ndarray, shape: tuple[int, ...], what: str, where: str, source: str
) -> None:
  if array.shape != shape:
    raise _error(where, f"{what} has shape {array.shape}, expected {shape}", source)


def _variables(
  convs: Mapping[str, tuple[np.ndarray, np.ndarray]],
  scale: np.ndarray,
  offset: np.ndarray,
  where: str,
  source: str,
) -> Variables:
  """Checks shapes and values (HWIO kernels, RGB input) and returns
  the variables as float32 jax arrays."""
  params = {}
  for name, cin, cout in CONVS:
    kernel, bias = convs[name]
    _expect_shape(kernel, (3, 3, cin, cout), f"{name} kernel (HWIO)", where, source)
    _expect_shape(bias, (cout,), f"{name} bias", where, source)
    params[name] = {"kernel": kernel, "bias": bias}
  _expect_shape(scale, (3,), "normalization scale", where, source)
  _expect_shape(offset, (3,), "normalization offset", where, source)
  variables = {"params": params, NORMALIZATION: {"scale": scale, "offset": offset}}
  leaves = jax.tree.leaves(variables)
  if not all(np.all(np.isfinite(leaf)) for leaf in leaves):
    raise _error(where, "some values are NaN or infinite", source)
  return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), variables)


def from_torchvision_state_dict(
  state_dict: Mapping[str, Any], where: str = "state dict"
) -> Variables:
  """Variables from a torchvision VGG-16 state dict (`features.<i>.weight`
  (cout, cin, 3, 3), `.bias`)."""
  convs = {}
  for name, cin, cout in CONVS:
    prefix = f"features.{_TORCHVISION_INDEX[name]}"
    missing = [key for key in (f"{prefix}.weight", f"{prefix}.bias") if key not in state_dict]
    if missing:
      raise _error(where, f"missing {missing} ({name})", "torchvision")
    kernel = np.asarray(state_dict[f"{prefix}.weight"], np.float32)
    _expect_shape(kernel, (cout, cin, 3, 3), f"{prefix}.weight ({name})", where, "torchvision")
    convs[name] = (
      kernel.transpose(2, 3, 1, 0),
      np.asarray(state_dict[f"{prefix}.bias"], np.float32),
    )
  return _variables(convs, *input_normalization("torchvision"), where, "torchvision")


def load_torchvision_pth(path: str | os.PathLike) -> Variables:
  """Variables from torchvision's `vgg16-397923af.pth` (or any VGG-16
  state dict saved with `torch.save`)."""
  missing_torch = VGGWeightsError(
    f"reading {path} needs PyTorch, which is not installed: `pip install torch` (the CPU wheel is "
    f"enough), or use the Keras weights instead: `{fetch_command('keras')}`"
  )
  return from_torchvision_state_dict(
    weights.read_torch_state_dict(path, missing_torch, _error), str(path)
  )


def load_keras_h5(path: str | os.PathLike) -> Variables:
  """Variables from Keras' `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (or a full VGG-16
  save).

  Each layer group `block<b>_conv<i>` holds one 4-D kernel (kh, kw, cin, cout) and one 1-D bias,
  named `block1_conv1_W_1:0`/`..._b_1:0` in the published file and `block1_conv1/kernel:0`/`bias:0`
  in later Keras 2 saves; both are found by shape. conv1_1's input channels are reversed from BGR to
  RGB.
  """
  where = str(path)
  layers = weights.read_keras_layers(path, lambda where, problem: _error(where, problem, "keras"))
  convs = {}
  for name, cin, cout in CONVS:
    layer = f"block{name[4]}_conv{name[6]}"
    if layer not in layers:
      raise _error(where, f"has no layer group {layer!r} ({name})", "keras")
    kernels = [d for d in layers[layer].values() if d.ndim == 4]
    biases = [d for d in layers[layer].values() if d.ndim == 1]
    if len(kernels) != 1 or len(biases) != 1:
      raise _error(where, f"layer {layer!r} does not hold exactly one kernel and one bias", "keras")
    kernel = kernels[0].astype(np.float32)
    _expect_shape(kernel, (3, 3, cin, cout), f"{layer} kernel (kh, kw, cin, cout)", where, "keras")
    if name == "conv1_1":
      kernel = kernel[:, :, ::-1, :]
    convs[name] = (kernel, biases[0].astype(np.float32))
  return _variables(convs, *input_normalization("keras"), where, "keras")


def save_npz(
  variables: Variables, path: str | os.PathLike, *, source: str, origin_sha256: str
) -> None:
  """Writes the compact file atomically; `source`/`origin_sha256`
  record where the weights came from."""
  arrays = {
    f"params/{name}/{key}": np.asarray(value)
    for name, layer in variables["params"].items()
    for key, value in layer.items()
  }
  arrays.update(
    {f"{NORMALIZATION}/{key}": np.asarray(value) for key, value in variables[NORMALIZATION].items()}
  )
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".part")
  with open(partial, "wb") as f:
    np.savez(f, source=np.array(source), origin_sha256=np.array(origin_sha256), **arrays)
  os.replace(partial, path)


def load_npz(path: str | os.PathLike) -> Variables:
  """Variables from the project's compact file (see `save_npz`)."""
  where = str(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = dict(data)
  except (OSError, ValueError) as e:
    raise _error(where, f"cannot be read as a .npz file ({e})") from e
  recorded = {key: str(arrays.get(key, "not recorded")) for key in ("source", "origin_sha256")}
  source = recorded["source"] if recorded["source"] in SOURCES else "torchvision"
  keys = [f"params/{name}/{key}" for name, _, _ in CONVS for key in ("kernel", "bias")]
  keys += [f"{NORMALIZATION}/scale", f"{NORMALIZATION}/offset"]
  missing = [key for key in keys if key not in arrays]
  if missing:
    raise _error(where, f"missing arrays {missing}", source)
  logging.info(
    "VGG-16 weights %s (source: %s, SHA-256 of the converted file: %s)",
    where,
    recorded["source"],
    recorded["origin_sha256"],
  )
  convs = {
    name: (arrays[f"params/{name}/kernel"], arrays[f"params/{name}/bias"]) for name, _, _ in CONVS
  }
  return _variables(
    convs, arrays[f"{NORMALIZATION}/scale"], arrays[f"{NORMALIZATION}/offset"], where, source
  )


FILES = weights.WeightFiles(
  network="VGG-16",
  torch_format="torchvision",
  torch_label="torchvision",
  loaders={"torchvision": load_torchvision_pth, "keras": load_keras_h5, "npz": load_npz},
  config_field="config.loss.vgg_weights",
  fetch_command=fetch_command,
  error=VGGWeightsError,
)


def load_variables(path: str | os.PathLike) -> Variables:
  """Variables from a .npz, .pth/.pt or .h5/.hdf5 file, chosen by suffix. Raises VGGWeightsError."""
  return FILES.load(path)


# --------------------------------------------------------------------------------------------------
# Cache, download and conversion.


def cached_path(source: str) -> Path:
  """Where `fetch`/`convert` put the compact file for `source` ("torchvision" or "keras")."""
  if source not in SOURCES:
    raise ValueError(f"unknown VGG-16 weight source {source!r}; expected one of {sorted(SOURCES)}")
  return weights.cache_dir() / f"vgg16_pool3_{source}.npz"


def resolve_weights(path: str | os.PathLike | None, *, required: bool) -> Variables | None:
  """The VGG-16 variables for the loss: from `path` (config.loss.vgg_weights) if given, else from
  the cache.

  The cache is searched for torchvision's weights first, then Keras'. A given `path` must load. With
  no path and nothing cached: raises VGGWeightsError (saying what to run) if `required`, else logs a
  prominent warning and returns None, which switches the perceptual and style terms off.
  """
  if path is None:
    path = next((cached_path(source) for source in SOURCES if cached_path(source).is_file()), None)
  if path is not None:
    logging.info("VGG-16 weights for the perceptual and style losses: %s", path)
    return load_variables(path)
  candidates = " nor ".join(cached_path(source).name for source in SOURCES)
  if required:
    raise VGGWeightsError(
      "No VGG-16 weights for the perceptual and style losses: config.loss.vgg_weights is not set "
      "and the cache "
      f"{weights.cache_dir()} holds neither {candidates}.\n"
      f"Run:  {fetch_command()}\n"
      f"(downloads {SOURCES['torchvision'].url} once, needs PyTorch to convert; or "
      f"`{fetch_command('keras')}`, "
      "h5py only; set $PCONV_JAX_CACHE to use another cache directory), or set "
      "config.loss.vgg_weights to a "
      ".pth, .h5 or .npz file."
    )
  banner = "!" * 100
  logging.warning(
    "\n%s\nNO VGG-16 WEIGHTS in %s: training WITHOUT the perceptual and style losses (valid, hole, "
    "TV and any optional terms remain).\n"
    "This is not the paper's loss. For it, run `%s` and restart.\n%s",
    banner,
    weights.cache_dir(),
    fetch_command(),
    banner,
  )
  return None


def fetch(source: str, *, url: str | None = None, sha256: str | None = None) -> Path:
  """Downloads `source`'s canonical file, verifies it, converts it to the compact file in the cache;
  returns it.

  `url` replaces the canonical URL (a mirror or a local `file://` copy); `sha256` replaces the
  published checksums, which are otherwise required (torchvision: SHA-256; Keras: MD5, the only hash
  Keras publishes).
  """
  spec = SOURCES.get(source)
  if spec is None:
    raise ValueError(f"unknown VGG-16 weight source {source!r}; expected one of {sorted(SOURCES)}")
  if source == "torchvision":
    if importlib.util.find_spec("torch") is None:  # Fail before a 528 MB download, not after.
      raise VGGWeightsError(
        f"converting torchvision's .pth needs PyTorch: `pip install torch` (CPU wheel), or run "
        f"`{fetch_command('keras')}` instead"
      )
  out = cached_path(source)
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    raw = Path(tmp) / spec.filename
    digests = weights.download(
      url or spec.url, raw, {"sha256": sha256} if sha256 else spec.checksums, VGGWeightsError
    )
    save_npz(FILES.loaders[source](raw), out, source=source, origin_sha256=digests["sha256"])
  return out


def convert(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
  """Converts a local .pth/.h5 file to the compact file (default: the cache's) and returns the
  output path.

  A file that differs from the canonical download is converted too, with a warning.
  """
  path = Path(path).expanduser()
  source = FILES.format_of(path)
  if source == "npz":
    raise VGGWeightsError(
      f"{path} is already a compact .npz file; use it directly as config.loss.vgg_weights"
    )
  variables = load_variables(path)
  digests = weights.check_canonical(path, SOURCES[source])
  out = Path(output) if output is not None else cached_path(source)
  save_npz(variables, out, source=source, origin_sha256=digests["sha256"])
  return out


def main(argv: Sequence[str] | None = None) -> int:
  return weights.main(
    argv,
    network="VGG-16 (conv1_1 ... conv3_3)",
    prog="python -m pconv_jax.vgg",
    sources=SOURCES,
    fetch=fetch,
    convert=convert,
    cache_name="vgg16_pool3_<source>.npz",
  )


if __name__ == "__main__":
  sys.exit(main())
