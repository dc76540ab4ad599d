"""glibc's transparent-huge-page tunable: set by the launchers, never by restarting a process."""

import platform
import sys

import pytest

from pconv_jax import hugepages

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_benchmark_workers_get_the_setting_asked_for_and_keep_other_tunables():
  assert hugepages.with_huge_pages({"A": "1"}) == {
    "A": "1",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
  }
  environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  off = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
  assert hugepages.with_huge_pages(environ, False) == off
  assert hugepages.with_huge_pages(environ, True) == environ
  assert hugepages.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
    "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  }


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc tunables exist on Linux with glibc only")
def test_missing_unless_set_either_way():
  assert hugepages.missing({})
  assert hugepages.missing({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert not hugepages.missing({"GLIBC_TUNABLES": hugepages.SETTING.split("=", 1)[1]})
  assert not hugepages.missing({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # Opted out.
