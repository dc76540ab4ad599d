"""The side-by-side benchmark runs end to end at a tiny size (PyTorch included when installed)."""

import importlib.util
import json
import os
from pathlib import Path
import subprocess
import sys

from benchmarks import accelerator_check, workloads
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
    "--modes=train",  # Inference is timed by the same workers in the accelerator check below.
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
  assert rows == {(f, "train") for f in frameworks}
  for r in results["results"]:
    assert r["images_per_s"] > 0 and r["peak_bytes"] > 0 and len(r["times"]) == 2
  assert results["ceiling"]["gflops"] > 0


def test_useful_flops_of_the_papers_256_network():
  forward = 2 * sum(workloads.network_layers(256, 7, paper_features(7)))
  # FIELD-NOTES: ~18.9 GFLOP per image of useful convolution work.
  assert abs(forward / 1e9 - 18.9) < 0.5
  # VGG-16 to conv3_3: ~12 GMAC per 256x256 image.
  assert abs(workloads.vgg_macs(256) / 1e9 - 12.2) < 0.1


def test_accelerator_check_runs_at_a_tiny_size(tmp_path):
  """The GPU/TPU check end to end on one CPU device: correctness, ceilings, and every timing row
  (PyTorch eager and torch.compile too, when installed)."""
  out = tmp_path / "check.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  torch = importlib.util.find_spec("torch") is not None
  command = [sys.executable, "-m", "benchmarks.accelerator_check", "--tiny", f"--json={out}"]
  proc = subprocess.run(
    command + ([] if torch else ["--skip_torch"]),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads(out.read_text())
  checks = results["correctness"]
  assert results["correct"] and all(c["passed"] for c in checks)
  assert [c["check"] for c in checks] == [
    "forward, float32 highest",
    "loss gradient, float32 highest",
    "bfloat16 train steps finite (forward error reported, not checked)",
  ]
  assert all(0 < c["error"] <= c["tolerance"] for c in checks[:2])
  assert set(results["ceilings"]) == {"bfloat16", "float32"}
  timed = {
    (r["framework"], r["dtype"], r["size"], r["batch"], r["mode"]) for r in results["results"]
  }
  frameworks = ["pconv_jax", "torch eager", "torch.compile"] if torch else ["pconv_jax"]
  for mode in ("infer", "train"):
    assert {(f, "bfloat16", 32, 2, mode) for f in frameworks} <= timed
    # The memory-bound batch (2x on a CPU).
    assert {(f, "bfloat16", 32, 4, mode) for f in frameworks[:2]} <= timed
  assert len(timed) == len(results["results"]) == 2 * (len(frameworks) + min(len(frameworks), 2))
  assert all(r["images_per_s"] > 0 and r["mfu_pct"] > 0 for r in results["results"])
  assert "| pconv_jax | bfloat16 | 32 | 2 | train |" in proc.stdout
  assert "train MFU %" in {t["target"] for t in results["targets"]}
  tasks = [t["task"] for t in results["tasks"]]
  assert (
    tasks[:3] == ["imports", "correctness", "ceilings"] and tasks.count("time") == len(timed) / 2
  )
  assert all(t["wall_s"] > 0 and t["problem"] is None for t in results["tasks"])


def test_accelerator_check_records_what_stops_a_run():
  """Out of memory (by the last exception line, not an allocator's warning), other failures, and a
  run past its time, killed with its process group."""
  oom = "W ran out of memory trying to allocate 2GiB (not a failure)\nTraceback ...\n" + (
    "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 3 GiB"
  )
  assert accelerator_check._failure(oom).startswith("out of memory: jaxlib")
  warned = "W ran out of memory trying to allocate 2GiB\nTraceback\nValueError: bad shape"
  assert accelerator_check._failure(warned).startswith("failed: ValueError: bad shape")
  found, problem = accelerator_check.run_task({"task": "imports"}, timeout=0.2)
  assert found == [] and problem.startswith("cut: ran past the time budget")
  assert accelerator_check.large_batch({"bytes_limit": 100, "peak_bytes": 30}, 6, 64) == 16
  assert accelerator_check.large_batch({"peak_bytes": 30}, 6, 64) == 12
