"""Inpaint in the browser: upload a photo, paint the hole, inpaint, download the PNG.

    python -m pconv_jax.app --checkpoint DIR [--checkpoint DIR2 ...] [--port 7860] \
        [--host 127.0.0.1] [--max_upload_mb 40] [--max_megapixels 50]

then open http://127.0.0.1:7860. Several checkpoints give a model menu; the page names the
checkpoint and network that runs. The page (`app.html`) paints the hole on a mask canvas at the
photo's own resolution, so the mask fits the photo pixel for pixel whatever the zoom.

A standard-library HTTP server (threads; one inference at a time, the others queued), no web
framework: Gradio, the ecosystem's usual choice, requires Pillow < 13 and would pin this project's
Pillow back; this needs no dependency beyond the project's. Uploads are capped in bytes and pixels
before decoding, every user mistake is a message on the page (never a traceback; the server keeps
running), results live in one temporary directory removed at exit, and the server listens on
127.0.0.1 unless --host says otherwise.
"""

import argparse
import base64
import binascii
from collections.abc import Sequence
import dataclasses
import http.server
import io
import itertools
import json
import logging
from pathlib import Path
import queue
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any
import urllib.parse
import warnings

from etils import epath
import numpy as np
from PIL import Image

from pconv_jax import hd, images, inpaint
from pconv_jax.errors import UserError

PAGE = Path(__file__).with_name("app.html")
LOCAL_HOSTS = ("127.0.0.1", "localhost")
KEPT_RESULTS = 20  # Finished jobs (and their PNGs) kept for polling and download.
MAX_PENDING = 8  # Jobs waiting or running; each holds its photo in memory.


class AppError(UserError, ValueError):
  """A request or setting the app refuses; the message says why (on the page for a request)."""


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded checkpoint and how the page names it."""

  label: str
  description: str
  inpainter: inpaint.Inpainter


def describe(inpainter: inpaint.Inpainter) -> str:
  """The network and where its weights come from, in one line."""
  model, meta = inpainter.model, inpainter.meta
  kind = "PConv" if model.partial else "Conv (no partial convolutions)"
  parts = [
    f"{kind} U-Net, {model.depth} levels, trained at {inpainter.training_size}x"
    f"{inpainter.training_size}",
    f"step {meta.get('step', '?')}",
  ]
  if meta.get("project"):
    parts.append(
      f"converted from {meta['project']} ({Path(str(meta.get('source', ''))).name}, SHA-256 "
      f"{str(meta.get('source_sha256', ''))[:12]})"
    )
  return "; ".join(parts)


@dataclasses.dataclass
class Job:
  """One inpainting request's state, as the page polls it; `number` orders the queue."""

  model: Model
  image: np.ndarray | None  # None once inpainted: the result is on disk.
  hole: np.ndarray | None
  strategy: hd.HDStrategy
  name: str
  number: int = 0
  state: str = "queued"  # queued | running | done | failed
  done: int = 0
  total: int = 0
  error: str | None = None
  seconds: float | None = None
  result: Path | None = None  # Set last: a job with a result is complete.

  @property
  def filename(self) -> str:
    return f"{Path(self.name).stem or 'photo'}_inpainted.png"

  def status(self, job_id: str) -> dict[str, Any]:
    """What the page polls: state, progress, then the result's address or the error."""
    status = {"state": self.state, "done": self.done, "total": self.total}
    if self.error:
      status["error"] = self.error
    if self.result:
      status |= {"result": f"/api/results/{job_id}.png", "filename": self.filename}
      status["seconds"] = round(self.seconds, 1)
    return status


class Busy(AppError):
  """Too many inpaintings are waiting."""


class Jobs:
  """Inpainting jobs, run one at a time by a daemon thread; their PNGs go to `directory`, which
  `close` removes."""

  def __init__(self, directory: Path) -> None:
    self.directory = directory
    self._jobs: dict[str, Job] = {}
    self._lock = threading.Lock()  # Of `_jobs`.
    self._writing = threading.Lock()  # Of `directory`.
    self._numbers = itertools.count()
    self._queue: queue.Queue[str] = queue.Queue()
    self._closed = False
    threading.Thread(target=self._work, name="inpainting", daemon=True).start()

  def submit(self, job: Job) -> str:
    """Queues `job`; its id, unguessable. Raises Busy when MAX_PENDING jobs wait or run."""
    with self._lock:
      pending = sum(1 for j in self._jobs.values() if j.state in ("queued", "running"))
      if pending >= MAX_PENDING:
        raise Busy(f"The server is busy with {pending} inpaintings: try again in a moment.")
      finished = [i for i, j in self._jobs.items() if j.state in ("done", "failed")]
      for old in finished[: max(0, len(finished) - KEPT_RESULTS + 1)]:
        if result := self._jobs.pop(old).result:
          result.unlink(missing_ok=True)
      job_id, job.number = secrets.token_urlsafe(12), next(self._numbers)
      self._jobs[job_id] = job
    self._queue.put(job_id)
    return job_id

  def get(self, job_id: str) -> Job | None:
    with self._lock:
      return self._jobs.get(job_id)

  def ahead_of(self, job: Job) -> int:
    """Jobs waiting or running that came before `job`."""
    with self._lock:
      return sum(
        1 for j in self._jobs.values() if j.number < job.number and j.state in ("queued", "running")
      )

  def _work(self) -> None:
    while True:
      job_id = self._queue.get()
      if job := self.get(job_id):
        self._run(job_id, job)

  def _run(self, job_id: str, job: Job) -> None:
    job.state = "running"
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
      job.done, job.total = done, total

    try:
      (result,) = job.model.inpainter.inpaint_many([job.image], [job.hole], job.strategy, progress)
      path = self.directory / f"{job_id}.png"
      with self._writing:  # Never after `close` removed the directory.
        if self._closed:
          return
        Image.fromarray(result).save(path, compress_level=inpaint.PNG_COMPRESS_LEVEL)
      job.seconds = time.perf_counter() - start
      job.result, job.state = path, "done"
    except UserError as e:
      job.error, job.state = str(e), "failed"
    except Exception as e:  # A bug or an out-of-memory: told on the page, logged in full here.
      logging.exception("Inpainting job %s failed", job_id)
      job.error, job.state = f"Inpainting failed on the server ({type(e).__name__}: {e}).", "failed"
    finally:
      job.image = job.hole = None

  def close(self) -> None:
    """Removes the results; a job still running writes nothing."""
    with self._writing:
      self._closed = True
      shutil.rmtree(self.directory, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Limits:
  """The largest photo the server accepts, in bytes (as uploaded) and in pixels."""

  max_upload_bytes: int
  max_pixels: int


def decode_upload(
  payload: dict[str, Any], models: Sequence[Model], limits: Limits
) -> tuple[Model, np.ndarray, np.ndarray, hd.HDStrategy, str]:
  """(model, RGB uint8 photo, bool hole, strategy, file name) from the page's JSON request."""
  try:
    model = models[int(payload.get("model", 0))]
  except (IndexError, TypeError, ValueError):
    raise AppError(f"Unknown model {payload.get('model')!r}.") from None
  try:
    limit = payload.get("resize_limit")
    strategy = hd.HDStrategy(
      str(payload.get("strategy", "crop")),
      int(payload.get("crop_margin", hd.HDStrategy.crop_margin)),
      None if limit in (None, "") else int(limit),
    )
  except (TypeError, ValueError):
    raise AppError("The crop margin and the resize limit must be whole numbers.") from None
  if problem := strategy.problem():
    raise AppError(problem)
  name = str(payload.get("name") or "photo")
  photo = _decode(payload.get("image"), "The photo", limits)
  mask = _decode(payload.get("mask"), "The mask", limits)
  if mask.size != photo.size:
    raise AppError(
      f"The mask is {mask.size[0]}x{mask.size[1]} pixels but the photo is "
      f"{photo.size[0]}x{photo.size[1]}: reload the page and paint again."
    )
  alpha = mask.getchannel("A") if mask.mode in ("RGBA", "LA") else mask.convert("L")
  hole = np.asarray(alpha) >= images.MASK_THRESHOLD
  if not hole.any():
    raise AppError("Nothing is painted: paint over what should be inpainted, then Inpaint.")
  if hole.all():
    raise AppError(
      "Everything is painted, so no known pixel is left to inpaint from: erase some of it."
    )
  return model, np.asarray(photo.convert("RGB")), hole, strategy, name


def _decode(encoded: Any, what: str, limits: Limits) -> Image.Image:
  """A base64 image from the page, its pixel count checked before its pixels are decoded."""
  if not isinstance(encoded, str) or not encoded:
    raise AppError(f"{what} is missing: choose a photo first.")
  try:
    raw = io.BytesIO(base64.b64decode(encoded.split(",", 1)[-1], validate=True))
  except (binascii.Error, ValueError):
    raise AppError(f"{what} did not arrive intact (not base64): reload the page.") from None
  try:
    with Image.open(raw) as image:
      width, height = image.size
    if width * height <= limits.max_pixels:
      return images.load(raw)  # Decoded, as browsers show it (EXIF orientation applied).
  except images.DECODE_ERRORS as e:
    raise AppError(f"{what} is not an image this server can read ({e}).") from None
  raise AppError(
    f"{what} is {width}x{height} pixels ({width * height / 1e6:.3g} megapixels); this server "
    f"accepts at most {limits.max_pixels / 1e6:.3g} megapixels (--max_megapixels): downscale it "
    "first."
  )


def content_disposition(filename: str) -> str:
  """An attachment header naming `filename` (any characters) safely: an ASCII name, and the
  percent-encoded UTF-8 one (RFC 6266)."""
  fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename)
  return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(filename)}"


NOT_FROM_THE_PAGE = "The request is not what the page sends: reload the page."


def make_handler(
  models: Sequence[Model], jobs: Jobs, limits: Limits, local: bool
) -> type[http.server.BaseHTTPRequestHandler]:
  """The request handler of one server: the page, its JSON API and the result files. A `local`
  server answers only requests addressed to 127.0.0.1 or localhost (no DNS rebinding)."""
  info = {
    "models": [{"label": m.label, "description": m.description} for m in models],
    "strategies": list(hd.STRATEGIES),
    "default_strategy": hd.HDStrategy().name,
    "max_upload_bytes": limits.max_upload_bytes,
    "max_pixels": limits.max_pixels,
  }
  # Base64 makes 4 bytes of 3; the photo and a mask of at most its pixels travel together.
  max_body = limits.max_upload_bytes * 4 // 3 + limits.max_pixels // 2 + 65536

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "pconv_jax"
    timeout = 120  # Seconds a silent client may hold its thread.

    def log_message(self, format: str, *args: Any) -> None:
      logging.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      for name, value in headers.items():
        self.send_header(name.replace("_", "-"), value)
      self.end_headers()
      self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
      self._send(status, json.dumps(value).encode(), "application/json")

    def _foreign(self) -> bool:
      """Answers 403 to a request for another host name (a local server only)."""
      host = urllib.parse.urlsplit(f"//{self.headers.get('Host', '')}").hostname
      if not local or host in LOCAL_HOSTS:
        return False
      self._json(403, {"error": "This server answers only at 127.0.0.1 or localhost."})
      return True

    def do_GET(self) -> None:
      if self._foreign():
        return
      if self.path in ("/", "/index.html"):
        self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
      elif self.path == "/api/info":
        self._json(200, info)
      elif self.path.startswith("/api/jobs/"):
        job_id = self.path.removeprefix("/api/jobs/")
        if (job := jobs.get(job_id)) is None:
          self._json(404, {"error": "No such job: the server may have restarted; try again."})
        else:
          self._json(200, {**job.status(job_id), "ahead": jobs.ahead_of(job)})
      elif self.path.startswith("/api/results/") and self.path.endswith(".png"):
        job = jobs.get(self.path.removeprefix("/api/results/").removesuffix(".png"))
        try:
          body = job.result.read_bytes()  # AttributeError: no such job or no result yet.
        except (AttributeError, OSError):
          self._json(404, {"error": "No such result (only the latest are kept): inpaint again."})
          return
        self._send(200, body, "image/png", Content_Disposition=content_disposition(job.filename))
      else:
        self._json(404, {"error": f"Nothing at {self.path}."})

    def do_POST(self) -> None:
      if self._foreign():
        return
      if self.path != "/api/inpaint":
        self._json(404, {"error": f"Nothing at {self.path}."})
        return
      try:
        length = int(self.headers.get("Content-Length", ""))
      except ValueError:
        length = -1
      if length < 0 or self.headers.get_content_type() != "application/json":
        self.close_connection = True
        self._json(400, {"error": NOT_FROM_THE_PAGE})
        return
      if length > max_body:
        self._drop(length)
        self._json(
          413,
          {
            "error": f"The upload is {length / 2**20:.3g} MB; this server accepts photos of at "
            f"most {limits.max_upload_bytes / 2**20:.3g} MB (--max_upload_mb)."
          },
        )
        return
      try:
        payload = json.loads(self.rfile.read(length))
        if not isinstance(payload, dict):
          raise AppError(NOT_FROM_THE_PAGE)
        job_id = jobs.submit(Job(*decode_upload(payload, models, limits)))
      except (ValueError, RecursionError) as e:  # JSON (and UnicodeDecodeError) or an AppError.
        status = 429 if isinstance(e, Busy) else 400
        self._json(status, {"error": str(e) if isinstance(e, UserError) else NOT_FROM_THE_PAGE})
        return
      except Exception as e:  # A bug: told on the page, logged in full here.
        logging.exception("Reading an upload failed")
        self._json(500, {"error": f"The server failed to read the upload ({type(e).__name__})."})
        return
      self._json(202, {"job": job_id})

    def _drop(self, length: int) -> None:
      """Reads and drops a refused body (up to 1 GiB), so that the browser sees the answer."""
      self.close_connection = True
      remaining = length if length <= 2**30 else 0
      while remaining > 0 and (chunk := self.rfile.read(min(2**20, remaining))):
        remaining -= len(chunk)

  return Handler


def load_models(paths: Sequence[str]) -> list[Model]:
  """Each checkpoint as a menu entry, labelled by its path."""
  models = []
  for path in paths:
    inpainter = inpaint.Inpainter.from_checkpoint(path, batch_size=1)
    models.append(Model(str(path), describe(inpainter), inpainter))
  return models


def serve(models: Sequence[Model], host: str, port: int, limits: Limits) -> None:
  """Serves the page until SIGINT or SIGTERM; the results live in a temporary directory, removed
  at the end."""
  directory = Path(tempfile.mkdtemp(prefix="pconv_jax_app_"))
  jobs = Jobs(directory)
  try:
    handler = make_handler(models, jobs, limits, local=host in LOCAL_HOSTS)
    server = http.server.ThreadingHTTPServer((host, port), handler)
  except OSError as e:  # The port is taken, or the address is not this machine's.
    jobs.close()
    raise AppError(f"Cannot listen on {host}:{port} ({e.strerror or e}).") from None
  server.daemon_threads = True
  signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
  try:
    print(f"Serving {len(models)} model(s) on http://{host}:{server.server_address[1]}", flush=True)
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    jobs.close()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m pconv_jax.app",
    description="A local web page to inpaint photos with trained PConv checkpoints.",
  )
  parser.add_argument(
    "--checkpoint",
    action="append",
    required=True,
    type=epath.Path,
    help="a workdir or checkpoint directory; repeat it for a model menu",
  )
  parser.add_argument(
    "--port", type=int, default=7860, help="port to listen on (default: %(default)s; 0: any free)"
  )
  parser.add_argument(
    "--host",
    default="127.0.0.1",
    help="address to listen on (default: %(default)s, this machine only; 0.0.0.0: every network)",
  )
  parser.add_argument(
    "--max_upload_mb", type=float, default=40.0, help="largest photo file (default: %(default)g MB)"
  )
  parser.add_argument(
    "--max_megapixels",
    type=float,
    default=50.0,
    help="largest photo (default: %(default)g million pixels)",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  warnings.simplefilter("ignore", inpaint.HoleShareWarning)  # A painted hole is never inverted.
  try:
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
      raise AppError("--max_upload_mb and --max_megapixels must be positive.")
    limits = Limits(int(args.max_upload_mb * 2**20), int(args.max_megapixels * 1e6))
    models = load_models(args.checkpoint)
    if args.host not in LOCAL_HOSTS:
      print(
        f"warning: listening on {args.host}: anyone who can reach this machine on the network can "
        "use this page and run the model on it.",
        file=sys.stderr,
      )
    serve(models, args.host, args.port, limits)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
