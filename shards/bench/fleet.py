"""Client processes: each holds many :class:`~shards.bench.loadclient.LoadClient` connections.

Owns: forking the client processes (before the driver starts any event loop or ZeroMQ context),
the request/reply protocol over a ``multiprocessing`` pipe (``open``, ``stats``, ``reset``,
``drop``, ``close``, ``exit``; every request carries an id so that ``stats`` can be polled while an
``open`` is running), opening connections with bounded concurrency and a deadline, and the
choice of source address (``127.0.0.x``, one per 20,000 connections: a single source address runs
out of ephemeral ports near 28,000). Must never touch the server other than through its public
WebSocket port, and never outlive the driver (daemon processes, killed in :meth:`Fleet.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from actors.wire.tokens import mint
from shards.bench.loadclient import LoadClient, Stats, bucket, upgrade_request

PER_SOURCE = 20_000
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), not at bind()
TOKEN_TTL = 6 * 3600.0
RETRIES = 5  # a 503 (shard restarting or not keeping up) is retried, as a real client would
RETRY_AFTER = 1.0  # what ucc's 503 says

Plan = tuple[int, tuple[int, ...]]  # (user, channels)


def source_address(index: int, total: int) -> str | None:
    """The loopback source address of connection ``index`` of ``total`` (None: let the kernel)."""
    if total <= PER_SOURCE:
        return None
    return f"127.0.0.{1 + index // PER_SOURCE}"


async def open_client(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    request: bytes,
    stats: Stats,
    source: str | None,
    timeout: float,
) -> LoadClient:
    """Connect one load client and wait for the server's first frame (ucc's hello)."""
    opened: asyncio.Future[None] = loop.create_future()
    client = LoadClient(request, stats, opened)
    try:
        async with asyncio.timeout(timeout):
            if source is None:
                await loop.create_connection(lambda: client, host, port)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((source, 0))
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (host, port))
                except BaseException:
                    sock.close()
                    raise
                await loop.create_connection(lambda: client, sock=sock)
            await opened
    except BaseException:
        if client.transport is not None:
            client.transport.abort()
        raise
    return client


async def open_many(
    host: str,
    port: int,
    secret: str,
    plans: Sequence[Plan],
    first_index: int,
    total: int,
    concurrency: int,
    timeout: float,
    stats: Stats,
    clients: list[LoadClient],
    by_user: dict[int, LoadClient] | None = None,
) -> dict[str, Any]:
    """Open one connection per plan, ``concurrency`` at a time; every one bounded by ``timeout``.

    Returns counts, failed users, the first errors, and histograms of the time to the 101 and
    to the hello (from the start of that connection's attempt).
    """
    loop = asyncio.get_running_loop()
    work = iter(enumerate(plans))
    failed: list[int] = []
    errors: list[str] = []
    upgrade_hist: dict[int, int] = {}
    hello_hist: dict[int, int] = {}
    t_first = time.monotonic_ns()
    retried = 0

    async def one_at_a_time() -> None:
        nonlocal retried
        for offset, (user, channels) in work:
            token = mint(secret, user, list(channels), ttl=TOKEN_TTL)
            request = upgrade_request(host, port, f"/?token={token}")
            source = source_address(first_index + offset, total)
            client = None
            for attempt in range(RETRIES + 1):
                try:
                    client = await open_client(loop, host, port, request, stats, source, timeout)
                    break
                except (OSError, TimeoutError) as exc:
                    if attempt < RETRIES and "503" in str(exc):
                        retried += 1  # the server's back-pressure: retry after Retry-After
                        await asyncio.sleep(RETRY_AFTER)
                        continue
                    failed.append(user)
                    if len(errors) < 3:
                        errors.append(f"user {user}: {type(exc).__name__}: {exc}")
                    break
            if client is None:
                continue
            clients.append(client)
            if by_user is not None:
                by_user[user] = client  # the last connection opened for the user
            up = bucket(client.t_upgraded - client.t_start)
            upgrade_hist[up] = upgrade_hist.get(up, 0) + 1
            hello = bucket(client.t_hello - client.t_start)
            hello_hist[hello] = hello_hist.get(hello, 0) + 1

    await asyncio.gather(*(one_at_a_time() for _ in range(max(1, concurrency))))
    return {
        "ok": len(plans) - len(failed),
        "failed": failed,
        "retried": retried,
        "errors": errors,
        "upgrade_hist": upgrade_hist,
        "hello_hist": hello_hist,
        "t_first_ns": t_first,
        "t_last_ns": time.monotonic_ns(),
    }


# --- the client process ------------------------------------------------------------------------


def _worker_main(pipe: Connection) -> None:
    import uvloop  # noqa: PLC0415 - a dependency of ucc; only the client processes need it

    uvloop.run(_serve(pipe))


async def _serve(pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    clients: list[LoadClient] = []
    by_user: dict[int, LoadClient] = {}
    done = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(request_id: int, kind: str, args: tuple[Any, ...]) -> None:
        result: Any = None
        if kind == "open":
            result = await open_many(**args[0], stats=stats, clients=clients, by_user=by_user)
        elif kind == "stats":
            result = {
                "frames": stats.frames,
                "hist": stats.hist,
                "max_ns": stats.max_ns,
                "last_ns": stats.last_ns,
                "closed": stats.closed,
                "open": sum(1 for client in clients if client.transport is not None),
            }
        elif kind == "reset":
            stats.reset()
        elif kind == "drop":  # close the connections of these users (opened here); how many
            dropped = [by_user.pop(user) for user in args[0] if user in by_user]
            for client in dropped:
                client.close()
            gone = set(map(id, dropped))
            clients[:] = [client for client in clients if id(client) not in gone]
            result = len(dropped)
        elif kind == "close":
            for client in clients:
                client.close()
            clients.clear()
            by_user.clear()
        elif kind == "exit":
            done.set()
        pipe.send((request_id, result))

    def readable() -> None:
        try:
            request_id, kind, args = pipe.recv()
        except EOFError:  # the driver is gone
            done.set()
            return
        task = loop.create_task(handle(request_id, kind, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_reader(pipe.fileno(), readable)
    os.set_blocking(pipe.fileno(), True)  # uvloop made it non-blocking; messages are whole
    await done.wait()
    loop.remove_reader(pipe.fileno())
    for client in clients:
        client.close()


# --- the driver's side -------------------------------------------------------------------------


class Fleet:
    """``count`` client processes. Create it before the driver's event loop starts (fork)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs if proc.pid is not None]

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading replies on ``loop`` (the driver's)."""
        self._loop = loop
        for pipe in self.pipes:
            loop.add_reader(pipe.fileno(), self._readable, pipe)
            os.set_blocking(pipe.fileno(), True)  # uvloop made it non-blocking

    def _readable(self, pipe: Connection) -> None:
        try:
            request_id, result = pipe.recv()
        except EOFError:
            assert self._loop is not None
            self._loop.remove_reader(pipe.fileno())
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(RuntimeError("a client process died"))
            return
        future = self._waiting.pop(request_id) if request_id in self._waiting else None
        if future is not None and not future.done():
            future.set_result(result)

    async def ask(self, index: int, kind: str, *args: Any, timeout: float = 60.0) -> Any:
        """Send one request to client process ``index`` and wait (bounded) for its reply."""
        assert self._loop is not None, "attach() first"
        request_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._waiting[request_id] = future
        self.pipes[index].send((request_id, kind, args))
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            if request_id in self._waiting:
                del self._waiting[request_id]

    async def ask_all(self, kind: str, *args: Any, timeout: float = 60.0) -> list[Any]:
        return list(
            await asyncio.gather(
                *(self.ask(i, kind, *args, timeout=timeout) for i in range(len(self.pipes)))
            )
        )

    async def stats(self) -> dict[str, Any]:
        """The sum of every process's counters, and their merged latency histogram."""
        merged: dict[str, Any] = {"frames": 0, "hist": {}, "max_ns": 0, "last_ns": 0, "open": 0}
        for part in await self.ask_all("stats", timeout=10.0):
            merged["frames"] += part["frames"]
            merged["open"] += part["open"]
            merged["max_ns"] = max(merged["max_ns"], part["max_ns"])
            merged["last_ns"] = max(merged["last_ns"], part["last_ns"])
            for key, count in part["hist"].items():
                merged["hist"][key] = merged["hist"].get(key, 0) + count
        return merged

    def close(self) -> None:
        """Ask every process to exit; kill the ones that do not within a second."""
        if self._loop is not None:
            for pipe in self.pipes:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(pipe.fileno())
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send((0, "exit", ()))
        deadline = time.monotonic() + 1.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for pipe in self.pipes:
            pipe.close()
