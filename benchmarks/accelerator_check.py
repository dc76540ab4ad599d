"""One prepared check of pconv_jax on an accelerator: correctness on the device, then its speed
against PyTorch on the same device, within a time budget.

On whatever backend JAX finds (GPU, TPU, or CPU), after checking that pconv_jax imports:
  1. correctness: with random weights, VGG-16 included, the paper's network (its widths, 6 levels,
     128x128, batch 2): the forward pass and the gradient of the paper's full loss in float32 on
     the device against the same computation in float64 on the CPU, at the highest matmul precision
     and at the default one (the one training uses: TF32 on recent NVIDIA GPUs, one bfloat16 pass
     on TPUs); then bfloat16 train steps, which must stay finite;
  2. the chip's ceilings: a large bfloat16 and float32 matrix product (default precision);
  3. timings after compilation, in priority order while --budget_s (from the start) lasts:
     pconv_jax's train step (`train.make_train_step`: the paper's full loss, Adam) and inference,
     interleaved with the PyTorch reference (`benchmarks/torch_reference.py`, channels-last) eager
     and under `torch.compile`, in bfloat16 (autocast for PyTorch) and float32; 256x256 at batch 6
     and at the largest batch that memory allows (up to --max_batch), 512x512 at batch 6. Model
     FLOP utilisation counts the useful FLOPs of `benchmarks/workloads.py`, against the measured
     ceiling of the run's dtype.
Every run is its own subprocess (its peak memory is its own; a crash, an out-of-memory or a run cut
by the budget is recorded, what it measured kept, and the check goes on). The JSON is rewritten
after each step; at the end the table and the targets of a train step at 256x256 in bfloat16 are
printed: at least 1.5x PyTorch eager, 1.2x torch.compile, 40% model FLOP utilisation. Exit status:
1 when a correctness check fails, 2 when a timing run failed (other than by running out of memory
or time), 3 when pconv_jax cannot be imported.

  python -m benchmarks.accelerator_check [--budget_s=420] [--json=accelerator_check.json]
  python -m benchmarks.accelerator_check --tiny   # a minute on a CPU: keeps this script working
"""

from collections.abc import Sequence
import importlib.util
import json
import os
from pathlib import Path
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
import numpy as np

from benchmarks import workloads
from pconv_jax.models import paper_features

ROOT = Path(__file__).resolve().parents[1]

_TINY = flags.DEFINE_bool(
  "tiny", False, "Tiny shapes and a cheap torch.compile backend: a CPU test of the script."
)
_BUDGET = flags.DEFINE_float(
  "budget_s", 420.0, "Start no run after this many seconds from the start; end any a minute later."
)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "Largest batch of the memory-bound row.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per run (at most).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Time pconv_jax alone.")
_JSON = flags.DEFINE_string("json", "accelerator_check.json", "Where to write the results.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one task given as JSON, print JSON.")

JAX, EAGER, COMPILED = "pconv_jax", "torch eager", "torch.compile"
DTYPES = ("bfloat16", "float32")
# Correctness tolerances (relative): the forward pass's largest error against its largest value,
# each gradient leaf's error norm against its norm (at least 1% of the whole gradient's). "highest"
# is float32 arithmetic (float32 errors, ~1e-5 on a CPU, leave room for cuDNN's Winograd and FFT
# algorithms); "default" lets the chip round products to TF32 or bfloat16, which only gross errors
# exceed.
TOLERANCES = {"highest": (1e-3, 1e-2), "default": (5e-2, 1e-1)}
TARGETS = {EAGER: 1.5, COMPILED: 1.2, "mfu_pct": 40.0}
RESULT = "RESULT "  # Marks a worker's result lines on its stdout.


# --------------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process.


def check_correctness(spec: dict[str, Any]) -> None:
  """Float32 on the device against float64 on the CPU (forward and the full loss's gradient), and
  bfloat16 train steps."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from pconv_jax import kernels, losses, parallel, train  # pylint: disable=import-outside-toplevel

  config = _config(spec)
  images, masks = workloads.inputs(spec["size"], spec["batch"])
  vgg_variables = jax.device_get(workloads.random_vgg_variables(0))
  mesh = parallel.create_mesh(1)
  model = train.create_model(config, mesh)
  variables = _random_batch_stats(
    jax.device_get(model.init(jax.random.key(0), images[:1], masks[:1]))
  )
  weights = {name: float(config.loss[name]) for name in losses.TERMS}

  def forward_and_gradient(net):
    def loss(params, batch_stats, image, mask, vgg):
      outputs, _ = net.apply(
        {"params": params, "batch_stats": batch_stats},
        image,
        mask,
        train=True,
        mutable=["batch_stats"],
      )
      return losses.inpainting_loss(outputs, image, mask, vgg, weights, net.kernels)[0]

    def both(variables, image, mask, vgg):
      output = net.apply(variables, image, mask, train=False)
      return output, jax.grad(loss)(variables["params"], variables["batch_stats"], image, mask, vgg)

    return jax.jit(both)

  inputs = (variables, images, masks, vgg_variables)
  cpu = jax.devices("cpu")[0]
  with jax.enable_x64(True):
    reference = train.create_model(config, parallel.create_mesh(1)).clone(
      dtype=jnp.float64, kernels=kernels.XLA
    )
    wide = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float64), inputs), cpu)
    want_output, want_grads = jax.device_get(forward_and_gradient(reference)(*wide))
  device = jax.devices()[0]
  emit({"device": device.device_kind, "platform": device.platform})
  # A CPU computes float32 products in float32 at either precision: one pass there.
  precisions = ("highest",) if device.platform == "cpu" else tuple(TOLERANCES)
  for precision in precisions:
    forward_tol, grad_tol = TOLERANCES[precision]
    with jax.default_matmul_precision(precision):
      output, grads = jax.device_get(forward_and_gradient(model)(*jax.device_put(inputs, device)))
    emit(_check(f"forward, float32 {precision}", _max_error(output, want_output), forward_tol))
    emit(
      _check(f"loss gradient, float32 {precision}", _gradient_error(grads, want_grads), grad_tol)
    )

  config.model.dtype = "bfloat16"
  half = train.create_model(config, mesh)
  output = jax.jit(lambda *a: half.apply(*a, train=False))(variables, images, masks)
  bf16_error = _max_error(np.asarray(output, np.float32), want_output)
  tx = train.create_optimizer(train.INITIAL, config)
  state = train.create_train_state(half, tx, mesh, spec["size"], 0)
  step = train.make_train_step(train.INITIAL, config, half, mesh)
  batch = parallel.global_batch({"image": images, "mask": masks}, mesh)
  finite = True
  for _ in range(3):
    state, metrics = step(state, batch, parallel.replicate(vgg_variables, mesh))
    finite &= bool(np.isfinite(float(metrics["loss"])) and int(metrics["nonfinite"]) == 0)
  emit(
    {
      "check": "bfloat16 train steps finite (forward error reported, not checked)",
      "error": bf16_error,
      "tolerance": None,
      "passed": finite,
    }
  )


def _config(spec: dict[str, Any]):
  from configs import default  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.depth, config.model.features = spec["depth"], tuple(spec["features"])
  config.data.image_size, config.optim.batch_size = spec["size"], spec["batch"]
  config.model.conv_impl = spec.get("conv_impl", "auto")
  return config


def _random_batch_stats(variables: dict[str, Any]) -> dict[str, Any]:
  """Running means and variances drawn at random, so the inference pass uses them."""
  import flax  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(1)
  flat = flax.traverse_util.flatten_dict(variables["batch_stats"])
  stats = {
    path: (rng.normal(0, 0.2, v.shape) if path[-1] == "mean" else rng.uniform(0.5, 1.5, v.shape))
    for path, v in flat.items()
  }
  stats = {path: value.astype(np.float32) for path, value in stats.items()}
  return {**variables, "batch_stats": flax.traverse_util.unflatten_dict(stats)}


def _max_error(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _gradient_error(got: Any, want: Any) -> float:
  """The largest error norm of a gradient leaf, against that leaf's norm or, for leaves whose
  gradient is small, 1% of the whole gradient's."""
  import jax  # pylint: disable=import-outside-toplevel

  pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  total = np.sqrt(sum(np.sum(np.square(w)) for _, w in pairs))
  return max(
    float(np.linalg.norm(np.asarray(g, np.float64) - w) / max(np.linalg.norm(w), 0.01 * total))
    for g, w in pairs
  )


def _check(name: str, error: float, tolerance: float) -> dict[str, Any]:
  return {"check": name, "error": error, "tolerance": tolerance, "passed": error <= tolerance}


def time_runs(spec: dict[str, Any]) -> None:
  """One framework at one size, batch and dtype: pconv_jax's inference, then its train step (which
  consumes the state); PyTorch's train step first (a torch.compile run cut short keeps it)."""
  if spec["framework"] == JAX:
    results = workloads.run_jax({**spec, "modes": workloads.MODES})
  else:
    results = workloads.run_torch({**spec, "modes": workloads.MODES[::-1]})
  for result in results:
    emit(result)


def measure_ceilings(spec: dict[str, Any]) -> None:
  for dtype in DTYPES:
    emit({"dtype": dtype, **workloads.run_ceiling({"size": spec["size"], "dtype": dtype})[0]})


def emit(result: dict[str, Any]) -> None:
  """Hands one result to the orchestrator (a marked stdout line)."""
  print(RESULT + json.dumps(result), flush=True)


def check_imports(spec: dict[str, Any]) -> None:
  """Everything the other tasks import (a missing package fails here, in seconds)."""
  del spec
  import configs.default  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import pconv_jax.train  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


_TASKS = {
  "imports": check_imports,
  "correctness": check_correctness,
  "time": time_runs,
  "ceilings": measure_ceilings,
}


# --------------------------------------------------------------------------------------------------
# Orchestration.


class Budget:
  """No run starts after `seconds`; every run ends by `seconds` + `grace`."""

  def __init__(self, seconds: float, grace: float = 60.0):
    self.start_by = time.monotonic() + seconds
    self.end_by = self.start_by + grace

  def spent(self) -> bool:
    return time.monotonic() >= self.start_by

  def timeout(self) -> float:
    return max(self.end_by - time.monotonic(), 1.0)


_OOM = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError")


def run_task(spec: dict[str, Any], timeout: float) -> tuple[list[Any], str | None]:
  """(the results the worker printed, None) or (those it printed before it stopped, why it
  stopped). A worker that runs out of time is killed with its process group (compiler workers
  too)."""
  env = dict(os.environ)
  if spec.get("framework") == JAX:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  else:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # Leave the device to PyTorch.
  if env.get("JAX_PLATFORMS") and "cpu" not in env["JAX_PLATFORMS"]:
    env["JAX_PLATFORMS"] += ",cpu"  # The float64 reference runs on the CPU.
  proc = subprocess.Popen(
    [sys.executable, "-m", "benchmarks.accelerator_check", f"--worker={json.dumps(spec)}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
    problem = None if proc.returncode == 0 else _failure(stderr)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    problem = f"cut: ran past the time budget ({timeout:.0f} s)"
  results = []
  for line in stdout.splitlines():
    if line.startswith(RESULT):
      try:
        results.append(json.loads(line.removeprefix(RESULT)))
      except json.JSONDecodeError:
        problem = problem or f"failed: unreadable result {line[:200]!r}"
  return results, problem


def _failure(stderr: str) -> str:
  """Why a worker failed, its last exception line first, after "out of memory: " or "failed: "."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", line)]
  last = errors[-1] if errors else (lines[-1] if lines else "no output")
  kind = "out of memory" if any(s in last for s in _OOM) else "failed"
  return f"{kind}: {last[:400]} | " + " | ".join(lines[-6:])[-800:]


def plan(tiny: bool) -> dict[str, Any]:
  """Shapes of the check, and its timing rows in priority order: (size, batch or None for the
  memory-bound batch, frameworks, dtypes). The paper's networks, or a tiny one on the accelerator
  path (XLA's convolutions) with fewer rows."""
  if tiny:
    return {
      "check": {"size": 32, "depth": 3, "features": [8, 16, 16], "batch": 2, "conv_impl": "xla"},
      "depth": {32: 3},
      "features": [8, 16, 16],
      "rows": [
        (32, 2, (JAX, EAGER, COMPILED), ("bfloat16",)),
        (32, None, (JAX, EAGER), ("bfloat16",)),
      ],
      "matmul": 512,
      "compile_backend": "aot_eager",
      "conv_impl": "xla",
      "repeats": 2,
    }
  return {
    # The paper's widths at 128x128 (6 levels, 2x2 at the bottom): the float64 reference takes
    # seconds on a CPU (about 50 s for the whole check on 2 cores).
    "check": {"size": 128, "depth": 6, "features": list(paper_features(6)), "batch": 2},
    "depth": {256: 7, 512: 8},
    "features": None,
    # The targets' row first; bfloat16 before float32 beyond batch 6 at 256x256.
    "rows": [
      (256, 6, (JAX, EAGER, COMPILED), ("bfloat16",)),
      (256, 6, (JAX, EAGER), ("float32",)),
      (256, None, (JAX, EAGER), ("bfloat16",)),
      (512, 6, (JAX, EAGER), ("bfloat16",)),
      (256, 6, (COMPILED,), ("float32",)),
      (256, None, (JAX, EAGER), ("float32",)),
      (512, 6, (JAX, EAGER), ("float32",)),
    ],
    "matmul": 8192,
    "compile_backend": "inductor",
    "conv_impl": "auto",
    "repeats": _REPEATS.value,
  }


def large_batch(result: dict[str, Any], batch: int, max_batch: int) -> int:
  """The largest batch (a multiple of 8, at most `max_batch`) whose train step should fit in 80% of
  the device's memory, from a train step's peak at `batch`; twice `batch` where the device reports
  no memory."""
  if not result.get("bytes_limit"):
    return min(2 * batch, max_batch)
  fits = int(0.8 * result["bytes_limit"] / (result["peak_bytes"] / batch))
  return max(min(fits // 8 * 8, max_batch), batch)


def timing_rows(the_plan: dict[str, Any], skip_torch: bool) -> list[dict[str, Any]]:
  """The runs in priority order, interleaving the frameworks; `batch` None is the memory-bound
  batch, decided on the way."""
  return [
    {"framework": framework, "size": size, "batch": batch, "dtype": dtype}
    for size, batch, frameworks, dtypes in the_plan["rows"]
    for dtype in dtypes
    for framework in frameworks
    if framework == JAX or not skip_torch
  ]


def timing_spec(row: dict[str, Any], the_plan: dict[str, Any], batch: int) -> dict[str, Any]:
  depth = the_plan["depth"][row["size"]]
  spec = {
    "task": "time",
    "framework": JAX if row["framework"] == JAX else "torch",
    "size": row["size"],
    "depth": depth,
    "batch": batch,
    "features": the_plan["features"] or list(paper_features(depth)),
    "dtype": row["dtype"],
    "conv_impl": the_plan["conv_impl"],
    "warmup": 1,
    "repeats": the_plan["repeats"],
    "max_seconds": 20.0,
  }
  if row["framework"] != JAX:
    spec |= {"channels_last": True, "compile": row["framework"] == COMPILED}
    spec["compile_backend"] = the_plan["compile_backend"]
  return spec


def summarise(
  row: dict[str, Any], spec: dict[str, Any], run: dict[str, Any], ceilings: dict[str, Any] | None
) -> dict[str, Any]:
  median = statistics.median(run["times"])
  flops = workloads.useful_flops(
    run["mode"], spec["size"], spec["depth"], spec["batch"], spec["features"]
  )
  out = {
    **row,
    **{k: v for k, v in run.items() if k != "times"},
    "batch": spec["batch"],
    "times": run["times"],
    "ms_median": 1e3 * median,
    "images_per_s": spec["batch"] / median,
    "useful_tflops": flops / median / 1e12,
  }
  if row["dtype"] in (ceilings or {}):
    out["mfu_pct"] = 100 * out["useful_tflops"] / ceilings[row["dtype"]]["tflops"]
  return out


def format_table(results: list[dict[str, Any]]) -> str:
  lines = [
    "| impl | dtype | size | batch | mode | ms/step median (min-max) | images/s | MFU % | "
    "compile s | peak MB | pconv_jax speed-up |",
    "|" + "---|" * 11,
  ]
  key = lambda r: (r["dtype"], r["size"], r["batch"], r["mode"])  # noqa: E731
  ours = {key(r): r["images_per_s"] for r in results if r["framework"] == JAX and "times" in r}
  for r in results:
    if "times" not in r:
      lines.append(
        f"| {r['framework']} | {r['dtype']} | {r['size']} | {r.get('batch') or ''} | "
        f"{r.get('mode', '-')} | {r['problem'][:160]} | | | | | |"
      )
      continue
    ours_rate = ours.get(key(r)) if r["framework"] != JAX else None
    speed_up = f"{ours_rate / r['images_per_s']:.2f}x" if ours_rate else ""
    mfu = f"{r['mfu_pct']:.1f}" if "mfu_pct" in r else ""
    times = [1e3 * t for t in r["times"]]
    compile_s = "eager" if r["framework"] == EAGER else f"{r['compile_s']:.1f}"
    lines.append(
      f"| {r['framework']} | {r['dtype']} | {r['size']} | {r['batch']} | {r['mode']} | "
      f"{r['ms_median']:.1f} ({min(times):.1f}-{max(times):.1f}) | {r['images_per_s']:.1f} | "
      f"{mfu} | {compile_s} | {r['peak_bytes'] / 2**20:.0f} | "
      f"{speed_up} |"
    )
  return "\n".join(lines)


def targets(results: list[dict[str, Any]], size: int, batch: int) -> list[dict[str, Any]]:
  """The issue's targets for a train step at (size, batch) in bfloat16, where both sides ran."""
  rate = {
    r["framework"]: r
    for r in results
    if "times" in r
    and (r["mode"], r["dtype"], r["size"], r["batch"]) == ("train", "bfloat16", size, batch)
  }
  if JAX not in rate:
    return []
  found = []
  for peer in (EAGER, COMPILED):
    if peer in rate:
      value = rate[JAX]["images_per_s"] / rate[peer]["images_per_s"]
      found.append({"target": f"train speed-up over {peer}", "value": value, "want": TARGETS[peer]})
  if "mfu_pct" in rate[JAX]:
    found.append(
      {"target": "train MFU %", "value": rate[JAX]["mfu_pct"], "want": TARGETS["mfu_pct"]}
    )
  return [{**t, "met": t["value"] >= t["want"]} for t in found]


def main(argv: Sequence[str]) -> None:
  del argv
  if _WORKER.value:
    spec = json.loads(_WORKER.value)
    _TASKS[spec["task"]](spec)
    sys.stdout.flush()
    os._exit(0)  # Results are out; skip the frameworks' teardown.
  the_plan = plan(_TINY.value)
  report = Report(_JSON.value)
  budget = Budget(_BUDGET.value)
  _, problem = report.run({"task": "imports"}, budget.timeout())
  if problem:
    print(
      f"error: pconv_jax cannot be imported here ({problem.split(' | ')[0]}); install the "
      "requirements, or bring their wheels (docs/accelerators.md).",
      file=sys.stderr,
    )
    sys.exit(3)
  found, problem = report.run({"task": "correctness", **the_plan["check"]}, budget.timeout())
  device = found[0] if found else {}
  report.correctness = found[1:] + (
    [{"check": "correctness run", "passed": False, "problem": problem}] if problem else []
  )
  for c in report.correctness:
    shown = f"error {c['error']:.2e}" if "error" in c else c["problem"]
    print(f"{'ok  ' if c['passed'] else 'FAIL'} {c['check']}: {shown}", flush=True)
  report.write()
  skip_torch = _torch_problem(device.get("platform"))
  if skip_torch:
    print(f"PyTorch not timed: {skip_torch}", flush=True)
  found, problem = report.run({"task": "ceilings", "size": the_plan["matmul"]}, budget.timeout())
  for c in found:
    c["tflops"] = 2 * the_plan["matmul"] ** 3 / statistics.median(c["times"]) / 1e12
    report.ceilings[c["dtype"]] = c
    print(
      f"ceiling {c['dtype']} (default precision): {c['tflops']:.1f} TFLOP/s ({c['device']})",
      flush=True,
    )
  if problem:
    print(f"ceilings: {problem}", flush=True)
  batches = {}
  for row in timing_rows(the_plan, bool(skip_torch)):
    batch = row["batch"] or batches.get(row["dtype"])
    if budget.spent() or batch is None:
      why = "time budget spent" if budget.spent() else "no batch-6 train step to size it from"
      report.results.append({**row, "problem": f"skipped: {why}"})
      continue
    spec = timing_spec(row, the_plan, batch)
    runs, problem = report.run(spec, budget.timeout())
    while problem and problem.startswith("out of memory") and row["batch"] is None:
      if spec["batch"] // 2 <= the_plan["rows"][0][1] or budget.spent():
        break
      spec["batch"] //= 2
      runs, problem = report.run(spec, budget.timeout())
    for run in runs:
      report.results.append(summarise(row, spec, run, report.ceilings))
      r = report.results[-1]
      print(
        f"{r['framework']} {r['dtype']} {r['size']}x{r['size']} batch {r['batch']} {r['mode']}: "
        f"{r['images_per_s']:.1f} images/s, compile {r['compile_s']:.1f} s",
        flush=True,
      )
    if problem:
      report.results.append({**row, "batch": spec["batch"], "problem": problem})
      print(f"{row['framework']} {row['dtype']} {row['size']}: {problem}", flush=True)
    train = [r for r in runs if r["mode"] == "train"]
    if row["framework"] == JAX and row["size"] == the_plan["rows"][0][0] and train:
      if row["batch"] is None:  # PyTorch gets the batch that fitted.
        batches[row["dtype"]] = spec["batch"]
      else:
        batches[row["dtype"]] = large_batch(train[0], spec["batch"], _MAX_BATCH.value)
    report.write()
  report.targets = targets(report.results, *the_plan["rows"][0][:2])
  report.write()
  print(format_table(report.results))
  for t in report.targets:
    verdict = "met" if t["met"] else "NOT met"
    print(f"target {t['target']}: {t['value']:.2f} (want >= {t['want']}): {verdict}")
  if not report.correct():
    print("error: a correctness check failed (see above).", file=sys.stderr)
    sys.exit(1)
  failed = [r for r in report.results if r.get("problem", "").startswith("failed")]
  if failed:
    print(f"error: {len(failed)} timing run(s) failed (see the table).", file=sys.stderr)
    sys.exit(2)


class Report:
  """Everything the check found, written to JSON after each step (a check cut short keeps it)."""

  def __init__(self, path: str):
    self.path = path
    self.command = "python -m benchmarks.accelerator_check " + " ".join(sys.argv[1:])
    self.started = time.strftime("%Y-%m-%d %H:%M:%S")
    self.correctness: list[dict[str, Any]] = []
    self.ceilings: dict[str, Any] = {}
    self.results: list[dict[str, Any]] = []
    self.targets: list[dict[str, Any]] = []
    self.tasks: list[dict[str, Any]] = []  # Every worker: what it ran, its wall time, its problem.

  def run(self, spec: dict[str, Any], timeout: float) -> tuple[list[Any], str | None]:
    """`run_task`, recorded."""
    start = time.monotonic()
    found, problem = run_task(spec, timeout)
    self.tasks.append({**spec, "wall_s": time.monotonic() - start, "problem": problem})
    return found, problem

  def correct(self) -> bool:
    return bool(self.correctness) and all(c["passed"] for c in self.correctness)

  def write(self) -> None:
    fields = ("command", "started", "correctness", "ceilings", "results", "targets", "tasks")
    report = {name: getattr(self, name) for name in fields}
    report |= {"correct": self.correct(), "table": format_table(self.results)}
    with open(self.path, "w") as f:
      json.dump(report, f, indent=1)


def _torch_problem(platform: str | None) -> str | None:
  """Why PyTorch is not timed beside JAX here, or None."""
  if _SKIP_TORCH.value:
    return "--skip_torch"
  if importlib.util.find_spec("torch") is None:
    return "PyTorch is not installed (pip install torch, or pass --skip_torch)"
  if platform not in ("gpu", None) and not _TINY.value:
    return f"the reference runs on CUDA or in --tiny only; JAX runs on {platform}"
  return None


if __name__ == "__main__":
  app.run(main)
