"""The web app's screenshot in the docs (docs/app.png), taken in headless Chromium.

    python -m docs.app_screenshot --checkpoint /tmp/pconv_demo [--output docs/app.png]

Serves the checkpoint with `python -m pconv_jax.app`, uploads scikit-image's coffee photo (held out
from the demo's training), paints over the spoon with the brush, inpaints, and saves the page. Needs
what tests/test_app.py needs: `pip install -r requirements-test.txt` and Debian's `chromium`.
"""

import argparse
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile

from PIL import Image
from playwright import sync_api
from skimage import data

# (brush width, points) in photo pixels of the 600x400 coffee photo: the spoon's handle, its bowl.
STROKES = [(30, [(412, 68), (404, 140), (390, 205), (377, 245)]), (80, [(364, 268), (368, 290)])]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--output", default="docs/app.png")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    photo = Path(tmp) / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    app = subprocess.Popen(
      [sys.executable, "-m", "pconv_jax.app", "--checkpoint", args.checkpoint, "--port", "0"],
      stdout=subprocess.PIPE,
      text=True,
    )
    try:
      url = app.stdout.readline().split()[-1]
      with sync_api.sync_playwright() as playwright:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 700})
        page.goto(url)
        page.set_input_files("#file", str(photo))
        sync_api.expect(page.locator("#message")).to_contain_text("600x400")
        box = page.locator("#paint").bounding_box()
        scale = box["width"] / 600
        for brush, ((x, y), *rest) in STROKES:
          page.locator("#size").fill(str(round(brush * scale)))
          page.mouse.move(box["x"] + x * scale, box["y"] + y * scale)
          page.mouse.down()
          for x, y in rest:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=10)
          page.mouse.up()
        page.click("#run")
        sync_api.expect(page.locator("#download")).to_be_visible(timeout=120_000)
        page.screenshot(path=args.output, full_page=True)
        browser.close()
    finally:
      app.terminate()
      app.wait()
  print(f"Wrote {args.output}")


if __name__ == "__main__":
  main()
