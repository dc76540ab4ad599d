"""The blog post's PyTorch PConv U-Net (layout `blog`) -> Flax: identical outputs in eval and
training mode, clear errors, and the CLI's orbax checkpoint. (The other projects' layouts:
test_published.py.)"""

import functools
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pconv_jax import checkpoints, convert, models, published

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402  (imports torch)

ROOT = Path(__file__).resolve().parents[1]


def inputs(size, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, size, size, 3))
  masks = np.ones((batch, size, size, 1))
  masks[0, size // 4 : size // 2, size // 8 : 3 * size // 4] = 0
  masks[1, size // 2 :, : size // 3] = 0
  masks[1, : size // 5] = 0
  return images, masks


def torch_forward(net, images, masks, dtype):
  def to_torch(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dtype)

  with torch.no_grad():
    out = net.to(dtype).eval()(to_torch(images), to_torch(np.repeat(masks, 3, axis=-1)))
  return out.numpy().transpose(0, 2, 3, 1)


def from_state_dict(state_dict, dtype=np.float32):
  """The Flax variables of a state dict, its layout recognised."""
  layout, _, variables = convert.convert_weights(published.clean(state_dict), "torch", dtype=dtype)
  assert layout.name == "blog"
  return variables


@pytest.fixture(scope="module")
def paper_net():
  return torch_reference.randomize(torch_reference.TorchPUNet(), seed=0)


def test_float64_outputs_match_to_1e8(paper_net):
  images, masks = inputs(128)
  want = torch_forward(paper_net, images, masks, torch.float64)
  assert np.mean(np.abs(want) > 0.99) < 0.1  # tanh not saturated: the comparison is meaningful.
  with jax.enable_x64(True):
    variables = from_state_dict(paper_net.double().state_dict(), dtype=np.float64)
    got = jax.jit(models.PUNet(dtype=jnp.float64).apply)(variables, images, masks)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-8)


def test_train_mode_outputs_and_batchnorm_statistics_match_in_float64():
  """One training-mode forward: batch statistics, PyTorch's momentum
  and its unbiased running variance."""
  net = torch_reference.randomize(torch_reference.TorchPUNet(), seed=5).double()
  images, masks = inputs(128, seed=3)
  variables = from_state_dict(net.state_dict(), dtype=np.float64)
  net.train()
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  with torch.no_grad():
    want = (
      net(to_torch(images), to_torch(np.repeat(masks, 3, axis=-1))).numpy().transpose(0, 2, 3, 1)
    )
  want_stats = from_state_dict(net.state_dict(), dtype=np.float64)["batch_stats"]
  with jax.enable_x64(True):
    apply = jax.jit(
      functools.partial(models.PUNet(dtype=jnp.float64).apply, train=True, mutable=["batch_stats"])
    )
    got, updates = apply(variables, images, masks)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-8)
    jax.tree.map(
      lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-10, atol=1e-12),
      updates["batch_stats"],
      want_stats,
    )
  # The bottleneck (1x1 per image, batch 2) is where the unbiased correction matters most: n/(n-1) =
  # 2.
  assert not np.allclose(
    want_stats["encoder"]["block_7"]["bn"]["var"],
    variables["batch_stats"]["encoder"]["block_7"]["bn"]["var"],
  )


def test_float32_outputs_match(paper_net):
  """Tolerance: on this input PyTorch's own float32 forward differs from its float64 one by 1.2e-5
  at most and 1.7e-7 on average (14 layers of up to 9216-term sums and BatchNorm); ours measured
  1.1e-5 and 2.3e-7. A wrong layout, mask rule or BatchNorm constant shows up at O(1e-2) or more."""
  images, masks = inputs(128, seed=1)
  want = torch_forward(paper_net, images, masks, torch.float64)
  variables = from_state_dict(paper_net.state_dict())
  got = np.asarray(
    jax.jit(models.PUNet().apply)(variables, images.astype(np.float32), masks.astype(np.float32))
  )
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
  assert np.abs(got - want).mean() < 1e-6


def test_custom_width_network_is_detected_and_converted():
  net = torch_reference.randomize(
    torch_reference.TorchPUNet(depth=3, features=(8, 16, 16), kernel_sizes=(5, 3, 3)), seed=3
  )
  state = {"module." + k: v for k, v in net.state_dict().items()}  # DataParallel prefix.
  _, config, variables = convert.convert_weights(published.clean(state), "torch")
  assert config == {"depth": 3, "features": [8, 16, 16], "kernel_sizes": [5, 3, 3], "partial": True}
  assert models.architecture(config) == models.architecture(
    {"depth": 3, "features": (8, 16, 16), "kernel_sizes": (5, 3, 3)}
  )  # The paper's variant: every other field at PUNet's default.
  images, masks = inputs(16, seed=2)
  got = jax.jit(models.create_model(config).apply)(
    variables, images.astype(np.float32), masks.astype(np.float32)
  )
  np.testing.assert_allclose(got, torch_forward(net, images, masks, torch.float64), atol=1e-5)


def small_state_dict():
  net = torch_reference.TorchPUNet(depth=2, features=(4, 8), kernel_sizes=(3, 3))
  return {k: v.numpy() for k, v in net.state_dict().items()}


def test_unknown_missing_and_misshaped_keys_are_listed():
  state = small_state_dict()
  state["ec_images_2.extra.weight"] = np.zeros(3)
  del state["dc_images_2.bn.running_var"]
  state["dc_images_1.conv.bias"] = np.zeros(5)
  with pytest.raises(published.ConversionError) as info:
    from_state_dict(state)
  message = str(info.value)
  assert "unexpected weights ['ec_images_2.extra.weight']" in message
  assert "nothing for ['batch_stats/decoder/block_2/bn/var']" in message
  assert "params/decoder/block_1/conv/bias (5,) (expected (3,))" in message


def test_not_a_punet_is_refused():
  with pytest.raises(published.ConversionError, match="Not a PConv U-Net layout this converter"):
    convert.convert_weights({"features.0.weight": np.zeros((64, 3, 3, 3))}, "torch")


def test_cli_writes_a_checkpoint_that_loads(tmp_path):
  net = torch_reference.randomize(
    torch_reference.TorchPUNet(depth=2, features=(4, 8), kernel_sizes=(3, 3)), 4
  )
  torch.save({"state_dict": net.state_dict()}, tmp_path / "net.pth")
  subprocess.run(
    [sys.executable, "-m", "pconv_jax.convert", str(tmp_path / "net.pth"), str(tmp_path / "ckpt")],
    check=True,
    capture_output=True,
    cwd=ROOT,
  )
  model, variables, meta = checkpoints.load_model(tmp_path / "ckpt")
  assert model.depth == 2 and tuple(model.features) == (4, 8) and meta["source"].endswith("net.pth")
  assert meta["layout"] == "blog"
  images, masks = inputs(8, seed=5)
  np.testing.assert_allclose(
    model.apply(variables, images.astype(np.float32), masks.astype(np.float32)),
    torch_forward(net, images, masks, torch.float64),
    atol=1e-5,
  )


def test_cli_reports_a_bad_file(tmp_path):
  torch.save({"weights": {"foo": torch.zeros(2)}}, tmp_path / "bad.pth")
  result = subprocess.run(
    [sys.executable, "-m", "pconv_jax.convert", str(tmp_path / "bad.pth"), str(tmp_path / "out")],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert result.returncode != 0
  assert "Not a PConv U-Net layout this converter knows" in result.stderr
  assert "naoto0804" in result.stderr and "Traceback" not in result.stderr
