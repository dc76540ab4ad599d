"""Published PConv U-Net weights -> an orbax checkpoint of `pconv_jax.models.PUNet`.

    python -m pconv_jax.convert FILE OUT_DIR [--source NAME]
    python -m pconv_jax.convert fetch NAME [OUT_DIR]

FILE is a PyTorch `.pth` (a state dict, or a training checkpoint holding one under `state_dict`,
`model` or `generator`; `module.` and `generator.` prefixes are dropped) or a Keras `.h5`. Its
layout (`pconv_jax.published.LAYOUTS`) is recognised from its weight names, or forced with
`--source`. The
checkpoint records the network's variant (output activation, biases, BatchNorm, input range and
channel order) with the weights, so inference, evaluation and `stages.finetune_from` run the network
as its authors did. `fetch` downloads a published model (`pconv_jax.published.MODELS`) into the
cache, checks the hash its authors published where there is one, and converts it.
"""

import argparse
from collections.abc import Mapping, Sequence
import importlib.util
import os
from pathlib import Path
import sys
from typing import Any

from absl import logging
from etils import epath
import h5py
import numpy as np

from pconv_jax import checkpoints, published, weights
from pconv_jax.errors import UserError
from pconv_jax.published import ConversionError, Layout


def _missing_torch() -> ConversionError:
  return ConversionError(
    "Reading .pth files needs PyTorch: pip install torch==2.13.0 (the CPU wheel)."
  )


def _unreadable(where: str, problem: str) -> ConversionError:
  return ConversionError(f"{where} {problem}.")


def read_weights(path: str | os.PathLike) -> tuple[str, published.Arrays]:
  """(container, weights) of a file: ("keras", {"layer/weight": array}) for HDF5 files, else
  ("torch", the state dict `published.clean`ed)."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise ConversionError(f"{path}: no such file.")
  if h5py.is_hdf5(path):
    layers = weights.read_keras_layers(path, _unreadable)
    return "keras", {f"{layer}/{name}": v for layer, ws in layers.items() for name, v in ws.items()}
  state_dict = weights.read_torch_state_dict(path, _missing_torch(), _unreadable)
  return "torch", published.clean(state_dict)


def convert_weights(
  arrays: published.Arrays, container: str, source: str | None = None, dtype: Any = np.float32
) -> tuple[Layout, dict, dict]:
  """(layout, model config, Flax variables) of weights read by `read_weights`: the layout named
  `source`, or the one recognised from the weight names."""
  if source is None:
    layout = published.detect(arrays, container)
  else:
    layout = published.LAYOUTS[source]
    if layout.container != container:
      raise ConversionError(
        f"--source {source} ({layout.project}) reads {layout.container} files, not {container}."
      )
  config, variables = layout.convert(arrays, dtype)
  return layout, config, variables


def convert_file(
  path: str | os.PathLike,
  out_dir: str | os.PathLike,
  source: str | None = None,
  origin: str | None = None,
  **meta: Any,
) -> tuple[Layout, epath.Path]:
  """Converts a weight file to a checkpoint in `out_dir` (which must not hold one yet); returns the
  layout found and the checkpoint step's path. `source` forces a layout; `origin` (default: the
  path) and `meta` are stored beside the weights."""
  if (epath.Path(out_dir) / "0").exists():
    raise ConversionError(f"{out_dir} already holds a checkpoint: choose a new directory.")
  container, arrays = read_weights(path)
  layout, config, variables = convert_weights(arrays, container, source)
  digest = weights.file_digests(Path(path).expanduser())["sha256"]
  saved = checkpoints.save_model(
    out_dir,
    variables,
    config,
    source=origin or str(path),
    source_sha256=digest,
    layout=layout.name,
    project=layout.project,
    train_size=layout.train_size,
    **meta,
  )
  return layout, saved


def fetch(
  name: str,
  out_dir: str | os.PathLike | None = None,
  url: str | None = None,
  sha256: str | None = None,
) -> tuple[Layout, epath.Path]:
  """Downloads the published model `name` into the cache (once), verifies it, and converts it to a
  checkpoint in `out_dir` (default: the cache's `models/NAME`); returns like `convert_file`.

  `url` replaces the published address (a mirror, or `file://`), `sha256` the published hash.
  """
  model = published.MODELS[name]
  default_dir = weights.cache_dir() / "models" / name
  if out_dir is None and (default_dir / "0").exists():
    logging.info("%s was fetched before: %s (remove it to fetch again).", name, default_dir)
    return published.LAYOUTS[model.layout], epath.Path(default_dir) / "0"
  out_dir = Path(out_dir) if out_dir else default_dir
  if not model.direct and url is None:
    raise ConversionError(
      f"{name} ({model.data}) is on Google Drive, which has no stable download link: open "
      f"{model.url} in a browser, download the file, then run `python -m pconv_jax.convert FILE "
      f"{out_dir}`."
    )
  if model.layout != "keras" and importlib.util.find_spec("torch") is None:
    raise _missing_torch()  # Before the download, not after.
  expected = {"sha256": sha256 or model.sha256_prefix} if sha256 or model.sha256_prefix else {}
  weights.check_checksums(expected, ConversionError)
  raw = weights.cache_dir() / "published" / (name + (".h5" if model.layout == "keras" else ".pth"))
  if raw.is_file() and (url or not _matches(raw, expected)):
    raw.unlink()  # Another address, or not the file the hash names: download it again.
  if not raw.is_file():
    raw.parent.mkdir(parents=True, exist_ok=True)
    digests = weights.download(
      url or model.url,
      raw,
      expected,
      ConversionError,
      f" If this machine cannot reach it, download {model.url} elsewhere and run `python -m "
      f"pconv_jax.convert fetch {name} --url file:///path/to/FILE`.",
    )
    if not expected:
      logging.warning(
        "%s publishes no hash for %s: not verified (SHA-256 %s, recorded in the checkpoint).",
        published.LAYOUTS[model.layout].project,
        name,
        digests["sha256"],
      )
  return convert_file(raw, out_dir, model.layout, origin=url or model.url, published_model=name)


def _matches(path: Path, checksums: Mapping[str, str]) -> bool:
  digests = weights.file_digests(path)
  return all(digests[name].startswith(want.lower()) for name, want in checksums.items())


def _convert_main(argv: Sequence[str]) -> tuple[Layout, epath.Path]:
  parser = argparse.ArgumentParser(
    prog="python -m pconv_jax.convert",
    description="Convert a published PConv U-Net (.pth or Keras .h5) to an orbax checkpoint.",
    epilog="`python -m pconv_jax.convert fetch NAME [OUT_DIR]` downloads and converts "
    f"{', '.join(published.MODELS)}.",
  )
  parser.add_argument("file", help="the weight file (.pth, .h5)")
  parser.add_argument("out_dir", help="directory for the checkpoint (must not hold one yet)")
  parser.add_argument(
    "--source", choices=sorted(published.LAYOUTS), help="the layout (default: recognised)"
  )
  args = parser.parse_args(argv)
  return convert_file(args.file, args.out_dir, args.source)


def _fetch_main(argv: Sequence[str]) -> tuple[Layout, epath.Path]:
  parser = argparse.ArgumentParser(
    prog="python -m pconv_jax.convert fetch",
    description="Download a published PConv U-Net and convert it to an orbax checkpoint.",
    epilog="\n".join(
      f"{name}: {published.LAYOUTS[m.layout].project}, {m.data}; licence {m.licence}"
      for name, m in published.MODELS.items()
    ),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("name", choices=list(published.MODELS))
  parser.add_argument("out_dir", nargs="?", help="checkpoint directory (default: in the cache)")
  parser.add_argument("--url", help="download from here instead (a mirror, or file:///path)")
  parser.add_argument("--sha256", help="expected SHA-256 of that file, replacing the published one")
  args = parser.parse_args(argv)
  print(f"Fetching {args.name} ...", flush=True)
  return fetch(args.name, args.out_dir, args.url, args.sha256)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv[:1] == ["fetch"]:
      layout, saved = _fetch_main(argv[1:])
    else:
      layout, saved = _convert_main(argv)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"Found the {layout.name} layout ({layout.project}); wrote {saved}.")
  print(
    f"Inpaint with: python -m pconv_jax.inpaint --checkpoint {saved.parent} --image IMAGE "
    "--mask MASK --output OUT.png"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
