"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# An empty weight cache: tests never pick up VGG/Inception weights a developer downloaded.
os.environ["PCONV_JAX_CACHE"] = tempfile.mkdtemp(prefix="pconv_jax_test_cache_")
# One persistent XLA compilation cache for the session, shared with every `python -m pconv_jax.main`
# a test starts: the tiny train steps that the resume tests compile again and again compile once.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="pconv_jax_test_compilation_cache_")
)

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)

assert jax.device_count() == 8, "conftest must run before anything imports jax"
