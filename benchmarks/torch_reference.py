"""A PyTorch PConv U-Net with NVIDIA PartialConv2d semantics and the paper's loss: the benchmark's
reference.

Written from the summary's formulas (docs/seed SUMMARY.md), not from pconv_jax. Benchmark- and
test-only: imports torch, which is never a runtime dependency of pconv_jax.
"""

import torch
from torch import nn
import torch.nn.functional as F

# The paper's loss weights (Liu et al., ECCV 2018).
LOSS_WEIGHTS = {
  "valid": 1.0,
  "hole": 6.0,
  "perceptual": 0.05,
  "style_out": 120.0,
  "style_comp": 120.0,
  "tv": 0.1,
}
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


class PartialConv2d(nn.Conv2d):
  """NVIDIA's PartialConv2d with multi_channel and return_mask, mask given (no caching)."""

  def __init__(self, *args, multi_channel: bool = True, **kwargs):
    super().__init__(*args, **kwargs)
    self.multi_channel = multi_channel

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
      shape = (self.out_channels, self.in_channels) if self.multi_channel else (1, 1)
      ones = torch.ones(shape + self.kernel_size, dtype=x.dtype, device=x.device)
      slide_winsize = ones.shape[1] * ones.shape[2] * ones.shape[3]
      update = F.conv2d(mask, ones, None, self.stride, self.padding, self.dilation)
      ratio = slide_winsize / (update + 1e-8)
      update = torch.clamp(update, 0, 1)
      ratio = ratio * update
    raw = super().forward(x * mask)
    if self.bias is not None:
      bias = self.bias.view(1, -1, 1, 1)
      return ((raw - bias) * ratio + bias) * update, update
    return raw * ratio, update


class PConvBNActiv(nn.Module):
  """PartialConv2d, optional BatchNorm, ReLU / LeakyReLU(0.2) / none."""

  def __init__(
    self,
    cin: int,
    cout: int,
    kernel_size: int,
    stride: int,
    bn: bool = True,
    activ: str | None = "relu",
    bias: bool = False,
  ):
    super().__init__()
    self.conv = PartialConv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=bias)
    if bn:
      self.bn = nn.BatchNorm2d(cout)
    self.activ = activ

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = self.conv(x, mask)
    if hasattr(self, "bn"):
      x = self.bn(x)
    if self.activ == "relu":
      x = F.relu(x)
    elif self.activ == "leaky":
      x = F.leaky_relu(x, 0.2)
    return x, mask


class TorchPUNet(nn.Module):
  """The summary's "Double U-Net": ec_images_1..N, dc_images_N..1, nearest upsampling, tanh."""

  def __init__(self, depth: int = 7, features=None, kernel_sizes=None, channels: int = 3):
    super().__init__()
    features = features or ((64, 128, 256) + (512,) * depth)[:depth]
    kernel_sizes = kernel_sizes or ((7, 5, 5) + (3,) * depth)[:depth]
    self.depth = depth
    cin = channels
    for i in range(1, depth + 1):
      self.add_module(
        f"ec_images_{i}", PConvBNActiv(cin, features[i - 1], kernel_sizes[i - 1], 2, bn=i > 1)
      )
      cin = features[i - 1]
    for i in range(depth, 1, -1):
      self.add_module(
        f"dc_images_{i}",
        PConvBNActiv(features[i - 1] + features[i - 2], features[i - 2], 3, 1, activ="leaky"),
      )
    self.dc_images_1 = PConvBNActiv(
      features[0] + channels, channels, 3, 1, bn=False, activ=None, bias=True
    )

  def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    levels = [(images, masks)]
    for i in range(1, self.depth + 1):
      levels.append(getattr(self, f"ec_images_{i}")(*levels[-1]))
    x, mask = levels[-1]
    for i in range(self.depth, 0, -1):
      x = torch.cat((F.interpolate(x, scale_factor=2, mode="nearest"), levels[i - 1][0]), dim=1)
      mask = torch.cat(
        (F.interpolate(mask, scale_factor=2, mode="nearest"), levels[i - 1][1]), dim=1
      )
      x, mask = getattr(self, f"dc_images_{i}")(x, mask)
    return torch.tanh(x)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BatchNorm statistics, scaled so activations
  stay O(1) through the network."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
        module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    if isinstance(model, TorchPUNet):
      # Keeps tanh out of saturation, so outputs are informative.
      model.dc_images_1.conv.weight.mul_(0.03)
  return model


class VGG16Pool3(nn.Module):
  """torchvision's `vgg16().features[:17]` (conv1_1 ... pool3) returning pool1, pool2, pool3;
  frozen.

  Takes images in [-1, 1] and applies torchvision's ImageNet normalisation. Random weights unless
  loaded.
  """

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for block in ((64, 64), (128, 128), (256, 256, 256)):
      for cout in block:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
        cin = cout
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.register_buffer("mean", torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1))
    self.register_buffer("std", torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1))
    self.requires_grad_(False)

  def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
    x = ((images + 1) / 2 - self.mean) / self.std
    pooled = []
    for layer in self.features:
      x = layer(x)
      if isinstance(layer, nn.MaxPool2d):
        pooled.append(x)
    return pooled


def gram(features: torch.Tensor) -> torch.Tensor:
  b, c, h, w = features.shape
  flat = features.reshape(b, c, h * w)
  return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def inpainting_loss(
  output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, vgg: VGG16Pool3
) -> torch.Tensor:
  """The paper's total loss (valid, hole, perceptual, style out/comp, TV on the dilated holes)."""
  comp = mask * target + (1 - mask) * output
  terms = {
    "valid": torch.mean(torch.abs(mask * (output - target))),
    "hole": torch.mean(torch.abs((1 - mask) * (output - target))),
  }
  with torch.no_grad():
    target_features = vgg(target)
    target_grams = [gram(f) for f in target_features]
  both = vgg(torch.cat((output, comp)))
  batch = output.shape[0]
  out_features, comp_features = [f[:batch] for f in both], [f[batch:] for f in both]
  terms["perceptual"] = sum(F.l1_loss(f, g) for f, g in zip(out_features, target_features)) + sum(
    F.l1_loss(f, g) for f, g in zip(comp_features, target_features)
  )
  terms["style_out"] = sum(F.l1_loss(gram(f), g) for f, g in zip(out_features, target_grams))
  terms["style_comp"] = sum(F.l1_loss(gram(f), g) for f, g in zip(comp_features, target_grams))
  region = F.max_pool2d(1 - mask, 3, 1, 1)
  dx = torch.abs(comp[..., 1:] - comp[..., :-1]) * region[..., 1:] * region[..., :-1]
  dy = torch.abs(comp[..., 1:, :] - comp[..., :-1, :]) * region[..., 1:, :] * region[..., :-1, :]
  terms["tv"] = (dx.sum() + dy.sum()) / comp.numel()
  return sum(LOSS_WEIGHTS[name] * value for name, value in terms.items())
