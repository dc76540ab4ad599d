"""The PyTorch reference network for the tests: re-exported from benchmarks/torch_reference.py (imports torch)."""

from benchmarks.torch_reference import PartialConv2d, PConvBNActiv, TorchPUNet, randomize  # noqa: F401
