"""The PyTorch reference network of the tests: benchmarks/torch_reference.py (imports torch)."""

from benchmarks.torch_reference import PartialConv2d, PConvBNActiv, TorchPUNet, randomize

__all__ = ["PartialConv2d", "PConvBNActiv", "TorchPUNet", "randomize"]
