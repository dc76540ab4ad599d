"""Transparent huge pages for the large buffers XLA:CPU allocates at every step (glibc's malloc).

XLA's CPU runtime allocates each step's buffers anew (hundreds of MB to GB). glibc serves such sizes with fresh
`mmap`s whose 4 KiB pages fault in one at a time: on the VM measured, huge pages made single large convolutions
up to ~4x faster and train steps 10-33% faster (benchmarks/RESULTS.md, optimisation 19). With the tunable
`glibc.malloc.hugetlb=1` malloc asks the kernel for 2 MiB transparent huge pages instead. glibc reads tunables
only at process start, so the command-line entry points re-execute themselves once with it set.
"""

import os
import platform
import sys
from collections.abc import Mapping

from absl import logging

TUNABLE = "glibc.malloc.hugetlb"
VARIABLE = "GLIBC_TUNABLES"


def _tunables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
  return [tuple(item.split("=", 1)) for item in environ.get(VARIABLE, "").split(":") if "=" in item]


def with_huge_pages(environ: Mapping[str, str], on: bool = True) -> dict[str, str]:
  """`environ` with glibc's huge-page tunable set on or off, its other tunables kept."""
  kept = [f"{name}={value}" for name, value in _tunables(environ) if name != TUNABLE]
  return {**environ, VARIABLE: ":".join(kept + [f"{TUNABLE}={int(on)}"])}


def environment_with_huge_pages(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with huge pages on, or None if the tunable is already set either way (e.g. `=0` to opt out)."""
  return None if any(name == TUNABLE for name, _ in _tunables(environ)) else with_huge_pages(environ)


def reexec_with_huge_pages() -> None:
  """Re-executes this process's command line with huge pages on (Linux with glibc only; once).

  Call it first thing in a command-line entry point. Opt out with `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  environ = environment_with_huge_pages(os.environ)
  if environ is None:
    return
  logging.info("Restarting with %s=%s (huge pages for XLA's CPU buffers; set %s=0 in %s to opt out).",
               VARIABLE, environ[VARIABLE], TUNABLE, VARIABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
