"""shards.testing.peer: the test kit's client tracks positions, resumes and acks (issue 11),
against a stand-in server (websockets), no ucc process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from shards.testing.peer import connect_peer, reconnect_peer

EPOCH = "0a1b2c3d4e5f"


class StandInHost:
    """A WebSocket server that says hello, keeps channel 5's messages (offsets 1..latest), and
    answers a resume as the contract says; it records every frame a client sends."""

    def __init__(self) -> None:
        self.url = ""
        self.received: list[dict[str, Any]] = []
        self.latest = 0
        self.connections: list[ServerConnection] = []

    def token(self, user: int, channels: list[int] | None = None) -> str:
        return f"{user}-{','.join(map(str, channels or []))}"

    def message(self, offset: int) -> str:
        body = {"type": "message", "channel": 5, "offset": offset, "epoch": EPOCH, "data": offset}
        return json.dumps(body)

    async def publish(self, count: int) -> None:
        for _ in range(count):
            self.latest += 1
            for ws in list(self.connections):
                with contextlib.suppress(ConnectionClosed):  # one that is closing
                    await ws.send(self.message(self.latest))

    async def handler(self, ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "hello", "user": 7, "channels": [5], "heartbeat": 25}))
        await ws.send(json.dumps({"type": "message", "id": "c-1", "data": "critical"}))
        self.connections.append(ws)
        try:
            async for raw in ws:
                frame = json.loads(raw)
                self.received.append(frame)
                if frame["type"] == "resume":
                    recovered = frame["epoch"] == EPOCH
                    if recovered:
                        for offset in range(frame["offset"] + 1, self.latest + 1):
                            await ws.send(self.message(offset))
                    resumed = {
                        "type": "resumed",
                        "channel": 5,
                        "offset": self.latest,
                        "epoch": EPOCH,
                        "recovered": recovered,
                    }
                    await ws.send(json.dumps(resumed))
        finally:
            self.connections.remove(ws)


def run(scenario: Callable[[StandInHost], Awaitable[None]]) -> None:
    async def main() -> None:
        host = StandInHost()
        async with serve(host.handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            host.url = f"ws://127.0.0.1:{port}"
            await asyncio.wait_for(scenario(host), 10)

    asyncio.run(main())


def acks(host: StandInHost) -> list[str]:
    return [f["id"] for f in host.received if f["type"] == "ack"]


def resumes(host: StandInHost) -> list[dict[str, Any]]:
    return [f for f in host.received if f["type"] == "resume"]


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until the stand-in server has seen what ``predicate`` says (polled)."""
    while not predicate():
        await asyncio.sleep(0.005)


def test_a_peer_tracks_positions_and_acks_critical_messages():
    async def scenario(host: StandInHost) -> None:
        peer = await connect_peer(host, 7, [5])
        assert peer.position(5) == (0, "")
        await peer.wait_for(lambda _: peer.ids == ["c-1"])
        await host.publish(3)
        await peer.wait_for(lambda _: peer.offsets(5) == [1, 2, 3])
        assert peer.position(5) == (3, EPOCH)
        assert [m["data"] for m in peer.critical] == ["critical"]
        await until(lambda: acks(host) == ["c-1"])
        await peer.close()

    run(scenario)


def test_without_auto_ack_the_ids_are_kept_and_nothing_is_sent():
    async def scenario(host: StandInHost) -> None:
        peer = await connect_peer(host, 7, [5], auto_ack=False)
        await peer.wait_for(lambda _: peer.ids == ["c-1"])
        await peer.send({"type": "ping"})  # whatever was sent before it has arrived by now
        await until(lambda: any(f["type"] == "ping" for f in host.received))
        assert acks(host) == []
        await peer.ack("c-1")
        await until(lambda: acks(host) == ["c-1"])
        await peer.close()

    run(scenario)


def test_resume_sends_the_last_position_and_the_resumed_frame_moves_it():
    async def scenario(host: StandInHost) -> None:
        peer = await connect_peer(host, 7, [5])
        resumed = await peer.resume(5, wait=True)  # nothing known: offset 0, epoch ""
        assert resumed is not None and resumed["recovered"] is False
        assert resumes(host)[-1] == {"type": "resume", "channel": 5, "offset": 0, "epoch": ""}
        assert peer.position(5) == (0, EPOCH)
        await host.publish(2)
        await peer.wait_for(lambda _: peer.position(5) == (2, EPOCH))
        again = await peer.resume(5, wait=True)
        assert again is not None and again["recovered"] is True
        assert resumes(host)[-1] == {"type": "resume", "channel": 5, "offset": 2, "epoch": EPOCH}
        assert len(peer.resumed_of(5)) == 2
        await peer.close()

    run(scenario)


def test_reconnect_peer_carries_the_positions_over_and_recovers_what_was_missed():
    async def scenario(host: StandInHost) -> None:
        peer = await connect_peer(host, 7, [5])
        await host.publish(2)
        await peer.wait_for(lambda _: peer.offsets(5) == [1, 2])
        await peer.close()
        await host.publish(3)  # 3, 4, 5 while away
        again = await reconnect_peer(host, peer)
        assert again.user == 7
        assert again.offsets(5) == [3, 4, 5]
        assert again.resumed_of(5)[-1]["recovered"] is True
        assert again.position(5) == (5, EPOCH)
        await again.wait_for(lambda _: again.ids == ["c-1"])  # delivered again: a new connection
        await again.close()

    run(scenario)


def test_a_peer_left_open_by_a_failed_scenario_is_closed_with_its_loop():
    """An assertion that fails before ``peer.close()`` must cost its own test only: the peer's
    socket is closed as ``asyncio.run`` ends, not left to the garbage collector (whose
    ResourceWarning would fail whichever test runs then)."""
    host = StandInHost()
    started = threading.Event()
    stop: list[Callable[[], None]] = []

    def serve_in_a_thread() -> None:
        async def main() -> None:
            async with serve(host.handler, "127.0.0.1", 0) as server:
                host.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
                done = asyncio.Event()
                stop.append(lambda: loop.call_soon_threadsafe(done.set))
                started.set()
                await done.wait()

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    thread = threading.Thread(target=serve_in_a_thread)
    thread.start()
    try:
        assert started.wait(10)

        async def failing() -> None:
            peer = await connect_peer(host, 7, [5])
            assert peer.ids == ["never"], "fails with the peer open"

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(AssertionError, match="fails with the peer open"):
                asyncio.run(failing())
            gc.collect()
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    finally:
        if stop:
            stop[0]()
        thread.join(10)
