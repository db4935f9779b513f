"""The supervisor in this process, with real shard processes and sockets, driven through the
interleavings that real timing only produces once in a while (the order of events on its loop)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil

from actors.ids import ShardIndex, stable_hash
from actors.router import ShardEvent, ShardState
from actors.wire.tokens import Claims, mint, verify
from shards.config import ServeConfig
from shards.supervisor import Supervisor
from shards.testing import TIME_FACTOR, upgrade_request, wait_until_async

SECRET = "race-secret-" + "x" * 32


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
        await wait_until_async(
            lambda: supervisor.announced, 30, 0.01, what="for every shard to be ready"
        )
        yield supervisor
    finally:
        supervisor.stopping = True  # no more restarts
        for shard in supervisor.shards:
            supervisor._kill(shard)
            if shard.proc is not None:
                await asyncio.to_thread(shard.proc.wait, 10)  # SIGKILLed: a child to reap
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
                # a blocking wait on purpose: awaiting would let the loop run between these
                # steps, and the interleaving under test would not happen
                shard.proc.wait(10)
                supervisor._exited(shard, epoch)
                supervisor._place(claims, ours)
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


async def lose_the_next_ack(supervisor: Supervisor, index: int, client: socket.socket) -> None:
    """Let shard ``index`` take a connection while its ack to the supervisor is lost: read the
    ack off the control socket before the supervisor does, once the client has its 101."""
    loop = asyncio.get_running_loop()
    control = supervisor.shards[index].control
    assert control is not None
    head = await receive_head(client)
    assert head.startswith(b"HTTP/1.1 101"), head  # the shard took it and answered
    async with asyncio.timeout(5 * TIME_FACTOR):
        ack = await loop.sock_recv(control, 65536)
    assert b'"ack"' in ack
    loop.add_reader(control.fileno(), supervisor._acks, supervisor.shards[index])


async def received(client: socket.socket, wanted: bytes, timeout: float) -> bool:
    """Whether ``wanted`` arrives on ``client`` within ``timeout`` (False if it closes first)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout * TIME_FACTOR):
        while wanted not in data:
            chunk = await loop.sock_recv(client, 65536)
            if not chunk:
                return False
            data += chunk
    return True


async def closed_by_server(client: socket.socket, timeout: float) -> bool:
    """Whether the server's end of ``client`` closes (EOF or reset) within ``timeout``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout * TIME_FACTOR):
            while await loop.sock_recv(client, 65536):
                pass  # hello, a close frame...
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_connection_taken_without_an_ack_is_released_while_the_shard_lives():
    async def scenario() -> None:
        async with running_supervisor() as supervisor:
            index = 0
            control = supervisor.shards[index].control
            assert control is not None
            asyncio.get_running_loop().remove_reader(control.fileno())
            client, ours, claims = accepted_connection(user_of(index))
            try:
                supervisor._place(claims, ours)
                await lose_the_next_ack(supervisor, index, client)
                # the supervisor finds out that the shard has it, and closes its own copy
                await wait_until_async(
                    lambda: ours.fileno() == -1, 10, 0.01, what="for the supervisor's copy to go"
                )
                # while the shard goes on serving it: a ping gets its pong
                client.sendall(b"\x89\x80\x00\x00\x00\x00")  # masked (key 0), no payload
                assert await received(client, b"\x8a\x00", 5)
            finally:
                client.close()

    asyncio.run(scenario())


def test_a_connection_taken_without_an_ack_is_not_handed_to_the_next_incarnation(monkeypatch):
    import shards.supervisor  # noqa: PLC0415

    monkeypatch.setattr(shards.supervisor, "ACK_TIMEOUT", 600.0, raising=False)  # no sweep

    async def scenario() -> None:
        # a long handshake deadline: a shard that got a used connection would sit on it
        async with running_supervisor(handshake_timeout=60.0) as supervisor:
            index = 0
            shard = supervisor.shards[index]
            assert shard.control is not None and shard.proc is not None
            asyncio.get_running_loop().remove_reader(shard.control.fileno())
            client, ours, claims = accepted_connection(user_of(index))
            # and one the shard never reads: it is handed over after the shard has died
            late, late_ours, late_claims = accepted_connection(user_of(index))
            try:
                supervisor._place(claims, ours)
                await lose_the_next_ack(supervisor, index, client)
                pid, epoch = shard.proc.pid, shard.epoch
                os.kill(pid, signal.SIGSTOP)
                await wait_until_async(
                    lambda: psutil.Process(pid).status() == "stopped", 5, 0.01, what="for SIGSTOP"
                )
                assert supervisor._hand(shard, late_claims, late_ours)  # it will never read it
                os.kill(pid, signal.SIGKILL)
                # it died with the connection: its client is cut off at once, like its others
                assert await closed_by_server(client, 5)
                # the unread one is served by the next incarnation
                head = await receive_head(late)
                assert head.startswith(b"HTTP/1.1 101"), head
                assert shard.epoch == epoch + 1
            finally:
                client.close()
                late.close()

    asyncio.run(scenario())
