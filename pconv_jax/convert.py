"""PyTorch PConv U-Net weights -> Flax variables for `pconv_jax.models.PUNet`.

The PyTorch network is the one in the project summary: blocks `ec_images_{i}` and `dc_images_{i}`,
each with a `conv` (PartialConv2d, weight OIHW, bias only in `dc_images_1`) and, except
`ec_images_1` and `dc_images_1`, a `bn` (BatchNorm2d). Depth, widths and kernel sizes are read from
the weights.

CLI: `python -m pconv_jax.convert IN.pth OUT_DIR` writes an orbax checkpoint that
`checkpoints.load_model`, evaluation and inference read.
"""

import argparse
from collections.abc import Mapping
import re
from typing import Any

from etils import epath
import flax
import jax
import numpy as np

from pconv_jax import checkpoints, models, weights
from pconv_jax.errors import UserError

_KEY = re.compile(r"^(ec|dc)_images_(\d+)\.(conv|bn)\.(weight|bias|running_mean|running_var)$")
_IGNORED = re.compile(r"\.num_batches_tracked$")
_LEAF = {
  ("conv", "weight"): ("params", "kernel"),
  ("conv", "bias"): ("params", "bias"),
  ("bn", "weight"): ("params", "scale"),
  ("bn", "bias"): ("params", "bias"),
  ("bn", "running_mean"): ("batch_stats", "mean"),
  ("bn", "running_var"): ("batch_stats", "var"),
}


class ConversionError(UserError, ValueError):
  """The weights are not a PConv U-Net state dict, or the file cannot be read."""


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; torch itself is never imported here.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _clean(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Numpy values, without `module.` prefixes (DataParallel) and BatchNorm step counters."""
  return {
    key.removeprefix("module."): _to_numpy(value)
    for key, value in state_dict.items()
    if not _IGNORED.search(key)
  }


def torch_model_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The PUNet config (depth, features, kernel_sizes) that the weights in `state_dict` belong to."""
  arrays = _clean(state_dict)
  encoder = {
    int(m.group(2)): arrays[key]
    for key in arrays
    if (m := _KEY.match(key))
    and m.group(1) == "ec"
    and m.group(3) == "conv"
    and m.group(4) == "weight"
  }
  depth = len(encoder)
  if depth == 0 or sorted(encoder) != list(range(1, depth + 1)):
    raise ConversionError(
      "Not a PConv U-Net state dict: expected keys ec_images_1.conv.weight ... "
      "ec_images_N.conv.weight, "
      f"found encoder levels {sorted(encoder)} among keys {sorted(arrays)[:8]}..."
    )
  return {
    "depth": depth,
    "features": [int(encoder[i].shape[0]) for i in range(1, depth + 1)],
    "kernel_sizes": [int(encoder[i].shape[-1]) for i in range(1, depth + 1)],
    "partial": True,
  }


def from_torch_punet(state_dict: Mapping[str, Any], dtype: Any = np.float32) -> dict[str, Any]:
  """Flax variables {'params', 'batch_stats'} for `PUNet` from a PyTorch PConv U-Net state dict.

  Values may be numpy arrays or torch tensors. Raises a ConversionError listing every missing,
  unexpected or wrongly shaped key.
  """
  arrays = _clean(state_dict)
  model = models.create_model(torch_model_config(arrays))
  expected = flax.traverse_util.flatten_dict(
    checkpoints.abstract_variables(model, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  )

  flat, unexpected, wrong_shape = {}, [], {}
  for key, value in arrays.items():
    match = _KEY.match(key)
    side, level, layer, name = match.groups() if match else (None,) * 4
    collection, leaf = _LEAF.get((layer, name), (None, None))
    path = (collection, "encoder" if side == "ec" else "decoder", f"block_{level}", layer, leaf)
    if path not in expected:
      unexpected.append(key)
      continue
    if value.ndim == 4:  # OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
    if value.shape != expected[path].shape:
      wrong_shape[path] = (
        f"{key} {value.shape} (as Flax {'/'.join(path)}, which is {expected[path].shape})"
      )
      continue
    flat[path] = value.astype(dtype)

  missing = ["/".join(path) for path in expected if path not in flat and path not in wrong_shape]
  problems = []
  if unexpected:
    problems.append(f"unexpected keys {sorted(unexpected)}")
  if wrong_shape:
    problems.append(f"wrong shapes {list(wrong_shape.values())}")
  if missing:
    problems.append(f"nothing for the Flax variables {sorted(missing)}")
  if problems:
    raise ConversionError(
      f"Cannot convert the state dict to PUNet(depth={model.depth}): " + "; ".join(problems)
    )
  return flax.traverse_util.unflatten_dict(flat)


def load_torch_state_dict(path: str) -> dict[str, Any]:
  """Reads a .pth file: a state dict, or a training checkpoint
  holding one under 'state_dict' or 'model'."""
  missing_torch = ConversionError(
    "Reading .pth files needs PyTorch: pip install torch==2.13.0 (the CPU wheel)."
  )
  return weights.read_torch_state_dict(
    path, missing_torch, lambda where, problem: ConversionError(problem)
  )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("torch_file", help="PyTorch .pth file of the PConv U-Net")
  parser.add_argument(
    "out_dir", help="directory for the orbax checkpoint (must not hold step 0 yet)"
  )
  args = parser.parse_args(argv)
  try:
    state_dict = load_torch_state_dict(args.torch_file)
    variables = from_torch_punet(state_dict)
    if (epath.Path(args.out_dir) / "0").exists():
      raise ConversionError(f"{args.out_dir} already holds a checkpoint: choose a new directory.")
  except UserError as error:
    raise SystemExit(f"error: {args.torch_file}: {error}") from error
  path = checkpoints.save_model(
    args.out_dir, variables, torch_model_config(state_dict), source=args.torch_file
  )
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
