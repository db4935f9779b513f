"""WebSocket clients for tests: connect as a user, record every frame, wait for one.

Owns: :class:`Peer` (a ``websockets`` client whose reader task keeps every JSON frame it
receives, and behaves as a client of issue 11 should: it tracks each channel's position, the
``offset`` and ``epoch`` of the last message or ``resumed`` it saw, resumes from there, and
acknowledges every critical message), :func:`connect_peer`, :func:`reconnect_peer` (a new
connection of the same user that carries the positions over and resumes), and
:func:`upgrade_request` (the bytes of an upgrade request, for tests that speak to the server on
a raw socket). Everything here that waits is a coroutine or runs on the caller's event loop:
nothing blocks it.
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

__all__ = ["Peer", "connect_peer", "reconnect_peer", "upgrade_request"]

Position = tuple[int, str]  # a channel's (offset, epoch)


class Peer:
    """A WebSocket client that records every JSON frame it receives.

    ``positions``: each channel's last known (offset, epoch), updated by every channel message
    that carries one and by every ``resumed`` (pass another peer's to carry them over a
    reconnect). ``auto_ack``: acknowledge every message that carries an ``id`` (a critical
    message) as it arrives; ``ids`` keeps them all, in order of arrival, repeats included."""

    def __init__(
        self,
        ws: ClientConnection,
        user: int,
        auto_ack: bool = True,
        positions: dict[int, Position] | None = None,
    ) -> None:
        self.ws = ws
        self.user = user
        self.auto_ack = auto_ack
        self.positions: dict[int, Position] = {} if positions is None else positions
        self.frames: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.closed = asyncio.Event()
        self._arrived = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                self.frames.append(frame)
                await self._track(frame)
                self._arrived.set()
        except asyncio.CancelledError:
            # the scenario's loop is ending with this peer still open (an assertion failed
            # before its close): drop the connection now, or its socket is left to the garbage
            # collector, whose ResourceWarning then fails whichever test is running
            self.ws.transport.abort()
            raise
        except Exception:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    async def _track(self, frame: Any) -> None:
        """Keep the position a channel message or a ``resumed`` carries; ack a critical one."""
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind in ("message", "resumed") and "channel" in frame and "offset" in frame:
            channel = frame["channel"]
            known, known_epoch = self.position(channel)
            epoch = frame.get("epoch", known_epoch)
            # the highest offset of the epoch: a back-filled message (or a ``resumed`` whose
            # offset live messages already passed) never takes the position back
            if epoch != known_epoch or frame["offset"] > known:
                self.positions[channel] = (frame["offset"], epoch)
        elif kind == "message" and isinstance(frame.get("id"), str):
            self.ids.append(frame["id"])
            if self.auto_ack:
                await self.ack(frame["id"])

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    def channel_messages(self, channel: int) -> list[dict[str, Any]]:
        """The messages received on ``channel``, in order of arrival."""
        return [m for m in self.messages if m.get("channel") == channel]

    def offsets(self, channel: int) -> list[int]:
        """The offsets of the messages received on ``channel``, in order of arrival (a client
        that missed nothing and got nothing twice sees consecutive ones)."""
        return [m["offset"] for m in self.channel_messages(channel) if "offset" in m]

    @property
    def critical(self) -> list[dict[str, Any]]:
        """The critical messages received (those with an ``id``), repeats included."""
        return [m for m in self.messages if "id" in m]

    @property
    def resumed(self) -> list[dict[str, Any]]:
        """The ``resumed`` frames received, in order."""
        return [f for f in self.frames if f.get("type") == "resumed"]

    def position(self, channel: int) -> Position:
        """``channel``'s last known (offset, epoch); (0, "") when none is known."""
        return self.positions.get(channel, (0, ""))

    def resumed_of(self, channel: int) -> list[dict[str, Any]]:
        """The ``resumed`` frames of ``channel``, in order."""
        return [f for f in self.resumed if f.get("channel") == channel]

    async def resume(
        self, channel: int, wait: bool = False, timeout: float = 5.0
    ) -> dict[str, Any] | None:
        """Ask for ``channel``'s messages after its last known position; with ``wait``, wait
        for the ``resumed`` that answers it and return it."""
        seen = len(self.resumed_of(channel))
        offset, epoch = self.position(channel)
        await self.send({"type": "resume", "channel": channel, "offset": offset, "epoch": epoch})
        if not wait:
            return None
        return await self.wait_resumed(channel, seen + 1, timeout)

    async def wait_resumed(
        self, channel: int, count: int = 1, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Wait until ``count`` ``resumed`` frames of ``channel`` have arrived; the last one."""
        await self.wait_for(lambda _frames: len(self.resumed_of(channel)) >= count, timeout)
        return self.resumed_of(channel)[-1]

    async def ack(self, id: str) -> None:
        """Acknowledge the critical message ``id`` (quietly nothing once the connection is
        closed)."""
        with contextlib.suppress(Exception):
            await self.send({"type": "ack", "id": id})

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
    host: Host,
    user: int,
    channels: list[int] | None = None,
    wait_hello: bool = True,
    auto_ack: bool = True,
    positions: dict[int, Position] | None = None,
) -> Peer:
    """Connect a WebSocket client to ``host`` as ``user``; by default wait for its hello.
    ``auto_ack``, ``positions``: as :class:`Peer`'s."""
    ws = await connect(
        f"{host.url}/?token={host.token(user, channels)}",
        open_timeout=10 * TIME_FACTOR,
        max_size=None,
        compression=None,
    )
    peer = Peer(ws, user, auto_ack, positions)
    if wait_hello:
        await peer.wait_for(lambda frames: any(f["type"] == "hello" for f in frames))
    return peer


async def reconnect_peer(
    host: Host,
    peer: Peer,
    channels: list[int] | None = None,
    resume: bool = True,
    wait_resumed: bool = True,
) -> Peer:
    """A new connection of ``peer``'s user to ``host`` (this one or another of the cluster)
    that takes over ``peer``'s positions (``peer`` is closed first if it is not yet), and, with
    ``resume``, resumes every channel it knows a position of and (``wait_resumed``) waits for
    each one's ``resumed``. ``channels``: the token's (default: those known)."""
    if not peer.closed.is_set():
        await peer.close()
    known = sorted(peer.positions)
    new = await connect_peer(
        host,
        peer.user,
        known if channels is None else channels,
        wait_hello=False,
        auto_ack=peer.auto_ack,
        positions=peer.positions,
    )
    if resume:
        # at once, before hello: the shard takes the resume before any live message of the
        # channel reaches this connection (one sent after hello would race those: a live
        # message ahead of the replay, and the same again in the replay)
        for channel in known:
            await new.resume(channel)
    await new.wait_for(lambda frames: any(f.get("type") == "hello" for f in frames))
    if resume and wait_resumed:
        for channel in known:
            await new.wait_resumed(channel)
    return new


def upgrade_request(target: str, extra: str = "") -> bytes:
    """A WebSocket upgrade request for ``target`` (e.g. ``/?token=…``) with the header lines
    ``extra`` (each ending in CRLF), as a raw socket sends it."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()
