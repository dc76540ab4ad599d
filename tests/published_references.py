"""Independent references of the published PConv U-Nets, written from each project's formula and
architecture (not from pconv_jax), saving random weights in each project's own container and names.

Each `Reference` runs its project's own inference on uint8 images: its input normalisation and
channel order, its network (float64, NCHW), its composite, its conversion back to uint8. Test-only
(imports torch).
"""

import copy
import dataclasses
from typing import Callable

import h5py
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks.torch_reference import PartialConv2d

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
  if name == "relu":
    return F.relu(x)
  if name == "leaky":
    return F.leaky_relu(x, 0.2)
  return x


def _widths(features: tuple[int, ...]) -> list[tuple[int, int]]:
  """(cin, cout) of the encoder's levels for images of 3 channels."""
  return list(zip((3,) + tuple(features[:-1]), features))


def _decoder_widths(features: tuple[int, ...]) -> dict[int, tuple[int, int, int]]:
  """Decoder level -> (upsampled channels, skip channels, output channels)."""
  depth = len(features)
  return {
    i: (features[i - 1], features[i - 2] if i > 1 else 3, features[i - 2] if i > 1 else 3)
    for i in range(depth, 0, -1)
  }


def randomize(
  module: nn.Module, seed: int, last_conv_scale: float = 0.05, divides_by_count: bool = False
) -> nn.Module:
  """Random float32 weights (fan-in scaled), biases and BatchNorm statistics, in eval mode; the last
  convolution small so the output stays in its activation's informative range. `divides_by_count`:
  the layer divides by the window's count alone (naoto0804), so kernels are fan-in times larger for
  the same activations."""
  gen = torch.Generator().manual_seed(seed)
  convs = []
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
        fan_in = m.weight[0].numel()
        scale = (2.0 / fan_in) ** 0.5 * (fan_in if divides_by_count else 1)
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * scale)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        convs.append(m)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    convs[-1].weight.mul_(last_conv_scale)
  return module.eval()


# --------------------------------------------------------------------------------------------------
# naoto0804/pytorch-inpainting-with-partial-conv: output = (conv(X*M) - b) / sum(M) + b, 0 where
# sum(M) = 0, sum over Cin*k*k (an all-ones `mask_conv` stored in the weights); linear output;
# ImageNet mean/std.


class NaotoPartialConv(nn.Module):
  def __init__(self, cin: int, cout: int, k: int, stride: int, bias: bool):
    super().__init__()
    self.input_conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)
    self.mask_conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    nn.init.constant_(self.mask_conv.weight, 1.0)
    self.mask_conv.weight.requires_grad_(False)

  def forward(self, x, mask):
    out = self.input_conv(x * mask)
    bias = 0 if self.input_conv.bias is None else self.input_conv.bias.view(1, -1, 1, 1)
    with torch.no_grad():
      total = self.mask_conv(mask)
    holes = total == 0
    out = torch.where(
      holes, torch.zeros_like(out), (out - bias) / total.masked_fill(holes, 1) + bias
    )
    return out, (~holes).to(out.dtype)


class NaotoBlock(nn.Module):
  def __init__(self, cin, cout, k, stride, bn, activ, bias=False):
    super().__init__()
    self.conv = NaotoPartialConv(cin, cout, k, stride, bias)
    if bn:
      self.bn = nn.BatchNorm2d(cout)
    self.activ = activ

  def forward(self, x, mask):
    x, mask = self.conv(x, mask)
    if hasattr(self, "bn"):
      x = self.bn(x)
    return _activation(x, self.activ), mask


class NaotoUNet(nn.Module):
  def __init__(self, features, kernel_sizes):
    super().__init__()
    self.depth = len(features)
    for i, ((cin, cout), k) in enumerate(zip(_widths(features), kernel_sizes), 1):
      self.add_module(f"enc_{i}", NaotoBlock(cin, cout, k, 2, bn=i > 1, activ="relu"))
    for i, (up, skip, cout) in _decoder_widths(features).items():
      last = i == 1
      self.add_module(
        f"dec_{i}",
        NaotoBlock(up + skip, cout, 3, 1, bn=not last, activ=None if last else "leaky", bias=last),
      )

  def forward(self, x, mask):
    levels = [(x, mask)]
    for i in range(1, self.depth + 1):
      levels.append(getattr(self, f"enc_{i}")(*levels[-1]))
    h, h_mask = levels[-1]
    for i in range(self.depth, 0, -1):
      h = torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), levels[i - 1][0]], 1)
      h_mask = torch.cat(
        [F.interpolate(h_mask, scale_factor=2, mode="nearest"), levels[i - 1][1]], 1
      )
      h, h_mask = getattr(self, f"dec_{i}")(h, h_mask)
    return h


# --------------------------------------------------------------------------------------------------
# open-mmlab/mmagic: NVIDIA's formula with a stored all-ones `weight_mask_updater`; mmcv ConvModule
# names (`conv`, `bn`), a bias where a block has no norm; linear output; [-1, 1] in BGR.


class MMagicPartialConv(PartialConv2d):
  def __init__(self, cin, cout, k, stride, bias):
    super().__init__(cin, cout, k, stride, k // 2, bias=bias, multi_channel=True)
    self.register_buffer("weight_mask_updater", torch.ones(cout, cin, k, k))


class MMagicBlock(nn.Module):
  def __init__(self, cin, cout, k, stride, norm, activ):
    super().__init__()
    self.conv = MMagicPartialConv(cin, cout, k, stride, bias=not norm)
    if norm:
      self.bn = nn.BatchNorm2d(cout)
    self.activ = activ

  def forward(self, x, mask):
    x, mask = self.conv(x, mask)
    if hasattr(self, "bn"):
      x = self.bn(x)
    return _activation(x, self.activ), mask


class MMagicEncoderDecoder(nn.Module):
  def __init__(self, features, kernel_sizes):
    super().__init__()
    self.depth = len(features)
    self.encoder, self.decoder = nn.Module(), nn.Module()
    for i, ((cin, cout), k) in enumerate(zip(_widths(features), kernel_sizes), 1):
      self.encoder.add_module(f"enc{i}", MMagicBlock(cin, cout, k, 2, norm=i > 1, activ="relu"))
    for i, (up, skip, cout) in _decoder_widths(features).items():
      last = i == 1
      self.decoder.add_module(
        f"dec{i}",
        MMagicBlock(up + skip, cout, 3, 1, norm=not last, activ=None if last else "leaky"),
      )

  def forward(self, x, mask):
    levels = [(x, mask)]
    for i in range(1, self.depth + 1):
      levels.append(getattr(self.encoder, f"enc{i}")(*levels[-1]))
    h, h_mask = levels[-1]
    for i in range(self.depth, 0, -1):
      h = torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), levels[i - 1][0]], 1)
      h_mask = torch.cat(
        [F.interpolate(h_mask, scale_factor=2, mode="nearest"), levels[i - 1][1]], 1
      )
      h, h_mask = getattr(self.decoder, f"dec{i}")(h, h_mask)
    return h


class MMagicInpaintor(nn.Module):
  """The `generator.` prefix of mmagic's checkpoints."""

  def __init__(self, features, kernel_sizes):
    super().__init__()
    self.generator = MMagicEncoderDecoder(features, kernel_sizes)

  def forward(self, x, mask):
    return self.generator(x, mask)


# --------------------------------------------------------------------------------------------------
# jacobaustin123/pytorch-inpainting-partial-conv: NVIDIA's layer, single-channel masks in the
# encoder, per-block repeated masks in the decoder; BatchNorm in every block but the last (the first
# too), a bias only without BatchNorm; tanh; ImageNet mean/std.


class JacobLayer(nn.Module):
  def __init__(self, cin, cout, k, stride, activ="relu", bn=True, multi_channel=False):
    super().__init__()
    self.conv = PartialConv2d(
      cin, cout, k, stride, (k - 1) // 2, bias=not bn, multi_channel=multi_channel
    )
    self.bn = nn.BatchNorm2d(cout) if bn else None
    self.activ = activ

  def forward(self, x, mask):
    x, mask = self.conv(x, mask)
    if self.bn is not None:
      x = self.bn(x)
    x = torch.tanh(x) if self.activ == "tanh" else _activation(x, self.activ)
    return x, mask.prod(dim=1, keepdim=True)


class JacobModel(nn.Module):
  def __init__(self, features, kernel_sizes):
    super().__init__()
    self.depth = depth = len(features)
    for i, ((cin, cout), k) in enumerate(zip(_widths(features), kernel_sizes), 1):
      self.add_module(f"conv{i}", JacobLayer(cin, cout, k, 2))
    for i, (up, skip, cout) in _decoder_widths(features).items():
      last = i == 1
      layer = JacobLayer(
        up + skip, cout, 3, 1, "tanh" if last else "leaky", bn=not last, multi_channel=True
      )
      self.add_module(f"conv{2 * depth + 1 - i}", layer)

  def forward(self, x, mask):
    levels = [(x, mask)]
    for i in range(1, self.depth + 1):
      levels.append(getattr(self, f"conv{i}")(*levels[-1]))
    h, h_mask = levels[-1]
    for i in range(self.depth, 0, -1):
      skip, skip_mask = levels[i - 1]
      up = F.interpolate(h, scale_factor=2)
      up_mask = F.interpolate(h_mask, scale_factor=2)
      mask_in = torch.cat(
        [up_mask.repeat(1, up.shape[1], 1, 1), skip_mask.repeat(1, skip.shape[1], 1, 1)], 1
      )
      h, h_mask = getattr(self, f"conv{2 * self.depth + 1 - i}")(torch.cat([up, skip], 1), mask_in)
    return h


# --------------------------------------------------------------------------------------------------
# MathiasGruber/PConv-Keras: explicit (k-1)/2 zero padding, ratio k*k / (sum(M) + 1e-8) with the sum
# over Cin*k*k, the bias added everywhere (also in all-hole windows); a bias in every PConv2D;
# Keras BatchNorm (epsilon 1e-3); concatenation [skip, upsampled]; the last PConv2D with LeakyReLU,
# then a 1x1 Conv2D with a sigmoid; input [0, 1] RGB. Weights: Keras `save_weights` HDF5.


def keras_weights(
  features, kernel_sizes, seed: int, first: int = 1
) -> dict[str, dict[str, np.ndarray]]:
  """Random weights by Keras layer name (creation numbering from `first`), HWIO kernels."""
  rng = np.random.default_rng(seed)
  layers, number = {}, first

  def conv(cin, cout, k):
    kernel = rng.standard_normal((k, k, cin, cout)) * (2.0 / (k * k * cin)) ** 0.5
    return {"img_kernel": kernel, "bias": 0.1 * rng.standard_normal(cout)}

  def norm(c):
    return {
      "gamma": 1 + 0.2 * rng.standard_normal(c),
      "beta": 0.2 * rng.standard_normal(c),
      "moving_mean": 0.2 * rng.standard_normal(c),
      "moving_variance": 0.5 + rng.random(c),
    }

  for i, ((cin, cout), k) in enumerate(zip(_widths(features), kernel_sizes), 1):
    layers[f"p_conv2d_{number}"] = conv(cin, cout, k)
    number += 1
    if i > 1:
      layers[f"EncBN{i - 1}"] = norm(cout)
  for j, (i, (up, skip, cout)) in enumerate(_decoder_widths(features).items()):
    layers[f"p_conv2d_{number}"] = conv(skip + up, cout, 3)
    number += 1
    if i > 1:
      layers[f"batch_normalization_{first + j}"] = norm(cout)
  layers["outputs_img"] = {
    "kernel": rng.standard_normal((1, 1, 3, 3)) * 20.0,
    "bias": 0.1 * rng.standard_normal(3),
  }
  return {name: {w: v.astype(np.float32) for w, v in ws.items()} for name, ws in layers.items()}


def save_keras_h5(layers: dict[str, dict[str, np.ndarray]], path) -> None:
  """As Keras 2's `Model.save_weights`: `layer_names` (weightless layers too), each layer's
  `weight_names`, datasets `<layer>/<layer>/<weight>:0`."""
  names = ["inputs_img", "inputs_mask", *layers, "activation_1", "up_sampling2d_1"]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode() for n in names])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for name in names:
      group = f.create_group(name)
      weights = layers.get(name, {})
      group.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w in weights], "S")
      for w, value in weights.items():
        group.create_dataset(f"{name}/{w}:0", data=value)


def keras_forward(layers, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
  """PConv-Keras' network in float64 (NCHW): images on [0, 1], masks 1 = valid, 3 channels."""

  def tensor(a):
    return torch.from_numpy(np.asarray(a, np.float64))

  def pconv(name, x, mask, stride):
    kernel = tensor(layers[name]["img_kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
    pad = (kernel.shape[-1] - 1) // 2
    x, mask = F.pad(x, (pad,) * 4), F.pad(mask, (pad,) * 4)
    counts = F.conv2d(mask, torch.ones_like(kernel), stride=stride)
    out = F.conv2d(x * mask, kernel, stride=stride)
    new_mask = counts.clamp(0, 1)
    ratio = kernel.shape[-1] * kernel.shape[-2] / (counts + 1e-8) * new_mask
    return out * ratio + tensor(layers[name]["bias"]).view(1, -1, 1, 1), new_mask

  def norm(name, x):
    p = {k: tensor(v).view(1, -1, 1, 1) for k, v in layers[name].items()}
    return (x - p["moving_mean"]) / torch.sqrt(p["moving_variance"] + 1e-3) * p["gamma"] + p["beta"]

  pconvs = sorted(
    (n for n in layers if n.startswith("p_conv2d")), key=lambda n: int(n.split("_")[-1])
  )
  enc_norms = sorted((n for n in layers if n.startswith("EncBN")), key=lambda n: int(n[5:]))
  dec_norms = sorted(
    (n for n in layers if n.startswith("batch_norm")), key=lambda n: int(n.split("_")[-1])
  )
  depth = len(pconvs) // 2
  levels = [(images, masks)]
  for i in range(depth):
    x, mask = pconv(pconvs[i], *levels[-1], stride=2)
    if i > 0:
      x = norm(enc_norms[i - 1], x)
    levels.append((F.relu(x), mask))
  x, mask = levels[-1]
  for j in range(depth):
    skip, skip_mask = levels[depth - 1 - j]
    up, up_mask = F.interpolate(x, scale_factor=2), F.interpolate(mask, scale_factor=2)
    x, mask = pconv(
      pconvs[depth + j], torch.cat([skip, up], 1), torch.cat([skip_mask, up_mask], 1), 1
    )
    if j < depth - 1:
      x = norm(dec_norms[j], x)
    x = F.leaky_relu(x, 0.2)
  head = layers["outputs_img"]
  kernel = tensor(head["kernel"]).permute(3, 2, 0, 1)
  return torch.sigmoid(F.conv2d(x, kernel) + tensor(head["bias"]).view(1, -1, 1, 1))


# --------------------------------------------------------------------------------------------------
# Each project's inference on uint8 images.


@dataclasses.dataclass
class Reference:
  """A project's network (`forward(x, mask)` on its own input range, NCHW float64) and range."""

  forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
  mean: np.ndarray  # [0, 1] scale: x_net = (x01 - mean) / std.
  std: np.ndarray
  bgr: bool = False
  mask_channels: int = 3

  def normalize(self, images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC RGB -> the network's input, NCHW float64."""
    x = (images / 255.0 - self.mean) / self.std
    if self.bgr:
      x = x[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  def to_unit_range(self, y: torch.Tensor) -> np.ndarray:
    """The network's output -> NHWC RGB on [0, 1] scale (not clipped)."""
    y = y.numpy().transpose(0, 2, 3, 1)
    if self.bgr:
      y = y[..., ::-1]
    return y * self.std + self.mean

  def run(self, images: np.ndarray, holes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output on [-1, 1] RGB, the project's composite as uint8) for uint8 images and bool holes."""
    valid = torch.from_numpy((~holes)[:, None].astype(np.float64))
    x = self.normalize(images)
    with torch.no_grad():
      y = self.forward(x * valid, valid.repeat(1, self.mask_channels, 1, 1))
    composite = valid * x + (1 - valid) * y
    unit = self.to_unit_range(composite)
    return self.to_unit_range(y) * 2 - 1, np.clip(np.round(unit * 255), 0, 255).astype(np.uint8)


def _torch(net: nn.Module, **normalization) -> tuple[nn.Module, Reference]:
  """The float32 network (to save) and the reference running a float64 copy of it."""
  return net, Reference(copy.deepcopy(net).double(), **normalization)


def naoto(features, kernel_sizes, seed=0) -> tuple[nn.Module, Reference]:
  net = randomize(NaotoUNet(features, kernel_sizes), seed, 0.03, divides_by_count=True)
  return _torch(net, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def mmagic(features, kernel_sizes, seed=0) -> tuple[nn.Module, Reference]:
  net = randomize(MMagicInpaintor(features, kernel_sizes), seed, 0.02)
  return _torch(net, mean=np.full(3, 0.5), std=np.full(3, 0.5), bgr=True)


def jacob(features, kernel_sizes, seed=0) -> tuple[nn.Module, Reference]:
  net = randomize(JacobModel(features, kernel_sizes), seed, last_conv_scale=0.02)
  return _torch(net, mean=IMAGENET_MEAN, std=IMAGENET_STD, mask_channels=1)


def keras(features, kernel_sizes, seed=0, first=1) -> tuple[dict, Reference]:
  layers = keras_weights(features, kernel_sizes, seed, first)
  forward = lambda x, m: keras_forward(layers, x, m)  # noqa: E731
  return layers, Reference(forward, np.zeros(3), np.ones(3))
