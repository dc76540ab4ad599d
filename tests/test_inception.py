"""Inception-v3: loading random weights written here in pytorch-fid's
and Keras' layouts, against a PyTorch oracle."""

import hashlib
import importlib.util

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pconv_jax import inception

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

# Convolutions without padding in torchvision's Inception3 (every other one pads k // 2 per side).
UNPADDED = {
  "Conv2d_1a_3x3",
  "Conv2d_2a_3x3",
  "Conv2d_3b_1x1",
  "Conv2d_4a_3x3",
  "Mixed_6a.branch3x3",
  "Mixed_6a.branch3x3dbl_3",
  "Mixed_7a.branch3x3_2",
  "Mixed_7a.branch7x7x3_4",
}


def random_state_dict(
  seed: int, num_classes: int, with_gamma: bool = True
) -> dict[str, np.ndarray]:
  """A pytorch-fid style state dict with random weights that keep
  activations O(1) through the network."""
  rng = np.random.default_rng(seed)
  state = {}
  for path, (kh, kw, cin, cout) in inception.conv_shapes().items():
    prefix = ".".join(path)
    state[f"{prefix}.conv.weight"] = rng.normal(
      0, np.sqrt(2 / (kh * kw * cin)), (cout, cin, kh, kw)
    )
    state[f"{prefix}.bn.weight"] = rng.uniform(0.5, 1.5, cout) if with_gamma else np.ones(cout)
    state[f"{prefix}.bn.bias"] = rng.normal(0, 0.1, cout)
    state[f"{prefix}.bn.running_mean"] = rng.normal(0, 0.1, cout)
    state[f"{prefix}.bn.running_var"] = rng.uniform(0.5, 1.5, cout)
  state["fc.weight"] = rng.normal(0, 0.05, (num_classes, 2048))
  state["fc.bias"] = rng.normal(0, 0.1, num_classes)
  return {key: value.astype(np.float32) for key, value in state.items()}


def write_pth(state, path):
  torch = pytest.importorskip("torch")
  torch.save({key: torch.from_numpy(value) for key, value in state.items()}, path)
  return path


def write_h5(state, path, full_model_save=False):
  """Keras 2 layout: `conv2d_<i>/conv2d_<i>/kernel:0`, `batch_normalization_<i>/.../beta:0` (no
  gamma), with i in Keras' creation order, written in reverse so that only the numbers can give the
  order."""
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if full_model_save else f
    layers = []
    for i, path_ in enumerate(inception.conv_shapes(), start=1):
      prefix = ".".join(path_)
      layers.append(
        (f"conv2d_{i}", {"kernel": state[f"{prefix}.conv.weight"].transpose(2, 3, 1, 0)})
      )
      layers.append(
        (
          f"batch_normalization_{i}",
          {
            "beta": state[f"{prefix}.bn.bias"],
            "moving_mean": state[f"{prefix}.bn.running_mean"],
            "moving_variance": state[f"{prefix}.bn.running_var"],
          },
        )
      )
    layers.append(("predictions", {"kernel": state["fc.weight"].T, "bias": state["fc.bias"]}))
    for name, weights in reversed(layers):
      group = root.create_group(name)
      group.attrs["weight_names"] = [f"{name}/{key}:0".encode() for key in weights]
      for key, value in weights.items():
        group.create_dataset(f"{name}/{key}:0", data=value)
    root.attrs["layer_names"] = [name.encode() for name, _ in layers]
  return path


def torch_oracle(state, images, size, last_max_pool):
  """pytorch-fid's forward pass (resize, 2x - 1, Inception-v3 blocks, pool, fc) with
  torch.nn.functional."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  sd = {key: torch.from_numpy(value).double() for key, value in state.items()}

  def conv(x, name, stride=1):
    weight = sd[f"{name}.conv.weight"]
    padding = 0 if name in UNPADDED else (weight.shape[2] // 2, weight.shape[3] // 2)
    x = F.conv2d(x, weight, stride=stride, padding=padding)
    x = F.batch_norm(
      x,
      sd[f"{name}.bn.running_mean"],
      sd[f"{name}.bn.running_var"],
      sd[f"{name}.bn.weight"],
      sd[f"{name}.bn.bias"],
      training=False,
      eps=1e-3,
    )
    return F.relu(x)

  def chain(x, block, *names):
    for name in names:
      x = conv(x, f"{block}.{name}")
    return x

  def avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  x = torch.from_numpy(images.transpose(0, 3, 1, 2)).double()
  x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1
  x = conv(conv(conv(x, "Conv2d_1a_3x3", 2), "Conv2d_2a_3x3"), "Conv2d_2b_3x3")
  x = F.max_pool2d(x, 3, 2)
  x = F.max_pool2d(conv(conv(x, "Conv2d_3b_1x1"), "Conv2d_4a_3x3"), 3, 2)
  for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = torch.cat(
      [
        chain(x, b, "branch1x1"),
        chain(x, b, "branch5x5_1", "branch5x5_2"),
        chain(x, b, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
        chain(avg(x), b, "branch_pool"),
      ],
      1,
    )
  x = torch.cat(
    [
      conv(x, "Mixed_6a.branch3x3", 2),
      conv(chain(x, "Mixed_6a", "branch3x3dbl_1", "branch3x3dbl_2"), "Mixed_6a.branch3x3dbl_3", 2),
      F.max_pool2d(x, 3, 2),
    ],
    1,
  )
  for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = torch.cat(
      [
        chain(x, b, "branch1x1"),
        chain(x, b, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
        chain(x, b, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
        chain(avg(x), b, "branch_pool"),
      ],
      1,
    )
  x = torch.cat(
    [
      conv(conv(x, "Mixed_7a.branch3x3_1"), "Mixed_7a.branch3x3_2", 2),
      conv(
        chain(x, "Mixed_7a", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3"),
        "Mixed_7a.branch7x7x3_4",
        2,
      ),
      F.max_pool2d(x, 3, 2),
    ],
    1,
  )
  for b, max_pool in (("Mixed_7b", False), ("Mixed_7c", last_max_pool)):
    b3 = conv(x, f"{b}.branch3x3_1")
    bd = chain(x, b, "branch3x3dbl_1", "branch3x3dbl_2")
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else avg(x)
    x = torch.cat(
      [
        conv(x, f"{b}.branch1x1"),
        conv(b3, f"{b}.branch3x3_2a"),
        conv(b3, f"{b}.branch3x3_2b"),
        conv(bd, f"{b}.branch3x3dbl_3a"),
        conv(bd, f"{b}.branch3x3dbl_3b"),
        conv(pooled, f"{b}.branch_pool"),
      ],
      1,
    )
  features = x.mean(dim=(2, 3))
  return features.numpy(), (features @ sd["fc.weight"].T + sd["fc.bias"]).numpy()


def images(seed=0, batch=2, size=64):
  return np.random.default_rng(seed).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)


def assert_close(actual, expected, rtol=2e-3):
  actual = np.asarray(actual, np.float64)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_convolutions_in_keras_creation_order():
  """Keras names conv2d_<i> in creation order; spot checks from
  keras-applications' inception_v3.py."""
  shapes = inception.conv_shapes()
  paths = [".".join(p) for p in shapes]
  assert len(paths) == 94
  assert paths[:5] == [
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
  ]
  assert paths[26] == "Mixed_6a.branch3x3" and shapes[tuple(paths[26].split("."))] == (
    3,
    3,
    288,
    384,
  )
  assert paths[32] == "Mixed_6b.branch7x7_2" and shapes[("Mixed_6b", "branch7x7_2")] == (
    1,
    7,
    128,
    128,
  )
  assert paths[35] == "Mixed_6b.branch7x7dbl_2" and shapes[("Mixed_6b", "branch7x7dbl_2")] == (
    7,
    1,
    128,
    128,
  )
  assert paths[85:] == [
    f"Mixed_7c.{n}"
    for n in (
      "branch1x1",
      "branch3x3_1",
      "branch3x3_2a",
      "branch3x3_2b",
      "branch3x3dbl_1",
      "branch3x3dbl_2",
      "branch3x3dbl_3a",
      "branch3x3dbl_3b",
      "branch_pool",
    )
  ]
  assert shapes[("Mixed_7c", "branch_pool")] == (1, 1, 2048, 192)


@needs_torch
def test_fid_weights_match_pytorch_oracle(tmp_path):
  state = random_state_dict(0, num_classes=1008)
  network = inception.load(write_pth(state, tmp_path / "pt_inception.pth"))
  assert network.source == "fid" and network.num_classes == 1008
  batch = images(size=64)
  features, logits = jax.jit(network.__call__)(jnp.asarray(batch))
  assert features.shape == (2, 2048) and logits.shape == (2, 1008)
  want_features, want_logits = torch_oracle(state, batch, 299, last_max_pool=True)
  assert_close(features, want_features)
  assert_close(logits, want_logits)


@needs_torch
@pytest.mark.parametrize("full_model_save", [False, True])
def test_keras_weights_match_pytorch_oracle(tmp_path, full_model_save):
  state = random_state_dict(1, num_classes=1000, with_gamma=False)  # Keras' BatchNorm has no scale.
  network = inception.load(write_h5(state, tmp_path / "keras.h5", full_model_save))
  assert network.source == "keras" and network.num_classes == 1000
  batch = images(seed=1, size=80)
  size = 107  # Any size >= 75 works; a small one keeps the test fast.
  features, logits = network.module(size).apply(network.variables, jnp.asarray(batch))
  assert features.shape == (2, 2048) and logits.shape == (2, 1000)
  want_features, want_logits = torch_oracle(state, batch, size, last_max_pool=False)
  assert_close(features, want_features)
  assert_close(logits, want_logits)


@needs_torch
def test_same_weights_in_both_formats_load_identically(tmp_path):
  state = random_state_dict(2, num_classes=1000, with_gamma=False)
  from_pth = inception.load(write_pth(state, tmp_path / "w.pth"))
  from_h5 = inception.load(write_h5(state, tmp_path / "w.h5"))
  jax.tree.map(np.testing.assert_array_equal, from_pth.variables, from_h5.variables)


def test_convert_round_trip_and_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  assert inception.resolve(None) is None
  assert "python -m pconv_jax.inception fetch fid" in inception.missing_weights_message()
  source = write_h5(random_state_dict(3, num_classes=1000, with_gamma=False), tmp_path / "k.h5")
  assert inception.main(["convert", str(source)]) == 0
  cached = inception.resolve(None)
  assert cached.source == "keras"
  jax.tree.map(np.testing.assert_array_equal, inception.load(source).variables, cached.variables)
  assert str(np.load(inception.cached_path("keras"))["origin_sha256"]) == _sha256(source)


def test_fetch_from_file_url(tmp_path, monkeypatch):
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  source = write_h5(random_state_dict(4, num_classes=1000, with_gamma=False), tmp_path / "k.h5")
  out = inception.fetch("keras", url=source.as_uri(), sha256=_sha256(source))
  assert out == tmp_path / "cache" / "inception_v3_keras.npz"
  assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
  # The published MD5 cannot match.
  assert inception.main(["fetch", "keras", "--url", source.as_uri()]) == 1


def _sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _corrupt(kind, tmp_path):
  state = random_state_dict(5, num_classes=1000, with_gamma=False)
  if kind == "h5_missing_layer":
    path = write_h5(state, tmp_path / "bad.h5")
    with h5py.File(path, "a") as f:
      del f["conv2d_94"]
    return path
  if kind == "h5_wrong_shape":
    state["Mixed_5b.branch1x1.conv.weight"] = state["Mixed_5b.branch1x1.conv.weight"][:32]
    return write_h5(state, tmp_path / "bad.h5")
  if kind == "h5_not_hdf5":
    (tmp_path / "bad.h5").write_bytes(b"not an hdf5 file")
    return tmp_path / "bad.h5"
  if kind == "pth_missing_key":
    del state["Mixed_7c.branch_pool.bn.running_var"]
    return write_pth(state, tmp_path / "bad.pth")
  if kind == "npz_no_source":
    np.savez(tmp_path / "bad.npz", x=np.zeros(1))
    return tmp_path / "bad.npz"
  if kind == "unknown_suffix":
    (tmp_path / "w.bin").write_bytes(b"")
    return tmp_path / "w.bin"
  return tmp_path / "missing.pth"


@pytest.mark.parametrize(
  "kind",
  [
    "h5_missing_layer",
    "h5_wrong_shape",
    "h5_not_hdf5",
    "pth_missing_key",
    "npz_no_source",
    "unknown_suffix",
    "missing_file",
  ],
)
def test_bad_weight_files_raise_one_clear_error(kind, tmp_path):
  path = _corrupt(kind, tmp_path)
  with pytest.raises(inception.InceptionWeightsError, match="python -m pconv_jax.inception fetch"):
    inception.load(path)
