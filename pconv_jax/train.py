"""Training: the sharded train state and step, the paper's two stages, and the loop.

Stage "initial" trains everything. Stage "finetune" (from `config.stages.initial_steps` on, or from
the start when `config.stages.finetune_from` names a stage-1 checkpoint) freezes the encoder's
BatchNorm: its statistics are used as running averages and passed through unchanged, its scale/bias
get zero updates (optax), and the learning rate drops. The optimizer state starts afresh at the
stage change.
"""

from collections.abc import Mapping
import functools
import logging
import signal
import threading
import time
from typing import Any

from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from pconv_jax import (
  checkpoints,
  evaluate,
  images,
  input_pipeline,
  kernels,
  learning_curve,
  losses,
  masks,
  models,
  parallel,
  vgg,
)
from pconv_jax.errors import ConfigError
from pconv_jax.metric_writer import MetricWriter

INITIAL, FINETUNE = "initial", "finetune"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def stage_at(step: int, stages: ml_collections.ConfigDict) -> str:
  return INITIAL if step < stages.initial_steps else FINETUNE


def is_encoder_bn(path: tuple[str, ...]) -> bool:
  return path[0] == "encoder" and "bn" in path


def learning_rate(stage: str, stages: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
  """The stage's learning rate: a constant (whose optimizer state is that of checkpoints written
  before schedules existed), or in "finetune" with `stages.finetune_schedule="cosine"` a cosine
  decay to 0 against the optimizer's count, which restarts with the stage."""
  if stage == FINETUNE and stages.finetune_schedule == "cosine":
    return optax.cosine_decay_schedule(stages.finetune_lr, max(stages.finetune_steps, 1))
  return stages.initial_lr if stage == INITIAL else stages.finetune_lr


def learning_rate_at(step: int, stages: ml_collections.ConfigDict) -> float:
  """The learning rate of the update at global `step`."""
  stage = stage_at(step, stages)
  rate = learning_rate(stage, stages)
  return float(rate(step - stages.initial_steps)) if callable(rate) else float(rate)


def create_optimizer(stage: str, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with the stage's learning rate; in "finetune" the encoder's
  BatchNorm scale/bias get zero updates."""
  adam = optax.adam(learning_rate(stage, config.stages), b1=config.optim.b1, b2=config.optim.b2)
  if stage == INITIAL:
    return adam

  def labels(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
      {k: "frozen" if is_encoder_bn(k) else "train" for k in flat}
    )

  return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


def _init_fn(model: models.PUNet, tx: optax.GradientTransformation, image_size: int):
  """`init(rng, variables) -> TrainState`: fresh variables from `rng` when `variables` is None."""

  def init(rng, variables):
    if variables is None:
      image = jnp.zeros((1, image_size, image_size, model.out_channels), jnp.float32)
      variables = model.init(rng, image, jnp.ones(image.shape[:3] + (1,), jnp.float32))
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
    )

  return init


def create_train_state(
  model: models.PUNet,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  image_size: int,
  seed: int,
  variables: Mapping[str, Any] | None = None,
) -> TrainState:
  """A new state born replicated on `mesh`: fresh variables from `seed`,
  or the given (replicated) `variables`."""
  init = jax.jit(_init_fn(model, tx, image_size), out_shardings=parallel.replicated(mesh))
  return init(jax.random.key(seed), variables)


def abstract_train_state(
  model: models.PUNet, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, image_size: int
) -> TrainState:
  """Shapes, dtypes and shardings of the train state, computed without allocating it."""
  shapes = jax.eval_shape(_init_fn(model, tx, image_size), jax.random.key(0), None)
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  vgg_variables: Any,
  *,
  model: models.PUNet,
  tx: optax.GradientTransformation,
  loss_weights: Mapping[str, float],
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on the paper's loss, computed with the model's kernels. A non-finite loss or
  gradient leaves the state unchanged (but counted). A model with a frozen encoder BatchNorm returns
  the encoder's statistics unchanged."""
  image, mask = batch["image"], batch["mask"]

  def loss_fn(params):
    outputs, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      image,
      mask,
      train=True,
      mutable=["batch_stats"],
    )
    total, terms = losses.inpainting_loss(
      outputs, image, mask, vgg_variables, loss_weights, model.kernels
    )
    return total, (terms, updates["batch_stats"])

  (total, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  new = state.replace(
    params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
  )
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  metrics = {
    "loss": total,
    **terms,
    "grad_norm": grad_norm,
    "nonfinite": (~finite).astype(jnp.int32),
  }
  return new.replace(step=state.step + 1), metrics


def create_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> models.PUNet:
  """The network of `config.model`, computed with the kernels
  `config.model.conv_impl` picks for `mesh`."""
  return models.create_model(
    config.model, kernels=kernels.select(config.model.conv_impl, mesh.devices.flat)
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for configurations that cannot train, before anything is compiled."""
  multiple = 2**config.model.depth
  if config.data.image_size % multiple:
    raise ConfigError(
      f"config.data.image_size={config.data.image_size} is not a multiple of 2**depth={multiple} "
      f"(config.model.depth={config.model.depth}): use {multiple}, {2 * multiple}, ... or change "
      "the depth."
    )
  if config.optim.batch_size <= 0:
    raise ConfigError(f"config.optim.batch_size must be positive, got {config.optim.batch_size}.")
  if (
    min(config.stages.initial_steps, config.stages.finetune_steps) < 0
    or config.stages.initial_steps + config.stages.finetune_steps == 0
  ):
    raise ConfigError("config.stages.initial_steps and finetune_steps must be >= 0 and not both 0.")
  if min(config.stages.initial_lr, config.stages.finetune_lr) <= 0:
    raise ConfigError("config.stages.initial_lr and finetune_lr must be positive.")
  if config.stages.finetune_schedule not in ("constant", "cosine"):
    raise ConfigError(
      "config.stages.finetune_schedule must be 'constant' or 'cosine', got "
      f"{config.stages.finetune_schedule!r}."
    )
  if config.train.nonfinite not in ("stop", "skip"):
    raise ConfigError(
      f"config.train.nonfinite must be 'stop' or 'skip', got {config.train.nonfinite!r}."
    )
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(
      f"config.model.dtype must be float32, bfloat16 or float16, got {config.model.dtype!r}."
    )
  try:
    models.create_model(config.model).check_variant()
  except ValueError as error:
    raise ConfigError(str(error).replace("PUNet.", "config.model.") + ".") from error
  if config.model.conv_impl not in kernels.CONV_IMPLS:
    raise ConfigError(
      f"config.model.conv_impl must be one of {kernels.CONV_IMPLS}, got {config.model.conv_impl!r}."
    )
  for name in ("log_every_steps", "sample_every_steps"):
    if config.train[name] <= 0:
      raise ConfigError(f"config.train.{name} must be positive.")
  if config.eval.every_steps is not None and config.eval.every_steps <= 0:
    raise ConfigError("config.eval.every_steps must be positive, or None for no learning curve.")
  if config.checkpoint.every_steps <= 0 or config.checkpoint.max_to_keep <= 0:
    raise ConfigError("config.checkpoint.every_steps and max_to_keep must be positive.")
  if config.eval.at_end or config.eval.every_steps:  # Not only after days of training.
    evaluate.validate_config(config)


class PreemptionWatcher:
  """True at the step where every process should save and stop (SIGTERM, e.g. a TPU preemption)."""

  def __init__(self):
    self._signalled = threading.Event()
    # Multi-process runs use JAX's coordination service, which traps SIGTERM.
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._signalled.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()

  def close(self) -> None:
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._previous)


def sample_grid(targets: np.ndarray, masks_: np.ndarray, outputs: np.ndarray) -> np.ndarray:
  """Rows of [input with white holes, output, composite, ground truth], HWC uint8."""
  return images.grid(
    [
      [images.with_white_holes(x, m), y, images.composite(y, x, m), x]
      for x, m, y in zip(targets, masks_, outputs)
    ]
  )


class _Samples:
  """Fixed evaluation images and masks, inpainted with the current model for visual progress."""

  def __init__(
    self, config: ml_collections.ConfigDict, model: models.PUNet, mesh: jax.sharding.Mesh
  ):
    size = config.data.image_size
    available = len(input_pipeline.create_image_source(config.data, train=False))
    self.images = input_pipeline.load_eval_images(
      config.data, min(config.train.num_samples, available)
    )
    self.masks = np.stack(
      [
        masks.random_mask(np.random.default_rng([config.seed, 7, i]), size, 0.1, 0.5)
        for i in range(len(self.images))
      ]
    ).astype(np.float32)
    self._inputs = [parallel.replicate(a, mesh) for a in (self.images, self.masks)]
    self._predict = jax.jit(
      functools.partial(model.apply, train=False), out_shardings=parallel.replicated(mesh)
    )

  def write(
    self, state: TrainState, writer: MetricWriter, directory: epath.Path, step: int
  ) -> None:
    outputs = self._predict(
      {"params": state.params, "batch_stats": state.batch_stats}, *self._inputs
    )
    grid = sample_grid(self.images, self.masks, np.asarray(outputs.addressable_data(0)))
    if jax.process_index() == 0:
      directory.mkdir(parents=True, exist_ok=True)
      with (directory / f"step_{step:08d}.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
      writer.write_images(step, {"samples/input_output_composite_truth": grid})


class _LearningCurve:
  """Held-out evaluation every `config.eval.every_steps` steps: scalars for TensorBoard and the
  JSON lines, and the whole curve redrawn as `<workdir>/eval/learning_curve.png`."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: models.PUNet,
    mesh: jax.sharding.Mesh,
    workdir: epath.Path,
  ):
    self._evaluator = evaluate.Evaluator(config, model, mesh)
    self._workdir = workdir
    self._layout_written = False

  def write(self, state: TrainState, writer: MetricWriter, step: int) -> None:
    rows, _ = self._evaluator.evaluate({"params": state.params, "batch_stats": state.batch_stats})
    values = learning_curve.scalars(rows)
    if not self._layout_written:
      writer.write_layout(learning_curve.layout(list(values)))
      self._layout_written = True
    writer.write_scalars(step, values)
    if jax.process_index() == 0:
      learning_curve.draw(self._workdir)


def _log_parameter_overview(params: Any) -> None:
  for side in sorted(params):
    count = sum(x.size for x in jax.tree.leaves(params[side]))
    logging.info("Parameters in %s: %s", side, f"{count:,}")
  logging.info("Parameters in total: %s", f"{sum(x.size for x in jax.tree.leaves(params)):,}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> TrainState:
  """Trains (resuming from `workdir/checkpoints` when it has any), evaluates the final checkpoint if
  `config.eval.at_end`, and returns the final state.

  `workdir` may be local or on an object store (gs://...: then pip install -r
  requirements-gcs.txt)."""
  workdir = epath.Path(workdir)
  validate_config(config)
  try:
    mesh = parallel.create_mesh(config.mesh.data)
  except ValueError as error:
    raise ConfigError(str(error)) from error
  if config.optim.batch_size % mesh.size:
    raise ConfigError(
      f"config.optim.batch_size={config.optim.batch_size} (the global batch) is not divisible "
      f"by the {mesh.size} data-parallel devices: use a multiple of {mesh.size}."
    )
  stages = config.stages
  total_steps = stages.initial_steps + stages.finetune_steps
  model = create_model(config, mesh)
  vgg_variables = vgg.resolve_weights(config.loss.vgg_weights, required=config.loss.require_vgg)
  if vgg_variables is not None:
    vgg_variables = parallel.replicate(vgg_variables, mesh)
  data_iter = input_pipeline.create_train_iter(
    config.data, global_batch_size=config.optim.batch_size, seed=config.seed
  )
  train_images = len(input_pipeline.create_image_source(config.data, train=True))
  samples = _Samples(config, model, mesh)
  curve = _LearningCurve(config, model, mesh, workdir) if config.eval.every_steps else None
  manager = checkpoints.train_manager(workdir / "checkpoints", config.checkpoint.max_to_keep)

  def abstract(meta: Mapping[str, Any]) -> TrainState:
    _check_architecture(
      meta, config, f"the checkpoint of step {meta['step']} in {manager.directory}"
    )
    return abstract_train_state(
      model, create_optimizer(meta["stage"], config), mesh, config.data.image_size
    )

  try:
    restored = checkpoints.restore_train_state(manager, abstract, data_iter)
  except BaseException:
    data_iter.close()
    manager.close()
    raise
  if restored is not None:
    state, meta = restored
    state_stage = meta["stage"]
    logging.info(
      "Resumed from %s at step %d (stage %s).", manager.directory, meta["step"], state_stage
    )
  elif stages.finetune_from:
    _, variables, meta = checkpoints.load_model(stages.finetune_from)
    _check_architecture(meta, config, f"config.stages.finetune_from={stages.finetune_from}")
    variables = parallel.replicate(jax.device_get(variables), mesh)
    state_stage = FINETUNE
    state = create_train_state(
      model,
      create_optimizer(FINETUNE, config),
      mesh,
      config.data.image_size,
      config.seed,
      variables,
    ).replace(step=jnp.asarray(stages.initial_steps, jnp.int32))
    data_iter.seek(stages.initial_steps)
    logging.info("Starting the finetune stage from %s.", stages.finetune_from)
  else:
    state_stage = stage_at(0, stages)
    state = create_train_state(
      model, create_optimizer(state_stage, config), mesh, config.data.image_size, config.seed
    )
  _log_parameter_overview(state.params)
  writer = MetricWriter(
    workdir / "logs", start_step=int(state.step), enabled=jax.process_index() == 0
  )
  writer.write_hparams(config.to_dict() | {"vgg_losses": vgg_variables is not None})

  step = int(state.step)
  compiled, compiled_stage = None, None
  preemption = PreemptionWatcher()
  pending: list[dict[str, jax.Array]] = []
  last_log = (time.perf_counter(), step)
  finished = False
  try:
    if curve and step == 0:
      curve.write(state, writer, step)
    while step < total_steps:
      stage = stage_at(step, stages)
      # initial -> finetune within the run: a fresh optimizer at the lower rate.
      if stage != state_stage:
        tx = create_optimizer(stage, config)
        state = state.replace(
          opt_state=jax.jit(tx.init, out_shardings=parallel.replicated(mesh))(state.params)
        )
        state_stage = stage
        logging.info(
          "Step %d: entering the finetune stage (encoder BatchNorm frozen, lr %g, %s).",
          step,
          stages.finetune_lr,
          stages.finetune_schedule,
        )
      batch = parallel.global_batch(next(data_iter), mesh)
      if compiled_stage != stage:
        compiled = _compile_step(stage, config, model, mesh, state, batch, vgg_variables)
        compiled_stage = stage
        last_log = (time.perf_counter(), step)  # Step times exclude compilation.
      state, metrics = compiled(state, batch, vgg_variables)
      step += 1
      pending.append(metrics)

      if step % config.train.log_every_steps == 0 or step == total_steps:
        last_log = _log_metrics(pending, writer, step, total_steps, last_log, config, stage)
        pending = []
      if step % config.train.sample_every_steps == 0 or step == total_steps:
        samples.write(state, writer, workdir / "samples", step)
      if curve and (step % config.eval.every_steps == 0 or step == total_steps):
        curve.write(state, writer, step)
      preempted = preemption.reached(step)
      if step % config.checkpoint.every_steps == 0 or step == total_steps or preempted:
        apply_nonfinite_policy(pending, step, config.train.nonfinite)
        meta = {
          "step": step,
          "stage": stage,
          "model": config.model.to_dict(),
          "config": config.to_dict(),
          "vgg_losses": vgg_variables is not None,
          "train_images": train_images,
        }
        checkpoints.save_train_state(manager, step, state, data_iter, meta)
      if preempted:
        logging.warning(
          "Preemption signal: saved step %d; exiting. Rerun the same command to resume.", step
        )
        break
    checkpoints.finish_saving(manager, step)  # The loop ends by saving its last step.
    finished = True
  finally:
    preemption.close()
    # Everything is closed; after a failure (a full disk, say) closing may fail again, which must
    # not hide the first error.
    problems = []
    for close in (data_iter.close, writer.close, manager.close):
      try:
        close()
      except Exception as error:
        logging.warning("Closing after the run: %s", error)
        problems.append(error)
    if finished and problems:
      raise problems[0]
  if step == total_steps and config.eval.at_end:
    evaluate.evaluate(config, workdir)
  return state


def _check_architecture(
  meta: Mapping[str, Any], config: ml_collections.ConfigDict, what: str
) -> None:
  saved, wanted = models.architecture(meta["model"]), models.architecture(config.model)
  differing = [name for name in saved if saved[name] != wanted[name]]
  if differing:
    config_has = ", ".join(f"{name}={wanted[name]!r}" for name in differing)
    flags = " ".join(f"--config.model.{name}={_flag(saved[name])}" for name in differing)
    raise ConfigError(
      f"config.model does not fit {what}, which holds another network (the config has "
      f"{config_has}): use the checkpoint's model settings ({flags}), or another workdir to train "
      "a different network."
    )


def _flag(value: Any) -> str:
  """A value as a command-line config override spells it."""
  if isinstance(value, (list, tuple)):
    return "'(" + ",".join(map(str, value)) + ",)'"
  return str(value)


def make_train_step(
  stage: str, config: ml_collections.ConfigDict, model: models.PUNet, mesh: jax.sharding.Mesh
):
  """The stage's train step, jitted with the state replicated, the batch split over `data` and the
  old state donated. Called as `step(state, batch, vgg_variables) -> (state, metrics)`. `model` is
  `create_model(config, mesh)`'s (or a clone of it)."""
  step_fn = functools.partial(
    train_step,
    model=model.clone(freeze_encoder_bn=stage == FINETUNE),
    tx=create_optimizer(stage, config),
    loss_weights={name: float(config.loss[name]) for name in losses.TERMS},
  )
  replicated = parallel.replicated(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )


def _compile_step(
  stage: str,
  config: ml_collections.ConfigDict,
  model: models.PUNet,
  mesh: jax.sharding.Mesh,
  state: TrainState,
  batch: Mapping[str, jax.Array],
  vgg_variables: Any,
):
  start = time.perf_counter()
  compiled = (
    make_train_step(stage, config, model, mesh).lower(state, batch, vgg_variables).compile()
  )
  logging.info("Compiled the %s train step in %.1f s.", stage, time.perf_counter() - start)
  return compiled


def apply_nonfinite_policy(pending: list[dict[str, jax.Array]], step: int, policy: str) -> None:
  """Applies config.train.nonfinite ("stop" or "skip") to the metrics of the steps up to `step` not
  yet checked.

  The train step already left the state unchanged at those steps, so no checkpoint ever holds a
  non-finite state.
  """
  bad = [i for i, m in enumerate(jax.device_get([m["nonfinite"] for m in pending])) if m]
  if not bad:
    return
  first = step - len(pending) + bad[0] + 1
  if policy == "stop":
    raise FloatingPointError(
      f"Non-finite loss or gradient at step {first} ({len(bad)} such step(s) up to step {step}); "
      "those updates were not applied and the checkpoints hold finite states. Lower the learning "
      "rate or check the data; config.train.nonfinite='skip' skips such steps instead."
    )
  logging.warning("Skipped %d non-finite update(s) between steps %d and %d.", len(bad), first, step)


def _log_metrics(
  pending: list[dict[str, jax.Array]],
  writer: MetricWriter,
  step: int,
  total_steps: int,
  last_log: tuple[float, int],
  config: ml_collections.ConfigDict,
  stage: str,
) -> tuple[float, int]:
  apply_nonfinite_policy(pending, step, config.train.nonfinite)
  values = jax.device_get(pending)
  now = time.perf_counter()
  seconds, steps = now - last_log[0], step - last_log[1]
  scalars = {
    f"train_{k}": float(np.mean([v[k] for v in values])) for k in values[0] if k != "nonfinite"
  }
  scalars |= {
    "train_step_seconds": seconds / steps,
    "train_images_per_second": steps * config.optim.batch_size / seconds,
    "train_learning_rate": learning_rate_at(step - 1, config.stages),
  }
  writer.write_scalars(step, scalars)
  eta = (total_steps - step) * seconds / steps
  logging.info(
    "Step %d/%d (%s) %.1f%%, %.3f s/step, ETA %s",
    step,
    total_steps,
    stage,
    100 * step / total_steps,
    seconds / steps,
    format_duration(eta),
  )
  return now, step


def format_duration(seconds: float) -> str:
  """HH:MM:SS, with the days in front from 24 hours on ("2d 03:04:05")."""
  days, rest = divmod(round(seconds), 86400)
  return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))
