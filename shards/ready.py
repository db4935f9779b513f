"""The ready line: what ``ucc serve`` prints once it serves, and how a launcher waits for it.

Owns: the pinned format ``ucc ready ws://HOST:PORT command=ENDPOINT shards=N``, its pattern, the
command line that starts ``ucc serve`` on free loopback ports, and reading a child's first line
with a deadline. Shared by the supervisor (which prints it), the test kit and the bench (which
wait for it). Must never start or kill a process itself.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time

PATTERN = re.compile(r"ucc ready (ws://\S+) command=(\S+) shards=(\d+)")


class NotReady(RuntimeError):
    """The child exited, or did not print its first line in time."""


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def format_line(host: str, port: int, command: str, shards: int) -> str:
    return f"ucc ready ws://{url_host(host)}:{port} command={command} shards={shards}"


def serve_argv(shards: int, *args: str) -> list[str]:
    """``ucc serve`` on loopback with any free WebSocket port and command endpoint."""
    return [
        sys.executable, "-m", "shards.cli", "serve",
        "--shards", str(shards),
        "--host", "127.0.0.1",
        "--port", "0",
        "--command", "tcp://127.0.0.1:*",
        *args,
    ]  # fmt: skip


def first_line(proc: subprocess.Popen[bytes], timeout: float, name: str = "ucc serve") -> str:
    """The first line ``proc`` prints on stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise NotReady(f"{name} not ready within {timeout:.0f} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise NotReady(f"{name} exited early with status {proc.wait()}")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()
