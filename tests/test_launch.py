"""Launch scripts: their dry runs print the commands they would
run, and bad arguments are refused."""

import os
from pathlib import Path
import shlex
import subprocess

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script, *args):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  result = subprocess.run(
    ["bash", str(ROOT / "launch" / script), "--dry-run", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
  )
  assert result.returncode == 0, result.stderr
  return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run():
  commands = dry_run(
    "tpu_pod.sh",
    "--name",
    "pc",
    "--zone",
    "us-central2-b",
    "--type",
    "v4-32",
    "--config",
    "configs/places2.py",
    "--workdir",
    "gs://b/run",
    "--tfds_data_dir",
    "gs://b/tfds",
    "--",
    "--config.optim.batch_size=96",
  )
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--accelerator-type" in commands[0] and "v4-32" in commands[0]
  assert commands[1][0] == "tar" and commands[2][4] == "scp" and "--worker=all" in commands[2]
  install, start = commands[3][-1], commands[4][-1]
  assert (
    "pip install -r requirements-gcs.txt 'jax[tpu]==0.10.2'" in install
    and "pconv_jax.vgg fetch keras" in install
  )
  assert all("--worker=all" in c for c in commands[3:])
  assert (
    "python -m pconv_jax.main --config configs/places2.py --workdir gs://b/run "
    "--config.data.tfds_data_dir=gs://b/tfds --config.optim.batch_size=96"
  ) in start


def test_tpu_pod_queued_resource_dry_run():
  commands = dry_run(
    "tpu_pod.sh",
    "--name",
    "pc",
    "--zone",
    "z",
    "--type",
    "v5p-64",
    "--config",
    "c.py",
    "--workdir",
    "gs://b/w",
    "--queued",
  )
  assert commands[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert len(commands) == 5


def test_slurm_dry_run():
  commands = dry_run(
    "slurm.sh",
    "--nodes",
    "2",
    "--gpus-per-node",
    "4",
    "--config",
    "configs/places2.py",
    "--workdir",
    "/shared/run",
    "--partition",
    "a100",
  )
  sbatch = commands[1]
  assert sbatch[0] == "sbatch" and sbatch[sbatch.index("--ntasks-per-node") + 1] == "4"
  assert sbatch[sbatch.index("--nodes") + 1] == "2" and "--signal=TERM@300" in sbatch
  assert sbatch[-4:] == ["--config", "configs/places2.py", "--workdir", "/shared/run"]
  assert (
    'srun --kill-on-bad-exit=1 python -m pconv_jax.main "$@"'
    in (ROOT / "launch" / "slurm.sbatch").read_text()
  )


def test_local_dry_run():
  commands = dry_run(
    "local.sh",
    "--processes",
    "3",
    "--devices-per-process",
    "2",
    "--config",
    "configs/demo.py",
    "--workdir",
    "/tmp/w",
    "--port",
    "4000",
  )
  assert len(commands) == 3
  for i, command in enumerate(commands):
    assert command[command.index("--process_id") + 1] == str(i)
    assert "--coordinator_address" in command and "127.0.0.1:4000" in command
    # Huge pages for XLA:CPU (hugepages.py).
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in command


def test_missing_arguments_are_refused():
  for script in ("tpu_pod.sh", "slurm.sh", "local.sh"):
    result = subprocess.run(
      ["bash", str(ROOT / "launch" / script), "--dry-run"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "required" in result.stderr
  result = subprocess.run(
    [
      "bash",
      str(ROOT / "launch" / "tpu_pod.sh"),
      "--name",
      "a",
      "--zone",
      "z",
      "--type",
      "v4-8",
      "--config",
      "c",
      "--workdir",
      "/local",
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and "gs://" in result.stderr
