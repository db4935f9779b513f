"""One ``ucc serve`` host for tests, started on free loopback ports with a private secret.

Owns: :class:`Host` (the server as a subprocess in its own process group, its clients, its
shards' pids and signals) and :class:`AsyncHost`, the same operations as coroutines for tests
that run an event loop (``host.aio``). ``Cluster`` is the former name of :class:`Host`, kept as
an alias so that existing tests keep working: it is one host, not a cluster of hosts nor a Redis
Cluster. Must never leave a process behind: :meth:`Host.close` kills the whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from actors.ids import stable_hash
from actors.wire.tokens import mint
from shards import procgroup, ready
from shards.client import AsyncClient, Client
from shards.testing.waiting import TIME_FACTOR, wait_until, wait_until_async

__all__ = ["AsyncHost", "Cluster", "Host", "refused_start"]


def refused_start(
    *args: str, env: dict[str, str] | None = None, secret: str = "s" * 32, timeout: float = 30.0
) -> str:
    """Run ``ucc serve ARGS`` (one shard, free ports), which must refuse to start: exit 2, no
    ready line. Returns what it wrote on stderr. ``env`` replaces the environment (default:
    this one, less the ``UCC_*`` settings a developer may have set, plus ``secret``)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UCC_")}
        env["UCC_SECRET"] = secret
    proc = procgroup.start(
        ready.serve_argv(1, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        out, err = proc.communicate(timeout=timeout * TIME_FACTOR)
    finally:
        procgroup.kill(proc)
    assert proc.returncode == 2, err.decode()[-2000:]
    assert out == b"", out  # no ready line
    return err.decode()


class Host:
    """One ``ucc serve`` host, started on free ports with its own secret."""

    def __init__(
        self,
        shards: int = 2,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        secret: str | None = None,
    ) -> None:
        """``secret``: share one between the hosts of a cluster (default: a new random one)."""
        self.secret = secret or secrets.token_hex(32)
        self.shards = shards
        # the server's private files (its ipc socket) go in a directory we remove ourselves:
        # a SIGKILLed supervisor cannot clean up after itself
        self.tmp = tempfile.mkdtemp(prefix="ucc-test-")
        full_env = {**os.environ, "UCC_SECRET": self.secret, "TMPDIR": self.tmp, **(env or {})}
        self.proc = procgroup.start(
            ready.serve_argv(shards, *args), stdout=subprocess.PIPE, env=full_env
        )
        self.pgid = self.proc.pid
        self.url = ""
        self.command = ""
        self._clients: list[Client | AsyncClient] = []
        self.aio = AsyncHost(self)
        try:
            self._wait_ready(ready_timeout * TIME_FACTOR)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        try:
            line = ready.first_line(self.proc, timeout)
        except ready.NotReady as exc:
            raise AssertionError(str(exc)) from None
        match = ready.PATTERN.fullmatch(line)
        if match is None:
            raise AssertionError(f"unexpected first line from ucc serve: {line!r}")
        self.url, self.command = match[1], match[2]
        self.ready_line = line

    @property
    def address(self) -> tuple[str, int]:
        """The WebSocket listener's ``(host, port)``, for raw sockets."""
        host, port = self.url.removeprefix("ws://").rsplit(":", 1)
        return host, int(port)

    # -- clients -----------------------------------------------------------------------------

    def token(self, user: int, channels: list[int] | None = None, ttl: float = 3600) -> str:
        return mint(self.secret, user, channels, ttl)

    def client(self, timeout: float = 5.0) -> Client:
        """A backend client for the command endpoint (closed with the host)."""
        client = Client(self.command, timeout=timeout * TIME_FACTOR)
        self._clients.append(client)
        return client

    def status(self) -> dict[str, Any]:
        with Client(self.command, timeout=5.0 * TIME_FACTOR) as client:
            return client.status()

    def shard_of(self, user: int) -> int:
        return stable_hash(user, self.shards)

    # -- shards ------------------------------------------------------------------------------

    def shard_pid(self, index: int) -> int:
        return _up_pid(self.status(), index)

    def signal_shard(self, index: int, sig: signal.Signals) -> int:
        pid = self.shard_pid(index)
        os.kill(pid, sig)
        return pid

    def kill_shard(self, index: int) -> int:
        """SIGKILL shard ``index``; returns the pid that was killed."""
        return self.signal_shard(index, signal.SIGKILL)

    def pause_shard(self, index: int) -> int:
        """SIGSTOP shard ``index`` (a hung shard); returns its pid."""
        return self.signal_shard(index, signal.SIGSTOP)

    @staticmethod
    def resume(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def wait_shard_replaced(self, index: int, old_pid: int, timeout: float = 10.0) -> int:
        """Wait until shard ``index`` is up again with another pid; returns the new pid."""

        def replaced() -> int | None:
            with contextlib.suppress(Exception):
                return _new_pid(self.status(), index, old_pid)
            return None

        return int(wait_until(replaced, timeout, what=f"for shard {index} to be replaced"))

    # -- stopping ----------------------------------------------------------------------------

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the supervisor and wait for its exit code."""
        self.signal(sig)
        return self.proc.wait(timeout * TIME_FACTOR)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the supervisor alone (e.g. SIGKILL: a power loss, no goodbye)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def close(self) -> None:
        """Kill the whole process group (supervisor and shards) and close clients."""
        for client in self._clients:
            client.close()
        procgroup.kill(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Cluster = Host
"""The former name of :class:`Host` (one ``ucc serve``), kept for existing tests."""


def _up_pid(status: dict[str, Any], index: int) -> int:
    row = status["shards"][index]
    assert row["state"] == "up", row
    return int(row["pid"])


def _new_pid(status: dict[str, Any], index: int, old_pid: int) -> int | None:
    row = status["shards"][index]
    if row["state"] == "up" and row["pid"] != old_pid:
        return int(row["pid"])
    return None


class AsyncHost:
    """The blocking operations of a :class:`Host` as coroutines (``host.aio``), for tests that
    run an event loop: they never block it."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def client(self, timeout: float = 5.0) -> AsyncClient:
        """An :class:`~shards.client.AsyncClient` for the command endpoint (closed with the
        host); create it in the coroutine that uses it."""
        client = AsyncClient(self.host.command, timeout=timeout * TIME_FACTOR)
        self.host._clients.append(client)
        return client

    async def status(self) -> dict[str, Any]:
        async with AsyncClient(self.host.command, timeout=5.0 * TIME_FACTOR) as client:
            return await client.status()

    async def shard_pid(self, index: int) -> int:
        return _up_pid(await self.status(), index)

    async def signal_shard(self, index: int, sig: signal.Signals) -> int:
        pid = await self.shard_pid(index)
        os.kill(pid, sig)
        return pid

    async def kill_shard(self, index: int) -> int:
        """SIGKILL shard ``index``; returns the pid that was killed."""
        return await self.signal_shard(index, signal.SIGKILL)

    async def pause_shard(self, index: int) -> int:
        """SIGSTOP shard ``index`` (a hung shard); returns its pid."""
        return await self.signal_shard(index, signal.SIGSTOP)

    async def wait_shard_replaced(self, index: int, old_pid: int, timeout: float = 10.0) -> int:
        """Wait until shard ``index`` is up again with another pid; returns the new pid."""

        async def replaced() -> int | None:
            with contextlib.suppress(Exception):
                return _new_pid(await self.status(), index, old_pid)
            return None

        what = f"for shard {index} to be replaced"
        return int(await wait_until_async(replaced, timeout, what=what))

    async def wait_online(
        self, users: list[int], channel: int | None = None, timeout: float = 10.0
    ) -> None:
        """Wait until the online users (of ``channel``, if given) are exactly ``users``.

        Once a channel lists its members, the router has indexed them all: a broadcast sent
        after that reaches each of them (a hello alone does not promise it).
        """
        wanted = sorted(users)
        async with AsyncClient(self.host.command, timeout=5.0 * TIME_FACTOR) as client:

            async def online() -> bool:
                if channel is None:
                    return await client.get_online_users() == wanted
                return await client.get_online_users_in_channel(channel) == wanted

            where = "" if channel is None else f" in channel {channel}"
            await wait_until_async(online, timeout, what=f"for users {wanted[:20]} online{where}")

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the supervisor's exit code (polling: a child has no awaitable exit)."""
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while (code := self.host.proc.poll()) is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"ucc serve still running after {timeout * TIME_FACTOR:.0f} s")
            await asyncio.sleep(0.02)
        return code

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the supervisor and wait for its exit code."""
        self.host.signal(sig)
        return await self.wait_exit(timeout)
