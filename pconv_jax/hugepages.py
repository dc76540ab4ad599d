"""Transparent huge pages for the large buffers XLA:CPU allocates at every step (glibc's malloc).

XLA's CPU runtime allocates each step's buffers anew (hundreds of MB to GB). glibc serves such sizes
with fresh `mmap`s whose 4 KiB pages fault in one at a time: on the VM measured, huge pages made
single large convolutions up to ~4x faster and train steps 10-33% faster (benchmarks/RESULTS.md,
optimisation 19). glibc reads its tunables only at process start, so they are set where a process is
started: the README's CPU commands, `launch/local.sh` and the benchmark's workers put

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1

in the environment. GPU and TPU runs do not need it.
"""

from collections.abc import Mapping
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
VARIABLE = "GLIBC_TUNABLES"
SETTING = f"{VARIABLE}={TUNABLE}=1"


def _tunables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
  items = environ.get(VARIABLE, "").split(":")
  return [tuple(item.split("=", 1)) for item in items if "=" in item]


def with_huge_pages(environ: Mapping[str, str], on: bool = True) -> dict[str, str]:
  """`environ` with glibc's huge-page tunable set on or off, its other tunables kept."""
  kept = [f"{name}={value}" for name, value in _tunables(environ) if name != TUNABLE]
  return {**environ, VARIABLE: ":".join(kept + [f"{TUNABLE}={int(on)}"])}


def missing(environ: Mapping[str, str]) -> bool:
  """Whether this is glibc on Linux and `environ` leaves the
  tunable unset (set it to 0 to opt out)."""
  glibc_linux = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
  return glibc_linux and all(name != TUNABLE for name, _ in _tunables(environ))
