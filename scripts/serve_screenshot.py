#!/usr/bin/env python3
"""The README's screenshot of the page: serve the models, upload images through the page in chromium,
show one stage's Grad-CAM heatmap, and save the whole page.

    python scripts/serve_screenshot.py --models trained_models --out docs/serve.png IMAGE...

It uses the browser test's helpers (tests/browser.py): Debian's chromium through Playwright and a
uvicorn server on a free 127.0.0.1 port.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import classify_in_page, launch, live_server  # noqa: E402

from lcpn.serve import create_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--models", default="trained_models")
    parser.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    parser.add_argument("--width", type=int, default=1100, help="window width in pixels")
    args = parser.parse_args()
    with live_server(create_app(args.models, device="cpu")) as url, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": args.width, "height": 800})
        classify_in_page(page, url, args.images)
        page.locator(".card").first.locator(".stages button").last.click()  # the deepest stage's heatmap
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
