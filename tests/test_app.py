"""The web app in a real headless Chromium: upload, paint, erase, inpaint, download, and every
refusal shown on the page while the server keeps running."""

import base64
import http.client
import io
import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse

import numpy as np
from PIL import Image
import pytest
from skimage import data

from pconv_jax import app as app_module
from pconv_jax import convert

torch = pytest.importorskip("torch")
import torch_reference  # noqa: E402  (imports torch)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
  CHROMIUM is None, reason="needs Chromium: apt-get install chromium (.ci/run does)"
)


def converted_checkpoint(directory: Path, seed: int) -> Path:
  """A tiny network in the blog post's PyTorch layout, converted as a user would."""
  net = torch_reference.randomize(
    torch_reference.TorchPUNet(depth=3, features=(8, 16, 16), kernel_sizes=(5, 3, 3)), seed
  )
  torch.save(net.state_dict(), directory / f"net{seed}.pth")
  assert convert.main([str(directory / f"net{seed}.pth"), str(directory / f"ckpt{seed}")]) == 0
  return directory / f"ckpt{seed}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("checkpoints")
  return [converted_checkpoint(root, seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def app(checkpoints, tmp_path_factory):
  """The app serving two converted checkpoints, started in an empty working directory with its own
  TMPDIR and HOME, so that anything it writes can be found."""
  root = tmp_path_factory.mktemp("app")
  places = {name: root / name for name in ("cwd", "tmp", "home")}
  for place in places.values():
    place.mkdir()
  command = [sys.executable, "-m", "pconv_jax.app", "--port", "0"]
  command += ["--max_upload_mb", "0.1", "--max_megapixels", "0.02"]
  for checkpoint in checkpoints:
    command += ["--checkpoint", str(checkpoint)]
  process = subprocess.Popen(
    command,
    cwd=places["cwd"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=os.environ
    | {
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": str(REPO),
      "TMPDIR": str(places["tmp"]),
      "HOME": str(places["home"]),
    },
  )
  line = process.stdout.readline()
  assert "Serving 2 model(s) on http://127.0.0.1:" in line, process.stderr.read()
  yield line.split()[-1], process, places
  if process.poll() is None:
    process.kill()


def photo_file(path: Path, width=96, height=64) -> np.ndarray:
  photo = data.astronaut()[100 : 100 + height, 150 : 150 + width].copy()
  Image.fromarray(photo).save(path)
  return photo


def test_paint_inpaint_and_download_in_a_browser(app, tmp_path):
  url, process, places = app
  photo = photo_file(tmp_path / "photo.png")
  (tmp_path / "notes.png").write_text("not an image")
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM)
    page = browser.new_page(viewport={"width": 1100, "height": 700}, accept_downloads=True)
    page.goto(url)
    description = page.locator("#model-description")
    sync_api.expect(description).to_contain_text("PConv U-Net, 3 levels, trained at 256x256")
    sync_api.expect(description).to_contain_text("converted from the blog post's PyTorch PUNet")
    page.select_option("#model", "1")
    sync_api.expect(description).to_contain_text("ckpt2")
    message = page.locator("#message")

    page.set_input_files("#file", str(tmp_path / "notes.png"))
    sync_api.expect(message).to_contain_text("notes.png is not an image this browser can read")
    # Over the limits (0.1 MB, 0.02 megapixels): told before any upload.
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")
    page.set_input_files("#file", str(tmp_path / "big.png"))
    sync_api.expect(message).to_have_text(
      f"big.png is {(tmp_path / 'big.png').stat().st_size / 2**20:.3g} MB; this server accepts "
      "photos of at most 0.1 MB."
    )
    Image.fromarray(noise[:1, :1].repeat(200, 0).repeat(200, 1)).save(tmp_path / "wide.png")
    page.set_input_files("#file", str(tmp_path / "wide.png"))
    sync_api.expect(message).to_have_text(
      "wide.png is 200x200 pixels; this server accepts at most 0.02 megapixels."
    )
    page.set_input_files("#file", str(tmp_path / "photo.png"))
    sync_api.expect(message).to_contain_text("photo.png: 96x64")
    page.click("#run")
    sync_api.expect(message).to_contain_text("Nothing is painted")

    # Everything painted: refused by the server, shown on the page.
    page.evaluate(
      "() => { const c = document.getElementById('paint'); "
      "c.getContext('2d').fillRect(0, 0, c.width, c.height); }"
    )
    page.click("#run")
    sync_api.expect(message).to_contain_text("Everything is painted")
    page.click("#clear")

    # A stroke across the photo with a brush 12 photo pixels wide (its size is set on screen),
    # then one end erased.
    box = page.locator("#paint").bounding_box()
    scale = box["width"] / 96  # Screen pixels per photo pixel.
    page.locator("#size").fill(str(round(12 * scale)))
    page.mouse.move(box["x"] + 20 * scale, box["y"] + 30 * scale)
    page.mouse.down()
    page.mouse.move(box["x"] + 70 * scale, box["y"] + 34 * scale, steps=8)
    page.mouse.up()
    page.click("#eraser")
    page.locator("#size").fill(str(round(8 * scale)))
    page.mouse.move(box["x"] + 70 * scale, box["y"] + 34 * scale)
    page.mouse.down()
    page.mouse.up()
    alpha = np.array(
      page.evaluate(
        "() => { const c = document.getElementById('paint'); return Array.from(c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 == 3)); }"
      ),
      np.uint8,
    ).reshape(64, 96)
    hole = alpha >= 128
    assert hole[30, 20] and hole[32, 45] and not hole[34, 70]  # Painted; erased.
    assert 0.05 < hole.mean() < 0.2

    sync_api.expect(page.locator("#limit")).to_be_hidden()
    page.select_option("#strategy", "resize")
    sync_api.expect(page.locator("#margin")).to_be_hidden()
    page.locator("#limit").fill("48")
    page.click("#run")
    sync_api.expect(page.locator("#download")).to_be_visible(timeout=30_000)
    sync_api.expect(message).to_contain_text("s on the server (resize).")
    with page.expect_download() as download:
      page.click("#download")
    assert download.value.suggested_filename == "photo_inpainted.png"
    download.value.save_as(tmp_path / "result.png")
    page.screenshot(path=tmp_path / "page.png")
    browser.close()

  result = np.asarray(Image.open(tmp_path / "result.png"))
  assert result.shape == photo.shape
  np.testing.assert_array_equal(result[~hole], photo[~hole])
  assert np.mean(np.any(result[hole] != photo[hole], axis=-1)) > 0.9
  assert process.poll() is None  # Still serving.


def request(url: str, method: str, path: str, body: bytes = b"", **headers: str):
  """(status, headers, body) of one request, with exactly the headers given (and Host)."""
  address = urllib.parse.urlsplit(url)
  connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
  connection.request(
    method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
  )
  response = connection.getresponse()
  return response.status, dict(response.getheaders()), response.read()


def post(url: str, body: bytes) -> tuple[int, dict]:
  status, _, answer = request(url, "POST", "/api/inpaint", body, Content_Type="application/json")
  return status, json.loads(answer)


def encoded(image: np.ndarray) -> str:
  """A PNG data URL, as the page sends."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_server_refuses_bad_requests_with_messages_and_cleans_up(app):
  """What a page that skipped its own checks (or another client) would send."""
  url, process, places = app
  photo = data.astronaut()[:64, :96]
  mask = np.zeros((64, 96, 4), np.uint8)
  mask[10:20, 10:20, 3] = 255
  too_large = "this server accepts photos of at most 0.1 MB (--max_upload_mb)."
  cases = [
    (b"x" * 300_000, 413, f"The upload is 0.286 MB; {too_large}"),
    (b"x" * 1_500_000, 413, f"The upload is 1.43 MB; {too_large}"),  # Read in 2 chunks.
    (b"{not json", 400, "The request is not what the page sends: reload the page."),
    (b"\xff\xfe", 400, "The request is not what the page sends: reload the page."),
    (
      json.dumps({"image": encoded(data.astronaut()[:200, :200]), "mask": encoded(mask)}).encode(),
      400,
      "The photo is 200x200 pixels (0.04 megapixels); this server accepts at most 0.02 "
      "megapixels (--max_megapixels): downscale it first.",
    ),
    (
      json.dumps({"image": "data:image/png;base64,aGVsbG8=", "mask": encoded(mask)}).encode(),
      400,
      "The photo is not an image this server can read (cannot identify image file",
    ),
    (
      json.dumps({"image": encoded(photo), "mask": encoded(mask[:32])}).encode(),
      400,
      "The mask is 96x32 pixels but the photo is 96x64: reload the page and paint again.",
    ),
    (
      json.dumps({"image": encoded(photo), "mask": encoded(mask), "strategy": "tiles"}).encode(),
      400,
      "Unknown HD strategy 'tiles'; use one of original, resize, crop.",
    ),
    (
      json.dumps({"image": encoded(photo), "mask": encoded(mask), "crop_margin": "x"}).encode(),
      400,
      "The crop margin and the resize limit must be whole numbers.",
    ),
    (
      json.dumps({"image": encoded(photo), "mask": encoded(mask), "crop_margin": -3}).encode(),
      400,
      "The crop margin must be 0 or more pixels, got -3.",
    ),
    (
      json.dumps({"image": encoded(photo), "mask": encoded(mask), "model": 5}).encode(),
      400,
      "Unknown model 5.",
    ),
  ]
  for body, status, message in cases:  # Exact messages (the unreadable photo's ends with PIL's).
    got, answer = post(url, body)
    assert got == status and answer["error"].startswith(message), answer
  for headers in [{"Content_Length": "-5"}, {"Content_Type": "text/plain"}]:
    status, _, answer = request(
      url, "POST", "/api/inpaint", b"{}", **{"Content_Type": "application/json"} | headers
    )
    assert (status, json.loads(answer)["error"]) == (
      400,
      "The request is not what the page sends: reload the page.",
    )
  status, _, answer = request(url, "GET", "/api/info", Host="attacker.example")  # DNS rebinding.
  assert (status, json.loads(answer)["error"]) == (
    403,
    "This server answers only at 127.0.0.1 or localhost.",
  )

  # Any file name reaches the download's header safely.
  name = 'фото "1"\r\nX-Injected: 1.jpg'
  body = json.dumps({"image": encoded(photo), "mask": encoded(mask), "name": name}).encode()
  status, answer = post(url, body)
  assert status == 202
  for _ in range(300):
    status, _, state = request(url, "GET", f"/api/jobs/{answer['job']}")
    if json.loads(state)["state"] == "done":
      break
    time.sleep(0.1)
  status, headers, png = request(url, "GET", f"/api/results/{answer['job']}.png")
  assert status == 200 and "X-Injected" not in headers
  assert headers["Content-Disposition"] == (
    'attachment; filename="_1_X-Injected_1_inpainted.png"; '
    "filename*=UTF-8''%D1%84%D0%BE%D1%82%D0%BE%20%221%22%0D%0AX-Injected%3A%201_inpainted.png"
  )
  result = np.asarray(Image.open(io.BytesIO(png)))
  hole = mask[..., 3] > 0
  np.testing.assert_array_equal(result[~hole], photo[~hole])

  assert process.poll() is None
  process.terminate()
  assert process.wait(timeout=30) == 0
  assert "Traceback" not in process.stderr.read()
  for name, place in places.items():  # The results' temporary directory is gone.
    assert list(place.iterdir()) == [], name


def test_a_public_address_is_warned_about_and_a_taken_port_is_one_line(checkpoints, capsys):
  with socket.socket() as taken:
    taken.bind(("0.0.0.0", 0))
    port = taken.getsockname()[1]
    assert (
      app_module.main(
        ["--checkpoint", str(checkpoints[0]), "--host", "0.0.0.0", "--port", str(port)]
      )
      == 1
    )
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith("warning: listening on 0.0.0.0: anyone who can reach this machine")
  assert err[1].startswith(f"error: Cannot listen on 0.0.0.0:{port} (Address already in use)")
  assert len(err) == 2
