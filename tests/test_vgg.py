"""VGG-16 features and weight loading, against a float64 NumPy oracle written from the definitions.

Random VGG-16 weights are written by the tests themselves to every supported format (torchvision
.pth with torch, Keras .h5 with h5py in both naming schemes, the project's .npz). The helpers here
are also used by test_losses.py. Nothing is downloaded: the fetch command is exercised with file://
and a 127.0.0.1 server.
"""

import functools
import hashlib
import http.server
import importlib.util
from pathlib import Path
import sys
import threading

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pconv_jax import vgg, weights
from pconv_jax.kernels import CpuKernels, winograd

# The architecture and the sources' conventions, written out independently of pconv_jax.vgg.
LAYERS = (
  ("conv1_1", 3, 64),
  ("conv1_2", 64, 64),
  ("conv2_1", 64, 128),
  ("conv2_2", 128, 128),
  ("conv3_1", 128, 256),
  ("conv3_2", 256, 256),
  ("conv3_3", 256, 256),
)
POOL_AFTER = (1, 3, 6)  # pool1 after conv1_2, pool2 after conv2_2, pool3 after conv3_3.
TORCH_INDEX = (0, 2, 5, 7, 10, 12, 14)
KERAS_LAYERS = (
  "block1_conv1",
  "block1_conv2",
  "block2_conv1",
  "block2_conv2",
  "block3_conv1",
  "block3_conv2",
  "block3_conv3",
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
CAFFE_BGR = np.array([103.939, 116.779, 123.68])
FORMATS = ("torchvision", "keras_w1", "keras_kernel0", "npz")


def random_network(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """He-initialised (kernel (cout, cin, 3, 3), bias) per layer, float32: torchvision's layout."""
  rng = np.random.default_rng(seed)
  return [
    (
      rng.normal(0.0, np.sqrt(2.0 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32),
      rng.normal(0.0, 0.1, cout).astype(np.float32),
    )
    for _, cin, cout in LAYERS
  ]


def to_hwio(network):
  return [(np.ascontiguousarray(k.transpose(2, 3, 1, 0)), b) for k, b in network]


def write_pth(network, path: Path) -> Path:
  torch = pytest.importorskip("torch")
  state = {}
  for index, (kernel, bias) in zip(TORCH_INDEX, network):
    state[f"features.{index}.weight"] = torch.from_numpy(kernel)
    state[f"features.{index}.bias"] = torch.from_numpy(bias)
  state["classifier.6.bias"] = torch.zeros(1000)  # Present in the real file, ignored by the loader.
  torch.save(state, path)
  return path


def write_h5(network_hwio, path: Path, naming: str) -> Path:
  """Keras layout. naming "w1": the published file (`block1_conv1_W_1:0`, top level); "kernel0": a
  later Keras 2 full-model save (`model_weights/block1_conv1/block1_conv1/kernel:0`)."""
  with h5py.File(path, "w") as f:
    root = f if naming == "w1" else f.create_group("model_weights")
    names = ["input_1"] + list(KERAS_LAYERS)
    root.attrs["layer_names"] = [n.encode() for n in names]
    root.create_group("input_1").attrs["weight_names"] = []
    for layer, (kernel, bias) in zip(KERAS_LAYERS, network_hwio):
      group = root.create_group(layer)
      weight_names = (
        [f"{layer}_W_1:0", f"{layer}_b_1:0"]
        if naming == "w1"
        else [f"{layer}/kernel:0", f"{layer}/bias:0"]
      )
      group.attrs["weight_names"] = [n.encode() for n in weight_names]
      group.create_dataset(weight_names[0], data=kernel)
      group.create_dataset(weight_names[1], data=bias)
  return path


def write_npz(network_hwio, path: Path) -> Path:
  """The compact layout as documented in pconv_jax.vgg, with torchvision's normalisation."""
  arrays = {}
  for (name, _, _), (kernel, bias) in zip(LAYERS, network_hwio):
    arrays[f"params/{name}/kernel"] = kernel
    arrays[f"params/{name}/bias"] = bias
  arrays["normalization/scale"] = (0.5 / IMAGENET_STD).astype(np.float32)
  arrays["normalization/offset"] = ((0.5 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  np.savez(path, **arrays)
  return path


def write_format(network, fmt: str, directory: Path) -> Path:
  if fmt == "torchvision":
    return write_pth(network, directory / "vgg16.pth")
  if fmt == "npz":
    return write_npz(to_hwio(network), directory / "vgg16.npz")
  naming = fmt.split("_")[1]
  return write_h5(to_hwio(network), directory / f"vgg16_{naming}.h5", naming)


def oracle_normalize(images: np.ndarray, source: str) -> np.ndarray:
  """Model images ([-1, 1], RGB) -> the source network's input, float64."""
  x = images.astype(np.float64)
  if source == "torchvision":
    return ((x + 1.0) / 2.0 - IMAGENET_MEAN) / IMAGENET_STD
  return ((x + 1.0) * 127.5)[..., ::-1] - CAFFE_BGR  # Keras: BGR, [0, 255], Caffe mean.


def oracle_conv_relu(x: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray) -> np.ndarray:
  _, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel_hwio.shape[-1],)) + bias.astype(np.float64)
  for i in range(3):
    for j in range(3):
      out += padded[:, i : i + h, j : j + w, :] @ kernel_hwio[i, j].astype(np.float64)
  return np.maximum(out, 0.0)


def oracle_pool(x: np.ndarray) -> np.ndarray:
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def oracle_features(images: np.ndarray, network_hwio, source: str) -> list[np.ndarray]:
  """[pool1, pool2, pool3] in float64, for a network whose
  conv1_1 expects the source's own input."""
  x = oracle_normalize(images, source)
  pools = []
  for index, (kernel, bias) in enumerate(network_hwio):
    x = oracle_conv_relu(x, kernel, bias)
    if index in POOL_AFTER:
      x = oracle_pool(x)
      pools.append(x)
  return pools


def oracle_for_format(network, fmt: str):
  """A function images -> oracle features for the weights as written by `write_format`."""
  source = "keras" if fmt.startswith("keras") else "torchvision"
  return functools.partial(oracle_features, network_hwio=to_hwio(network), source=source)


@pytest.fixture(scope="session")
def network():
  return random_network(seed=0)


@pytest.fixture(scope="session")
def weight_files(network, tmp_path_factory):
  """{format: path} with the same random weights in every supported
  format (torchvision skipped without torch)."""
  directory = tmp_path_factory.mktemp("vgg_weights")
  files = {}
  for fmt in FORMATS:
    if fmt == "torchvision" and not _has_torch():
      continue
    files[fmt] = write_format(network, fmt, directory)
  return files


def _has_torch() -> bool:
  return importlib.util.find_spec("torch") is not None


def _path(weight_files, fmt: str) -> Path:
  if fmt not in weight_files:
    pytest.skip("torch is not installed")
  return weight_files[fmt]


def assert_features_close(actual, expected, rtol=1e-4):
  for a, e in zip(actual, expected, strict=True):
    a = np.asarray(a, np.float64)
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_features_match_float64_oracle(network, weight_files, fmt):
  # Odd pool3 size: 4x5.
  images = np.random.default_rng(1).uniform(-1, 1, (2, 36, 44, 3)).astype(np.float32)
  variables = vgg.load_variables(_path(weight_files, fmt))
  features = vgg.VGG16Features().apply(variables, jnp.asarray(images))
  assert [f.shape for f in features] == [(2, 18, 22, 64), (2, 9, 11, 128), (2, 4, 5, 256)]
  assert_features_close(features, oracle_for_format(network, fmt)(images))


def test_cpu_engine_features_match_float64_oracle(network, weight_files):
  """At 132x136 the conv2 and conv3 blocks run as Winograd convolutions in the CPU engine, and
  pooling and the other layers by its rules (pconv_jax/kernels/cpu.py)."""
  images = np.random.default_rng(4).uniform(-1, 1, (1, 132, 136, 3)).astype(np.float32)
  assert winograd.is_faster((1, 33, 34, 128), (3, 3, 128, 256), jnp.float32)
  variables = vgg.load_variables(weight_files["npz"])
  features = jax.jit(vgg.VGG16Features(kernels=CpuKernels()).apply)(variables, jnp.asarray(images))
  assert_features_close(features, oracle_for_format(network, "npz")(images))


def test_keras_and_torchvision_files_give_same_features(network, tmp_path):
  """One network written in each source's convention (layout, BGR order, normalisation) gives the
  same features.

  The Keras conv1_1 kernel is the torchvision one re-expressed for Caffe's input: channels reversed
  to BGR and divided by 255 * std. This is exact, zero padding included, when every kernel tap is
  orthogonal to d = (caffe_mean / 255 - mean) / std, the torchvision input at which the Keras input
  is zero.
  """
  torch_net = [(k.copy(), b) for k, b in network]
  kernel = torch_net[0][0].astype(np.float64)
  d = (CAFFE_BGR[::-1] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  kernel -= np.einsum("ocij,c->oij", kernel, d)[:, None] * d[None, :, None, None] / (d @ d)
  torch_net[0] = (kernel.astype(np.float32), torch_net[0][1])
  keras_net = to_hwio(torch_net)
  keras_kernel = kernel / (255.0 * IMAGENET_STD)[None, :, None, None]
  keras_net[0] = (
    np.ascontiguousarray(keras_kernel.transpose(2, 3, 1, 0)[:, :, ::-1, :]).astype(np.float32),
    torch_net[0][1],
  )

  images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  keras_variables = vgg.load_variables(write_h5(keras_net, tmp_path / "keras.h5", "w1"))
  keras_features = vgg.VGG16Features().apply(keras_variables, images)
  if _has_torch():
    torch_variables = vgg.load_variables(write_pth(torch_net, tmp_path / "torch.pth"))
  else:
    torch_variables = vgg.from_torchvision_state_dict(
      {
        f"features.{i}.{kind}": array
        for i, (k, b) in zip(TORCH_INDEX, torch_net)
        for kind, array in (("weight", k), ("bias", b))
      }
    )
  torch_features = vgg.VGG16Features().apply(torch_variables, images)
  assert_features_close(
    keras_features, [np.asarray(f, np.float64) for f in torch_features], rtol=2e-4
  )
  # And the per-source normalisations really differ (the equality above is not trivial).
  assert not np.allclose(
    keras_variables["normalization"]["offset"], torch_variables["normalization"]["offset"]
  )


def test_bfloat16_features_close_to_float32(weight_files):
  variables = vgg.load_variables(weight_files["npz"])
  images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  full = vgg.VGG16Features().apply(variables, images)
  half = vgg.VGG16Features(dtype=jnp.bfloat16).apply(variables, images)
  for f, h in zip(full, half):
    assert h.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(h, np.float32), f, rtol=0.05, atol=0.05 * float(jnp.abs(f).max())
    )


def test_random_initialisation_is_refused():
  with pytest.raises(vgg.VGGWeightsError, match="never randomly initialised"):
    vgg.VGG16Features().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("fmt", ["torchvision", "keras_w1"])
def test_convert_command_writes_the_compact_file(weight_files, fmt, tmp_path):
  source = _path(weight_files, fmt)
  out = tmp_path / "compact.npz"
  assert vgg.main(["convert", str(source), "--output", str(out)]) == 0
  direct, converted = vgg.load_variables(source), vgg.load_variables(out)
  jax.tree.map(np.testing.assert_array_equal, direct, converted)
  assert str(np.load(out)["source"]) == ("torchvision" if fmt == "torchvision" else "keras")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("PCONV_JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert weights.cache_dir() == tmp_path / "xdg" / "pconv_jax"
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "mine"))
  assert vgg.cached_path("keras") == tmp_path / "mine" / "vgg16_pool3_keras.npz"


def test_resolve_weights(monkeypatch, tmp_path, weight_files, caplog):
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(vgg.VGGWeightsError) as error:
    vgg.resolve_weights(None, required=True)
  assert "python -m pconv_jax.vgg fetch torchvision" in str(error.value)
  assert str(tmp_path / "cache") in str(error.value)

  assert vgg.resolve_weights(None, required=False) is None
  assert "WITHOUT the perceptual and style losses" in caplog.text

  with pytest.raises(vgg.VGGWeightsError, match="python -m pconv_jax.vgg fetch"):
    vgg.resolve_weights(tmp_path / "nowhere.npz", required=False)  # A configured path must exist.

  explicit = vgg.resolve_weights(str(weight_files["keras_w1"]), required=True)
  assert vgg.main(["convert", str(weight_files["keras_w1"])]) == 0  # Default output: the cache.
  cached = vgg.resolve_weights(None, required=True)
  jax.tree.map(np.testing.assert_array_equal, explicit, cached)


def _corrupt(kind: str, network, directory: Path) -> Path:
  hwio = to_hwio(network)
  if kind == "npz_wrong_shape":
    hwio[2] = (hwio[2][0][:, :, :32], hwio[2][1])
    return write_npz(hwio, directory / "bad.npz")
  if kind == "npz_missing_layer":
    path = write_npz(hwio, directory / "bad.npz")
    arrays = dict(np.load(path))
    del arrays["params/conv3_3/bias"]
    np.savez(path, **arrays)
    return path
  if kind == "h5_theano_layout":
    return write_h5([(k.transpose(3, 2, 0, 1), b) for k, b in hwio], directory / "bad.h5", "w1")
  if kind == "h5_not_hdf5":
    (directory / "bad.h5").write_bytes(b"not an hdf5 file")
    return directory / "bad.h5"
  if kind == "pth_missing_layer":
    path = write_pth(network, directory / "bad.pth")
    torch = pytest.importorskip("torch")
    state = torch.load(path, weights_only=True)
    del state["features.14.weight"]
    torch.save(state, path)
    return path
  if kind == "unknown_suffix":
    (directory / "weights.bin").write_bytes(b"")
    return directory / "weights.bin"
  return directory / "missing.h5"


@pytest.mark.parametrize(
  "kind",
  [
    "npz_wrong_shape",
    "npz_missing_layer",
    "h5_theano_layout",
    "h5_not_hdf5",
    "pth_missing_layer",
    "unknown_suffix",
    "missing_file",
  ],
)
def test_bad_weight_files_raise_one_clear_error(kind, network, tmp_path):
  path = _corrupt(kind, network, tmp_path)
  with pytest.raises(vgg.VGGWeightsError, match="python -m pconv_jax.vgg fetch"):
    vgg.load_variables(path)


def test_pth_without_torch_says_how_to_install(weight_files, monkeypatch):
  path = _path(weight_files, "torchvision")
  monkeypatch.setitem(sys.modules, "torch", None)  # Makes `import torch` raise ImportError.
  with pytest.raises(vgg.VGGWeightsError, match="pip install torch"):
    vgg.load_variables(path)


def test_published_checksums():
  # torch.hub's name prefix.
  assert vgg.SOURCES["torchvision"].checksums["sha256"].startswith("397923af")
  assert vgg.SOURCES["torchvision"].filename == "vgg16-397923af.pth"
  assert vgg.SOURCES["keras"].checksums == {"md5": "6d6bbae143d832006294945121d1f1fc"}


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_server(tmp_path):
  """Serves tmp_path/"served" over HTTP on 127.0.0.1; yields the base URL."""
  served = tmp_path / "served"
  served.mkdir()

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # pylint: disable=arguments-differ
      pass

  server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served))
  )
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()
  thread.join()


def test_fetch_from_file_url(weight_files, monkeypatch, tmp_path):
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  source = weight_files["keras_w1"]
  out = vgg.fetch("keras", url=source.as_uri(), sha256=_sha256(source))
  assert out == tmp_path / "cache" / "vgg16_pool3_keras.npz"
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
    out.name
  ]  # The download was cleaned up.
  assert str(np.load(out)["origin_sha256"]) == _sha256(source)
  jax.tree.map(
    np.testing.assert_array_equal,
    vgg.load_variables(source),
    vgg.resolve_weights(None, required=True),
  )


def test_fetch_command_over_http(weight_files, monkeypatch, tmp_path, local_server):
  source = _path(weight_files, "torchvision")
  served, base_url = local_server
  (served / "vgg16-397923af.pth").write_bytes(source.read_bytes())
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  url = f"{base_url}/vgg16-397923af.pth"
  assert vgg.main(["fetch", "torchvision", "--url", url, "--sha256", _sha256(source)]) == 0
  jax.tree.map(
    np.testing.assert_array_equal,
    vgg.load_variables(source),
    vgg.load_variables(tmp_path / "cache" / "vgg16_pool3_torchvision.npz"),
  )


@pytest.mark.parametrize("checksum", ["given_sha256", "published_md5"])
def test_fetch_refuses_a_wrong_checksum(
  weight_files, monkeypatch, tmp_path, local_server, capsys, checksum
):
  served, base_url = local_server
  (served / "weights.h5").write_bytes(weight_files["keras_w1"].read_bytes())
  monkeypatch.setenv("PCONV_JAX_CACHE", str(tmp_path / "cache"))
  argv = ["fetch", "keras", "--url", f"{base_url}/weights.h5"]
  if checksum == "given_sha256":
    argv += ["--sha256", "0" * 64]
  # Without --sha256 the published Keras MD5 applies, which a test file cannot match.
  assert vgg.main(argv) == 1
  assert "checksum mismatch" in capsys.readouterr().err
  assert list((tmp_path / "cache").iterdir()) == []  # Nothing cached, no partial download left.
