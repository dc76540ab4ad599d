"""Orbax checkpoints of the project.

A checkpoint directory is an orbax `CheckpointManager` directory: one sub-directory per step, each
holding the item `model` (the Flax variables `params` and `batch_stats`) and the JSON item `meta`
(at least `model`, the model config needed to rebuild the network). Training adds `opt_state` and
`data` (the input iterator of every process) beside them; inference and evaluation read only `model`
and `meta`, so they never need the optimizer.
"""

from collections.abc import Callable, Iterator, Mapping
import contextlib
import errno
import json
import logging
import os
import re
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


class SaveError(CheckpointError):
  """A checkpoint could not be written (storage full, permissions, quota, the object store)."""


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
        if i + 1 == len(steps) or not is_corrupt(error):
          raise CheckpointError(
            f"Cannot read checkpoint step {candidate} in {directory}: {error}"
          ) from error
        logging.warning(
          "Checkpoint step %d in %s is corrupt (%s); falling back to step %d.",
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
  """The training run's manager: asynchronous saves, the newest `max_to_keep` steps kept, and the
  temporary directory of a save that never finished removed."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=True,
    enable_async_checkpointing=True,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(_absolute(directory), item_names=TRAIN_ITEMS, options=options)


def save_train_state(
  manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, meta: Mapping[str, Any]
) -> None:
  """Starts an asynchronous save of `state` (params, batch_stats, opt_state), the input iterator
  and `meta`. A SaveError if this save, or the asynchronous one before it, failed."""
  with _save_errors(manager, step):
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


def finish_saving(manager: ocp.CheckpointManager, step: int) -> None:
  """Waits for the asynchronous save of `step`; a SaveError if it failed."""
  with _save_errors(manager, step):
    manager.wait_until_finished()


# A full disk, a quota, a read-only or forbidden directory: the user's to fix, not a bug.
STORAGE_ERRNOS = {
  errno.ENOSPC: "free space",
  errno.EDQUOT: "raise the quota or free space",
  errno.EROFS: "make the storage writable",
  errno.EACCES: "fix the permissions",
  errno.EPERM: "fix the permissions",
}
# Tensorstore's (and object stores') status codes of storage problems, with what to do.
_STORAGE_CODES = {
  "RESOURCE_EXHAUSTED": "free space or raise the quota",
  "PERMISSION_DENIED": "fix the permissions",
  "UNAVAILABLE": "wait for the storage to answer again",
}


@contextlib.contextmanager
def _save_errors(manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
  """Turns a failed save into one SaveError naming the step, the cause, what to do and the last
  complete checkpoint; other errors (bugs) propagate as they are."""
  try:
    yield
  except Exception as error:  # Orbax raises the storage's errors in many types.
    cause, remedy = storage_problem(error)
    if cause is None:
      raise
    kept = last_complete_step(manager.directory)
    try:  # A failed step's directory is left unfinished (local) or uncommitted (object stores).
      started = [int(m[1]) for p in epath.Path(manager.directory).iterdir() if (m := _STEP(p.name))]
    except OSError:
      started = []
    # An asynchronous save's error is raised by the next save: the failed step is the newest one
    # started after the last complete one.
    failed = max((n for n in started if kept is None or n > kept), default=step)
    raise SaveError(
      f"Saving checkpoint step {failed} in {manager.directory} failed: {cause}. "
      + how_to_resume(manager.directory, remedy, kept)
    ) from None


_STEP = re.compile(r"(\d+)(\.|$)").match


def storage_problem(error: BaseException) -> tuple[str | None, str]:
  """(the cause, what to do) where `error` is the storage's (full, forbidden, unavailable), else
  (None, "")."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return e.strerror or os.strerror(e.errno), STORAGE_ERRNOS[e.errno]
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code and int(code[1]) in STORAGE_ERRNOS:
      return os.strerror(int(code[1])), STORAGE_ERRNOS[int(code[1])]
    status = next((c for c in _STORAGE_CODES if str(e).lstrip("'\"").startswith(c)), None)
    if status:
      return str(e).lstrip("'\"")[:300], _STORAGE_CODES[status]
  return None, ""


def last_complete_step(directory: str | epath.Path) -> int | None:
  """The newest step orbax counts as complete in `directory` (on object stores too), or None."""
  try:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(_absolute(directory), options=options) as manager:
      return manager.latest_step()
  except Exception:  # Missing, or the storage is not even listable now.
    return None


def how_to_resume(directory: str | epath.Path, remedy: str, kept: int | None) -> str:
  """The end of a storage error's message: what is kept, and how to go on."""
  if kept is None:
    return f"No checkpoint in {directory} is complete yet: {remedy} and rerun the same command."
  return (
    f"The last complete checkpoint, step {kept} in {directory}, is intact: {remedy} and rerun "
    f"the same command to resume from it (the steps after {kept} are trained again)."
  )


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the errors it was raised from or during."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def restore_train_state(
  manager: ocp.CheckpointManager, abstract_state: Callable[[dict], Any], data_iter: Any
) -> tuple[Any, dict] | None:
  """Restores the newest readable step into `abstract_state(meta)`; None if there is no checkpoint.

  A step that is demonstrably corrupt (its data or metadata do not decode, or files of it are
  missing) on some process is moved to `<directory>/../corrupt_checkpoints/` by every process
  together, and the previous step is tried. Any other read error (storage, permissions, memory,
  an object store's outage) is retried `READ_ATTEMPTS` times and then stops the run with a
  CheckpointError, the step left in place. Errors of `abstract_state` (a config that does not fit
  the checkpoint) propagate. The input iterator is restored too; if it was saved by a different
  number of processes, it is positioned at the checkpoint's step instead (batches are a function of
  seed and step).
  """
  moved: list[int] = []
  for step in sorted(manager.all_steps(), reverse=True):
    meta, error = _attempt(
      lambda: manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    )
    if _agreed_failure(manager, step, error, moved):
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
    if _agreed_failure(manager, step, error, moved):
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


READ_ATTEMPTS = 3
RETRY_SECONDS = 2.0  # Before the second attempt; doubled before each further one.
# Status codes (tensorstore's, in orbax's errors) of data that does not decode or is missing.
_CORRUPT_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "INVALID_ARGUMENT")


def is_corrupt(error: BaseException) -> bool:
  """Whether a read error shows the checkpoint itself is damaged (undecodable data or metadata,
  missing files), as opposed to a storage, permission or resource problem that may pass."""
  return any(
    isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError))
    or (isinstance(e, ValueError) and str(e).lstrip("'\"").startswith(_CORRUPT_CODES))
    for e in _chain(error)
  )


def _attempt(read: Callable[[], Any]) -> tuple[Any, Exception | None]:
  """(read(), None), or (None, the last error): a corrupt step is read twice, any other error
  `READ_ATTEMPTS` times with a growing pause (object stores have transient errors)."""
  error, pause = None, RETRY_SECONDS
  for attempt in range(READ_ATTEMPTS):
    try:
      return read(), None
    except Exception as e:  # Orbax raises many types for truncated or corrupt files.
      error = e
    if attempt + 1 == READ_ATTEMPTS or (is_corrupt(error) and attempt == 1):
      break
    if not is_corrupt(error):
      logging.warning("Reading a checkpoint failed (%s); retrying in %.0f s.", error, pause)
      time.sleep(pause)
      pause *= 2
  return None, error


def _agreed_failure(
  manager: ocp.CheckpointManager, step: int, error: Exception | None, moved: list[int]
) -> bool:
  """Whether reading `step` failed on any process, decided the same way on all (or collectives
  deadlock): True after moving a corrupt step aside (and adding it to `moved`); a CheckpointError,
  the step kept, where a process saw another error, or where a step was moved aside already (two
  corrupt steps in a row more likely mean a misjudged error than damage)."""
  status = 0 if error is None else 1 if is_corrupt(error) else 2
  worst = int(multihost_utils.process_allgather(np.int32(status)).max())
  directory = epath.Path(manager.directory)
  if worst == 2:
    cause = f"{type(error).__name__}: {error}" if status == 2 else "an error on another process"
    raise CheckpointError(
      f"Cannot read checkpoint step {step} in {directory} after {READ_ATTEMPTS} attempts "
      f"({cause}). This is not corruption (storage, permissions, memory or an outage): the step is "
      f"kept. Fix the cause and rerun to resume from it; only if it is damaged, move "
      f"{directory / str(step)} aside to resume from the previous step."
    )
  if worst == 1 and moved:
    raise CheckpointError(
      f"Checkpoint step {step} in {directory} is unreadable too, after step {moved[0]} was moved "
      f"to {directory.parent / 'corrupt_checkpoints'}: stopping rather than moving more aside. "
      f"Check the storage; move {directory / str(step)} aside yourself to go on from an older step."
    )
  if worst == 1:
    _quarantine(manager, step, error)
    moved.append(step)
  return worst == 1


def _quarantine(manager: ocp.CheckpointManager, step: int, error: Exception | None) -> None:
  directory = epath.Path(manager.directory)
  target = directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
  logging.error(
    "Checkpoint step %d in %s is corrupt, unreadable (%s); moving it to %s and falling back to "
    "the previous step.",
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
