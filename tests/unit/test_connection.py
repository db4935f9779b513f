"""Connection (shards/connection.py) over a real socket pair on a real event loop.

The server end of ``socket.socketpair()`` is adopted with ``loop.connect_accepted_socket``, as
the shard adopts a handed-over connection; the client end speaks WebSocket through websockets'
Sans-I/O ``ClientProtocol``. Only the shard is a stand-in (:class:`StandInShard`, implementing
``ShardSide``); the transport, the socket and the parser are real. Every wait is for bytes on
the client's socket, under a deadline: no sleeps.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from actors.cache import UserConnectionCache
from actors.ids import ChannelId, ConnId, UserId
from actors.wire import frames, tokens
from shards import connection
from shards.config import ServeConfig
from shards.connection import MAX_EARLY, Connection
from shards.handoff import ShardConfig

DEADLINE = 5.0  # seconds: a wait that takes this long is a failure, not a synchronisation
CONFIG = ShardConfig.of(ServeConfig(secret="s"))
FAILING_USER = UserId(666)  # the stand-in shard raises on this user's subscribe
SECRET = "a-token-secret-of-at-least-32-bytes!"


class StandInShard:
    """What a Connection needs of its shard (``shards.connection.ShardSide``), recording what
    it is told. It
    answers as the real shard does, a turn of the loop later: ``registered`` after
    ``connection_opened``, ``confirm`` after ``subscribe`` (or the ``limit`` error, decided by
    a real cache as the CacheActor does); it counts each user's connections as the shard does
    (``admit``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: ShardConfig) -> None:
        self.loop = loop
        self.config = config
        self.secret = SECRET
        self.per_user: Counter[UserId] = Counter()
        self.cache = UserConnectionCache(config.max_channels_per_connection)
        self.now = time.monotonic()
        self.write_high = 16 * 1024
        self.counters: Counter[str] = Counter()
        self.causes: list[tuple[ConnId, str, str]] = []  # closed_for_cause: (conn, cause, detail)
        self.opened: list[Connection] = []
        self.lost: list[Connection] = []
        self.subscriptions: list[tuple[UserId, ChannelId, bool]] = []
        self.resumes: list[tuple[UserId, ChannelId, int, str]] = []
        self.acks: list[tuple[UserId, str]] = []
        self.active = 0
        self.pairs: list[tuple[Connection, Client]] = []  # made by ``connected``, closed by ``run``
        self.unregistered: list[Connection] | None = None  # a list: hold registrations there

    def count(self, what: str) -> None:
        self.counters[what] += 1

    def closed_for_cause(self, conn: Connection, cause: str, detail: str = "") -> None:
        self.counters[cause] += 1
        self.causes.append((conn.conn_id, cause, detail))

    def mark_active(self, conn: Connection) -> None:
        self.active += 1

    def admit(self, conn: Connection) -> bool:
        if self.per_user[conn.user] >= self.config.max_connections_per_user:
            return False
        self.per_user[conn.user] += 1
        return True

    def connection_opened(self, conn: Connection) -> None:
        self.opened.append(conn)
        self.cache.connect(conn.conn_id, conn.user, conn.channels, 0.0)
        if self.unregistered is not None:
            self.unregistered.append(conn)  # the test calls registered() when it wants
        else:
            self.loop.call_soon(conn.registered)

    def connection_lost(self, conn: Connection) -> None:
        if conn.admitted:
            self.per_user[conn.user] -= 1
        self.cache.disconnect(conn.conn_id)
        self.lost.append(conn)

    def subscribe(self, conn: Connection, channel: ChannelId) -> None:
        if conn.user == FAILING_USER:
            raise RuntimeError("a bug met on this connection's bytes")
        if not self.cache.can_join(conn.conn_id, channel):
            refused = frames.error("limit", "too many channels")
            self.loop.call_soon(conn.send, refused)
            return
        self.cache.subscribe(conn.conn_id, channel)
        self.subscriptions.append((conn.user, channel, True))
        self.loop.call_soon(conn.confirm, channel, True)

    def unsubscribe(self, conn: Connection, channel: ChannelId) -> None:
        self.cache.unsubscribe(conn.conn_id, channel)
        self.subscriptions.append((conn.user, channel, False))
        self.loop.call_soon(conn.confirm, channel, False)

    def resume(self, conn: Connection, channel: ChannelId, offset: int, epoch: str) -> None:
        self.resumes.append((conn.user, channel, offset, epoch))

    def ack(self, conn: Connection, id: str) -> None:
        self.acks.append((conn.user, id))

    def writing_paused(self, conn: Connection) -> None:
        pass

    def writing_resumed(self, conn: Connection) -> None:
        pass


class Client:
    """The client end of the pair: a WebSocket client over a real, non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.proto = ClientProtocol(parse_uri("ws://ucc.test/?token=t"))
        self.events: deque[Response | Frame] = deque()
        self.eof = False
        self.raw = bytearray()  # every byte the server sent (the parser stops at a close frame)

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.proto.data_to_send():
            # the server may have ended the connection already (after a close, or failing it)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if data:
                    await loop.sock_sendall(self.sock, data)
                else:
                    self.sock.shutdown(socket.SHUT_WR)

    async def send_raw(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self, reply: bool = True) -> Response | Frame | None:
        """The next event from the server; None once the server has ended the TCP stream.
        ``reply``: answer as a client does (a close frame, our EOF after the server's)."""
        loop = asyncio.get_running_loop()
        while not self.events and not self.eof:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), DEADLINE)
            except ConnectionResetError:  # closed with our bytes unread: an end all the same
                data = b""
            self.raw += data
            if data:
                self.proto.receive_data(data)
            else:
                self.eof = True
                self.proto.receive_eof()
            self.events.extend(self.proto.events_received())
            if reply:
                await self.flush()
        return self.events.popleft() if self.events else None

    async def handshake(self) -> Response:
        self.proto.send_request(self.proto.connect())
        await self.flush()
        response = await self.receive()
        assert isinstance(response, Response)
        return response

    async def text(self) -> dict[str, Any]:
        """The next frame, which must be a text frame: its JSON."""
        frame = await self.receive()
        assert isinstance(frame, Frame) and frame.opcode is Opcode.TEXT, frame
        body: dict[str, Any] = json.loads(frame.data)
        return body

    async def close_code(self, reply: bool = True) -> int:
        """Skip to the server's close frame: its code."""
        while True:
            frame = await self.receive(reply)
            assert frame is not None, "the stream ended without a close frame"
            if isinstance(frame, Frame) and frame.opcode is Opcode.CLOSE:
                return Close.parse(frame.data).code

    async def until_eof(self, reply: bool = True) -> list[Response | Frame]:
        """Everything the server still sends before it ends the stream."""
        seen = []
        while (event := await self.receive(reply)) is not None:
            seen.append(event)
        return seen


async def connected(
    shard: StandInShard,
    user: int = 7,
    channels: tuple[int, ...] = (1, 2),
    expires: float = float("inf"),
) -> tuple[Connection, Client]:
    """A Connection adopted on the server end of a fresh socket pair, and its client."""
    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()
    client_end.setblocking(False)
    ids = tuple(ChannelId(c) for c in channels)
    conn = Connection(shard, ConnId(len(shard.pairs) + 1), UserId(user), ids, expires)
    client = Client(client_end)
    shard.pairs.append((conn, client))
    await loop.connect_accepted_socket(lambda: conn, server_end)
    return conn, client


async def opened(
    shard: StandInShard,
    user: int = 7,
    channels: tuple[int, ...] = (1, 2),
    expires: float = float("inf"),
) -> tuple[Connection, Client]:
    """As :func:`connected`, past the handshake and hello."""
    conn, client = await connected(shard, user, channels, expires)
    assert (await client.handshake()).status_code == 101
    assert (await client.text())["type"] == "hello"
    return conn, client


LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}  # the shards run uvloop


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Run ``scenario(shard)`` on a fresh loop of each kind, with a stand-in shard configured
    with ``config``; nothing may reach the loop's exception handler."""

    def runner(
        scenario: Callable[[StandInShard], Coroutine[Any, Any, None]],
        config: ShardConfig = CONFIG,
    ) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            escaped: list[dict[str, Any]] = []
            loop.set_exception_handler(lambda _loop, context: escaped.append(context))
            shard = StandInShard(loop, config)
            try:
                await asyncio.wait_for(scenario(shard), 4 * DEADLINE)
            finally:
                for conn, client in shard.pairs:
                    client.sock.close()
                    if conn.transport is not None:
                        conn.transport.abort()
                while len(shard.lost) < len(shard.pairs):  # connection_lost: a turn later
                    await asyncio.sleep(0)
            assert escaped == []

        LOOPS[request.param](main())

    return runner


def test_the_handshake_opens_it_and_hello_follows(run):
    async def scenario(shard: StandInShard) -> None:
        conn, client = await connected(shard, user=42, channels=(3, 4))
        response = await client.handshake()
        assert response.status_code == 101
        assert shard.opened == [conn]
        assert await client.text() == {
            "type": "hello",
            "user": 42,
            "channels": [3, 4],
            "heartbeat": CONFIG.heartbeat,
        }
        assert conn.is_open

    run(scenario)


def test_text_commands_are_answered(run):
    async def scenario(shard: StandInShard) -> None:
        _conn, client = await opened(shard, user=7, channels=(1, 2))
        for command in ({"type": "ping"}, {"type": "subscribe", "channel": 2}):
            client.proto.send_text(json.dumps(command).encode())
        client.proto.send_text(b'{"type": "subscribe", "channel": 9}')
        client.proto.send_text(b'{"type": "unsubscribe", "channel": 1}')
        client.proto.send_text(b"not json")
        await client.flush()
        assert await client.text() == {"type": "pong"}
        assert (await client.text())["code"] == "forbidden"  # 9: not in the token
        assert (await client.text())["code"] == "bad_json"
        # confirmations come a turn later, once the shard has them
        assert await client.text() == {"type": "subscribed", "channel": 2}
        assert await client.text() == {"type": "unsubscribed", "channel": 1}
        assert shard.subscriptions == [(7, 2, True), (7, 1, False)]
        assert shard.active > 0

    run(scenario)


def test_invalid_utf8_in_a_text_frame_closes_it_1007(run):
    async def scenario(shard: StandInShard) -> None:
        _conn, client = await opened(shard)
        client.proto.send_text(b'{"type": "ping", "x": "\xff\xfe"}')  # not UTF-8
        await client.flush()
        assert await client.close_code() == 1007
        assert shard.counters["closed_invalid_utf8"] == 1

    run(scenario)


def test_over_the_frame_budget_it_is_closed_1008_and_the_rest_is_not_read(run):
    config = dataclasses.replace(CONFIG, client_frame_burst=3, client_frame_rate=0.001)

    async def scenario(shard: StandInShard) -> None:
        _conn, client = await opened(shard)
        for _ in range(6):
            client.proto.send_text(b'{"type": "ping"}')
        await client.flush()  # all six in one write: the budget decides, not the timing
        for _ in range(3):
            assert await client.text() == {"type": "pong"}
        assert await client.close_code() == 1008
        assert await client.until_eof() == []  # no pong for the rest: never parsed
        assert shard.counters["closed_rate_limit"] == 1

    run(scenario, config)


def test_a_write_after_eof_is_a_no_op(run):
    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard)
        client.proto.send_close(1000, "bye")
        await client.flush()
        # the server answers our close and ends its half of the stream (write_eof); we keep
        # ours open, so its transport stays open, for reading only
        assert await client.close_code(reply=False) == 1000
        assert await client.until_eof(reply=False) == []
        assert conn.shut and not conn.is_open
        assert conn.transport is not None and not conn.transport.is_closing()
        conn.send(frames.PONG)  # a broadcast that arrives late
        conn.ping()
        conn.confirm(ChannelId(1), True)
        conn.registered()
        conn.close(4001, "disconnected by the backend")
        # a write after write_eof raises in the transport, and would have failed it (counted)
        assert "connection_errors" not in shard.counters

    run(scenario)


def test_nothing_is_written_after_the_close_frame(run):
    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard)
        conn.close(4001, "bye")  # the backend disconnected the user
        conn.send(frames.PONG)  # a broadcast in the same batch of actions
        conn.ping()
        conn.confirm(ChannelId(1), True)
        assert await client.close_code() == 4001  # we answer it: the server ends the stream
        assert await client.until_eof() == []
        close = Frame(Opcode.CLOSE, Close(4001, "bye").serialize())
        assert client.raw.endswith(close.serialize(mask=False))
        assert "connection_errors" not in shard.counters

    run(scenario)


def test_an_exception_handling_bytes_closes_that_connection_only_1011(run):
    async def scenario(shard: StandInShard) -> None:
        failing, doomed = await opened(shard, user=FAILING_USER)
        healthy, client = await opened(shard, user=8)
        doomed.proto.send_text(b'{"type": "subscribe", "channel": 1}')  # raises in the shard
        await doomed.flush()
        assert await doomed.close_code() == 1011
        await doomed.until_eof()
        assert shard.counters["connection_errors"] == 1
        assert failing.shut and not failing.is_open
        # the other connection on the same shard and loop goes on
        client.proto.send_text(b'{"type": "ping"}')
        await client.flush()
        assert await client.text() == {"type": "pong"}
        assert healthy.is_open

    run(scenario)


def test_one_connection_too_many_for_a_user_gets_429_before_the_upgrade(run):
    config = dataclasses.replace(CONFIG, max_connections_per_user=2)

    async def scenario(shard: StandInShard) -> None:
        first, _ = await opened(shard, user=7)
        # the second is counted from its arrival, before its handshake: a burst cannot pass
        _second, pending = await connected(shard, user=7)
        _third, refused = await connected(shard, user=7)
        _other, client = await connected(shard, user=8)  # another user: its own count
        response = await refused.handshake()
        assert response.status_code == 429
        assert response.headers["Retry-After"] == str(connection.RETRY_AFTER_PER_USER)
        assert b"too many connections for this user" in response.body
        assert await refused.until_eof() == []  # no upgrade: the stream ends
        assert shard.counters["refused_per_user"] == 1
        assert (await pending.handshake()).status_code == 101
        assert (await client.handshake()).status_code == 101
        assert first.is_open and len(shard.opened) == 3
        # one of the user's connections ends: room for another
        first.close(1000, "bye")
        assert await shard.pairs[0][1].close_code() == 1000
        await shard.pairs[0][1].until_eof()
        while first not in shard.lost:
            await asyncio.sleep(0)  # connection_lost: the loop's next turns
        _fourth, again = await connected(shard, user=7)
        assert (await again.handshake()).status_code == 101

    run(scenario, config)


def test_a_subscribe_beyond_the_channel_limit_gets_error_limit_and_it_stays_open(run):
    config = dataclasses.replace(CONFIG, max_channels_per_connection=2)

    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard, channels=(1, 2, 3))
        client.proto.send_text(b'{"type": "unsubscribe", "channel": 1}')
        client.proto.send_text(b'{"type": "subscribe", "channel": 3}')  # holds 2, 3 already
        client.proto.send_text(b'{"type": "subscribe", "channel": 1}')  # a third: refused
        client.proto.send_text(b'{"type": "ping"}')
        await client.flush()
        assert await client.text() == {"type": "pong"}
        assert await client.text() == {"type": "unsubscribed", "channel": 1}
        assert await client.text() == {"type": "subscribed", "channel": 3}
        refused = await client.text()
        assert (refused["type"], refused["code"]) == ("error", "limit")
        assert conn.is_open

    run(scenario, config)


def test_resume_and_ack_are_passed_to_the_shard_and_a_forbidden_resume_is_refused(run):
    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard, user=7, channels=(1, 2))
        for command in (
            {"type": "resume", "channel": 2, "offset": 41, "epoch": "0a1b2c3d4e5f"},
            {"type": "resume", "channel": 9, "offset": 1, "epoch": "e"},  # not in the token
            {"type": "resume", "channel": 1, "offset": -1, "epoch": "e"},
            {"type": "resume", "channel": 1, "offset": 0},
            {"type": "ack", "id": "h1-7"},
            {"type": "ack", "id": 7},
            {"type": "ping"},
        ):
            client.proto.send_text(json.dumps(command).encode())
        await client.flush()
        forbidden = await client.text()
        assert (forbidden["code"], forbidden["message"]) == (
            "forbidden",
            "the token does not allow channel 9",
        )
        assert (await client.text())["code"] == "bad_frame"  # offset -1
        assert (await client.text())["code"] == "bad_frame"  # id 7
        assert await client.text() == {"type": "pong"}
        assert shard.resumes == [(7, 2, 41, "0a1b2c3d4e5f"), (7, 1, 0, "")]
        assert shard.acks == [(7, "h1-7")]
        assert conn.is_open

    run(scenario)


def test_answers_to_frames_sent_before_hello_come_right_after_it(run):
    async def scenario(shard: StandInShard) -> None:
        shard.unregistered = []
        conn, client = await connected(shard, user=7, channels=(1,))
        assert (await client.handshake()).status_code == 101
        for command in (
            {"type": "resume", "channel": 9, "offset": 0, "epoch": ""},  # not in the token
            {"type": "ping"},
        ):
            client.proto.send_text(json.dumps(command).encode())
        await client.flush()
        while len(conn.early or []) < 2:  # read by the server, not answered (run's deadline)
            await asyncio.sleep(0)
        conn.registered()
        assert (await client.text())["type"] == "hello"
        assert (await client.text())["code"] == "forbidden"
        assert await client.text() == {"type": "pong"}
        assert conn.early is None

    run(scenario)


def test_answers_waiting_for_hello_are_bounded(run):
    async def scenario(shard: StandInShard) -> None:
        shard.unregistered = []
        conn, client = await connected(shard, user=7, channels=(1,))
        assert (await client.handshake()).status_code == 101
        for _ in range(MAX_EARLY + 5):
            client.proto.send_text(b'{"type":"ping"}')
        await client.flush()
        while shard.counters["early_answers_dropped"] < 5:
            await asyncio.sleep(0)
        assert len(conn.early or []) == MAX_EARLY
        conn.registered()
        assert (await client.text())["type"] == "hello"
        for _ in range(MAX_EARLY):
            assert await client.text() == {"type": "pong"}

    run(scenario)


def refresh(token: str) -> bytes:
    return json.dumps({"type": "refresh", "token": token}).encode()


def test_a_refresh_moves_the_expiry_and_the_allowed_channels(run):
    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard, user=7, channels=(1, 2, 3), expires=time.time() + 3)
        token = tokens.mint(SECRET, 7, [2, 3, 4], ttl=3600)
        exp = tokens.verify(SECRET, token).exp
        client.proto.send_text(refresh(token))
        client.proto.send_text(b'{"type": "subscribe", "channel": 4}')  # allowed now
        client.proto.send_text(b'{"type": "subscribe", "channel": 1}')  # not any more
        await client.flush()
        assert await client.text() == {"type": "refreshed", "exp": int(exp)}
        assert (await client.text())["code"] == "forbidden"  # 1
        # 1 is no longer allowed: unsubscribed as the client's own unsubscribe would be
        assert await client.text() == {"type": "unsubscribed", "channel": 1}
        assert await client.text() == {"type": "subscribed", "channel": 4}
        assert conn.expires == exp
        assert conn.allowed == {2, 3, 4}
        assert shard.subscriptions == [(7, 1, False), (7, 4, True)]
        assert shard.counters["refreshed"] == 1

    run(scenario)


def test_a_bad_refresh_is_bad_token_and_the_old_expiry_stands(run):
    config = dataclasses.replace(CONFIG, token_audience="app", max_channels_per_connection=2)

    async def scenario(shard: StandInShard) -> None:
        expires = time.time() + 60
        conn, client = await opened(shard, user=7, channels=(1,), expires=expires)
        bad = [
            tokens.mint(SECRET, 8, [1], audience="app"),  # another user's
            tokens.mint("another-secret-of-at-least-32-bytes", 7, [1], audience="app"),
            tokens.mint(SECRET, 7, [1], ttl=-10, audience="app"),  # expired
            tokens.mint(SECRET, 7, [1]),  # no aud, and one is configured
            tokens.mint(SECRET, 7, [1], audience="other"),
            tokens.mint(SECRET, 7, [1, 2, 3], audience="app"),  # over the channel limit
            "not.a.token",
        ]
        for token in bad:
            client.proto.send_text(refresh(token))
        await client.flush()
        for _ in bad:
            body = await client.text()
            assert (body["type"], body["code"]) == ("error", "bad_token"), body
            assert body["message"].startswith("refresh refused: ")
        assert conn.expires == expires and conn.allowed == {1}
        assert conn.is_open
        assert shard.counters["refresh_refused"] == len(bad)
        assert shard.subscriptions == []
        # a good one still works afterwards
        client.proto.send_text(refresh(tokens.mint(SECRET, 7, [1], audience="app")))
        await client.flush()
        assert (await client.text())["type"] == "refreshed"
        assert conn.expires > expires

    run(scenario, config)


def test_without_a_secret_every_refresh_is_refused(run):
    async def scenario(shard: StandInShard) -> None:
        shard.secret = ""
        conn, client = await opened(shard, user=7)
        client.proto.send_text(refresh(tokens.mint(SECRET, 7, [1])))  # valid, but uncheckable
        await client.flush()
        assert (await client.text())["code"] == "bad_token"
        assert conn.expires == float("inf")

    run(scenario)


def test_connection_does_not_import_the_shard():
    # no cycle, not even for the type checker: it names what it needs of a shard (ShardSide)
    tree = ast.parse(Path(connection.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    assert "shards.worker" not in imported
    assert "shards.handoff.ShardConfig" in imported  # the walk does see its imports


# -- issue 12: closes for cause, close status, remote -------------------------------------------


def test_a_failure_is_reported_once_with_its_error_and_never_logged_above_debug(run, caplog):
    async def scenario(shard: StandInShard) -> None:
        failing, doomed = await opened(shard, user=FAILING_USER)
        with caplog.at_level("INFO", logger="ucc.connection"):
            doomed.proto.send_text(b'{"type": "subscribe", "channel": 1}')  # raises
            await doomed.flush()
            assert await doomed.close_code() == 1011
            await doomed.until_eof()
        assert shard.causes == [
            (
                failing.conn_id,
                "connection_errors",
                "RuntimeError: a bug met on this connection's bytes",
            )
        ]
        assert caplog.records == []  # the shard's summary says it, once per interval
        assert failing.close_status() == (1011, "internal error")

    run(scenario)


def test_close_status_is_the_first_close_frame_of_the_handshake(run):
    async def scenario(shard: StandInShard) -> None:
        ours, client = await opened(shard)
        ours.close(4001, "disconnected by the backend")
        assert await client.close_code() == 4001  # the client echoes it (1000 would do too)
        await client.until_eof()
        assert ours.close_status() == (4001, "disconnected by the backend")
        theirs, client = await opened(shard)
        client.proto.send_close(1001, "going away")
        await client.flush()
        await client.until_eof()
        assert theirs.close_status() == (1001, "going away")
        silent, client = await opened(shard)
        client.sock.close()  # no closing handshake at all
        while silent not in shard.lost:
            await asyncio.sleep(0)
        assert silent.close_status() == (1006, "connection lost")

    run(scenario)


def test_closes_for_cause_are_reported_to_the_shard(run):
    config = dataclasses.replace(CONFIG, client_frame_burst=1, client_frame_rate=0.001)

    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard)
        assert conn.remote() == ""  # a unix socket pair: no ip:port
        client.proto.send_text(b'{"type": "ping"}')
        client.proto.send_text(b'{"type": "ping"}')
        await client.flush()
        assert await client.close_code() == 1008
        assert shard.causes == [(conn.conn_id, "closed_rate_limit", "over its frame rate budget")]
        assert conn.remote() == ""  # closed: nothing, and no exception either

    run(scenario, config)


def test_a_malformed_frame_is_a_close_for_cause(run):
    async def scenario(shard: StandInShard) -> None:
        conn, client = await opened(shard)
        await client.send_raw(b"\x83\x80\x00\x00\x00\x00")  # opcode 3: reserved
        assert await client.close_code() == 1002
        await client.until_eof()
        while conn not in shard.lost:
            await asyncio.sleep(0)
        ((who, cause, _detail),) = shard.causes
        assert (who, cause) == (conn.conn_id, "closed_protocol_error")

    run(scenario)


def test_deliver_writes_to_each_open_recipient_and_closes_a_slow_consumer(run):
    """connection.deliver, the fan-out: the frame reaches every open recipient, in order; an
    unknown id (None) or a closed connection is skipped; one whose reader reads nothing is
    closed 4000 once its buffer passes the limit, and the others go on getting every frame."""
    frame = frames.text_frame(b'{"type":"message","data":"%b"}' % (b"x" * 1000))

    async def scenario(shard: StandInShard) -> None:
        (a, ca), (b, cb), (slow, _never_read) = [await opened(shard, user=u) for u in (1, 2, 3)]
        gone, cgone = await opened(shard, user=4)
        cgone.sock.close()
        gone.close(1000, "bye")
        conns = {c.conn_id: c for c in (a, b, slow, gone)}
        recipients = (a.conn_id, ConnId(999), b.conn_id, slow.conn_id, gone.conn_id)
        sent = 0
        while slow.is_open:  # each round: a and b read it all, slow reads nothing
            assert sent < 10_000, "never over the limit: the kernel buffers took it all"
            connection.deliver(map(conns.get, recipients), frame, limit=64 * 1024)
            sent += 1
            for client in (ca, cb):
                assert (await client.text())["data"] == "x" * 1000
        assert shard.causes[-1] == (slow.conn_id, "closed_slow_consumer", "write buffer full")
        connection.deliver(map(conns.get, recipients), frame, 64 * 1024)  # slow: a no-op now
        for client in (ca, cb):
            assert (await client.text())["data"] == "x" * 1000
        assert [c for c, cause, _ in shard.causes if cause == "closed_slow_consumer"] == [
            slow.conn_id
        ]

    run(scenario)
