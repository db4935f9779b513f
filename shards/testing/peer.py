"""WebSocket clients for tests: connect as a user, record every frame, wait for one.

Owns: :class:`Peer` (a ``websockets`` client whose reader task keeps every JSON frame it
receives), :func:`connect_peer`, and :func:`upgrade_request` (the bytes of an upgrade request,
for tests that speak to the server on a raw socket). Everything here that waits is a coroutine
or runs on the caller's event loop: nothing blocks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from shards.testing.host import Host
from shards.testing.waiting import TIME_FACTOR

__all__ = ["Peer", "connect_peer", "upgrade_request"]


class Peer:
    """A WebSocket client that records every JSON frame it receives."""

    def __init__(self, ws: ClientConnection, user: int) -> None:
        self.ws = ws
        self.user = user
        self.frames: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._arrived = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                self._arrived.set()
        except Exception:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
    ) -> None:
        """Wait until ``predicate(frames)`` holds; AssertionError at the deadline."""
        deadline = asyncio.get_running_loop().time() + timeout * TIME_FACTOR
        while not predicate(self.frames):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                last = str(self.frames[-5:])[:500]
                raise AssertionError(f"user {self.user}: timed out; last frames: {last}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def connect_peer(
    host: Host, user: int, channels: list[int] | None = None, wait_hello: bool = True
) -> Peer:
    """Connect a WebSocket client to ``host`` as ``user``; by default wait for its hello."""
    ws = await connect(
        f"{host.url}/?token={host.token(user, channels)}",
        open_timeout=10 * TIME_FACTOR,
        max_size=None,
        compression=None,
    )
    peer = Peer(ws, user)
    if wait_hello:
        await peer.wait_for(lambda frames: any(f["type"] == "hello" for f in frames))
    return peer


def upgrade_request(target: str, extra: str = "") -> bytes:
    """A WebSocket upgrade request for ``target`` (e.g. ``/?token=…``) with the header lines
    ``extra`` (each ending in CRLF), as a raw socket sends it."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()
