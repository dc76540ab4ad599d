"""Entry point:
`python -m pconv_jax.main --config configs/places2.py --workdir DIR [--mode train|eval]`.

Run the same command on every host of a TPU pod or every task of a Slurm job: multi-process JAX is
started automatically there. Elsewhere give --coordinator_address/--num_processes/--process_id (or
the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

import logging
import os
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from pconv_jax import evaluate, hugepages, train
from pconv_jax.errors import UserError

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
flags.mark_flags_as_required(["config", "workdir"])


def in_managed_cluster() -> bool:
  """True on a multi-host Cloud TPU slice or in a multi-task Slurm
  job (JAX then finds its peers itself)."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed() -> None:
  if FLAGS.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  if FLAGS.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif in_managed_cluster():
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # Orbax's per-file INFO lines drown the progress lines.
  for handler in logging.getLogger().handlers:
    handler.addFilter(
      lambda record: record.levelno >= logging.WARNING or "/orbax/" not in record.pathname
    )
  initialize_distributed()
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
  except (UserError, FloatingPointError) as error:
    logging.error("%s", error)
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
