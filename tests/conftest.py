"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# An empty weight cache: tests never pick up VGG/Inception weights a developer downloaded.
os.environ["PCONV_JAX_CACHE"] = tempfile.mkdtemp(prefix="pconv_jax_test_cache_")

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)

assert jax.device_count() == 8, "conftest must run before anything imports jax"
