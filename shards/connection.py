"""One WebSocket connection inside a shard: a lean ``asyncio.Protocol`` over websockets' Sans-I/O.

Owns: the handshake (on bytes the supervisor only peeked at), parsing client frames (websockets'
``ServerProtocol``), the client commands (subscribe, unsubscribe, ping), writes (including
pre-encoded broadcast frames, written as they are) and the slow-consumer cap. Must never touch
the cache: it reports to its :class:`Shard`, which tells the CacheActor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from actors import frames
from actors.clientwire import ClientFrameError, parse_client_frame
from actors.ids import ChannelId, ConnId, UserId

if TYPE_CHECKING:
    from shards.worker import Shard

log = logging.getLogger("ucc.connection")

CLOSE_TIMEOUT = 2.0


class Connection(asyncio.Protocol):
    __slots__ = (
        "allowed",
        "channels",
        "conn_id",
        "expires",
        "fragments",
        "is_open",
        "last_inbound",
        "proto",
        "shard",
        "timer",
        "transport",
        "user",
    )

    def __init__(
        self,
        shard: Shard,
        conn_id: ConnId,
        user: UserId,
        channels: tuple[ChannelId, ...],
        expires: float,
    ) -> None:
        self.shard = shard
        self.expires = expires  # the token's exp (seconds since the epoch)
        self.conn_id = conn_id
        self.user = user
        self.channels = channels  # the token's channels: subscribed at connect, allowed later
        self.allowed = frozenset(channels)
        self.transport: asyncio.Transport | None = None
        self.proto = ServerProtocol(max_size=shard.max_frame)
        self.is_open = False  # handshake done and registered in the cache
        self.last_inbound = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.fragments: list[bytes] | None = None  # a text message arriving in pieces

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.last_inbound = self.shard.now
        self.timer = self.shard.loop.call_later(
            self.shard.handshake_timeout, self._abort, "handshake timeout"
        )

    def data_received(self, data: bytes) -> None:
        self.last_inbound = self.shard.now
        self.shard.mark_active(self)
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.is_open = False
        self.shard.connection_lost(self)

    # -- protocol --------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        response = self.proto.accept(request)
        self.proto.send_response(response)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if response.status_code == 101:
            self.shard.connection_opened(self)
        else:
            self._close_soon()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT and frame.fin:
            self._command(bytes(frame.data))
        elif opcode is Opcode.TEXT or (opcode is Opcode.CONT and self.fragments is not None):
            # a fragmented message (RFC 6455 §5.4): ServerProtocol bounds its total size
            if self.fragments is None:
                self.fragments = []
            self.fragments.append(bytes(frame.data))
            if frame.fin:
                payload, self.fragments = b"".join(self.fragments), None
                self._command(payload)
        elif opcode is Opcode.BINARY:
            self.send(frames.error("binary_unsupported", "send JSON text frames"))
        elif opcode is Opcode.CLOSE:
            self._close_soon()
        # pings are answered by ServerProtocol; pongs only count as activity

    def _command(self, payload: bytes) -> None:
        try:
            kind, channel = parse_client_frame(payload)
        except ClientFrameError as exc:
            self.send(frames.error(exc.code, exc.message))
            return
        if kind == "ping":
            self.send(frames.PONG)
        elif channel is None:  # pragma: no cover - parse_client_frame guarantees a channel
            raise AssertionError(kind)
        elif kind == "subscribe":
            if channel not in self.allowed:
                self.send(frames.error("forbidden", f"the token does not allow channel {channel}"))
                return
            self.shard.subscribe(self, channel)  # confirmed once the cache has it
        else:
            self.shard.unsubscribe(self, channel)

    def confirm(self, channel: ChannelId, subscribed: bool) -> None:
        kind = b"subscribed" if subscribed else b"unsubscribed"
        self.send(frames.text_frame(b'{"type":"%b","channel":%d}' % (kind, channel)))

    # -- writing ---------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Write a complete, pre-encoded server frame (the broadcast path)."""
        transport = self.transport
        if not self.is_open or transport is None:
            return
        transport.write(frame)
        if transport.get_write_buffer_size() > self.shard.write_buffer_limit:
            log.debug("connection %d: slow consumer, closing", self.conn_id)
            self.close(4000, "slow consumer")

    def ping(self) -> None:
        if self.is_open and self.transport is not None:
            self.transport.write(frames.PING)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; abort if the peer does not finish it in time."""
        if self.proto.state is State.OPEN:
            self.proto.send_close(code, reason)
            self.is_open = False
            self._flush()
        self._close_soon()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.proto.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
        if self.proto.state is State.CLOSED:
            self.is_open = False
            transport.close()
        elif self.proto.close_expected():
            self._close_soon()

    def _close_soon(self) -> None:
        self.is_open = False
        if self.timer is None and self.transport is not None:
            self.timer = self.shard.loop.call_later(CLOSE_TIMEOUT, self._abort, "close timeout")

    def _abort(self, why: str) -> None:
        self.timer = None
        if self.transport is not None:
            log.debug("connection %d: %s", self.conn_id, why)
            self.transport.abort()
