"""The entry points' re-execution with glibc's transparent-huge-page tunable."""

import os
import subprocess
import sys

import pytest

from pconv_jax import hugepages


def test_tunable_is_added_to_existing_tunables_once():
  assert hugepages.environment_with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  added = hugepages.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert added == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  assert hugepages.environment_with_huge_pages(added) is None
  assert hugepages.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # Opted out.


def test_benchmark_workers_get_the_setting_asked_for_and_keep_other_tunables():
  environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  off = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
  assert hugepages.with_huge_pages(environ, False) == off
  assert hugepages.with_huge_pages(environ, True) == environ


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
@pytest.mark.parametrize("preset,expected", [(None, "glibc.malloc.hugetlb=1"),
                                             ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0")])
def test_process_restarts_with_the_same_arguments_and_the_tunable(preset, expected):
  code = ("import os, sys; from pconv_jax import hugepages; hugepages.reexec_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if preset:
    env["GLIBC_TUNABLES"] = preset
  proc = subprocess.run([sys.executable, "-c", code, "arg1", "--flag=2"], env=env, capture_output=True, text=True,
                        check=True)
  assert proc.stdout.strip() == f"{expected} ['arg1', '--flag=2']"
