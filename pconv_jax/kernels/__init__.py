"""Implementations of the heavy operations of the network and the loss, chosen explicitly.

The model, VGG-16 and the loss take a `Kernels` object (as flax's ResNet takes its `conv`), set from
`config.model.conv_impl`:

  xla   the plain path (`kernels.xla`): XLA's own convolution, pooling and products; any backend;
  cpu   the CPU engine (`kernels.cpu`): the same values, faster on XLA:CPU; CPU devices only;
  auto  cpu when every device of the mesh is a CPU, else xla (GPUs and TPUs: the plain path).
"""

from collections.abc import Iterable

import jax

from pconv_jax.errors import ConfigError
from pconv_jax.kernels.cpu import CpuKernels
from pconv_jax.kernels.xla import XlaKernels

Kernels = XlaKernels  # The methods every implementation has.
XLA = XlaKernels()
CONV_IMPLS = ("auto", "xla", "cpu")


def select(conv_impl: str, devices: Iterable[jax.Device]) -> Kernels:
  """The implementation `conv_impl` names, for a batch split over `devices` (e.g.
  `mesh.devices.flat`)."""
  devices = list(devices)
  platforms = sorted({device.platform for device in devices})
  if conv_impl not in CONV_IMPLS:
    raise ConfigError(f"config.model.conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.")
  if conv_impl == "auto":
    conv_impl = "cpu" if platforms == ["cpu"] else "xla"
  if conv_impl == "xla":
    return XLA
  if platforms != ["cpu"]:
    raise ConfigError(
      f"config.model.conv_impl='cpu' is the CPU engine, but the devices are {platforms}: use "
      "'auto' or 'xla' (GPUs and TPUs take the plain XLA path)."
    )
  return CpuKernels(batch_shards=len(devices))
