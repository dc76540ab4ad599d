"""Train step and inference of pconv_jax against a PyTorch reference, side by side in one run.

Times, on this machine, for each configuration `size:depth:batch`:
  * pconv_jax: `train.make_train_step` (forward, the paper's full loss with VGG-16 to pool3,
    backward, Adam) and the jitted inference forward pass;
  * the reference (benchmarks/torch_reference.py: NVIDIA PartialConv2d semantics, the same loss,
    torchvision's VGG-16 layout, random weights, torch.optim.Adam), `torch.set_num_threads` = the
    cores available;
  * a float32 matrix product in JAX: the machine's measured compute ceiling.
Every configuration (framework x mode x size x batch) runs in its own subprocess, so that its peak
memory (the process's RSS high-water mark, `ru_maxrss`, or the device's `peak_bytes_in_use` where
JAX reports it) is its own. Before each one the script waits (up to --max_wait s) until other
processes use less than --max_busy cores, and records that load. Times are the median (and min-max)
of up to --repeats steps after --warmup steps, fewer when the steps exceed --max_seconds (at least
2). Workers of both frameworks run with glibc's transparent huge pages on (as the README's CPU
commands run pconv_jax, pconv_jax/hugepages.py), or both off with --nohuge_pages.

Useful FLOPs are counted as `benchmarks/workloads.py` says; XLA's own cost analysis of the compiled
JAX step is recorded in the JSON as `xla_gflop`.

From the repository root:
  python -m benchmarks.train_step [--configs=256:7:1,256:7:4,512:8:6] [--modes=train,infer] \
      [--skip_torch]
"""

from collections.abc import Sequence
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from benchmarks.workloads import JAX, RUNNERS, TORCH, useful_flops
from pconv_jax import hugepages
from pconv_jax.models import paper_features

_CONFIGS = flags.DEFINE_list(
  "configs",
  ["256:7:1", "256:7:4", "512:8:6"],
  "Configurations as size:depth:batch (256:7 and 512:8 are the paper's networks).",
)
_MODES = flags.DEFINE_list("modes", ["train", "infer"], "train and/or infer.")
_FEATURES = flags.DEFINE_list(
  "features", None, "Encoder widths (default: the paper's for each depth)."
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16"],
  "pconv_jax activation dtype (config.model.dtype); the reference stays float32.",
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per configuration (at most).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_MAX_SECONDS = flags.DEFINE_float(
  "max_seconds", 60.0, "Stop timing a configuration after this long (>= 2 steps)."
)
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Do not run the PyTorch reference.")
_MATMUL = flags.DEFINE_integer(
  "matmul_size", 2048, "n of the n x n x n float32 matrix product (the ceiling)."
)
_JSON = flags.DEFINE_string("json", "benchmarks/results.json", "Where to write the results.")
_MAX_BUSY = flags.DEFINE_float(
  "max_busy", 0.5, "Wait while other processes use more cores than this."
)
_MAX_WAIT = flags.DEFINE_float(
  "max_wait", 300.0, "Longest wait for a quiet machine per configuration, s."
)
_HUGE_PAGES = flags.DEFINE_bool(
  "huge_pages",
  True,
  "Run both frameworks' workers with glibc.malloc.hugetlb=1 "
  "(else =0): transparent huge pages for large buffers.",
)
_WORKER = flags.DEFINE_string(
  "worker", None, "Internal: run one configuration given as JSON, print JSON."
)

# --------------------------------------------------------------------------------------------------
# Orchestration.


def busy_cores(interval: float = 0.5) -> float:
  """Cores in use over `interval` s, from /proc/stat (the 1-minute
  load average where that is missing)."""

  def sample():
    with open("/proc/stat") as f:
      values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # total, idle + iowait

  try:
    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
  except OSError:
    return os.getloadavg()[0]
  return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def wait_for_quiet(max_busy: float, max_wait: float) -> float:
  """Waits until other processes use at most `max_busy` cores or
  `max_wait` s pass; returns the last load."""
  deadline = time.monotonic() + max_wait
  while (busy := busy_cores()) > max_busy and time.monotonic() < deadline:
    time.sleep(4)
  return busy


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
  busy = wait_for_quiet(_MAX_BUSY.value, _MAX_WAIT.value)
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.train_step", f"--worker={json.dumps(spec)}"],
    env=hugepages.with_huge_pages(os.environ, _HUGE_PAGES.value),
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(f"benchmark worker {spec} failed:\n{proc.stderr[-4000:]}")
  (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
  return {
    **spec,
    **result,
    "busy_cores_before": busy,
    "busy_cores_after": busy_cores(),
    "loadavg": os.getloadavg(),
  }


def summarise(result: dict[str, Any], ceiling_gflops: float | None) -> dict[str, Any]:
  times = result["times"]
  median = statistics.median(times)
  summary = {
    "ms_median": 1e3 * median,
    "ms_min": 1e3 * min(times),
    "ms_max": 1e3 * max(times),
    "images_per_s": result.get("batch", 1) / median,
  }
  if result["framework"] != "ceiling":
    flops = useful_flops(
      result["mode"], result["size"], result["depth"], result["batch"], result["features"]
    )
    summary["useful_gflop"] = flops / 1e9
    summary["gflops"] = flops / 1e9 / median
  else:
    summary["gflops"] = result["xla_gflop"] / median
  if ceiling_gflops:
    summary["pct_ceiling"] = 100 * summary["gflops"] / ceiling_gflops
  return {**result, **summary}


def format_table(results: list[dict[str, Any]], ceiling: dict[str, Any]) -> str:
  header = (
    "| impl | mode | size | depth | batch | ms/step median (min-max) | images/s | useful GFLOP/s | "
    "% ceiling | compile s | peak MB | jax/torch |"
  )
  lines = [header, "|" + "---|" * 12]
  lines.append(
    f"| jax matmul {ceiling['size']}^3 f32 | ceiling | | | | {ceiling['ms_median']:.1f} "
    f"({ceiling['ms_min']:.1f}-{ceiling['ms_max']:.1f}) | | {ceiling['gflops']:.0f} | 100 | | "
    f"{ceiling['peak_bytes'] / 2**20:.0f} | |"
  )
  key = lambda r: (r["mode"], r["size"], r["depth"], r["batch"])  # noqa: E731
  torch_rate = {key(r): r["images_per_s"] for r in results if r["framework"] == TORCH}
  for r in results:
    ratio = torch_rate.get(key(r)) if r["framework"] == JAX else None
    compile_s = f"{r['compile_s']:.1f}" if r["framework"] == JAX else "eager"
    lines.append(
      f"| {r['framework']} | {r['mode']} | {r['size']} | {r['depth']} | {r['batch']} | "
      f"{r['ms_median']:.0f} "
      f"({r['ms_min']:.0f}-{r['ms_max']:.0f}) | {r['images_per_s']:.2f} | {r['gflops']:.0f} | "
      f"{r['pct_ceiling']:.0f} | {compile_s} | {r['peak_bytes'] / 2**20:.0f} | "
      f"{_ratio(r['images_per_s'], ratio)} |"
    )
  return "\n".join(lines)


def _ratio(value: float, reference: float | None) -> str:
  return f"{value / reference:.2f}x" if reference else ""


def parse_config(text: str) -> tuple[int, int, int]:
  try:
    size, depth, batch = (int(v) for v in text.split(":"))
  except ValueError as e:
    raise app.UsageError(
      f"--configs entries are size:depth:batch, e.g. 256:7:4; got {text!r}"
    ) from e
  if size % 2**depth:
    raise app.UsageError(f"size {size} is not a multiple of 2**depth = {2**depth} in {text!r}")
  return size, depth, batch


def main(argv: Sequence[str]) -> None:
  del argv
  if _WORKER.value:
    spec = json.loads(_WORKER.value)
    print(json.dumps(list(RUNNERS[spec["framework"]](spec))))
    return
  if not set(_MODES.value) <= {"train", "infer"}:
    raise app.UsageError(f"--modes takes train and/or infer, got {_MODES.value}")
  frameworks = [JAX] + ([] if _SKIP_TORCH.value else [TORCH])
  timing = {"warmup": _WARMUP.value, "repeats": _REPEATS.value, "max_seconds": _MAX_SECONDS.value}
  ceiling = summarise(
    run_in_subprocess({"framework": "ceiling", "size": _MATMUL.value, **timing}), None
  )
  print(
    f"ceiling: {ceiling['gflops']:.0f} GFLOP/s (float32 {_MATMUL.value}^3 matmul in JAX)",
    flush=True,
  )
  results = []
  for text in _CONFIGS.value:
    size, depth, batch = parse_config(text)
    features = [int(f) for f in _FEATURES.value] if _FEATURES.value else list(paper_features(depth))
    for mode in _MODES.value:
      for framework in frameworks:
        spec = {
          "framework": framework,
          "mode": mode,
          "modes": [mode],
          "size": size,
          "depth": depth,
          "batch": batch,
          "features": features,
          "dtype": _DTYPE.value,
          **timing,
        }
        results.append(summarise(run_in_subprocess(spec), ceiling["gflops"]))
        r = results[-1]
        print(
          f"{framework} {mode} {size}:{depth}:{batch}: {r['ms_median']:.0f} ms/step, "
          f"{r['images_per_s']:.2f} images/s, busy cores before {r['busy_cores_before']:.2f}",
          flush=True,
        )
  table = format_table(results, ceiling)
  print(table)
  command = "python -m benchmarks.train_step " + " ".join(sys.argv[1:])
  with open(_JSON.value, "w") as f:
    json.dump(
      {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "huge_pages": _HUGE_PAGES.value,
        "ceiling": ceiling,
        "results": results,
        "table": table,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  app.run(main)
