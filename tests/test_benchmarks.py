"""The side-by-side benchmark runs end to end at a tiny size (PyTorch included when installed)."""

import importlib.util
import json
import os
from pathlib import Path
import subprocess
import sys

from benchmarks import train_step
from pconv_jax.models import paper_features

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_at_a_tiny_size_and_writes_the_table(tmp_path):
  out = tmp_path / "results.json"
  env = {
    k: v for k, v in os.environ.items() if k != "XLA_FLAGS"
  }  # One real CPU device, as users run it.
  torch = importlib.util.find_spec("torch") is not None
  command = [
    sys.executable,
    "-m",
    "benchmarks.train_step",
    "--configs=16:2:2",
    "--features=4,8",
    "--repeats=2",
    "--warmup=0",
    "--matmul_size=128",
    "--max_wait=0",
    f"--json={out}",
  ] + ([] if torch else ["--skip_torch"])
  proc = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| pconv_jax | train | 16 | 2 | 2 |" in proc.stdout
  results = json.loads(out.read_text())
  rows = {(r["framework"], r["mode"]) for r in results["results"]}
  frameworks = ("pconv_jax", "torch") if torch else ("pconv_jax",)
  assert rows == {(f, m) for f in frameworks for m in ("train", "infer")}
  for r in results["results"]:
    assert r["images_per_s"] > 0 and r["peak_bytes"] > 0 and len(r["times"]) == 2
  assert results["ceiling"]["gflops"] > 0


def test_useful_flops_of_the_papers_256_network():
  forward = 2 * sum(train_step.network_layers(256, 7, paper_features(7)))
  # FIELD-NOTES: ~18.9 GFLOP per image of useful convolution work.
  assert abs(forward / 1e9 - 18.9) < 0.5
  # VGG-16 to conv3_3: ~12 GMAC per 256x256 image.
  assert abs(train_step.vgg_macs(256) / 1e9 - 12.2) < 0.1
