"""Training: a two-stage run, sharding parity, the frozen encoder,
non-finite steps, resume and bad configs."""

import errno
import json
import logging
import math
import os
from pathlib import Path
import re
import signal
import socket
import subprocess
import sys
import time
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tiny_config

from configs import demo
from pconv_jax import (
  checkpoints,
  evaluate,
  hugepages,
  input_pipeline,
  kernels,
  learning_curve,
  metric_writer,
  parallel,
  train,
  vgg,
)

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(workdir: Path) -> dict[int, dict]:
  return {
    step: m for step, m in metric_writer.read_metrics(workdir / "logs").items() if "train_loss" in m
  }


def final_params(workdir: Path) -> dict:
  _, variables, meta = checkpoints.load_model(workdir / "checkpoints")
  return {
    "meta_step": meta["step"],
    **flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/"),
  }


def test_two_stage_run_leaves_checkpoints_logs_samples_and_evaluation(tmp_path):
  config = tiny_config.get_config()
  config.eval.update(
    at_end=True, num_images=None, masks_per_bin=1, baselines=("mean_fill",), inception=False
  )
  state = train.train_and_evaluate(config, tmp_path)
  assert int(state.step) == 6
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(m["train_loss"]) for m in metrics.values())
  assert metrics[3]["train_learning_rate"] == pytest.approx(config.stages.initial_lr)
  assert metrics[4]["train_learning_rate"] == pytest.approx(config.stages.finetune_lr)
  assert metrics[1]["train_perceptual"] == 0.0  # No VGG weights in the test cache: the term is off.
  _, _, meta = checkpoints.load_model(tmp_path / "checkpoints")
  assert meta["step"] == 6 and meta["stage"] == "finetune" and meta["vgg_losses"] is False
  assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
    "step_00000003.png",
    "step_00000006.png",
  ]
  assert json.loads((tmp_path / "logs" / "hparams.json").read_text())["optim"]["batch_size"] == 8
  assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
  table = (tmp_path / "eval" / "step_6" / "results.md").read_text()
  assert "| Mean colour |" in table and "| PConv (this model) |" in table
  assert "without the perceptual and style losses" in table
  # The notes say what this run trained, from its checkpoint.
  assert (
    "The model: PConv U-Net of depth 3, widths 8-16-16, after 6 steps (finetune stage) at batch 8 "
    "on 32x32 crops of 7 images (the demo's natural photos). Loss weights: valid 1, hole 6, "
    "perceptual 0.05, style_out 120, style_comp 120, tv 0.1." in table
  )


def test_learning_curve_holds_each_evaluation_and_the_final_one_equals_the_checkpoints(tmp_path):
  config = tiny_config.get_config()
  config.eval.update(every_steps=3, num_images=None, masks_per_bin=1, baselines=("mean_fill",))
  train.train_and_evaluate(config, tmp_path)
  curve = {
    step: {k: v for k, v in values.items() if k.startswith("eval/")}
    for step, values in metric_writer.read_metrics(tmp_path / "logs").items()
  }
  curve = {step: values for step, values in curve.items() if values}
  assert sorted(curve) == [0, 3, 6]
  # 2 metrics x 2 mask sets x 6 bins x (model, mean fill), each bin with 2 pairs.
  assert all(len(values) == 48 for values in curve.values())
  assert curve[0]["eval/psnr/N/0.2-0.3/pconv"] != curve[6]["eval/psnr/N/0.2-0.3/pconv"]
  # The baselines do not train: one value at every step, a horizontal line.
  baseline = {k: v for k, v in curve[0].items() if k.endswith("/mean_fill")}
  assert all({k: curve[s][k] for k in baseline} == baseline for s in (3, 6))
  # An independent evaluation of the step-6 checkpoint (reloaded, its own Evaluator) agrees.
  results = evaluate.evaluate(config, tmp_path / "again", checkpoint=tmp_path / "checkpoints")
  assert results["step"] == 6
  for row in results["rows"]:
    for metric in ("psnr", "ssim"):
      name = learning_curve.tag(metric, row["mask_set"], row["bin_index"], row["method"])
      np.testing.assert_allclose(curve[6][name], row[metric], rtol=1e-5)
  with Image.open(tmp_path / "eval" / "learning_curve.png") as png:
    assert png.format == "PNG" and png.width > 1000
  learning_curve.main([str(tmp_path), "--output", str(tmp_path / "redrawn.png")])
  with Image.open(tmp_path / "redrawn.png") as png:
    assert png.size == Image.open(tmp_path / "eval" / "learning_curve.png").size
  with pytest.raises(SystemExit, match="no logs/hparams.json"):
    learning_curve.main([str(tmp_path / "checkpoints")])
  events = next((tmp_path / "logs").glob("events.out.tfevents.*")).read_bytes()
  assert b"custom_scalars" in events and b"eval/psnr/B/0.5-0.6/mean_fill" in events


def make_state_and_batches(config, mesh, num_batches):
  model = train.create_model(config, mesh)
  state = train.create_train_state(
    model, train.create_optimizer("initial", config), mesh, config.data.image_size, config.seed
  )
  with input_pipeline.create_train_iter(
    config.data, global_batch_size=config.optim.batch_size, seed=config.seed
  ) as data:
    batches = [next(data) for _ in range(num_batches)]
  return model, state, batches


def random_vgg_variables(seed=0):
  """Small random VGG-16 weights through the torchvision loader
  (the loss then has all six terms)."""
  rng = np.random.default_rng(seed)
  state = {}
  for index, (_, cin, cout) in zip((0, 2, 5, 7, 10, 12, 14), vgg.CONVS):
    state[f"features.{index}.weight"] = rng.normal(
      0, (2 / (9 * cin)) ** 0.5, (cout, cin, 3, 3)
    ).astype(np.float32)
    state[f"features.{index}.bias"] = np.zeros(cout, np.float32)
  return vgg.from_torchvision_state_dict(state)


def test_eight_devices_match_one_device_with_the_full_loss():
  config = tiny_config.get_config()
  vgg_variables = random_vgg_variables()
  losses, trained = {}, {}
  for devices in (1, 8):
    mesh = parallel.create_mesh(devices)
    model, state, batches = make_state_and_batches(config, mesh, 3)
    step = train.make_train_step("initial", config, model, mesh)
    losses[devices] = []
    for batch in batches:
      state, metrics = step(
        state, parallel.global_batch(batch, mesh), parallel.replicate(vgg_variables, mesh)
      )
      losses[devices].append(float(metrics["loss"]))
      assert float(metrics["style_out"]) > 0 and float(metrics["perceptual"]) > 0
    assert len(state.params["encoder"]["block_1"]["conv"]["kernel"].sharding.device_set) == devices
    trained[devices] = jax.device_get((state.params, state.opt_state[0].mu))
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
  # Adam's first moment (a running mean of the gradients, summed in another order on 8 devices, with
  # cancellation in the biases') agrees to 1e-3 of each leaf's scale.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max()),
    trained[8][1],
    trained[1][1],
  )
  # Adam moves each element by about the learning rate whatever its gradient's size, so the few
  # elements whose gradient is at rounding level can step either way (at most 2 lr a step apart);
  # the others agree to a small fraction of one step.
  lr = config.stages.initial_lr

  def assert_params_agree(a, b):
    assert np.abs(a - b).max() <= 2 * len(batches) * lr
    assert np.mean(np.isclose(a, b, rtol=1e-4, atol=0.05 * lr)) >= 0.99

  jax.tree.map(assert_params_agree, trained[8][0], trained[1][0])
  assert losses[1][0] != losses[1][2]


def test_xla_and_cpu_kernels_give_the_same_step_loss_and_gradients_in_float64():
  """The train step built for a mesh of 2 CPU devices with conv_impl "xla" (the plain path) and
  "cpu" (the CPU engine, whose rules the sizes here exercise: per-tap products, phases, by-image and
  matrix-product gradients, pooling and Gram VJPs) computes the same loss, gradients and update.
  After the first step, Adam's first moment is (1 - b1) times the gradients."""
  config = tiny_config.get_config()
  config.model.features = (32, 32, 32)  # The last layer then has few outputs (9 x 3 < 35 inputs).
  config.data.image_size, config.optim.batch_size = 64, 2
  mesh = parallel.create_mesh(2)
  with jax.enable_x64(True):
    wide = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
    vgg_variables = parallel.replicate(wide(random_vgg_variables()), mesh)
    with input_pipeline.create_train_iter(config.data, global_batch_size=2, seed=0) as data:
      batch = parallel.global_batch(wide(next(data)), mesh)
    results = {}
    for impl in ("xla", "cpu"):
      config.model.conv_impl = impl
      model = train.create_model(config, mesh).clone(dtype=jnp.float64)
      assert isinstance(model.kernels, kernels.CpuKernels) == (impl == "cpu")
      variables = wide(model.init(jax.random.key(0), batch["image"][:1], batch["mask"][:1]))
      tx = train.create_optimizer("initial", config)
      state = train.create_train_state(model, tx, mesh, 64, 0, parallel.replicate(variables, mesh))
      new_state, metrics = train.make_train_step("initial", config, model, mesh)(
        state, batch, vgg_variables
      )
      assert metrics["loss"].dtype == jnp.float64 and all(
        v > 0 for k, v in metrics.items() if k not in ("nonfinite", "ssim")
      )
      assert metrics["ssim"] == 0.0  # Weight 0 in the paper's loss: not computed.
      adam = new_state.opt_state[0]
      gradients = jax.tree.map(lambda mu: mu / (1 - config.optim.b1), adam.mu)
      results[impl] = jax.device_get(
        (metrics, gradients, new_state.params, new_state.batch_stats, adam.nu)
      )
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)  # noqa: E731
  jax.tree.map(close, results["cpu"], results["xla"])


def test_compiled_train_step_stays_on_the_devices():
  """The train step as GPUs and TPUs compile it (XLA's convolutions), for a mesh of 8 devices: no
  host transfer or callback inside the step, the batch split 8 ways, the gradients reduced on the
  devices, and every leaf of the old state donated to the new one."""
  config = tiny_config.get_config()
  config.model.conv_impl = "xla"
  mesh = parallel.create_mesh(8)
  model, state, batches = make_state_and_batches(config, mesh, 1)
  batch = parallel.global_batch(batches[0], mesh)
  vgg_variables = parallel.replicate(random_vgg_variables(), mesh)
  compiled = (
    train.make_train_step("initial", config, model, mesh)
    .lower(state, batch, vgg_variables)
    .compile()
  )
  hlo = compiled.as_text()
  for host_op in ("infeed", "outfeed", " send(", " recv(", "callback", "host"):
    assert host_op not in hlo, host_op
  assert "all-reduce" in hlo
  assert hlo.splitlines()[0].count("-alias)") == len(jax.tree.leaves(state))
  image = compiled.input_shardings[0][1]["image"]
  assert image.shard_shape(batch["image"].shape)[0] == config.optim.batch_size // 8


def test_finetune_step_freezes_encoder_batchnorm_only():
  config = tiny_config.get_config()
  mesh = parallel.create_mesh()
  model, state, batches = make_state_and_batches(config, mesh, 2)
  initial = train.make_train_step("initial", config, model, mesh)
  state, _ = initial(state, parallel.global_batch(batches[0], mesh), None)
  tx = train.create_optimizer("finetune", config)
  state = state.replace(opt_state=tx.init(state.params))
  before = jax.device_get(state)
  finetune = train.make_train_step("finetune", config, model, mesh)
  after = jax.device_get(finetune(state, parallel.global_batch(batches[1], mesh), None)[0])

  jax.tree.map(
    np.testing.assert_array_equal, before.batch_stats["encoder"], after.batch_stats["encoder"]
  )
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), before.batch_stats["decoder"], after.batch_stats["decoder"]
  )
  assert all(jax.tree.leaves(changed))
  flat_before = flax.traverse_util.flatten_dict(before.params)
  flat_after = flax.traverse_util.flatten_dict(after.params)
  for path, value in flat_before.items():
    if train.is_encoder_bn(path):
      np.testing.assert_array_equal(value, flat_after[path], err_msg=str(path))
    else:
      assert np.any(value != flat_after[path]), path
  assert any(train.is_encoder_bn(path) for path in flat_before)


def test_cosine_finetune_schedule_decays_adam_steps_to_zero():
  config = tiny_config.get_config()
  config.stages.update(initial_steps=2, finetune_steps=4, finetune_schedule="cosine")
  lr = config.stages.finetune_lr
  # Closed form: lr/2 (1 + cos(pi t / T)) over the stage's T updates, after the constant initial lr.
  expected = [config.stages.initial_lr] * 2 + [
    lr / 2 * (1 + math.cos(math.pi * t / 4)) for t in range(4)
  ]
  got = [train.learning_rate_at(step, config.stages) for step in range(6)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)

  # With a constant gradient Adam's step is -lr (up to eps): the updates follow the schedule,
  # and the encoder's BatchNorm stays frozen.
  params = {"encoder": {"bn": {"scale": jnp.ones(3)}}, "decoder": {"conv": {"kernel": jnp.ones(3)}}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = train.create_optimizer("finetune", config)
  opt_state = tx.init(params)
  for want in expected[2:]:
    updates, opt_state = tx.update(grads, opt_state, params)
    np.testing.assert_allclose(updates["decoder"]["conv"]["kernel"], -want, rtol=1e-5)
    np.testing.assert_array_equal(updates["encoder"]["bn"]["scale"], 0.0)

  config.stages.finetune_schedule = "constant"
  assert train.learning_rate_at(5, config.stages) == pytest.approx(lr)
  # A constant rate keeps Adam's state as it was before schedules: older checkpoints resume.
  for stage in ("initial", "finetune"):
    state = train.create_optimizer(stage, config).init(params)
    assert "ScaleByScheduleState" not in repr(jax.tree.structure(state))


def test_bfloat16_activations_train_with_float32_parameters():
  config = tiny_config.get_config()
  config.model.dtype = "bfloat16"
  mesh = parallel.create_mesh()
  model, state, batches = make_state_and_batches(config, mesh, 2)
  step = train.make_train_step("initial", config, model, mesh)
  for batch in batches:
    state, metrics = step(state, parallel.global_batch(batch, mesh), random_vgg_variables())
    assert np.isfinite(float(metrics["loss"])) and int(metrics["nonfinite"]) == 0
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


def test_nonfinite_update_is_not_applied_and_policy_is_applied():
  config = tiny_config.get_config()
  mesh = parallel.create_mesh()
  model, state, batches = make_state_and_batches(config, mesh, 1)
  bad = dict(batches[0], image=np.full_like(batches[0]["image"], np.nan))
  before = jax.device_get(state)
  step = train.make_train_step("initial", config, model, mesh)
  after, metrics = step(state, parallel.global_batch(bad, mesh), None)
  assert int(metrics["nonfinite"]) == 1 and int(after.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before.params, jax.device_get(after.params))
  jax.tree.map(np.testing.assert_array_equal, before.opt_state, jax.device_get(after.opt_state))

  pending = [{"nonfinite": jnp.int32(0)}, metrics]
  with pytest.raises(FloatingPointError, match="at step 10 .*nonfinite='skip'"):
    train.apply_nonfinite_policy(pending, 10, "stop")
  train.apply_nonfinite_policy(pending, 10, "skip")  # Logs and goes on.


@pytest.mark.parametrize(
  "override,match",
  [
    (("data", "image_size", 36), "image_size=36 is not a multiple of 2\\*\\*depth=8"),
    (("optim", "batch_size", 6), "batch_size=6 .* not divisible by the 8 data-parallel devices"),
    (("train", "nonfinite", "ignore"), "'stop' or 'skip'"),
    (("mesh", "data", 16), "config.mesh.data=16"),
    (("model", "output_activation", "relu"), "config.model.output_activation must be one of"),
    (("model", "input_mean", (0.5, 0.5, 0.5)), "config.model.input_mean and input_std are set"),
    (("eval", "every_steps", 0), "config.eval.every_steps must be positive"),
    (("stages", "finetune_schedule", "linear"), "'constant' or 'cosine', got 'linear'"),
  ],
)
def test_invalid_configs_fail_before_compiling(tmp_path, override, match):
  config = tiny_config.get_config()
  section, name, value = override
  config[section][name] = value
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_learning_curve_draws_an_exact_reconstruction():
  metrics = {
    step: {"eval/psnr/N/0.01-0.1/pconv": psnr, "eval/psnr/N/0.01-0.1/telea": math.inf}
    for step, psnr in ((0, 10.0), (5, math.inf), (10, 30.0))
  }
  names = {"pconv": "PConv", "telea": "Telea"}
  learning_curve.plot(metrics, "/dev/null", names, "an infinite PSNR")


def test_the_quality_recipe_validates_and_unknown_variants_are_refused():
  config = demo.get_config("quality")
  train.validate_config(config)
  assert config.eval.every_steps and config.model.partial
  with pytest.raises(ValueError, match="the only one is 'quality'"):
    demo.get_config("fast")


def test_unknown_dataset_and_missing_vgg_weights_are_explained(tmp_path):
  config = tiny_config.get_config()
  config.data.source = "imagenet"
  with pytest.raises(ValueError, match="config.data.source"):
    train.train_and_evaluate(config, tmp_path)
  config = tiny_config.get_config()
  config.loss.require_vgg = True
  with pytest.raises(vgg.VGGWeightsError, match="python -m pconv_jax.vgg fetch"):
    train.train_and_evaluate(config, tmp_path)


def test_unreadable_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  config = tiny_config.get_config()
  config.stages.finetune_steps = 0
  train.train_and_evaluate(config, tmp_path)
  for path in (tmp_path / "checkpoints" / "3" / "model").rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # Truncate every file.
  config.stages.finetune_steps = 1
  state = train.train_and_evaluate(config, tmp_path)
  assert "step 3" in caplog.text and "unreadable" in caplog.text
  assert int(state.step) == 4
  assert [p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["3"]
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3, 4]

  # A deleted latest step resumes from the one before.
  import shutil

  shutil.rmtree(tmp_path / "checkpoints" / "4")
  config.stages.finetune_steps = 2
  assert int(train.train_and_evaluate(config, tmp_path).step) == 5


def test_a_transient_read_error_keeps_the_newest_checkpoint(tmp_path, monkeypatch):
  """A read error that is not corruption (here permissions, then an object store's outage) is
  retried; if it stays, the run stops with the newest step in place; if it passes, training resumes
  from that step."""
  config = tiny_config.get_config()
  config.stages.finetune_steps = 0
  train.train_and_evaluate(config, tmp_path)
  monkeypatch.setattr(checkpoints, "RETRY_SECONDS", 0.01)
  restore = ocp.CheckpointManager.restore
  attempts = []

  def denied(self, step, *args, **kwargs):
    attempts.append(step)
    raise PermissionError(13, "Permission denied", str(tmp_path / "checkpoints" / str(step)))

  monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
  config.stages.finetune_steps = 1
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"Cannot read checkpoint step 3 .* after 3 attempts \(PermissionError: .* step is kept",
  ):
    train.train_and_evaluate(config, tmp_path)
  assert attempts == [3, 3, 3] and (tmp_path / "checkpoints" / "3").is_dir()
  assert not (tmp_path / "corrupt_checkpoints").exists()

  outages = [ValueError("UNAVAILABLE: the object store did not answer")]

  def flaky(self, *args, **kwargs):
    if outages:
      raise outages.pop()
    return restore(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  assert int(train.train_and_evaluate(config, tmp_path).step) == 4


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs (needs root, as CI has); skipped where mounting is not allowed."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, check=False
  )
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  yield disk
  subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(small_disk):
  """Training on a 1 MiB disk: one error line naming the step, the cause and the last complete
  checkpoint (no traceback); that checkpoint loads, and with space the same run resumes from it."""
  workdir = small_disk / "w"
  process = run_main(workdir, env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
  _, log = process.communicate(timeout=300)
  last = log.strip().splitlines()[-1]
  assert process.returncode == 1 and "Traceback" not in log, log[-3000:]
  # A checkpoint's save or another write (logs, samples) hits the full disk first.
  match = re.fullmatch(
    r"error: (?:Saving checkpoint step \d+ in \S+ failed|Storage error on \S+): No space left on "
    r"device\. The last complete checkpoint, step (\d+) in (\S+), is intact: free space and rerun "
    r"the same command to resume from it \(the steps after \d+ are trained again\)\.",
    last,
  )
  assert match and match[2] == str(workdir / "checkpoints"), last
  kept = int(match[1])
  assert checkpoints.load_model(workdir / "checkpoints")[2]["step"] == kept

  subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
  config = tiny_config.get_config()
  assert int(train.train_and_evaluate(config, workdir).step) == 6
  assert not list((workdir / "checkpoints").glob("*tmp*"))


def test_asyncio_reports_of_a_failed_save_task_are_dropped():
  """A save task's storage error also reaches asyncio's "Task exception was never retrieved" report
  (with a traceback) now and then; the run's one line says it all. Other task errors stay."""
  from pconv_jax import main  # Defines the absl flags of the entry point: imported here only.

  def asyncio_record(error):
    return logging.LogRecord(
      "asyncio",
      logging.ERROR,
      "base_events.py",
      1,
      "Task exception was never retrieved",
      (),
      (type(error), error, None),
    )

  full = ValueError("ABORTED: Error writing local file \"0.count\" [os_error_code='28']")
  assert not main._quiet_orbax(asyncio_record(full))
  assert main._quiet_orbax(asyncio_record(ValueError("a bug")))


def test_a_failed_save_names_the_step_the_cause_and_what_is_kept(tmp_path, monkeypatch):
  """Storage errors of a save (an OSError, or tensorstore's status in a ValueError) become one
  SaveError; any other error is a bug and propagates as it is."""
  directory = tmp_path / "checkpoints"
  checkpoints.save_model(directory, {"params": {"w": np.ones(2)}}, {"depth": 1}, step=2)
  manager = checkpoints.train_manager(directory, 5)
  state = types.SimpleNamespace(params={}, batch_stats={}, opt_state={})
  for error, cause, remedy in [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device", "free space"),
    (OSError(errno.EACCES, "Permission denied"), "Permission denied", "fix the permissions"),
    (
      ValueError("RESOURCE_EXHAUSTED: quota exceeded"),
      "RESOURCE_EXHAUSTED: quota exceeded",
      "free",
    ),
  ]:

    def fail(*args, error=error, **kwargs):
      raise error

    monkeypatch.setattr(manager, "save", fail)
    with pytest.raises(checkpoints.SaveError) as raised:
      checkpoints.save_train_state(manager, 3, state, None, {})
    assert str(raised.value).startswith(
      f"Saving checkpoint step 3 in {directory} failed: {cause}. The last complete checkpoint, "
      f"step 2 in {directory}, is intact: {remedy}"
    ), raised.value
  monkeypatch.setattr(manager, "save", lambda *a, **k: [][1])
  with pytest.raises(IndexError):
    checkpoints.save_train_state(manager, 3, state, None, {})
  manager.close()


def test_only_errors_of_damaged_data_count_as_corruption():
  damaged = [
    json.JSONDecodeError("Unterminated string", "{", 0),
    ValueError('DATA_LOSS: Error opening "zarr" driver'),
    ValueError('OUT_OF_RANGE: Error reading "w/.zarray" in OCDBT database'),
    ValueError('NOT_FOUND: Metadata at "w/.zarray" does not exist'),
    FileNotFoundError("_CHECKPOINT_METADATA"),
  ]
  passing = [
    PermissionError(13, "Permission denied"),
    MemoryError(),
    OSError(28, "No space left on device"),
    ValueError("UNAVAILABLE: the object store did not answer"),
    ValueError("RESOURCE_EXHAUSTED: out of memory"),
  ]
  assert all(checkpoints.is_corrupt(e) for e in damaged)
  assert not any(checkpoints.is_corrupt(e) for e in passing)


def test_resume_at_the_stage_boundary_equals_one_run(tmp_path):
  """Stop exactly after the initial stage (checkpoint with Adam state
  of stage 1), then resume into finetune."""
  config = tiny_config.get_config()
  train.train_and_evaluate(config, tmp_path / "straight")
  config.stages.finetune_steps = 0
  train.train_and_evaluate(config, tmp_path / "split")
  config.stages.finetune_steps = 3
  train.train_and_evaluate(config, tmp_path / "split")
  want, got = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
  assert got["meta_step"] == 6
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_finetune_from_a_stage1_checkpoint_on_eight_devices(tmp_path):
  config = tiny_config.get_config()
  config.stages.finetune_steps = 0
  train.train_and_evaluate(config, tmp_path / "stage1")
  _, stage1, _ = checkpoints.load_model(tmp_path / "stage1" / "checkpoints")
  config.stages.finetune_steps = 2
  config.stages.finetune_from = str(tmp_path / "stage1" / "checkpoints")
  state = train.train_and_evaluate(config, tmp_path / "stage2")
  assert int(state.step) == 5 and sorted(read_metrics(tmp_path / "stage2")) == [4, 5]
  _, variables, meta = checkpoints.load_model(tmp_path / "stage2" / "checkpoints")
  assert meta["stage"] == "finetune"
  jax.tree.map(
    np.testing.assert_array_equal,
    variables["batch_stats"]["encoder"],
    stage1["batch_stats"]["encoder"],
  )

  config.model.features = (8, 16, 32)
  with pytest.raises(train.ConfigError, match="does not fit config.stages.finetune_from"):
    train.train_and_evaluate(config, tmp_path / "stage2_wider")


def test_resuming_with_another_network_is_refused_and_keeps_the_checkpoints(tmp_path):
  config = tiny_config.get_config()
  config.stages.update(initial_steps=2, finetune_steps=0)
  train.train_and_evaluate(config, tmp_path)
  config.model.depth, config.model.features = 2, (8, 16)
  with pytest.raises(train.ConfigError, match="does not fit the checkpoint of step 2"):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
    "1",
    "2",
  ]


def run_main(workdir, *args, env=None, **popen):
  command = [
    sys.executable,
    "-m",
    "pconv_jax.main",
    "--config",
    str(ROOT / "tests" / "tiny_config.py"),
    "--workdir",
    str(workdir),
    *args,
  ]
  return subprocess.Popen(
    command, cwd=ROOT, env=env or os.environ.copy(), stderr=subprocess.PIPE, text=True, **popen
  )


def wait_for_log(process, text):
  lines = []
  for line in process.stderr:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"{text!r} never logged:\n{''.join(lines)}")


STEPS = ("--config.stages.initial_steps=8", "--config.stages.finetune_steps=8")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  assert run_main(straight, *STEPS).wait() == 0
  process = run_main(killed, *STEPS)
  wait_for_log(process, "Step 4/16")
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert max(read_metrics(killed)) < 16
  resumed = run_main(killed, *STEPS)
  assert "Resumed from" in resumed.communicate()[1] and resumed.returncode == 0

  want, got = final_params(straight), final_params(killed)
  assert got["meta_step"] == 16
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  want_metrics, got_metrics = read_metrics(straight), read_metrics(killed)
  for step in range(1, 17):
    assert got_metrics[step]["train_loss"] == want_metrics[step]["train_loss"], step


def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path):
  process = run_main(tmp_path, *STEPS)
  wait_for_log(process, "Step 3/16")
  process.send_signal(signal.SIGTERM)
  _, rest = process.communicate()
  assert process.returncode == 0, rest
  assert "Preemption signal: saved step" in rest
  saved = int(rest.split("Preemption signal: saved step ")[1].split(";")[0])
  assert saved < 16 and (tmp_path / "checkpoints" / str(saved)).is_dir()
  resumed = run_main(tmp_path, *STEPS)
  assert f"at step {saved}" in resumed.communicate()[1] and resumed.returncode == 0
  assert final_params(tmp_path)["meta_step"] == 16


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  steps = ("--config.stages.initial_steps=2", "--config.stages.finetune_steps=1")
  single = run_main(tmp_path / "single", *steps, "--num_cpu_devices=4", env=env)
  assert single.wait() == 0, single.stderr.read()

  port = _free_port()
  processes = [
    run_main(
      tmp_path / "multi",
      *steps,
      "--num_cpu_devices=2",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      env=env,
    )
    for i in range(2)
  ]
  outputs = [p.communicate()[1] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]

  want, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
  assert sorted(got) == [1, 2, 3]
  for step in got:
    np.testing.assert_allclose(got[step]["train_loss"], want[step]["train_loss"], rtol=1e-5)

  more = run_main(
    tmp_path / "multi",
    "--config.stages.initial_steps=2",
    "--config.stages.finetune_steps=2",
    "--num_cpu_devices=4",
    env=env,
  )
  log = more.communicate()[1]
  assert more.returncode == 0, log[-3000:]
  assert "Resumed from" in log and "continuing the input pipeline at step 3" in log
  assert final_params(tmp_path / "multi")["meta_step"] == 4


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_cli_reports_config_errors_without_traceback(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  process = run_main(tmp_path, "--config.data.image_size=36", env=env)
  _, log = process.communicate()
  assert process.returncode == 1
  assert (
    "error: config.data.image_size=36 is not a multiple of 2**depth=8" in log
    and "Traceback" not in log
  )
  # A CPU run without huge pages says how to get them; it never restarts itself.
  assert (
    "start the command with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in log
  ) == hugepages.missing(env)
  assert "Restarting" not in log
  # A typo'd field: one line with ml_collections' hint.
  process = run_main(tmp_path, "--config.optim.batchsize=4", env=env)
  _, log = process.communicate()
  assert process.returncode == 1 and "Traceback" not in log
  assert log.strip().splitlines()[-1] == (
    "error: --config.optim.batchsize: the config has no field 'batchsize'. "
    'Did you mean "batch_size" instead of "batchsize"?'
  )


def test_cluster_mistakes_end_with_one_line_in_time(tmp_path):
  """A Slurm batch script that runs Python without srun, and a coordinator that never answers: one
  line each, within the timeout, instead of a wait without end or XLA's abort."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  slurm = env | {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}
  _, log = run_main(tmp_path / "a", env=slurm).communicate(timeout=120)
  assert log.strip().splitlines()[-1] == (
    "error: This Slurm job has SLURM_NTASKS=4 tasks, but this process was not started as one of "
    "them: run it with `srun python -m pconv_jax.main ...` (as launch/slurm.sbatch does), or unset "
    "SLURM_NTASKS for a single-process run."
  )
  with socket.socket() as unused:
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
  start = time.monotonic()
  process = run_main(
    tmp_path / "b",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    "--process_id=1",
    "--distributed_timeout_s=3",
    env=env,
  )
  _, log = process.communicate(timeout=120)
  assert process.returncode == 1 and time.monotonic() - start < 60
  assert log.strip().splitlines()[-1] == (
    f"error: process 1 of 2 found no complete job at the coordinator 127.0.0.1:{port} within 3 s: "
    "check that it is process 0's host:port, reachable from every host, and that every process "
    "was started (--distributed_timeout_s sets the wait)."
  )
  assert "Traceback" not in log and "Check failure" not in log


def test_eta_shows_days():
  assert train.format_duration(3725.2) == "01:02:05"
  assert train.format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 03:04:05"
