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

Useful FLOPs are counted from the convolutions' shapes (2 FLOPs per multiply-add, the same count for
both frameworks): the network's data convolutions (forward; a train step adds their input and weight
gradients, except the input gradient of the first layer), VGG-16 to conv3_3 on target, output and
composite (forward) and its input gradient for output and composite. Mask updates, BatchNorm, Gram
matrices and element-wise work are not counted. XLA's own cost analysis of the compiled JAX step is
recorded in the JSON as `xla_gflop`.

From the repository root:
  python -m benchmarks.train_step [--configs=256:7:1,256:7:4,512:8:6] [--modes=train,infer] \
      [--skip_torch]
"""

from collections.abc import Callable, Sequence
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
import numpy as np

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

JAX, TORCH = "pconv_jax", "torch"
# VGG-16's convolutions to conv3_3, per pooling block.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256))


# --------------------------------------------------------------------------------------------------
# Useful FLOPs.


def network_layers(size: int, depth: int, features: Sequence[int]) -> list[int]:
  """Multiply-adds per image of the PConv U-Net's data convolutions, first encoder layer first."""
  kernels = ((7, 5, 5) + (3,) * depth)[:depth]
  macs, cin = [], 3
  for i, (cout, k) in enumerate(zip(features, kernels), start=1):
    macs.append((size >> i) ** 2 * k * k * cin * cout)
    cin = cout
  for i in range(depth, 0, -1):
    cin = features[i - 1] + (features[i - 2] if i > 1 else 3)
    cout = features[i - 2] if i > 1 else 3
    macs.append((size >> (i - 1)) ** 2 * 9 * cin * cout)
  return macs


def vgg_macs(size: int) -> int:
  """Multiply-adds per image of VGG-16's conv1_1 ... conv3_3."""
  total, cin = 0, 3
  for level, block in enumerate(VGG_BLOCKS):
    for cout in block:
      total += (size >> level) ** 2 * 9 * cin * cout
      cin = cout
  return total


def useful_flops(mode: str, size: int, depth: int, batch: int, features: Sequence[int]) -> int:
  layers = network_layers(size, depth, features)
  if mode == "infer":
    return 2 * batch * sum(layers)
  return 2 * batch * (3 * sum(layers) - layers[0] + 5 * vgg_macs(size))


# --------------------------------------------------------------------------------------------------
# Workers: one configuration each, in a fresh process.


def _inputs(size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Images in [-1, 1] and masks (1 = valid) with rectangular holes
  over about a quarter of the image, NHWC."""
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  masks = np.ones((batch, size, size, 1), np.float32)
  for b in range(batch):
    for _ in range(4):
      h, w = rng.integers(size // 8, size // 3, 2)
      y, x = rng.integers(0, size - h), rng.integers(0, size - w)
      masks[b, y : y + h, x : x + w] = 0
  return images, masks


def _time(
  step: Callable[[], Any], warmup: int, repeats: int, max_seconds: float
) -> tuple[float, list[float]]:
  """(first step s, timed step times s); `step` must block until its results exist."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup):
    step()
  times, begin = [], time.perf_counter()
  while len(times) < repeats and (len(times) < 2 or time.perf_counter() - begin < max_seconds):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first, times


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
    1 if sys.platform == "darwin" else 1024
  )


def _random_vgg_variables(seed: int) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from pconv_jax import vgg  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  params = {
    name: {
      "kernel": rng.normal(0, (2 / (9 * cin)) ** 0.5, (3, 3, cin, cout)).astype(np.float32),
      "bias": np.zeros(cout, np.float32),
    }
    for name, cin, cout in vgg.CONVS
  }
  scale, offset = vgg.input_normalization("torchvision")
  return jax.tree.map(
    jnp.asarray, {"params": params, vgg.NORMALIZATION: {"scale": scale, "offset": offset}}
  )


def run_jax(spec: dict[str, Any]) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel

  from configs import default  # pylint: disable=import-outside-toplevel
  from pconv_jax import parallel, train  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.depth, config.model.features = spec["depth"], tuple(spec["features"])
  config.model.dtype = spec.get("dtype", "float32")
  config.data.image_size, config.optim.batch_size = spec["size"], spec["batch"]
  mesh = parallel.create_mesh(1)
  model = train.create_model(config, mesh)
  images, masks = _inputs(spec["size"], spec["batch"])
  batch = {
    "image": jax.device_put(images, parallel.batch_sharded(mesh)),
    "mask": jax.device_put(masks, parallel.batch_sharded(mesh)),
  }
  state = train.create_train_state(
    model, train.create_optimizer(train.INITIAL, config), mesh, spec["size"], 0
  )
  start = time.perf_counter()
  if spec["mode"] == "train":
    vgg_variables = jax.device_put(_random_vgg_variables(0), parallel.replicated(mesh))
    compiled = (
      train.make_train_step(train.INITIAL, config, model, mesh)
      .lower(state, batch, vgg_variables)
      .compile()
    )
    carry = [state]

    def step():
      carry[0], metrics = compiled(carry[0], batch, vgg_variables)
      jax.block_until_ready((carry[0], metrics))
  else:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    compiled = (
      jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
      .lower(variables, batch["image"], batch["mask"])
      .compile()
    )

    def step():
      compiled(variables, batch["image"], batch["mask"]).block_until_ready()

  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  first, times = _time(step, spec["warmup"], spec["repeats"], spec["max_seconds"])
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "times": times,
    "first_step_s": first,
    "compile_s": compile_s,
    "xla_gflop": (cost or {}).get("flops", float("nan")) / 1e9,
    "peak_bytes": stats.get("peak_bytes_in_use", _peak_rss()),
    "memory_method": "peak_bytes_in_use" if "peak_bytes_in_use" in stats else "ru_maxrss",
    "device": jax.devices()[0].device_kind,
  }


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel

  from benchmarks import torch_reference as ref  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  net = ref.randomize(ref.TorchPUNet(spec["depth"], tuple(spec["features"]))).to(device)
  images, masks = (
    torch.from_numpy(a.transpose(0, 3, 1, 2)).to(device)
    for a in _inputs(spec["size"], spec["batch"])
  )
  masks = masks.expand(-1, 3, -1, -1).contiguous()
  start = time.perf_counter()
  if spec["mode"] == "train":
    net.train()
    vgg = ref.VGG16Pool3().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.999))

    def step():
      opt.zero_grad(set_to_none=True)
      ref.inpainting_loss(net(images, masks), images, masks, vgg).backward()
      opt.step()
      sync()
  else:
    net.eval()

    def step():
      with torch.inference_mode():
        net(images, masks)
      sync()

  setup_s = time.perf_counter() - start
  first, times = _time(step, spec["warmup"], spec["repeats"], spec["max_seconds"])
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
  return {
    "times": times,
    "first_step_s": first,
    "compile_s": setup_s,
    "xla_gflop": float("nan"),
    "peak_bytes": peak,
    "memory_method": "max_memory_allocated" if device == "cuda" else "ru_maxrss",
    "device": device,
    "threads": torch.get_num_threads(),
  }


def run_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  n = spec["size"]
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  first, times = _time(lambda: matmul(a, b).block_until_ready(), 2, 10, 30.0)
  return {
    "times": times,
    "first_step_s": first,
    "compile_s": 0.0,
    "xla_gflop": 2 * n**3 / 1e9,
    "peak_bytes": _peak_rss(),
    "memory_method": "ru_maxrss",
    "device": jax.devices()[0].device_kind,
  }


_RUNNERS = {JAX: run_jax, TORCH: run_torch, "ceiling": run_ceiling}


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
  result = json.loads(proc.stdout.strip().splitlines()[-1])
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
    print(json.dumps(_RUNNERS[spec["framework"]](spec)))
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
