"""The client side of one benchmark WebSocket: a lean ``asyncio.Protocol``, no library.

Owns: writing a precomputed upgrade request, checking the 101 answer (status line and
``Sec-WebSocket-Accept``), and a minimal parser of server frames (RFC 6455 §5.2: a server never
masks, and neither ucc nor websockets fragments these small messages). It counts text frames,
takes the publisher's timestamp (``"t":<monotonic ns>``) out of each payload for the latency
histogram, answers pings with pongs and closes with closes — client frames are always masked
(§5.3). Must never decode JSON on the hot path, nor create an object per received frame beyond
the payload slice: it is there to measure the server, so it must cost as little as possible.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from typing import cast

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
KEY = base64.b64encode(b"ucc-bench-key-16")  # fixed: every client sends the same request shape
ACCEPT = base64.b64encode(hashlib.sha1(KEY + GUID).digest())  # RFC 6455 §4.2.2
STAMP = b'"t":'

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

# Latency histogram: 10 µs buckets below 100 ms, 1 ms buckets up to 10 s, one overflow bucket.
_FINE_US, _FINE_LIMIT_US, _COARSE_US, _LAST_BUCKET = 10, 100_000, 1_000, 19_900


def bucket(latency_ns: int) -> int:
    """The histogram bucket of a latency."""
    us = latency_ns // 1000
    if us < _FINE_LIMIT_US:
        return max(0, us // _FINE_US)
    return min(_LAST_BUCKET, _FINE_LIMIT_US // _FINE_US + (us - _FINE_LIMIT_US) // _COARSE_US)


def bucket_ms(index: int) -> float:
    """The upper edge of a bucket, in milliseconds (percentiles are conservative)."""
    fine = _FINE_LIMIT_US // _FINE_US
    if index < fine:
        return (index + 1) * _FINE_US / 1000
    return (_FINE_LIMIT_US + (index - fine + 1) * _COARSE_US) / 1000


def upgrade_request(host: str, port: int, path: str) -> bytes:
    """The complete HTTP/1.1 upgrade request (RFC 6455 §4.1)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def masked_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A complete client frame: FIN, ``opcode``, masked ``payload`` (§5.3)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    repeated = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")
    return header + key + masked


class Stats:
    """What all the load clients of one process observed since the last :meth:`reset`."""

    __slots__ = ("closed", "frames", "hist", "last_ns", "max_ns", "pings")

    def __init__(self) -> None:
        self.frames = 0
        self.hist: dict[int, int] = {}
        self.max_ns = 0
        self.last_ns = 0  # when the last timestamped frame arrived
        self.closed = 0
        self.pings = 0

    def reset(self) -> None:
        self.frames = 0
        self.hist = {}
        self.max_ns = 0
        self.last_ns = 0
        self.pings = 0


class LoadClient(asyncio.Protocol):
    """One connection. ``opened`` resolves at the server's first text frame (ucc's hello)."""

    __slots__ = (
        "buf",
        "opened",
        "request",
        "stats",
        "t_hello",
        "t_start",
        "t_upgraded",
        "transport",
        "upgraded",
    )

    def __init__(self, request: bytes, stats: Stats, opened: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.t_start = time.monotonic_ns()
        self.t_upgraded = 0
        self.t_hello = 0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stats.closed += 1
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before hello: {exc}"))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101") or ACCEPT not in head:
                self._fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self.upgraded = True
            self.t_upgraded = time.monotonic_ns()
            data = data[end + 4 :]
        self._frames(data)

    # -- frames -------------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        stats = self.stats
        now = time.monotonic_ns()
        size = len(data)
        pos = 0
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == OP_TEXT:
                payload = data[start:end]
                i = payload.find(STAMP)
                if i >= 0:
                    sent = int(payload[i + 4 : payload.find(b",", i)])
                    latency = now - sent
                    stats.frames += 1
                    hist = stats.hist
                    index = bucket(latency)
                    hist[index] = hist.get(index, 0) + 1
                    stats.max_ns = max(stats.max_ns, latency)
                    stats.last_ns = now
                elif not self.opened.done():
                    self.t_hello = now
                    self.opened.set_result(None)
            elif opcode == OP_PING:
                stats.pings += 1
                self._write(masked_frame(OP_PONG, data[start:end]))
            elif opcode == OP_CLOSE:
                self._write(masked_frame(OP_CLOSE, data[start : start + 2]))
                if self.transport is not None:
                    self.transport.close()
                return
            pos = end
        if pos < size:
            self.buf = data[pos:]

    def _write(self, frame: bytes) -> None:
        if self.transport is not None:
            self.transport.write(frame)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"upgrade refused: {why}"))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Send a close frame (1000) and drop the connection."""
        if self.transport is not None:
            self._write(masked_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()
