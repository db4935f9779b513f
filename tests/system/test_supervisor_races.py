"""The supervisor in this process, with real shard processes and sockets, driven through the
interleavings that real timing only produces once in a while (the order of events on its loop)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from test_bad_input import upgrade_request

from actors.ids import ShardIndex, stable_hash
from actors.router import ShardEvent, ShardState
from actors.tokens import Claims, mint, verify
from shards.config import ServeConfig
from shards.supervisor import Supervisor
from shards.testing import TIME_FACTOR

SECRET = "race-secret-" + "x" * 32


async def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * TIME_FACTOR
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_supervisor(**options: Any) -> AsyncIterator[Supervisor]:
    """A Supervisor of two real shards on this test's loop, every process killed at the end."""
    loop = asyncio.get_running_loop()
    config = ServeConfig(
        secret=SECRET,
        shards=2,
        port=0,
        command="tcp://127.0.0.1:*",
        drain_window=0.0,
        log_level="WARNING",
        **options,
    )
    supervisor = Supervisor(config, loop)
    try:
        supervisor.start()
        await until(lambda: supervisor.announced, 30, "for every shard to be ready")
        yield supervisor
    finally:
        supervisor.stopping = True  # no more restarts
        for shard in supervisor.shards:
            supervisor._kill(shard)
            if shard.proc is not None:
                shard.proc.wait(10)
            if shard.pidfd >= 0:
                loop.remove_reader(shard.pidfd)
                os.close(shard.pidfd)
            if shard.control is not None:
                loop.remove_reader(shard.control.fileno())
                shard.control.close()
            for entry in shard.held:
                entry.sock.close()
        if supervisor.acceptor is not None:
            supervisor.acceptor.close()
        else:
            supervisor.listener.close()
        supervisor.close()


def user_of(index: int) -> int:
    return next(u for u in range(1, 1000) if stable_hash(u, 2) == index)


def accepted_connection(user: int) -> tuple[socket.socket, socket.socket, Claims]:
    """(the client's end, the server's end, its claims): a connection as the acceptor hands it
    over, its upgrade request sent and unread."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2], timeout=5)
        ours, _ = server.accept()
    token = mint(SECRET, user, [1])
    client.sendall(upgrade_request(f"/?token={token}"))
    client.setblocking(False)
    ours.setblocking(False)
    return client, ours, verify(SECRET, token, now=time.time())


async def receive_head(client: socket.socket, timeout: float = 10.0) -> bytes:
    """The HTTP response head the client gets (b"" if the connection closes first)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout * TIME_FACTOR):
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(client, 4096)
            if not chunk:
                break
            data += chunk
    return data


def test_an_up_handled_after_its_incarnation_exited_is_ignored():
    async def scenario() -> None:
        async with running_supervisor() as supervisor:
            index = 1
            shard = supervisor.shards[index]
            assert shard.proc is not None
            epoch, pid = shard.epoch, shard.proc.pid
            client, ours, claims = accepted_connection(user_of(index))
            try:
                # in one turn of the loop: the shard dies and the pidfd's callback runs; a
                # connection arrives for it and is held; then the router's UP for that same
                # incarnation (sent when its hello arrived) is handled, last
                os.kill(pid, signal.SIGKILL)
                shard.proc.wait(10)
                supervisor._exited(shard, epoch)
                supervisor._route(claims, ours)
                supervisor._shard_event(ShardEvent(ShardIndex(index), ShardState.UP, epoch, pid))
                assert not shard.ready
                assert [entry.sock for entry in shard.held] == [ours]  # still held: no 503
                # ...for the next incarnation, which serves it
                head = await receive_head(client)
                assert head.startswith(b"HTTP/1.1 101"), head
                assert shard.epoch == epoch + 1
            finally:
                client.close()

    asyncio.run(scenario())
