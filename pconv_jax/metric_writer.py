"""Metrics to the console, to TensorBoard event files (tensorboardX: no TensorFlow needed) and to
JSON lines.

Each run (start or resume) streams its scalars to `metrics_from_step_<N>.jsonl`, N being the step it
started at: a new file per run works on object stores (gs://), which cannot append. `read_metrics`
merges them.
"""

from collections.abc import Mapping
import json
import logging
from typing import Any

from etils import epath
import numpy as np
import tensorboardX


class MetricWriter:
  """Writes scalars, images and hyperparameters; a no-op except
  on the process that owns the logs."""

  def __init__(self, logdir: str | epath.Path, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self._logdir = epath.Path(logdir)
    if enabled:
      self._logdir.mkdir(parents=True, exist_ok=True)
      self._writer = tensorboardX.SummaryWriter(str(logdir))
      self._jsonl = (self._logdir / f"metrics_from_step_{start_step:08d}.jsonl").open("w")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    self._jsonl.write(
      json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n"
    )
    self._jsonl.flush()  # A killed run keeps every line it logged.
    logging.info(
      "[%d] %s", step, ", ".join(f"{k}={float(v):.5g}" for k, v in sorted(scalars.items()))
    )

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Images are HWC uint8."""
    if not self.enabled:
      return
    for name, image in images.items():
      self._writer.add_image(name, image, global_step=step, dataformats="HWC")

  def write_layout(self, layout: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """TensorBoard custom scalars: charts that draw several scalars together."""
    if self.enabled:
      self._writer.add_custom_scalars(layout)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's configuration, as TensorBoard text and as `hparams.json` beside the event files."""
    if not self.enabled:
      return
    text = json.dumps(hparams, indent=2, sort_keys=True, default=str)
    (self._logdir / "hparams.json").write_text(text)
    self._writer.add_text("hparams", f"```\n{text}\n```", global_step=0)

  def close(self) -> None:
    if self.enabled:
      self._writer.close()
      self._jsonl.close()


def read_metrics(logdir: str | epath.Path) -> dict[int, dict[str, float]]:
  """Scalars by step from every run's JSON lines; a resumed
  run's values replace the earlier run's."""
  metrics: dict[int, dict[str, float]] = {}
  for path in sorted(epath.Path(logdir).glob("metrics_from_step_*.jsonl")):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      metrics.setdefault(record.pop("step"), {}).update(record)
  return metrics
