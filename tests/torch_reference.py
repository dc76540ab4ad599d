"""The summary's PyTorch network (NVIDIA PartialConv2d semantics), written for the tests from its formulas.

Test-only: imports torch, which is never a runtime dependency of pconv_jax.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PartialConv2d(nn.Conv2d):
  """NVIDIA's PartialConv2d with multi_channel and return_mask, mask given (no caching)."""

  def __init__(self, *args, multi_channel: bool = True, **kwargs):
    super().__init__(*args, **kwargs)
    self.multi_channel = multi_channel

  def forward(self, x, mask):
    with torch.no_grad():
      shape = (self.out_channels, self.in_channels) if self.multi_channel else (1, 1)
      ones = torch.ones(shape + self.kernel_size, dtype=x.dtype)
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

  def __init__(self, cin, cout, kernel_size, stride, bn=True, activ="relu", bias=False):
    super().__init__()
    self.conv = PartialConv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=bias)
    if bn:
      self.bn = nn.BatchNorm2d(cout)
    self.activ = activ

  def forward(self, x, mask):
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

  def __init__(self, depth=7, features=None, kernel_sizes=None, channels=3):
    super().__init__()
    features = features or ((64, 128, 256) + (512,) * depth)[:depth]
    kernel_sizes = kernel_sizes or ((7, 5, 5) + (3,) * depth)[:depth]
    self.depth = depth
    cin = channels
    for i in range(1, depth + 1):
      self.add_module(f"ec_images_{i}", PConvBNActiv(cin, features[i - 1], kernel_sizes[i - 1], 2, bn=i > 1))
      cin = features[i - 1]
    for i in range(depth, 1, -1):
      self.add_module(f"dc_images_{i}", PConvBNActiv(features[i - 1] + features[i - 2], features[i - 2], 3, 1,
                                                     activ="leaky"))
    self.dc_images_1 = PConvBNActiv(features[0] + channels, channels, 3, 1, bn=False, activ=None, bias=True)

  def forward(self, images, masks):
    levels = [(images, masks)]
    for i in range(1, self.depth + 1):
      levels.append(getattr(self, f"ec_images_{i}")(*levels[-1]))
    x, mask = levels[-1]
    for i in range(self.depth, 0, -1):
      x = torch.cat((F.interpolate(x, scale_factor=2, mode="nearest"), levels[i - 1][0]), dim=1)
      mask = torch.cat((F.interpolate(mask, scale_factor=2, mode="nearest"), levels[i - 1][1]), dim=1)
      x, mask = getattr(self, f"dc_images_{i}")(x, mask)
    return torch.tanh(x)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights and BatchNorm statistics, scaled so activations stay O(1) through the network."""
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
    model.dc_images_1.conv.weight.mul_(0.03)  # Keeps tanh out of saturation, so outputs are informative.
  return model
