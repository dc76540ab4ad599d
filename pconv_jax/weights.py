"""Pretrained weight files of the loss (VGG-16), the evaluation (Inception-v3) and converted
networks: the cache directory, checksummed downloads, reading PyTorch and Keras files, and the
`fetch`/`convert` command line. Each network's module says what its files hold."""

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
import hashlib
import os
from pathlib import Path
import re
import sys
from typing import Any
import urllib.error
import urllib.request

from absl import logging
import h5py
import numpy as np

from pconv_jax.errors import UserError


class WeightsError(UserError, RuntimeError):
  """Weights are missing, corrupt or not in the expected layout; the message says what to run."""


@dataclass(frozen=True)
class Source:
  """A canonical public weight file and its published checksums
  (hashlib algorithm -> hex digest)."""

  url: str
  checksums: Mapping[str, str]

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class WeightFiles:
  """How one network's weight files are read: a loader per format,
  the format chosen by the file's suffix."""

  network: str  # e.g. "VGG-16", for messages.
  torch_format: str  # The format of .pth/.pt files (its loaders key).
  torch_label: str  # Who publishes those, for messages.
  loaders: Mapping[
    str, Callable[[Path], Any]
  ]  # torch_format, "keras" (.h5/.hdf5) and "npz" (this project's).
  config_field: str  # The config field naming a file.
  fetch_command: Callable[..., str]  # fetch_command(source="default") -> the shell command to run.
  error: type[WeightsError]

  def format_of(self, path: Path) -> str:
    suffixes = {
      ".pth": self.torch_format,
      ".pt": self.torch_format,
      ".h5": "keras",
      ".hdf5": "keras",
      ".npz": "npz",
    }
    kind = suffixes.get(path.suffix.lower())
    if kind is None:
      raise self.error(
        f"{path}: unknown {self.network} weight format {path.suffix!r}; expected .npz (this "
        "project's), .pth/.pt "
        f"({self.torch_label}) or .h5/.hdf5 (Keras). Create one with `{self.fetch_command()}`."
      )
    return kind

  def load(self, path: str | os.PathLike) -> Any:
    """Reads `path` with the loader of its format."""
    path = Path(path).expanduser()
    kind = self.format_of(path)
    if not path.is_file():
      raise self.error(
        f"{self.network} weights file {path} does not exist. Run `{self.fetch_command()}` (or "
        f"`{self.fetch_command('keras')}`) and leave {self.config_field} unset to use the cache, "
        "or point it at an existing file."
      )
    return self.loaders[kind](path)


def read_torch_state_dict(
  path: str | os.PathLike, missing_torch: UserError, unreadable: Callable[[str, str], UserError]
) -> dict[str, Any]:
  """The state dict in a `torch.save` file, read with PyTorch (imported only here: optional and
  heavy): the file's dict itself, or the one a training checkpoint holds under 'state_dict', 'model'
  or 'generator'.

  Raises `missing_torch` without PyTorch, and `unreadable(path, problem)` for a file that holds
  none."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise missing_torch from e
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a corrupt or non-tensor file.
    raise unreadable(str(path), _torch_load_problem(e)) from e
  if not isinstance(loaded, Mapping):
    raise unreadable(str(path), f"holds a {type(loaded).__name__}, not a state dict")
  for key in ("state_dict", "model", "generator"):
    if isinstance(loaded.get(key), Mapping):
      return dict(loaded[key])
  return dict(loaded)


def keras_counter(name: str) -> int:
  """Keras' creation counter at the end of a layer name (`conv2d_12` -> 12, `conv2d` -> 0)."""
  m = re.search(r"_(\d+)$", name)
  return int(m.group(1)) if m else 0


def read_keras_layers(
  path: str | os.PathLike, unreadable: Callable[[str, str], UserError]
) -> dict[str, dict[str, np.ndarray]]:
  """The weights of a Keras .h5 file (`save_weights`, or a whole-model save) by layer: {layer name:
  {weight name without the layer's prefix and ':0' (e.g. 'kernel', 'moving_mean'): array}}.

  Layers without weights are left out. Raises `unreadable(path, problem)` for a file that is not
  HDF5."""
  layers: dict[str, dict[str, np.ndarray]] = {}
  try:
    with h5py.File(path, "r") as f:
      root = f["model_weights"] if "model_weights" in f else f
      for name, group in root.items():
        if not isinstance(group, h5py.Group):
          continue
        found = {}
        group.visititems(
          lambda key, item: (
            found.update({key.rsplit("/", 1)[-1].split(":")[0]: np.asarray(item)})
            if isinstance(item, h5py.Dataset)
            else None
          )
        )
        if found:
          layers[name] = found
  except OSError as e:
    raise unreadable(str(path), f"cannot be read as an HDF5 file ({e})") from e
  return layers


def _torch_load_problem(error: Exception) -> str:
  """One line on why `torch.load(weights_only=True)` refused a file."""
  text = " ".join(str(error).split())
  reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
  if reason and "Unsupported global" in reason.group(1):
    return (
      f"holds Python objects besides tensors, which are not loaded ({reason.group(1)}): if you "
      "trust the file, save its state dict alone (torch.save(torch.load(FILE, weights_only=False)"
      "['state_dict'], NEW.pth)) and convert that"
    )
  detail = reason.group(1) if reason else f"{type(error).__name__}: {text}"
  return f"cannot be read as a PyTorch state dict ({detail})"


def cache_dir() -> Path:
  """$PCONV_JAX_CACHE, else $XDG_CACHE_HOME/pconv_jax, else ~/.cache/pconv_jax."""
  if os.environ.get("PCONV_JAX_CACHE"):
    return Path(os.environ["PCONV_JAX_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base).expanduser() / "pconv_jax"


def file_digests(path: Path) -> dict[str, str]:
  """SHA-256 and MD5 of a file."""
  hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      for h in hashes.values():
        h.update(chunk)
  return {name: h.hexdigest() for name, h in hashes.items()}


def download(
  url: str,
  dest: Path,
  checksums: Mapping[str, str],
  error: type[UserError] = WeightsError,
  unreachable_hint: str = "",
) -> dict[str, str]:
  """Downloads `url` (http(s) or file) to `dest` and returns its digests; refuses a file whose
  checksums differ.

  `checksums` maps "sha256"/"md5" to the expected hex digest, or to a prefix of at least 8 digits of
  it (as file names carry them for torch hub); empty only where no hash is published, the caller
  saying so. On any failure nothing is left at `dest`, and `error` is raised (with
  `unreachable_hint` appended where the address could not be read).
  """
  check_checksums(checksums, error)
  partial = dest.with_name(dest.name + ".part")
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
      while chunk := response.read(1 << 20):
        out.write(chunk)
    digests = file_digests(partial)
    wrong = {
      name: (want.lower(), digests[name])
      for name, want in checksums.items()
      if not digests[name].startswith(want.lower())
    }
    if wrong:
      details = "; ".join(
        f"{name} expected {want}, got {got}" for name, (want, got) in wrong.items()
      )
      raise error(
        f"checksum mismatch for {url} ({details}): refusing to use it. The download is corrupt or "
        "not the expected file; retry, or if you trust another copy, pass its SHA-256 with "
        "--sha256."
      )
    os.replace(partial, dest)
    return digests
  except (urllib.error.URLError, OSError) as e:
    raise error(f"could not download {url}: {e}.{unreachable_hint}") from e
  finally:
    partial.unlink(missing_ok=True)


def check_checksums(checksums: Mapping[str, str], error: type[UserError]) -> None:
  """Refuses checksums other than "sha256"/"md5" hex digests or prefixes of 8 digits or more."""
  for name, value in checksums.items():
    if name not in ("sha256", "md5") or not re.fullmatch(r"[0-9a-fA-F]{8,}", value):
      raise error(
        f"{name} checksum {value!r}: give the file's SHA-256 as hex digits (at least the first 8)."
      )


def check_canonical(path: Path, source: Source) -> dict[str, str]:
  """The file's digests; warns when it is not the canonical download (it is still used)."""
  digests = file_digests(path)
  if any(digests[name] != want for name, want in source.checksums.items()):
    logging.warning(
      "%s is not the canonical %s (SHA-256 %s); converting it anyway.",
      path,
      source.filename,
      digests["sha256"],
    )
  return digests


def main(
  argv: Sequence[str] | None,
  *,
  network: str,
  prog: str,
  sources: Mapping[str, Source],
  fetch: Callable[..., Path],
  convert: Callable[[str, str | None], Path],
  cache_name: str,
) -> int:
  """`fetch SOURCE [--url] [--sha256]` and `convert PATH [--output]` for one network's weights."""
  parser = argparse.ArgumentParser(
    prog=prog,
    description=f"Fetch or convert {network} weights.",
    epilog=f"Cache directory: {cache_dir()} (set $PCONV_JAX_CACHE to change it).",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  fetch_parser = commands.add_parser(
    "fetch", help="download, verify and convert a canonical weight file"
  )
  fetch_parser.add_argument("source", choices=sorted(sources))
  fetch_parser.add_argument("--url", help="download from here instead (a mirror, or file:///path)")
  fetch_parser.add_argument(
    "--sha256", help="expected SHA-256 of that file, replacing the published checksum"
  )
  convert_parser = commands.add_parser("convert", help="convert a local .pth or .h5 file")
  convert_parser.add_argument("path")
  convert_parser.add_argument("--output", help=f"output .npz (default: {cache_dir()}/{cache_name})")
  args = parser.parse_args(argv)
  try:
    if args.command == "fetch":
      print(f"Downloading {args.url or sources[args.source].url} ...", flush=True)
      out = fetch(args.source, url=args.url, sha256=args.sha256)
    else:
      out = convert(args.path, args.output)
  except WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Saved {network} weights to {out}")
  return 0
