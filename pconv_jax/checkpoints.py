"""Orbax checkpoints of the project.

A checkpoint directory is an orbax `CheckpointManager` directory: one sub-directory per step, each holding the
item `model` (the Flax variables `params` and `batch_stats`) and the JSON item `meta` (at least `model`, the
model config needed to rebuild the network). Training adds its own items beside them; inference and evaluation
read only `model` and `meta`, so they never need the optimizer.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from pconv_jax import models

MODEL = "model"
META = "meta"


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable; the message says what to do."""


def save_model(directory: str | Path, variables: Mapping[str, Any], model_config: Mapping[str, Any],
               step: int = 0, **meta: Any) -> Path:
  """Writes `variables` and the model config as step `step` of the checkpoint directory `directory`."""
  directory = Path(directory).absolute()
  with ocp.CheckpointManager(directory, item_names=(MODEL, META)) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(dict(variables)),
        META: ocp.args.JsonSave({"model": dict(model_config), **meta})}))
    manager.wait_until_finished()
  return directory / str(step)


def load_model(directory: str | Path, step: int | None = None) -> tuple[models.PUNet, dict, dict]:
  """Returns (model, variables, meta) from a checkpoint directory: the given step, or the newest readable one."""
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(
        f"No checkpoint directory at {directory}. Train a model with `python -m pconv_jax.main --config ... "
        f"--workdir DIR` (checkpoints go to DIR/checkpoints) or convert PyTorch weights with "
        f"`python -m pconv_jax.convert IN.pth OUT_DIR`.")
  with ocp.CheckpointManager(directory, item_names=(MODEL, META)) as manager:
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"{directory} holds no checkpoint steps: is it a checkpoint directory?")
    for i, candidate in enumerate(steps):
      try:
        return _restore_model(manager, candidate)
      except Exception as error:  # Orbax raises many types for truncated or corrupt files.
        if i + 1 == len(steps):
          raise CheckpointError(f"Cannot read checkpoint step {candidate} in {directory}: {error}") from error
        logging.warning("Checkpoint step %d in %s is unreadable (%s); falling back to step %d.",
                        candidate, directory, error, steps[i + 1])


def _restore_model(manager: ocp.CheckpointManager, step: int) -> tuple[models.PUNet, dict, dict]:
  meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  model = models.create_model(meta["model"])
  abstract = abstract_variables(model, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  restored = manager.restore(step, args=ocp.args.Composite(**{MODEL: ocp.args.StandardRestore(abstract)}))
  return model, restored[MODEL], meta


def abstract_variables(model: models.PUNet, sharding: jax.sharding.Sharding, size: int | None = None) -> dict:
  """Shapes and dtypes of `model`'s variables (no computation), placed with `sharding`."""
  size = size or model.size_multiple
  image = jax.ShapeDtypeStruct((1, size, size, model.out_channels), "float32")
  mask = jax.ShapeDtypeStruct((1, size, size, 1), "float32")
  shapes = jax.eval_shape(lambda i, m: model.init(jax.random.key(0), i, m), image, mask)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
