"""Take the README's screenshot of the web app (docs/screenshot.png).

    python scripts/web_screenshot.py http://127.0.0.1:8765 "/?q=a+flag" docs/screenshot.png [--dark]

needs a running ``mmsearch serve`` (without a token), Playwright and a
Chromium (``MMSEARCH_CHROMIUM``, else ``chromium`` on PATH). The picture is
reduced to a 256-colour palette to keep the file small.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil

from PIL import Image
from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the server's base URL")
    parser.add_argument("path", help="the page to show, e.g. /?q=a+flag")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--dark", action="store_true", help="prefers-color-scheme: dark")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS px")
    parser.add_argument("--height", type=int, default=860, help="viewport height in CSS px")
    args = parser.parse_args()

    executable = os.environ.get("MMSEARCH_CHROMIUM") or shutil.which("chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(
            viewport={"width": args.width, "height": args.height}, color_scheme="dark" if args.dark else "light"
        )
        page.goto(args.base + args.path)
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll('#grid img, #viewer-img')];"
            " return document.querySelector('#spinner').hidden && imgs.every(i => i.complete); }"
        )
        png = page.screenshot()
        browser.close()
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)


if __name__ == "__main__":
    main()
