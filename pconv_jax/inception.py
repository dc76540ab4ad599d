"""Inception-v3 in Flax for the Inception score and FID, with loading of the published weight files.

Two weight files are read:

  * "fid": pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, the TensorFlow graph of 2015-12-05
    that the original FID and Inception-score code use (1008 classes; its last block max-pools its
    pooling branch);
  * "keras": Keras' `inception_v3_weights_tf_dim_ordering_tf_kernels.h5` with the top (1000 classes;
    average pooling throughout; BatchNorm without a scale).

FID computed with the "fid" weights is the number other papers report; the "keras" network gives
comparable numbers only among themselves. Both networks take images on [0, 1], resized (bilinear, no
antialiasing, as `F.interpolate(align_corners=False)`) to 299x299 and mapped to [-1, 1]. They return
the 2048 pool features (FID) and the classifier logits (Inception score).

Variables are a plain pytree with BatchNorm folded into the convolutions (inference only):

    {"params": {"Conv2d_1a_3x3": {"kernel": HWIO, "bias": (C,)}, ...,
                "Mixed_7c": {"branch_pool": {...}},
                "fc": {"kernel": (2048, classes), "bias": (classes,)}}}

named as in torchvision/pytorch-fid. The Keras file's layers `conv2d_<i>`/`batch_normalization_<i>`
are matched by creation order (i), which is the order of the convolutions here.

Cache (as for VGG-16): `$PCONV_JAX_CACHE`, else `$XDG_CACHE_HOME/pconv_jax`, else
`~/.cache/pconv_jax`, holding `inception_v3_fid.npz` and/or `inception_v3_keras.npz`:

    python -m pconv_jax.inception fetch fid        # or: fetch keras
    python -m pconv_jax.inception convert path/to/pt_inception-2015-12-05-6726825d.pth
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
import re
import sys
import tempfile
from typing import Any

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pconv_jax import weights

Array = jax.Array
Variables = dict[str, Any]

INPUT_SIZE = 299
FEATURES = 2048
BN_EPSILON = (
  1e-3  # Both sources: TensorFlow's and Keras' BatchNorm epsilon (torchvision's BasicConv2d too).
)

SOURCES = {
  # torch.hub-style name: the suffix is the start of the SHA-256. The full digest (95,628,359 bytes)
  # is the one pinned for this URL by several independent projects (e.g. as 'tf_inception_v3' next
  # to this exact URL).
  "fid": weights.Source(
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    checksums={"sha256": "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"},
  ),
  # keras.applications.inception_v3 publishes only an MD5 (`file_hash`) for this file.
  "keras": weights.Source(
    url="https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
    checksums={"md5": "9a0d58056eeedaa3f26cb7ebd46da564"},
  ),
}


class InceptionWeightsError(weights.WeightsError):
  """Inception weights are missing, corrupt or not in the expected
  layout; the message says what to run."""


def fetch_command(source: str = "fid") -> str:
  return f"python -m pconv_jax.inception fetch {source}"


# --------------------------------------------------------------------------------------------------
# The network.


class _ConvBN(nn.Module):
  """Convolution with BatchNorm folded in (kernel, bias),
  then ReLU. Padding k // 2 per side, or none."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  pad: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    kernel = self.param(
      "kernel", nn.initializers.zeros_init(), (kh, kw, x.shape[-1], self.features)
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.pad else "VALID"
    y = lax.conv_general_dilated(
      x, kernel, (self.strides, self.strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return nn.relu(y + bias)


def _avg_pool(x: Array) -> Array:
  # TensorFlow's 'SAME' average pooling divides by the number of real (not padded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


def _max_pool_valid(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _BlockA(nn.Module):  # 35x35: Mixed_5b/c/d (Keras mixed0-2).
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = _ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = _ConvBN(64, (5, 5), name="branch5x5_2")(_ConvBN(48, (1, 1), name="branch5x5_1")(x))
    b3 = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = _ConvBN(96, (3, 3), name="branch3x3dbl_3")(_ConvBN(96, (3, 3), name="branch3x3dbl_2")(b3))
    bp = _ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _BlockB(nn.Module):  # 35x35 -> 17x17: Mixed_6a (mixed3).
  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = _ConvBN(384, (3, 3), strides=2, pad=False, name="branch3x3")(x)
    bd = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = _ConvBN(96, (3, 3), name="branch3x3dbl_2")(bd)
    bd = _ConvBN(96, (3, 3), strides=2, pad=False, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class _BlockC(nn.Module):  # 17x17: Mixed_6b-e (mixed4-7).
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.channels_7x7
    b1 = _ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = _ConvBN(c, (1, 1), name="branch7x7_1")(x)
    b7 = _ConvBN(192, (7, 1), name="branch7x7_3")(_ConvBN(c, (1, 7), name="branch7x7_2")(b7))
    bd = _ConvBN(c, (1, 1), name="branch7x7dbl_1")(x)
    for i, (features, kernel) in enumerate(
      ((c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))), start=2
    ):
      bd = _ConvBN(features, kernel, name=f"branch7x7dbl_{i}")(bd)
    bp = _ConvBN(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _BlockD(nn.Module):  # 17x17 -> 8x8: Mixed_7a (mixed8).
  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = _ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = _ConvBN(320, (3, 3), strides=2, pad=False, name="branch3x3_2")(b3)
    b7 = _ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = _ConvBN(192, (7, 1), name="branch7x7x3_3")(_ConvBN(192, (1, 7), name="branch7x7x3_2")(b7))
    b7 = _ConvBN(192, (3, 3), strides=2, pad=False, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class _BlockE(nn.Module):  # 8x8: Mixed_7b/c (mixed9-10).
  max_pool: bool = (
    False  # The FID graph's last block max-pools its pooling branch (a quirk of that graph).
  )

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = _ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = _ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        _ConvBN(384, (1, 3), name="branch3x3_2a")(b3),
        _ConvBN(384, (3, 1), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = _ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = _ConvBN(384, (3, 3), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        _ConvBN(384, (1, 3), name="branch3x3dbl_3a")(bd),
        _ConvBN(384, (3, 1), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    pooled = (
      nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME") if self.max_pool else _avg_pool(x)
    )
    bp = _ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Inception-v3 (inference). Maps images (B, H, W, 3) on [0, 1] to (pool features (B, 2048),
  logits).

  Attributes:
    num_classes: 1008 for the FID graph, 1000 for Keras.
    fid_variant: True for the FID graph (max pooling in the pooling branch of the last block).
    input_size: side the images are resized to (299 for the published weights; at least 75).
  """

  num_classes: int = 1008
  fid_variant: bool = True
  input_size: int = INPUT_SIZE

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    x = images.astype(jnp.float32)
    size = (x.shape[0], self.input_size, self.input_size, x.shape[-1])
    x = jax.image.resize(x, size, method="bilinear", antialias=False) * 2.0 - 1.0
    x = _ConvBN(32, (3, 3), strides=2, pad=False, name="Conv2d_1a_3x3")(x)
    x = _ConvBN(32, (3, 3), pad=False, name="Conv2d_2a_3x3")(x)
    x = _max_pool_valid(_ConvBN(64, (3, 3), name="Conv2d_2b_3x3")(x))
    x = _ConvBN(80, (1, 1), pad=False, name="Conv2d_3b_1x1")(x)
    x = _max_pool_valid(_ConvBN(192, (3, 3), pad=False, name="Conv2d_4a_3x3")(x))
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = _BlockA(pool_features, name=name)(x)
    x = _BlockB(name="Mixed_6a")(x)
    for name, channels in (
      ("Mixed_6b", 128),
      ("Mixed_6c", 160),
      ("Mixed_6d", 160),
      ("Mixed_6e", 192),
    ):
      x = _BlockC(channels, name=name)(x)
    x = _BlockD(name="Mixed_7a")(x)
    x = _BlockE(name="Mixed_7b")(x)
    x = _BlockE(max_pool=self.fid_variant, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros_init(), name="fc")(
      features
    )
    return features, logits


@functools.cache
def conv_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path of each convolution: HWIO kernel shape}, in the order the
  network creates them (= Keras' order)."""
  created = {}

  def init(images: Array) -> Variables:
    variables = InceptionV3().init(jax.random.key(0), images)
    # Flax keeps variables in creation order; read it here, before JAX's pytree handling sorts the
    # keys.
    created.update(traverse_util.flatten_dict(variables["params"]))
    return variables

  jax.eval_shape(init, jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {
    path[:-1]: tuple(leaf.shape)
    for path, leaf in created.items()
    if path[-1] == "kernel" and path[0] != "fc"
  }


# --------------------------------------------------------------------------------------------------
# The loaded network.


@dataclasses.dataclass(frozen=True)
class Inception:
  """Loaded weights and the network they belong to. `source` is "fid" or "keras"."""

  source: str
  variables: Variables

  @property
  def num_classes(self) -> int:
    return int(self.variables["params"]["fc"]["bias"].shape[0])

  def module(self, input_size: int = INPUT_SIZE) -> InceptionV3:
    return InceptionV3(
      num_classes=self.num_classes, fid_variant=self.source == "fid", input_size=input_size
    )

  def __call__(self, images: Array) -> tuple[Array, Array]:
    """(features (B, 2048), logits (B, classes)) of images (B, H, W, 3) on [0, 1]."""
    return self.module().apply(self.variables, images)


def _error(where: str, problem: str, source: str = "fid") -> InceptionWeightsError:
  return InceptionWeightsError(
    f"{where}: {problem}. These are not usable Inception-v3 weights; create the weights file with "
    f"`{fetch_command(source)}` (or point config.eval.inception_weights at a valid file)."
  )


def _fold(
  path: tuple[str, ...],
  kernel: np.ndarray,
  gamma: np.ndarray | None,
  beta: np.ndarray,
  mean: np.ndarray,
  variance: np.ndarray,
  where: str,
  source: str,
) -> dict[str, np.ndarray]:
  """Conv `path` (HWIO kernel) followed by inference BatchNorm ->
  one conv with a bias (folded in float64)."""
  shape = conv_shapes()[path]
  vectors = {"beta": beta, "mean": mean, "variance": variance} | (
    {} if gamma is None else {"gamma": gamma}
  )
  wrong = {k: v.shape for k, v in vectors.items() if v.shape != shape[-1:]}
  if kernel.shape != shape or wrong:
    raise _error(
      where,
      f"{'/'.join(path)} has kernel {kernel.shape} (expected {shape}, HWIO) and BatchNorm "
      f"shapes {wrong or 'as expected'} (expected {shape[-1:]})",
      source,
    )
  scale = (1.0 if gamma is None else gamma.astype(np.float64)) / np.sqrt(
    variance.astype(np.float64) + BN_EPSILON
  )
  return {
    "kernel": (kernel.astype(np.float64) * scale).astype(np.float32),
    "bias": (beta.astype(np.float64) - mean.astype(np.float64) * scale).astype(np.float32),
  }


def _build(
  convs: Mapping[tuple[str, ...], dict[str, np.ndarray]],
  fc_kernel: np.ndarray,
  fc_bias: np.ndarray,
  source: str,
  where: str,
) -> Inception:
  """Checks every shape and value and returns the network with float32 jax arrays."""
  flat = {}
  for path, shape in conv_shapes().items():
    layer = convs[path]
    if layer["kernel"].shape != shape or layer["bias"].shape != shape[-1:]:
      raise _error(
        where,
        f"{'/'.join(path)} has kernel {layer['kernel'].shape} and bias {layer['bias'].shape}, "
        f"expected {shape} (HWIO) and {shape[-1:]}",
        source,
      )
    flat[path + ("kernel",)], flat[path + ("bias",)] = layer["kernel"], layer["bias"]
  if fc_kernel.ndim != 2 or fc_kernel.shape[0] != FEATURES or fc_bias.shape != fc_kernel.shape[1:]:
    raise _error(
      where,
      f"the classifier has kernel {fc_kernel.shape} and bias {fc_bias.shape}, expected "
      f"({FEATURES}, classes) and (classes,)",
      source,
    )
  flat[("fc", "kernel")], flat[("fc", "bias")] = fc_kernel, fc_bias
  if not all(np.all(np.isfinite(leaf)) for leaf in flat.values()):
    raise _error(where, "some values are NaN or infinite", source)
  params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
  return Inception(source, {"params": params})


def from_torch_state_dict(state_dict: Mapping[str, Any], where: str = "state dict") -> Inception:
  """The FID network from pytorch-fid's state dict (`Mixed_5b.branch1x1.conv.weight`,
  `.bn.running_mean`, ...)."""

  def get(key: str) -> np.ndarray:
    if key not in state_dict:
      raise _error(where, f"missing {key!r}")
    return np.asarray(state_dict[key], np.float32)

  convs = {}
  for path in conv_shapes():
    prefix = ".".join(path)
    weight = get(f"{prefix}.conv.weight")
    if weight.ndim != 4:
      raise _error(
        where, f"{prefix}.conv.weight has shape {weight.shape}, expected (out, in, kh, kw)"
      )
    convs[path] = _fold(
      path,
      weight.transpose(2, 3, 1, 0),
      get(f"{prefix}.bn.weight"),
      get(f"{prefix}.bn.bias"),
      get(f"{prefix}.bn.running_mean"),
      get(f"{prefix}.bn.running_var"),
      where,
      "fid",
    )
  return _build(convs, get("fc.weight").T, get("fc.bias"), "fid", where)


def load_torch_pth(path: str | os.PathLike) -> Inception:
  """The FID network from `pt_inception-2015-12-05-6726825d.pth`
  (read with PyTorch, imported only here)."""
  missing_torch = InceptionWeightsError(
    f"reading {path} needs PyTorch, which is not installed: `pip install torch` (the CPU wheel is "
    f"enough), or use the Keras weights instead: `{fetch_command('keras')}`"
  )
  return from_torch_state_dict(
    weights.read_torch_state_dict(path, missing_torch, _error), str(path)
  )


def _numbered(layers: Mapping[str, Any], base: str) -> list[str]:
  """Layer names `base`, `base_1`, `base_2`, ... in Keras' creation order."""
  return sorted(
    (name for name in layers if re.fullmatch(rf"{base}(_\d+)?", name)), key=weights.keras_counter
  )


def load_keras_h5(path: str | os.PathLike) -> Inception:
  """The Keras network from `inception_v3_weights_tf_dim_ordering_tf_kernels.h5` (or a full-model
  save).

  Convolutions `conv2d_<i>` (kernel kh, kw, cin, cout) and BatchNorms `batch_normalization_<i>`
  (beta, moving_mean, moving_variance; no gamma) pair up by i in creation order; the classifier is
  `predictions`.
  """
  where = str(path)
  shapes = conv_shapes()
  layers = weights.read_keras_layers(path, lambda where, problem: _error(where, problem, "keras"))
  conv_names, bn_names = _numbered(layers, "conv2d"), _numbered(layers, "batch_normalization")
  if len(conv_names) != len(shapes) or len(bn_names) != len(shapes) or "predictions" not in layers:
    raise _error(
      where,
      f"has {len(conv_names)} conv2d and {len(bn_names)} batch_normalization layers "
      f"{'and' if 'predictions' in layers else 'and no'} 'predictions' layer; Keras' InceptionV3 "
      f"with top has {len(shapes)}, {len(shapes)} and one",
      "keras",
    )
  convs = {}
  for conv_path, conv_name, bn_name in zip(shapes, conv_names, bn_names):
    conv, bn = layers[conv_name], layers[bn_name]
    missing = [k for k in ("beta", "moving_mean", "moving_variance") if k not in bn]
    if "kernel" not in conv or missing:
      raise _error(
        where,
        f"layers {conv_name}/{bn_name} lack "
        f"{(['kernel'] if 'kernel' not in conv else []) + missing}",
        "keras",
      )
    convs[conv_path] = _fold(
      conv_path,
      conv["kernel"],
      bn.get("gamma"),
      bn["beta"],
      bn["moving_mean"],
      bn["moving_variance"],
      where,
      "keras",
    )
  dense = layers["predictions"]
  if "kernel" not in dense or "bias" not in dense:
    raise _error(where, "layer 'predictions' lacks its kernel or bias", "keras")
  return _build(convs, dense["kernel"], dense["bias"], "keras", where)


def save_npz(network: Inception, path: str | os.PathLike, *, origin_sha256: str) -> None:
  """Writes the compact file atomically; records the source ('fid'/'keras')
  and the original file's SHA-256."""
  flat = traverse_util.flatten_dict(network.variables["params"], sep="/")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".part")
  with open(partial, "wb") as f:
    np.savez(
      f,
      source=np.array(network.source),
      origin_sha256=np.array(origin_sha256),
      **{f"params/{key}": np.asarray(value) for key, value in flat.items()},
    )
  os.replace(partial, path)


def load_npz(path: str | os.PathLike) -> Inception:
  """The network from the project's compact file (see `save_npz`)."""
  where = str(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = dict(data)
  except (OSError, ValueError) as e:
    raise _error(where, f"cannot be read as a .npz file ({e})") from e
  source = str(arrays.get("source", ""))
  if source not in SOURCES:
    raise _error(where, f"records source {source!r}, expected one of {sorted(SOURCES)}")
  logging.info(
    "Inception-v3 weights %s (source: %s, SHA-256 of the converted file: %s)",
    where,
    source,
    arrays.get("origin_sha256", "not recorded"),
  )
  missing = [
    f"params/{'/'.join(p)}/{k}"
    for p in conv_shapes()
    for k in ("kernel", "bias")
    if f"params/{'/'.join(p)}/{k}" not in arrays
  ]
  missing += [key for key in ("params/fc/kernel", "params/fc/bias") if key not in arrays]
  if missing:
    raise _error(where, f"missing arrays {missing[:4]}{' ...' if len(missing) > 4 else ''}", source)
  convs = {
    p: {k: arrays[f"params/{'/'.join(p)}/{k}"] for k in ("kernel", "bias")} for p in conv_shapes()
  }
  return _build(convs, arrays["params/fc/kernel"], arrays["params/fc/bias"], source, where)


FILES = weights.WeightFiles(
  network="Inception",
  torch_format="fid",
  torch_label="pytorch-fid",
  loaders={"fid": load_torch_pth, "keras": load_keras_h5, "npz": load_npz},
  config_field="config.eval.inception_weights",
  fetch_command=fetch_command,
  error=InceptionWeightsError,
)


def load(path: str | os.PathLike) -> Inception:
  """The network from a .npz, .pth/.pt or .h5/.hdf5 file, chosen by suffix. Raises
  InceptionWeightsError."""
  return FILES.load(path)


# --------------------------------------------------------------------------------------------------
# Cache, download and conversion.


def cached_path(source: str) -> Path:
  """Where `fetch`/`convert` put the compact file for `source` ("fid" or "keras")."""
  if source not in SOURCES:
    raise ValueError(
      f"unknown Inception weight source {source!r}; expected one of {sorted(SOURCES)}"
    )
  return weights.cache_dir() / f"inception_v3_{source}.npz"


def missing_weights_message() -> str:
  """Why the Inception columns are empty and how to fill them."""
  return (
    "no Inception-v3 weights: config.eval.inception_weights is unset and the cache "
    f"{weights.cache_dir()} holds "
    f"neither {cached_path('fid').name} nor {cached_path('keras').name}; run `{fetch_command()}` "
    f"(or `{fetch_command('keras')}`)"
  )


def resolve(path: str | os.PathLike | None) -> Inception | None:
  """The network from `path` (config.eval.inception_weights) if given (it must load), else from the
  cache (FID weights first, then Keras'), else None."""
  if path is None:
    path = next((cached_path(source) for source in SOURCES if cached_path(source).is_file()), None)
    if path is None:
      return None
  logging.info("Inception-v3 weights for the Inception score and FID: %s", path)
  return load(path)


def fetch(source: str, *, url: str | None = None, sha256: str | None = None) -> Path:
  """Downloads `source`'s published file, verifies it, converts it to the compact file in the cache;
  returns it.

  `url` replaces the published URL (a mirror or a local `file://` copy); `sha256` replaces the
  published checksums, which are otherwise required (pytorch-fid: SHA-256; Keras: MD5, the only hash
  Keras publishes).
  """
  spec = SOURCES.get(source)
  if spec is None:
    raise ValueError(
      f"unknown Inception weight source {source!r}; expected one of {sorted(SOURCES)}"
    )
  # Fail before the download, not after.
  if source == "fid" and importlib.util.find_spec("torch") is None:
    raise InceptionWeightsError(
      f"converting pytorch-fid's .pth needs PyTorch: `pip install torch` (CPU wheel), or run "
      f"`{fetch_command('keras')}` instead"
    )
  out = cached_path(source)
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    raw = Path(tmp) / spec.filename
    digests = weights.download(
      url or spec.url, raw, {"sha256": sha256} if sha256 else spec.checksums, InceptionWeightsError
    )
    save_npz(FILES.loaders[source](raw), out, origin_sha256=digests["sha256"])
  return out


def convert(path: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
  """Converts a local .pth/.h5 file to the compact file (default:
  the cache's) and returns the output path."""
  path = Path(path).expanduser()
  if FILES.format_of(path) == "npz":
    raise InceptionWeightsError(
      f"{path} is already a compact .npz file; use it as config.eval.inception_weights"
    )
  network = load(path)
  digests = weights.check_canonical(path, SOURCES[network.source])
  out = Path(output) if output is not None else cached_path(network.source)
  save_npz(network, out, origin_sha256=digests["sha256"])
  return out


def main(argv: Sequence[str] | None = None) -> int:
  return weights.main(
    argv,
    network="Inception-v3 (IScore and FID)",
    prog="python -m pconv_jax.inception",
    sources=SOURCES,
    fetch=fetch,
    convert=convert,
    cache_name="inception_v3_<source>.npz",
  )


if __name__ == "__main__":
  sys.exit(main())
