"""What the benchmarks run, shared by `benchmarks.train_step` (CPU, against PyTorch) and
`benchmarks.accelerator_check` (GPU/TPU): the useful-FLOP count, and workers that each time one
configuration (pconv_jax, the PyTorch reference, a matrix product) in the current process.

Useful FLOPs are counted from the convolutions' shapes (2 FLOPs per multiply-add, the same count for
both frameworks): the network's data convolutions (forward; a train step adds their input and weight
gradients, except the input gradient of the first layer), VGG-16 to conv3_3 on target, output and
composite (forward) and its input gradient for output and composite. Mask updates, BatchNorm, Gram
matrices and element-wise work are not counted.
"""

from collections.abc import Callable, Iterator, Sequence
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

JAX, TORCH = "pconv_jax", "torch"
MODES = ("infer", "train")
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


def inputs(size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
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


def random_vgg_variables(seed: int) -> dict[str, Any]:
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


def run_jax(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
  """pconv_jax's inference and/or train step (`spec["modes"]`; in that order, as the train step
  consumes the state) at one configuration, each result as it is ready. The peak memory is the
  process's so far."""
  import jax  # pylint: disable=import-outside-toplevel

  from configs import default  # pylint: disable=import-outside-toplevel
  from pconv_jax import parallel, train  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.model.depth, config.model.features = spec["depth"], tuple(spec["features"])
  config.model.dtype = spec.get("dtype", "float32")
  config.model.conv_impl = spec.get("conv_impl", "auto")
  config.data.image_size, config.optim.batch_size = spec["size"], spec["batch"]
  mesh = parallel.create_mesh(1)
  model = train.create_model(config, mesh)
  images, masks = inputs(spec["size"], spec["batch"])
  batch = {
    "image": jax.device_put(images, parallel.batch_sharded(mesh)),
    "mask": jax.device_put(masks, parallel.batch_sharded(mesh)),
  }
  state = train.create_train_state(
    model, train.create_optimizer(train.INITIAL, config), mesh, spec["size"], 0
  )
  for mode in [m for m in MODES if m in spec["modes"]]:
    start = time.perf_counter()
    if mode == "train":
      vgg_variables = jax.device_put(random_vgg_variables(0), parallel.replicated(mesh))
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
    cost = (cost[0] if isinstance(cost, list) and cost else cost) or {}
    first, times = _time(step, spec["warmup"], spec["repeats"], spec["max_seconds"])
    stats = jax.devices()[0].memory_stats() or {}
    yield {
      "mode": mode,
      "times": times,
      "first_step_s": first,
      "compile_s": compile_s,
      "xla_gflop": cost["flops"] / 1e9 if "flops" in cost else None,
      "peak_bytes": stats.get("peak_bytes_in_use", _peak_rss()),
      "memory_method": "peak_bytes_in_use" if "peak_bytes_in_use" in stats else "ru_maxrss",
      "bytes_limit": stats.get("bytes_limit"),
      "device": jax.devices()[0].device_kind,
    }


def run_torch(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
  """The reference's modes `spec["modes"]`, in that order, at one configuration, each result as it
  is ready."""
  for mode in spec["modes"]:
    yield _run_torch(spec, mode)


def _run_torch(spec: dict[str, Any], mode: str) -> dict[str, Any]:
  """The reference on CUDA when there is one: eager, or with `spec["compile"]` through
  `torch.compile` (backend `spec["compile_backend"]`, default inductor); float32, or bfloat16
  autocast with `spec["dtype"] == "bfloat16"`; NCHW, or NHWC with `spec["channels_last"]`."""
  import torch  # pylint: disable=import-outside-toplevel

  from benchmarks import torch_reference as ref  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True  # Autotuned convolutions, as XLA's are; warm-up pays.
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  layout = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
  net = ref.randomize(ref.TorchPUNet(spec["depth"], tuple(spec["features"])))
  net = net.to(device, memory_format=layout)
  images, masks = (
    torch.from_numpy(a.transpose(0, 3, 1, 2)).to(device)
    for a in inputs(spec["size"], spec["batch"])
  )
  masks = masks.expand(-1, 3, -1, -1).contiguous(memory_format=layout)
  images = images.contiguous(memory_format=layout)
  autocast = torch.autocast(
    device, torch.bfloat16, enabled=spec.get("dtype", "float32") == "bfloat16"
  )
  compiled = (
    (lambda f: torch.compile(f, backend=spec.get("compile_backend", "inductor")))
    if spec.get("compile")
    else (lambda f: f)
  )
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  if mode == "train":
    net.train()
    vgg = ref.VGG16Pool3().to(device, memory_format=layout)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.999))
    loss_fn = compiled(lambda x, m: ref.inpainting_loss(net(x, m), x, m, vgg))

    def step():
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = loss_fn(images, masks)
      loss.backward()
      opt.step()
      sync()
  else:
    net.eval()
    forward = compiled(net)

    def step():
      with torch.inference_mode(), autocast:
        forward(images, masks)
      sync()

  setup_s = time.perf_counter() - start
  first, times = _time(step, spec["warmup"], spec["repeats"], spec["max_seconds"])
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
  return {
    "mode": mode,
    "times": times,
    "first_step_s": first,
    # torch.compile compiles in the first step.
    "compile_s": first - statistics.median(times) if spec.get("compile") else setup_s,
    "xla_gflop": None,
    "peak_bytes": peak,
    "memory_method": "max_memory_allocated" if device == "cuda" else "ru_maxrss",
    "device": torch.cuda.get_device_name() if device == "cuda" else device,
    "threads": torch.get_num_threads(),
  }


def run_ceiling(spec: dict[str, Any]) -> list[dict[str, Any]]:
  """An n x n x n matrix product in JAX (`spec["dtype"]`, default float32): the compute ceiling."""
  import jax  # pylint: disable=import-outside-toplevel

  n, dtype = spec["size"], spec.get("dtype", "float32")
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jax.numpy.matmul)
  # Steady clocks: repeat for a second (at most 1000 products).
  first, times = _time(lambda: matmul(a, b).block_until_ready(), 2, 1000, 1.0)
  return [
    {
      "times": times,
      "first_step_s": first,
      "compile_s": 0.0,
      "xla_gflop": 2 * n**3 / 1e9,
      "peak_bytes": _peak_rss(),
      "memory_method": "ru_maxrss",
      "device": jax.devices()[0].device_kind,
    }
  ]


RUNNERS = {JAX: run_jax, TORCH: run_torch, "ceiling": run_ceiling}
