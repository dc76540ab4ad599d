"""Orbax checkpoints of the project.

A checkpoint directory is an orbax `CheckpointManager` directory: one sub-directory per step, each
holding the item `model` (the Flax variables `params` and `batch_stats`) and the JSON item `meta`
(at least `model`, the model config needed to rebuild the network). Training adds `opt_state` and
`data` (the input iterator of every process) beside them; inference and evaluation read only `model`
and `meta`, so they never need the optimizer.
"""

from collections.abc import Callable, Mapping
import logging
import time
from typing import Any

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from pconv_jax import models
from pconv_jax.errors import UserError

MODEL = "model"
META = "meta"
OPT_STATE = "opt_state"
DATA = "data"
TRAIN_ITEMS = (MODEL, OPT_STATE, DATA, META)


class CheckpointError(UserError, RuntimeError):
  """A checkpoint is missing or unreadable; the message says what to do."""


def _absolute(path: str | epath.Path) -> epath.Path:
  path = epath.Path(path)
  return path if path.is_absolute() else path.resolve()


def save_model(
  directory: str | epath.Path,
  variables: Mapping[str, Any],
  model_config: Mapping[str, Any],
  step: int = 0,
  **meta: Any,
) -> epath.Path:
  """Writes `variables` and the model config as step `step` of
  the checkpoint directory `directory`."""
  directory = _absolute(directory)
  with ocp.CheckpointManager(directory, item_names=(MODEL, META)) as manager:
    manager.save(
      step,
      args=ocp.args.Composite(
        **{
          MODEL: ocp.args.StandardSave(dict(variables)),
          META: ocp.args.JsonSave({"model": dict(model_config), **meta}),
        }
      ),
    )
    manager.wait_until_finished()
  return directory / str(step)


def load_model(
  directory: str | epath.Path, step: int | None = None
) -> tuple[models.PUNet, dict, dict]:
  """Returns (model, variables, meta) from a checkpoint directory: the given step, or the newest
  readable one.

  `meta["step"]` is the step restored; `meta["model"]` the model config.
  """
  directory = _absolute(directory)
  if not directory.is_dir():
    raise CheckpointError(
      f"No checkpoint directory at {directory}. Train a model with `python -m pconv_jax.main "
      "--config ... --workdir DIR` (checkpoints go to DIR/checkpoints) or convert PyTorch weights "
      "with `python -m pconv_jax.convert IN.pth OUT_DIR`."
    )
  with ocp.CheckpointManager(directory, item_names=(MODEL, META)) as manager:
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"{directory} holds no checkpoint steps: is it a checkpoint directory?")
    for i, candidate in enumerate(steps):
      try:
        return _restore_model(manager, candidate)
      except Exception as error:  # Orbax raises many types for truncated or corrupt files.
        if i + 1 == len(steps):
          raise CheckpointError(
            f"Cannot read checkpoint step {candidate} in {directory}: {error}"
          ) from error
        logging.warning(
          "Checkpoint step %d in %s is unreadable (%s); falling back to step %d.",
          candidate,
          directory,
          error,
          steps[i + 1],
        )


def _restore_model(manager: ocp.CheckpointManager, step: int) -> tuple[models.PUNet, dict, dict]:
  meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  meta = {**meta, "step": step}  # The step actually restored, whoever wrote the checkpoint.
  model = models.create_model(meta["model"])
  abstract = abstract_variables(model, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  restored = manager.restore(
    step, args=ocp.args.Composite(**{MODEL: ocp.args.StandardRestore(abstract)})
  )
  return model, restored[MODEL], meta


def abstract_variables(
  model: models.PUNet, sharding: jax.sharding.Sharding, size: int | None = None
) -> dict:
  """Shapes and dtypes of `model`'s variables (no computation), placed with `sharding`."""
  size = size or model.size_multiple
  image = jax.ShapeDtypeStruct((1, size, size, model.out_channels), "float32")
  mask = jax.ShapeDtypeStruct((1, size, size, 1), "float32")
  shapes = jax.eval_shape(lambda i, m: model.init(jax.random.key(0), i, m), image, mask)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def train_manager(directory: str | epath.Path, max_to_keep: int) -> ocp.CheckpointManager:
  """The training run's manager: asynchronous saves, the newest `max_to_keep` steps kept."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(_absolute(directory), item_names=TRAIN_ITEMS, options=options)


def save_train_state(
  manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: Mapping[str, Any]
) -> None:
  """Starts an asynchronous save of `state` (params, batch_stats,
  opt_state), the input iterator and `meta`."""
  manager.save(
    step,
    force=True,
    args=ocp.args.Composite(
      **{
        MODEL: ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
        OPT_STATE: ocp.args.StandardSave(state.opt_state),
        DATA: grain.checkpoint.CheckpointSave(data_iter),
        META: ocp.args.JsonSave(dict(meta)),
      }
    ),
  )


def restore_train_state(
  manager: ocp.CheckpointManager, abstract_state: Callable[[dict], Any], data_iter: Any
) -> tuple[Any, dict] | None:
  """Restores the newest readable step into `abstract_state(meta)`; None if there is no checkpoint.

  A step that cannot be read on some process (after one retry) is moved to
  `<directory>/../corrupt_checkpoints/` by every process together, and the previous step is tried.
  Errors of `abstract_state` (a config that does not fit the checkpoint) propagate. The input
  iterator is restored too; if it was saved by a different number of processes, it is positioned at
  the checkpoint's step instead (batches are a function of seed and step).
  """
  for step in sorted(manager.all_steps(), reverse=True):
    meta, error = _attempt(
      lambda: manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    )
    if _failed_anywhere(error):
      _quarantine(manager, step, error)
      continue
    abstract = abstract_state(meta)
    restored, error = _attempt(
      lambda: manager.restore(
        step,
        args=ocp.args.Composite(
          **{
            MODEL: ocp.args.StandardRestore(
              {"params": abstract.params, "batch_stats": abstract.batch_stats}
            ),
            OPT_STATE: ocp.args.StandardRestore(abstract.opt_state),
          }
        ),
      )
    )
    if _failed_anywhere(error):
      _quarantine(manager, step, error)
      continue
    state = abstract.replace(
      step=jax.device_put(np.int32(step), abstract.step.sharding),
      params=restored[MODEL]["params"],
      batch_stats=restored[MODEL]["batch_stats"],
      opt_state=restored[OPT_STATE],
    )
    try:
      manager.restore(
        step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(data_iter)})
      )
    except (ValueError, FileNotFoundError) as error:
      logging.warning(
        "Input iterator state of step %d not restorable here (%s); continuing the input "
        "pipeline at step %d.",
        step,
        error,
        step,
      )
      data_iter.seek(step)
    return state, meta
  return None


def _attempt(read: Callable[[], Any]) -> tuple[Any, Exception | None]:
  """(read(), None), or (None, the error) if it failed twice (object
  stores have transient read errors)."""
  error = None
  for _ in range(2):
    try:
      return read(), None
    except Exception as e:  # Orbax raises many types for truncated or corrupt files.
      error = e
  return None, error


def _failed_anywhere(error: Exception | None) -> bool:
  """Whether any process failed: all processes must take the
  same branch, or collectives deadlock."""
  return bool(multihost_utils.process_allgather(np.int32(error is not None)).any())


def _quarantine(manager: ocp.CheckpointManager, step: int, error: Exception | None) -> None:
  directory = epath.Path(manager.directory)
  target = directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
  logging.error(
    "Checkpoint step %d in %s is unreadable (%s); moving it to %s and falling back to the "
    "previous step.",
    step,
    directory,
    f"{type(error).__name__}: {error}" if error else "on another process",
    target,
  )
  moved = True
  if jax.process_index() == 0:
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      (directory / str(step)).rename(target)
    except OSError as e:
      logging.error("Could not move %s: %s", directory / str(step), e)
      moved = False
  if not multihost_utils.process_allgather(np.int32(moved)).all():
    raise CheckpointError(
      f"Checkpoint step {step} in {directory} is unreadable and could not be moved aside: "
      f"move or delete {directory / str(step)} and rerun to resume from the previous step."
    )
  manager.reload()
