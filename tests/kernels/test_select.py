"""Choosing the implementation from config.model.conv_impl and the mesh's devices."""

import types

import jax
import pytest

from pconv_jax import kernels
from pconv_jax.errors import ConfigError


def test_auto_takes_the_cpu_engine_on_cpu_devices_split_the_batch_over_them():
  chosen = kernels.select("auto", jax.devices()[:4])
  assert chosen == kernels.CpuKernels(batch_shards=4)
  assert kernels.select("cpu", jax.devices()[:1]) == kernels.CpuKernels(batch_shards=1)
  assert kernels.select("xla", jax.devices()) is kernels.XLA


def test_accelerators_always_take_the_plain_path():
  gpus = [types.SimpleNamespace(platform="gpu")] * 2  # Only the platform is read.
  assert kernels.select("auto", gpus) is kernels.XLA
  with pytest.raises(ConfigError, match="devices are \\['gpu'\\]: use 'auto' or 'xla'"):
    kernels.select("cpu", gpus)


def test_unknown_implementation_is_explained():
  with pytest.raises(ConfigError, match="conv_impl must be one of"):
    kernels.select("cuda", jax.devices())
