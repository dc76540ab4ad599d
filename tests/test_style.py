"""The tree is formatted and linted with the configuration in pyproject.toml (ruff)."""

from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_finds_nothing_to_change(command):
  result = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr
