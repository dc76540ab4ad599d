"""Entry point:
`python -m pconv_jax.main --config configs/places2.py --workdir DIR [--mode train|eval]`.

Run the same command on every host of a TPU pod or every task of a Slurm job: multi-process JAX is
started automatically there. Elsewhere give --coordinator_address/--num_processes/--process_id (or
the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from collections.abc import Callable
import logging
import os
import sys
import threading
from typing import Any

from absl import app, flags
from etils import epath
import jax
from ml_collections import config_flags

from pconv_jax import checkpoints, evaluate, hugepages, train
from pconv_jax.errors import UserError, parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Configuration file, e.g. configs/places2.py[:variant].", lock_config=True
)
flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, logs, samples and evaluation results."
)
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval"],
  "Train (resuming if the workdir has checkpoints) or evaluate the newest checkpoint.",
)
flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("JAX_COORDINATOR_ADDRESS"),
  "host:port of process 0, for multi-process runs outside TPU pods and Slurm.",
)
flags.DEFINE_integer(
  "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None, "Processes in the job."
)
flags.DEFINE_integer(
  "process_id",
  int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
  "This process's index.",
)
flags.DEFINE_integer(
  "num_cpu_devices", None, "Simulated CPU devices per process (testing on one machine)."
)
flags.DEFINE_integer(
  "distributed_timeout_s",
  300,
  "Seconds a multi-process job waits for all its processes to reach the coordinator.",
)
flags.mark_flags_as_required(["config", "workdir"])


def in_managed_cluster() -> bool:
  """True on a multi-host Cloud TPU slice or in a task of a multi-task Slurm step (JAX then finds
  its peers itself)."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def slurm_without_srun() -> bool:
  """A Slurm job of several tasks whose batch script runs Python itself, not through `srun`: no
  step of several tasks, so no peers would ever come."""
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and not in_managed_cluster()


def initialize_distributed() -> None:
  if FLAGS.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  timeout = FLAGS.distributed_timeout_s
  if timeout <= 0:
    raise UserError(f"--distributed_timeout_s must be positive, got {timeout}.")
  if FLAGS.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _within(
      timeout,
      f"process {FLAGS.process_id} of {FLAGS.num_processes} found no complete job at the "
      f"coordinator {FLAGS.coordinator_address} within {timeout} s: check that it is process 0's "
      "host:port, reachable from every host, and that every process was started",
      lambda deadline: jax.distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        initialization_timeout=deadline,
      ),
    )
  elif slurm_without_srun():
    raise UserError(
      f"This Slurm job has SLURM_NTASKS={os.environ['SLURM_NTASKS']} tasks, but this process was "
      "not started as one of them: run it with `srun python -m pconv_jax.main ...` (as "
      "launch/slurm.sbatch does), or unset SLURM_NTASKS for a single-process run."
    )
  elif in_managed_cluster():
    _within(
      timeout,
      f"the processes of this job did not all connect within {timeout} s",
      lambda deadline: jax.distributed.initialize(initialization_timeout=deadline),
    )


def _within(seconds: int, problem: str, initialize: Callable[[int], None]) -> None:
  """Runs `initialize(deadline)`, or after `seconds` ends the process with one line saying
  `problem` (XLA's own deadline, a little later, would abort it with a stack trace)."""
  done = threading.Event()

  def watchdog() -> None:
    if not done.wait(seconds):
      print(f"error: {problem} (--distributed_timeout_s sets the wait).", file=sys.stderr)
      sys.stderr.flush()
      os._exit(1)

  threading.Thread(target=watchdog, daemon=True).start()
  try:
    initialize(seconds + 30)
  finally:
    done.set()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_quiet_orbax)
  sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
  threading.excepthook = _storage_errors_in_one_line(threading.excepthook)
  try:
    initialize_distributed()
  except UserError as error:
    sys.exit(f"error: {error}")
  platform = jax.devices()[0].platform
  logging.info(
    "JAX process %d of %d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    platform,
  )
  if platform == "cpu" and hugepages.missing(os.environ):
    logging.warning(
      "CPU steps run 10-33%% faster with transparent huge pages: start the command with %s "
      "(pconv_jax/hugepages.py; =0 silences this).",
      hugepages.SETTING,
    )
  if FLAGS.config.train.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.config.train.compilation_cache_dir)
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
  except checkpoints.SaveError as error:
    _exit_at_once(str(error))
  except (UserError, FloatingPointError) as error:
    logging.error("%s", error)
    sys.exit(f"error: {error}")
  except OSError as error:
    cause, remedy = checkpoints.storage_problem(error)
    if cause is None:
      raise
    directory = epath.Path(FLAGS.workdir) / "checkpoints"
    _exit_at_once(
      f"Storage error on {error.filename or FLAGS.workdir}: {cause}. "
      + checkpoints.how_to_resume(directory, remedy, checkpoints.last_complete_step(directory))
    )


def _exit_at_once(message: str) -> None:
  """Reports a storage failure and exits without the exit handlers, whose writes (TensorBoard's
  event files, say) would fail again on the same storage, each with a traceback."""
  logging.error("%s", message)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)


def _without_closed_loop_noise(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """`sys.unraisablehook` without the "Event loop is closed" tracebacks that tensorstore's
  callbacks report by the dozen once a failed save's event loop has gone (the failure itself is
  reported)."""

  def quieter(unraisable: Any) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      hook(unraisable)

  return quieter


def _storage_errors_in_one_line(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """`threading.excepthook` that logs a background writer's storage error (TensorBoard's event
  writer on a full disk, say) as one line; the run's own error says what to do."""

  def quieter(args: Any) -> None:
    if args.exc_value is not None and checkpoints.storage_problem(args.exc_value)[0]:
      logging.warning("Thread %s stopped: %s", getattr(args.thread, "name", "?"), args.exc_value)
    else:
      hook(args)

  return quieter


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Orbax's lines without its per-file INFO lines (they drown the progress lines) and without the
  tracebacks of its threads; no asyncio report of a save task's storage error either ("Task
  exception was never retrieved", with a traceback): a failed save is reported once, as one line."""
  if record.name == "asyncio" and record.exc_info:
    return not checkpoints.storage_problem(record.exc_info[1])[0]
  if "/orbax/" not in record.pathname:
    return True
  record.exc_info, record.exc_text = None, None
  return record.levelno >= logging.WARNING


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
