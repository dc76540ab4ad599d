"""The evaluation run: the paper's table (L1, PSNR, SSIM, IScore, FID per hole-ratio bin) for a
checkpoint and for classical baselines on the same images and masks.

    python -m pconv_jax.evaluate --config configs/places2.py --workdir DIR [--checkpoint CKPT_DIR]
    (or: python -m pconv_jax.main --config ... --workdir DIR --mode eval)

Images: `config.eval.num_images` evaluation images (`input_pipeline.load_eval_images`). Masks per
mask set (`masks.load_eval_masks`): the procedural sets "no_border" and "border" (no hole within
`config.data.masks.border_margin` of a side), or the sets under `config.data.masks.test_dir` (e.g.
NVIDIA's test masks), `config.eval.masks_per_bin` per bin. Each bin of each set evaluates P = max(N,
M) pairs: pair j is image j mod N with mask j mod M (N images, M masks in the bin); the model and
every baseline see the same pairs.

Metrics (`pconv_jax.metrics`) are on the composite (output in the holes, known pixels elsewhere) on
[0, 1] and averaged over the pairs. With Inception-v3 weights
(`python -m pconv_jax.inception fetch fid`), each bin also gets the Inception score of its P
composites (one split) and their FID against the N ground-truth images; without them those two
columns say n/a and the notes say why.

With `config.eval.self_ensemble` the model's output is the mean over the 8 flips and 90-degree
turns of its input (`pconv_jax.self_ensemble`).

Writes `<workdir>/eval/step_<N>/results.{csv,md,json}` (`step_<N>_self_ensemble` with the
self-ensemble) and `samples_<mask set>.png` (one row per bin: masked input, model, baselines,
ground truth), prints the Markdown table and returns the
results as a dict. Deterministic; the model and Inception run sharded over all devices like
training.
"""

from collections.abc import Mapping, Sequence
import csv
import dataclasses
import io
import json
import math
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from pconv_jax import (
  baselines,
  checkpoints,
  images,
  inception,
  input_pipeline,
  kernels,
  losses,
  masks,
  metrics,
  models,
  parallel,
)
from pconv_jax import self_ensemble as self_ensemble_lib
from pconv_jax.errors import ConfigError, UserError, parse_flags

MODEL_METHOD = "pconv"
IMAGE_METRICS = ("l1_percent", "psnr", "ssim")
# (key, Markdown label, format) in the paper's order.
TABLE_METRICS = (
  ("l1_percent", "L1 (%)", ".2f"),
  ("psnr", "PSNR (dB)", ".2f"),
  ("ssim", "SSIM", ".4f"),
  ("inception_score", "IScore", ".3f"),
  ("fid", "FID", ".2f"),
)
SET_ABBREVIATIONS = {"no_border": "N", "border": "B"}  # The paper's column labels.
CSV_COLUMNS = ("method", "mask_set", "bin", "pairs") + tuple(key for key, _, _ in TABLE_METRICS)


class EvalConfigError(ConfigError):
  """`config.eval` cannot work; the message says which field and what to use."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises EvalConfigError for an unusable `config.eval`."""
  cfg = config.eval
  if cfg.num_images is not None and cfg.num_images < 1:
    raise EvalConfigError(
      f"config.eval.num_images must be positive or None (all), got {cfg.num_images}."
    )
  if cfg.masks_per_bin < 1:
    raise EvalConfigError(f"config.eval.masks_per_bin must be positive, got {cfg.masks_per_bin}.")
  if cfg.batch_size < 1:
    raise EvalConfigError(f"config.eval.batch_size must be positive, got {cfg.batch_size}.")
  unknown = [name for name in cfg.baselines if name not in baselines.METHODS]
  if unknown:
    raise EvalConfigError(
      f"config.eval.baselines has unknown {unknown}; choose from {baselines.METHODS}."
    )
  if config.data.image_size < metrics.SSIM_WINDOW:
    raise EvalConfigError(
      f"SSIM needs images of at least {metrics.SSIM_WINDOW}x{metrics.SSIM_WINDOW}; "
      f"config.data.image_size is {config.data.image_size}."
    )


def _host(array: jax.Array) -> np.ndarray:
  return np.asarray(array.addressable_data(0))  # Replicated: every device holds all of it.


class _Runner:
  """The jitted computations at one global batch size (a multiple
  of the device count); pads and unpads."""

  def __init__(
    self,
    model: models.PUNet,
    network: inception.Inception | None,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    self_ensemble: bool = False,
  ):
    devices = mesh.devices.size
    self.batch_size = -(-batch_size // devices) * devices
    self._sharded, replicated = parallel.batch_sharded(mesh), parallel.replicated(mesh)

    def predict(variables, targets, masks_):
      def network(x, m):
        return model.apply(variables, x, m, train=False)

      output = (
        self_ensemble_lib.mean_over_symmetries(network, targets, masks_)
        if self_ensemble
        else network(targets, masks_)
      )
      return images.composite(output, targets, masks_)

    def score(predictions, targets):
      return metrics.image_metrics(
        metrics.to_unit_range(predictions), metrics.to_unit_range(targets)
      )

    self._predict = jax.jit(predict, out_shardings=replicated)
    self._score = jax.jit(score, out_shardings=replicated)
    if network is not None:
      self._inception_variables = parallel.replicate(network.variables, mesh)
      module = network.module()
      self._inception = jax.jit(
        lambda v, x: module.apply(v, metrics.to_unit_range(x)), out_shardings=replicated
      )
    else:
      self._inception = None

  def _pad(self, array: np.ndarray, fill: float) -> jax.Array:
    padding = np.full((self.batch_size - len(array),) + array.shape[1:], fill, array.dtype)
    return parallel.global_arrays(np.concatenate([array, padding]), self._sharded)

  def predict(self, variables: Any, images: np.ndarray, masks_: np.ndarray) -> np.ndarray:
    """Composites (n, H, W, 3) on [-1, 1] for n <= batch_size pairs; padding pairs have no hole.
    `variables` are replicated over the mesh."""
    out = self._predict(variables, self._pad(images, 0.0), self._pad(masks_, 1.0))
    return _host(out)[: len(images)]

  def image_metrics(self, predictions: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    out = self._score(self._pad(predictions, 0.0), self._pad(targets, 0.0))
    return {key: _host(value)[: len(predictions)].astype(np.float64) for key, value in out.items()}

  def inception(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pool features, logits) of up to batch_size images on [-1, 1]."""
    features, logits = self._inception(self._inception_variables, self._pad(images, 0.0))
    return _host(features)[: len(images)], _host(logits)[: len(images)]

  @property
  def has_inception(self) -> bool:
    return self._inception is not None


@dataclasses.dataclass
class _MethodResult:
  """Per-pair values of one method on one bin, accumulated batch by batch."""

  values: dict[str, list[np.ndarray]] = dataclasses.field(
    default_factory=lambda: {k: [] for k in IMAGE_METRICS}
  )
  features: list[np.ndarray] = dataclasses.field(default_factory=list)
  logits: list[np.ndarray] = dataclasses.field(default_factory=list)


def _evaluate_bin(
  runner: _Runner,
  variables: Any,
  targets: np.ndarray,
  bin_masks: np.ndarray,
  methods: Sequence[str],
  sample_index: int,
) -> tuple[dict[str, _MethodResult], dict[str, np.ndarray]]:
  """Every method (the model with `variables`, or baselines) on the P = max(N, M) pairs of one
  bin; also the outputs of pair `sample_index` for the grid."""
  pairs = max(len(targets), len(bin_masks))
  results = {method: _MethodResult() for method in methods}
  sample = {}
  for start in range(0, pairs, runner.batch_size):
    index = np.arange(start, min(start + runner.batch_size, pairs))
    batch_images = targets[index % len(targets)]
    batch_masks = bin_masks[index % len(bin_masks)].astype(np.float32)
    outputs = {}
    for method in methods:
      if method == MODEL_METHOD:
        outputs[method] = runner.predict(variables, batch_images, batch_masks)
      else:
        filled = baselines.inpaint(method, images.to_uint8(batch_images), batch_masks)
        outputs[method] = images.to_model_range(filled)
    for method, output in outputs.items():
      for key, value in runner.image_metrics(output, batch_images).items():
        results[method].values[key].append(value)
      if runner.has_inception:
        features, logits = runner.inception(output)
        results[method].features.append(features)
        results[method].logits.append(logits)
    if start <= sample_index < start + len(index):
      sample = {
        "input": batch_images[sample_index - start],
        "mask": batch_masks[sample_index - start],
        **{method: output[sample_index - start] for method, output in outputs.items()},
      }
  return results, sample


def _summarise(result: _MethodResult, real_features: np.ndarray | None) -> dict[str, float | None]:
  row = {key: float(np.mean(np.concatenate(values))) for key, values in result.values.items()}
  row["inception_score"] = row["fid"] = None
  if result.logits:
    row["inception_score"] = metrics.inception_score(np.concatenate(result.logits))[0]
    features = np.concatenate(result.features)
    if len(features) >= 2 and len(real_features) >= 2:
      row["fid"] = metrics.fid(features, real_features)
  return row


def bin_label(index: int) -> str:
  low, high = masks.HOLE_RATIO_BINS[index]
  return f"({low:g}, {high:g}]"


def method_names(
  partial: bool, methods: Sequence[str], self_ensemble: bool = False
) -> dict[str, str]:
  """Display names: the model as the paper names it (PConv, or Conv for plain convolutions)."""
  model = (
    f"{'PConv' if partial else 'Conv'} (this model{', x8 self-ensemble' if self_ensemble else ''})"
  )
  return {m: model if m == MODEL_METHOD else baselines.DISPLAY_NAMES[m] for m in methods}


def _format(value: float | None, spec: str) -> str:
  if value is None:
    return "n/a"
  return "inf" if math.isinf(value) else format(value, spec)


def markdown_table(results: Mapping[str, Any]) -> str:
  """The paper's layout: one row per metric and method, one column per bin and mask set."""
  sets = list(results["pairs"])
  columns = [(s, i) for i in range(len(masks.HOLE_RATIO_BINS)) for s in sets]
  label = lambda s: SET_ABBREVIATIONS.get(s, s) if len(sets) > 1 else ""  # noqa: E731
  header = ["Metric", "Method"] + [f"{bin_label(i)} {label(s)}".strip() for s, i in columns]
  rows = {(r["method"], r["mask_set"], r["bin_index"]): r for r in results["rows"]}
  methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
  names = results["method_names"]
  lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(columns)]
  for key, metric_label, spec in TABLE_METRICS:
    for k, method in enumerate(methods):
      cells = [_format(rows[(method, s, i)][key], spec) for s, i in columns]
      lines.append(
        "| " + " | ".join([metric_label if k == 0 else "", names[method]] + cells) + " |"
      )
  title = (
    f"Evaluation of {results['checkpoint']} (step {results['step']}): {results['num_images']} "
    f"images at {results['image_size']}x{results['image_size']}, masks: {results['mask_source']}."
  )
  pairs = ", ".join(
    f"{s}: {'/'.join(str(n) for n in counts.values())}" for s, counts in results["pairs"].items()
  )
  notes = [f"Pairs per bin ({pairs})."] + results["notes"]
  return "\n".join([title, "", *lines, "", *(f"- {note}" for note in notes)]) + "\n"


def _csv(results: Mapping[str, Any]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in results["rows"]:
    writer.writerow({key: "" if row[key] is None else row[key] for key in CSV_COLUMNS})
  return out.getvalue()


def _json_safe(value: Any) -> Any:
  """JSON has no infinities: +inf (PSNR of an exact reconstruction)
  is written as the string "inf"."""
  if isinstance(value, float) and not math.isfinite(value):
    return "inf" if value > 0 else "-inf" if value < 0 else None
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


def _sample_grid(samples: Sequence[Mapping[str, np.ndarray]], methods: Sequence[str]) -> np.ndarray:
  """One row per bin: input with white holes, each method's composite, ground truth; uint8."""
  return images.grid(
    [
      [images.with_white_holes(s["input"], s["mask"]), *(s[m] for m in methods), s["input"]]
      for s in samples
    ]
  )


def _notes(
  config: ml_collections.ConfigDict,
  network: inception.Inception | None,
  meta: Mapping[str, Any],
  pairs: Mapping[str, Mapping[str, int]],
  names: Mapping[str, str],
) -> list[str]:
  notes = [
    "Metrics on the composite (output in the holes, input elsewhere), images on [0, 1]: L1 in % "
    "of the range, PSNR in dB (range 1), SSIM with an 11x11 Gaussian window (sigma 1.5, K1 0.01, "
    "K2 0.03). Pair j of a bin is image j mod N with mask j mod M."
  ]
  if network is None:
    why = (
      "disabled (config.eval.inception=False)"
      if not config.eval.inception
      else inception.missing_weights_message()
    )
    notes.append(f"IScore and FID: n/a, {why}.")
  else:
    kind = (
      "pytorch-fid's FID Inception (the reference network)"
      if network.source == "fid"
      else "Keras' Inception-v3 (comparable only with other Keras-weight numbers)"
    )
    notes.append(
      "IScore (one split) of each bin's composites and their FID against the ground-truth images, "
      f"with {kind}. FID from few images is biased upward: compare FIDs only at equal counts."
    )
  if any(n == 0 for counts in pairs.values() for n in counts.values()):
    notes.append("Some bins have no masks (n/a): the mask set has none with that hole ratio.")
  columns = ", ".join(["input with holes in white"] + list(names.values()) + ["ground truth"])
  notes.append(
    "Sample grids samples_<mask set>.png: one row per bin, smallest holes first; columns: "
    f"{columns}."
  )
  if config.eval.self_ensemble:
    notes.append(
      "The model's output is the mean of its outputs over the 8 flips and 90-degree turns of the "
      "input, each undone (geometric self-ensemble, config.eval.self_ensemble): 8 network passes."
    )
  if "config" in meta:
    notes.append(training_note(meta))
  if config.eval.note:
    notes.append(config.eval.note)
  if "layout" in meta:
    notes.append(
      f"The model's weights are {meta['project']}'s ({meta['source']}, SHA-256 "
      f"{meta['source_sha256'][:12]}...), converted with `python -m pconv_jax.convert`; they run "
      "with that project's input range and channel order."
    )
  if meta.get("vgg_losses") is False:
    notes.append(
      "This model was trained without VGG-16 weights, i.e. without the perceptual and style "
      "losses: not the paper's loss."
    )
  return notes


class Evaluator:
  """The evaluation images and mask sets of `config.eval` with the baselines scored once; scores a
  model's variables on them (the final table, and the learning curve during training)."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: models.PUNet,
    mesh: jax.sharding.Mesh,
    network: inception.Inception | None = None,
  ):
    validate_config(config)
    cfg = config.eval
    available = len(input_pipeline.create_image_source(config.data, train=False))
    if cfg.num_images is not None and cfg.num_images > available:
      raise EvalConfigError(
        f"config.eval.num_images is {cfg.num_images} but the evaluation images number "
        f"{available}: set it to at most {available}, or to None for all of them."
      )
    self.targets = input_pipeline.load_eval_images(config.data, cfg.num_images)
    self.mask_sets = masks.load_eval_masks(config.data, cfg.masks_per_bin, seed=cfg.seed)
    self.methods = (MODEL_METHOD,) + tuple(cfg.baselines)
    self.pairs = {
      set_name: {bin_label(i): self._pairs(by_bin, i) for i in range(len(masks.HOLE_RATIO_BINS))}
      for set_name, by_bin in self.mask_sets.items()
    }
    self._runner = _Runner(model, network, mesh, cfg.batch_size, cfg.self_ensemble)
    self._real_features = None
    if self._runner.has_inception:
      self._real_features = np.concatenate(
        [
          self._runner.inception(self.targets[s : s + self._runner.batch_size])[0]
          for s in range(0, len(self.targets), self._runner.batch_size)
        ]
      )
    self._baselines = {
      (set_name, i): _evaluate_bin(
        self._runner, None, self.targets, by_bin[i], self.methods[1:], i % self._pairs(by_bin, i)
      )
      for set_name, by_bin in self.mask_sets.items()
      for i in range(len(masks.HOLE_RATIO_BINS))
      if self._pairs(by_bin, i)
    }

  def _pairs(self, by_bin: Mapping[int, np.ndarray], bin_index: int) -> int:
    count = len(by_bin.get(bin_index, ()))
    return max(len(self.targets), count) if count else 0

  def evaluate(self, variables: Any) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The rows of every method, bin and mask set for `variables` (replicated over the mesh), and
    each mask set's sample grid."""
    rows, grids = [], {}
    for set_name, by_bin in self.mask_sets.items():
      samples = []
      for bin_index in range(len(masks.HOLE_RATIO_BINS)):
        count = self._pairs(by_bin, bin_index)
        if count:
          by_method, sample = _evaluate_bin(
            self._runner,
            variables,
            self.targets,
            by_bin[bin_index],
            (MODEL_METHOD,),
            bin_index % count,
          )
          baseline_results, baseline_sample = self._baselines[(set_name, bin_index)]
          by_method |= baseline_results
          samples.append(sample | baseline_sample)
        for method in self.methods:
          values = (
            _summarise(by_method[method], self._real_features)
            if count
            else dict.fromkeys(IMAGE_METRICS + ("inception_score", "fid"))
          )
          rows.append(
            {
              "method": method,
              "mask_set": set_name,
              "bin": bin_label(bin_index),
              "bin_index": bin_index,
              "pairs": count,
              **values,
            }
          )
      if samples:
        grids[set_name] = _sample_grid(samples, self.methods)
    return rows, grids


def eval_dir_name(step: int, self_ensemble: bool) -> str:
  """The folder under `<workdir>/eval` of a checkpoint step's evaluation."""
  return f"step_{step}_self_ensemble" if self_ensemble else f"step_{step}"


def training_note(meta: Mapping[str, Any]) -> str:
  """What was trained, from a training checkpoint's own record: network, steps, batch, images and
  the loss's weights."""
  config = meta["config"]
  model, data = config["model"], config["data"]
  kind = "PConv" if model["partial"] else "Conv (plain convolutions, the paper's baseline)"
  widths = model["features"] or models.paper_features(model["depth"])
  source = {
    "demo": "the demo's natural photos",
    "folder": f"the images under {data['folder']}",
    "tfds": f"{data['tfds_name']} {data['train_split']}",
  }[data["source"]]
  images = f"{meta['train_images']} images" if "train_images" in meta else "images"
  size = data["image_size"]
  loss = config.get("loss", {})
  weights = ", ".join(f"{term} {loss[term]:g}" for term in losses.TERMS if loss.get(term))
  return (
    f"The model: {kind} U-Net of depth {model['depth']}, widths {'-'.join(map(str, widths))}, "
    f"after {meta['step']} steps ({meta['stage']} stage) at batch {config['optim']['batch_size']} "
    f"on {size}x{size} crops of {images} ({source}). Loss weights: {weights}."
  )


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | epath.Path,
  *,
  checkpoint: str | epath.Path | None = None,
) -> dict[str, Any]:
  """Evaluates a checkpoint (default: the newest readable step in `workdir/checkpoints`) and the
  baselines.

  Writes `workdir/eval/step_<N>/results.{csv,md,json}` and sample grids, prints the Markdown table
  and returns the results: {"checkpoint", "step", "num_images", "image_size", "mask_source",
  "pairs", "inception", "method_names", "notes", "rows": [{"method", "mask_set", "bin",
  "bin_index", "pairs", "l1_percent", "psnr", "ssim", "inception_score", "fid"}]} (None where a
  value cannot be computed, +inf PSNR for an exact reconstruction).
  """
  validate_config(config)
  cfg = config.eval
  directory = (
    epath.Path(checkpoint) if checkpoint is not None else epath.Path(workdir) / "checkpoints"
  )
  mesh = parallel.create_mesh(config.mesh.data)
  model, variables, meta = checkpoints.load_model(directory, cfg.step)
  model = model.clone(kernels=kernels.select(config.model.conv_impl, mesh.devices.flat))
  step = meta["step"]
  network = inception.resolve(cfg.inception_weights) if cfg.inception else None
  evaluator = Evaluator(config, model, mesh, network)
  logging.info(
    "Evaluating %s step %d on %d images and mask sets %s.",
    directory,
    step,
    len(evaluator.targets),
    evaluator.pairs,
  )
  rows, grids = evaluator.evaluate(parallel.replicate(variables, mesh))
  names = method_names(model.partial, evaluator.methods, cfg.self_ensemble)
  results = {
    "checkpoint": str(directory),
    "step": step,
    "num_images": len(evaluator.targets),
    "image_size": int(evaluator.targets.shape[1]),
    "mask_source": config.data.masks.test_dir or "procedural evaluation masks",
    "pairs": evaluator.pairs,
    "inception": None if network is None else network.source,
    "method_names": names,
    "notes": _notes(config, network, meta, evaluator.pairs, names),
    "rows": rows,
  }
  table = markdown_table(results)
  if jax.process_index() == 0:
    out = epath.Path(workdir) / "eval" / eval_dir_name(step, cfg.self_ensemble)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    (out / "results.csv").write_text(_csv(results))
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    for set_name, grid in grids.items():
      with (out / f"samples_{set_name}.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    logging.info("Evaluation results written to %s", out)
    print(table, flush=True)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m pconv_jax.evaluate --config FILE --workdir DIR
  [--checkpoint DIR]`: absl flags as in main.py."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Configuration file, e.g. configs/places2.py.")
  flags.DEFINE_string(
    "workdir", None, "Workdir: checkpoints in WORKDIR/checkpoints, results in WORKDIR/eval."
  )
  flags.DEFINE_string(
    "checkpoint", None, "A checkpoint directory to evaluate instead of WORKDIR/checkpoints."
  )
  flags.mark_flags_as_required(["config", "workdir"])

  def run(args: list[str]) -> None:
    if len(args) > 1:
      raise app.UsageError(f"Unexpected arguments: {args[1:]}")
    flag_values = flags.FLAGS
    try:
      evaluate(flag_values.config, flag_values.workdir, checkpoint=flag_values.checkpoint)
    except UserError as error:
      sys.exit(f"error: {error}")

  app.run(run, argv=list(argv) if argv is not None else None, flags_parser=parse_flags)
  return 0


if __name__ == "__main__":
  main()
