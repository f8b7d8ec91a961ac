"""A real browser for the page: Debian's chromium driven by Playwright, against a live uvicorn server.

Playwright's own browser downloads are never used: the tests launch the system's chromium, and
install Debian's ``chromium`` package when it is missing and they run as root with apt-get
(as in CI); elsewhere they say how to install it. ``scripts/serve_screenshot.py`` uses the same
helpers to take the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str:
    """The system's chromium, installed with apt-get first when it is missing and this runs as root."""
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
        return shutil.which("chromium")
    raise RuntimeError("the browser test needs Debian's chromium: sudo apt-get install chromium")


def launch(playwright):
    """Chromium through Playwright; root (CI containers) needs chromium's sandbox off."""
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    return playwright.chromium.launch(executable_path=chromium_path(), args=args)


@contextmanager
def live_server(app, start_timeout_s: float = 60) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def classify_in_page(page, url: str, images: list[Path], timeout_ms: int = 180_000) -> dict[str, str]:
    """Open the page, upload ``images`` through its file picker and wait until every card has its
    path and heatmap buttons; returns the path shown for each file name ('a > b > c')."""
    page.goto(url)
    page.set_input_files("#files", [str(p) for p in images])
    page.wait_for_function(
        f"document.querySelectorAll('.card').length === {len(images)}"
        " && document.querySelectorAll('.card[aria-busy]').length === 0",
        timeout=timeout_ms,
    )
    cards = page.query_selector_all(".card")
    return {card.get_attribute("data-file"): card.get_attribute("data-path") for card in cards}
