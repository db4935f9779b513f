"""Real-browser helpers for the system tests: Debian's ``chromium``, driven headless by
Playwright (``executable_path``: Playwright's own browser downloads are not used), and a static
file server on 127.0.0.1 for test pages.

``.ci/chromium`` (run by ``.ci/run`` and the README's test command) installs ``chromium`` with
apt-get when it is missing; elsewhere, point ``UCC_CHROMIUM`` at a Chromium binary.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    """The Chromium binary to drive; AssertionError saying how to get one if there is none."""
    explicit = os.environ.get("UCC_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "the browser tests need Chromium: run .ci/chromium (apt-get install -y chromium when"
        " it is missing), or set UCC_CHROMIUM to a Chromium binary"
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # the tests' output stays readable

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) while the block runs; yields
    the base URL (``http://127.0.0.1:PORT``)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="static-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
