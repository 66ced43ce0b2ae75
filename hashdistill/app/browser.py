"""A headless Chromium page on a folder served from 127.0.0.1: what the demo's screenshot, its tests and the browser
latency figure run in. Playwright drives Debian's ``chromium`` (``/usr/bin/chromium``, or $HASHDISTILL_CHROMIUM);
no browser is downloaded."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from hashdistill.errors import UserError
from hashdistill.untrusted import short

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium() -> str:
    """The Chromium executable to drive."""
    for candidate in (os.environ.get("HASHDISTILL_CHROMIUM"), *CHROMIUM, shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise UserError("no Chromium found: apt-get install chromium (or set HASHDISTILL_CHROMIUM)")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript"}

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """Serve ``root`` at http://127.0.0.1:<free port>."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def with_page(url: str, timeout_s: float = 120.0) -> Iterator[object]:
    """A playwright page on ``url`` in headless Chromium, once the page's ``window.hashdistill.ready`` resolved."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UserError("the browser check needs playwright: pip install playwright (no browser download: it "
                        "drives Debian's chromium)") from None
    from playwright.sync_api import Error

    executable = chromium()
    with sync_playwright() as driver:
        try:
            browser = driver.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"], timeout=timeout_s * 1000)
        except Error as exc:  # a broken or foreign executable, a missing library: say which browser and why
            raise UserError(f"Chromium at {executable} did not start: {short(str(exc).splitlines()[0])} "
                            "(apt-get install chromium, or set HASHDISTILL_CHROMIUM)") from None
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(timeout_s * 1000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("window.hashdistill !== undefined")
            try:
                page.evaluate("window.hashdistill.ready")
            except Exception as exc:  # noqa: BLE001 - playwright's Error; say what the page said
                raise UserError(f"the demo page did not load its model: {exc} {' '.join(errors)}") from None
            yield page
        finally:
            browser.close()
