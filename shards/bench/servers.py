"""The server under test: a ``ucc serve`` or a reference server started by the bench, or a
running ucc found by ``--target``.

Owns: starting the server as a subprocess in its own process group (free loopback ports, a
private secret, stderr to a temporary file shown if it fails), parsing its ready line, finding
its process tree for the CPU and memory probes, and killing the whole group in :meth:`close`
(called from ``finally``). Must never leave a process behind, and never signal a server it did
not start (``--target`` servers are only measured, never stopped).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urlsplit

import psutil

from shards import procgroup, ready
from shards.client import Client

REFERENCE_READY = re.compile(r"reference ready (ws://\S+) command=(\S+)")


class ServerError(RuntimeError):
    """The server under test could not be started or reached."""


@dataclass
class Server:
    """What the bench needs of a server: where it listens and which processes are its."""

    name: str  # "ucc" or "reference"
    url: str
    command: str
    secret: str
    shards: int
    root_pid: int | None
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def processes(self) -> list[psutil.Process]:
        """The server's process tree (empty if it is not on this host or not ours to see)."""
        if self.root_pid is None:
            return []
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def log_tail(self, limit: int = 2000) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def close(self) -> None:
        """Kill the process group of a server we started; forget a ``--target`` one."""
        if self.proc is not None:
            procgroup.kill(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


def _start(name: str, argv: list[str], secret: str, timeout: float) -> tuple[Server, re.Match[str]]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the Server, closed in close()
    # in its own process group: killed as one in close()
    proc = procgroup.start(
        argv, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "UCC_SECRET": secret}
    )
    server = Server(name, "", "", secret, 1, proc.pid, proc, log)
    try:
        try:
            line = ready.first_line(proc, timeout, f"the {name} server")
        except ready.NotReady as exc:
            raise ServerError(str(exc)) from None
        pattern = ready.PATTERN if name == "ucc" else REFERENCE_READY
        match = pattern.fullmatch(line)
        if match is None:
            raise ServerError(f"unexpected first line from the {name} server: {line!r}")
    except BaseException as exc:
        tail = server.log_tail()
        server.close()
        if isinstance(exc, ServerError):
            raise ServerError(f"{exc}\n{tail}") from None
        raise
    server.url, server.command = match[1], match[2]
    return server, match


def start_ucc(secret: str, shards: int, args: list[str], timeout: float = 30.0) -> Server:
    """``ucc serve`` on free loopback ports. The load comes from a few loopback addresses,
    opening hundreds of connections at once each: the per-address handshake cap and connect
    rate (defences against one address hoarding handshakes) are lifted; ``args`` may set them
    again."""
    argv = ready.serve_argv(
        shards,
        "--log-level",
        "WARNING",
        "--max-pending-per-address",
        "100000",
        "--connect-rate",
        "1000000",
        *args,
    )
    server, match = _start("ucc", argv, secret, timeout)
    server.shards = int(match[3])
    return server


def start_reference(secret: str, timeout: float = 30.0) -> Server:
    """The single-process ``websockets`` reference server (:mod:`shards.bench.reference`)."""
    argv = [sys.executable, "-m", "shards.bench.reference", "--port", "0"]
    server, _ = _start("reference", argv, secret, timeout)
    return server


def attach(url: str, command: str, secret: str, timeout: float = 5.0) -> Server:
    """A running ucc: its shard pids come from ``status``, the supervisor is their parent."""
    try:
        with Client(command, timeout=timeout) as client:
            shards = client.status()["shards"]
    except Exception as exc:
        raise ServerError(f"cannot reach the ucc command endpoint {command}: {exc}") from None
    root: int | None = None
    for row in shards:
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            parent = psutil.Process(int(row["pid"])).parent()
            if parent is not None:
                root = parent.pid
                break
    return Server("ucc", url, command, secret, len(shards), root)
