"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _temporary_dir(prefix: str) -> str:
  """A new directory, removed when the test session ends."""
  path = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


# An empty weight cache: tests never pick up VGG/Inception weights a developer downloaded.
os.environ["PCONV_JAX_CACHE"] = _temporary_dir("pconv_jax_test_cache_")
# One persistent XLA compilation cache for the session, shared with every `python -m pconv_jax.main`
# a test starts: the tiny train steps that the resume tests compile again and again compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _temporary_dir("pconv_jax_test_compilation_cache_")

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)

assert jax.device_count() == 8, "conftest must run before anything imports jax"
