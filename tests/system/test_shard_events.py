"""The shard's side of the event stream (issue 12) against a real ``ucc serve --events``, read
with a plain SUB socket: what each connection's life and each close for cause produce, in seq
order, with their exact fields; the connection records of ``get_user_connections`` and
``snapshot``; join/leave frames to the members of a marked channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq
from websockets.exceptions import ConnectionClosed

from shards.testing import Host, connect_peer, upgrade_request
from shards.testing.redis import free_port
from shards.testing.waiting import TIME_FACTOR

Event = dict[str, Any]


class Events:
    """A SUB socket on the host's event stream, read without blocking the loop."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.seen: list[Event] = []

    async def take(
        self, until: Callable[[list[Event]], bool], timeout: float = 10.0
    ) -> list[Event]:
        """Events from now on until ``until(events)`` holds; AssertionError at the deadline."""
        events: list[Event] = []
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while not until(events):
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out; got {str(events)[-1500:]}") from None
                await asyncio.sleep(0.005)
                continue
            assert raw.startswith(b'{"seq"'), raw
            event = json.loads(raw)
            events.append(event)
            self.seen.append(event)
        return events

    async def synced(self, host: Host) -> None:
        """Once this returns, the subscription is in place (a SUB socket joins late): a probe
        connection's events arrive."""
        user = 999_999
        deadline = time.monotonic() + 10 * TIME_FACTOR
        while True:
            probe = await connect_peer(host, user)
            await probe.close()
            try:
                await self.take(lambda e: any(x["type"] == "offline" for x in e), timeout=1.0)
                return
            except AssertionError:
                assert time.monotonic() < deadline, "no event from the host"

    def close(self) -> None:
        self.sock.close()


def start(ucc_host: Any, *args: str, shards: int = 2) -> tuple[Host, Events]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    host: Host = ucc_host(shards=shards, args=("--events", endpoint, *args))
    return host, Events(endpoint)


def consecutive(events: list[Event]) -> bool:
    seqs = [e["seq"] for e in events]
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def fields(event: Event) -> Event:
    """An event less what the router adds and the time."""
    return {k: v for k, v in event.items() if k not in ("seq", "host", "ts")}


def test_a_connection_life_in_seq_order_with_its_fields(ucc_host):
    host, stream = start(ucc_host)

    async def scenario() -> None:
        await stream.synced(host)
        before = time.time()
        peer = await connect_peer(host, 7, [5, 6, 8])
        await peer.send({"type": "unsubscribe", "channel": 8})
        await peer.send({"type": "subscribe", "channel": 8})
        await peer.wait_for(lambda f: any(x.get("type") == "subscribed" for x in f))
        async with host.aio.client() as backend:
            assert (await backend.subscribe(7, 9))["ok"]
            assert (await backend.unsubscribe(7, 5))["ok"]
            second = await connect_peer(host, 7, [6])
            events = await stream.take(lambda e: len(e) >= 7)
            kinds = [e["type"] for e in events]
            assert kinds == [
                "online", "connect", "unsubscribe", "subscribe", "subscribe", "unsubscribe",
                "connect",
            ]  # fmt: skip
            assert consecutive(events)
            assert len({e["host"] for e in stream.seen}) == 1
            assert all(before - 1 <= e["ts"] <= time.time() + 1 for e in events)
            online, connect, *changes, connect2 = events
            conn, conn2 = connect["conn"], connect2["conn"]
            shard = host.shard_of(7)
            assert conn.startswith(f"{shard}.") and conn != conn2
            assert fields(online) == {"type": "online", "user": 7}
            remote = connect["remote"]
            assert remote.startswith("127.0.0.1:") and int(remote.split(":")[1]) > 0
            assert fields(connect) == {
                "type": "connect",
                "user": 7,
                "conn": conn,
                "shard": shard,
                "channels": [5, 6, 8],
                "remote": remote,
            }
            assert [fields(e) for e in changes] == [
                {"type": "unsubscribe", "user": 7, "conn": conn, "channel": 8},
                {"type": "subscribe", "user": 7, "conn": conn, "channel": 8},
                {"type": "subscribe", "user": 7, "conn": conn, "channel": 9},
                {"type": "unsubscribe", "user": 7, "conn": conn, "channel": 5},
            ]
            assert connect2["channels"] == [6]

            # the records match the events, and the clock
            records = await backend.get_user_connections(7)
            by_conn = {r["conn"]: r for r in records}
            assert set(by_conn) == {conn, conn2}
            record = by_conn[conn]
            assert (record["shard"], record["remote"]) == (shard, remote)
            assert sorted(record["channels"]) == [6, 8, 9]
            assert before - 1 <= record["connected_at"] <= record["last_activity"] <= time.time()
            assert "host" in record
            snapshot = await backend.snapshot()
            assert snapshot["seq"] >= connect2["seq"]
            mine = [c for c in snapshot["connections"] if c["user"] == 7]
            assert {c["conn"] for c in mine} == {conn, conn2}

            # the backend disconnects the user: 4001 each, then offline after the last
            assert (await backend.disconnect(7))["ok"]
            events = await stream.take(lambda e: len(e) >= 3)
            assert consecutive(events)
            assert [e["type"] for e in events] == ["disconnect", "disconnect", "offline"]
            assert {e["conn"] for e in events[:2]} == {conn, conn2}
            for event in events[:2]:
                assert (event["code"], event["reason"]) == (4001, "disconnected by the backend")
            assert fields(events[2]) == {"type": "offline", "user": 7}
            await peer.closed.wait()
            await second.closed.wait()

        # a client's own close: its code and reason
        peer = await connect_peer(host, 8, [1])
        await peer.ws.close(4100, "see you")
        events = await stream.take(lambda e: any(x["type"] == "offline" for x in e))
        assert [e["type"] for e in events] == ["online", "connect", "disconnect", "offline"]
        assert (events[2]["code"], events[2]["reason"]) == (4100, "see you")

    try:
        asyncio.run(scenario())
    finally:
        stream.close()


def test_closes_for_cause_and_limits_are_events(ucc_host):
    host, stream = start(
        ucc_host,
        "--max-connections-per-user", "1",
        "--max-channels-per-connection", "2",
        "--client-frame-burst", "20",
        "--client-frame-rate", "1",
        shards=1,
    )  # fmt: skip

    async def scenario() -> None:
        await stream.synced(host)
        peer = await connect_peer(host, 7, [1, 2])
        conn = (await stream.take(lambda e: len(e) >= 2))[1]["conn"]  # online, connect
        # a subscribe beyond the channel limit: refused, an event; the connection stays
        await peer.send({"type": "unsubscribe", "channel": 1})
        await peer.wait_for(lambda f: any(x.get("type") == "unsubscribed" for x in f))
        async with host.aio.client() as backend:
            assert (await backend.request("subscribe", user=7, channel=3))["ok"]
        await peer.send({"type": "subscribe", "channel": 1})  # a third: refused, limit
        await peer.wait_for(lambda f: any(x.get("code") == "limit" for x in f))
        events = await stream.take(lambda e: len(e) >= 3)
        assert consecutive(events)
        assert [fields(e) for e in events] == [
            {"type": "unsubscribe", "user": 7, "conn": conn, "channel": 1},
            {"type": "subscribe", "user": 7, "conn": conn, "channel": 3},
            {"type": "limit", "user": 7, "what": "channels_per_connection"},
        ]
        # one connection too many for the user: 429 at the shard, an event
        refused = socket.create_connection(host.address)
        try:
            refused.sendall(upgrade_request(f"/?token={host.token(7, [1])}"))
            assert b" 429 " in refused.recv(4096).split(b"\r\n")[0]
        finally:
            refused.close()
        (limit,) = await stream.take(lambda e: len(e) >= 1)
        assert fields(limit) == {"type": "limit", "user": 7, "what": "connections_per_user"}
        # over its inbound frame budget: limit, then its disconnect 1008, then offline
        for _ in range(40):
            # the server closes it (1008) part way: what is sent after that may fail to go
            with contextlib.suppress(ConnectionClosed, OSError):
                await peer.send({"type": "ping"})
        await asyncio.wait_for(peer.closed.wait(), 10)
        events = await stream.take(lambda e: any(x["type"] == "offline" for x in e))
        assert [e["type"] for e in events] == ["limit", "disconnect", "offline"]
        assert consecutive(events)
        assert fields(events[0]) == {"type": "limit", "user": 7, "what": "inbound_rate"}
        assert events[1]["code"] == 1008
        assert events[1]["reason"] == "frame rate limit exceeded"
        status = await host.aio.status()
        counters = status["shards"][0]
        assert counters.get("closed_rate_limit") == 1, counters
        assert counters.get("refused_per_user") == 1, counters

    try:
        asyncio.run(scenario())
    finally:
        stream.close()


def test_a_slow_consumer_is_an_event_then_its_disconnect_4000(ucc_host):
    host, stream = start(ucc_host, "--write-buffer-limit", "65536", "--send-buffer", "4096")

    async def scenario() -> None:
        await stream.synced(host)
        # a client that never reads what it is sent
        lazy = socket.create_connection(host.address)
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            lazy.sendall(upgrade_request(f"/?token={host.token(7, [5])}"))
            await stream.take(lambda e: any(x["type"] == "connect" for x in e))
            async with host.aio.client() as backend:
                payload = "x" * 16_000
                for _ in range(100):
                    await backend.broadcast_to_channel(5, payload)
                    if any(e["type"] == "slow_consumer" for e in stream.seen):
                        break
            events = await stream.take(lambda e: any(x["type"] == "offline" for x in e))
        finally:
            lazy.close()
        kinds = [e["type"] for e in events]
        assert kinds[-3:] == ["slow_consumer", "disconnect", "offline"], kinds
        slow, gone, _offline = events[-3:]
        assert fields(slow) == {"type": "slow_consumer", "user": 7, "conn": gone["conn"]}
        assert (gone["code"], gone["reason"]) == (4000, "slow consumer")

    try:
        asyncio.run(scenario())
    finally:
        stream.close()


def test_members_of_a_marked_channel_are_told_joins_and_leaves(ucc_host):
    host, stream = start(ucc_host)

    async def scenario() -> None:
        member = await connect_peer(host, 1, [5])
        async with host.aio.client() as backend:
            reply = await backend.set_channel(5, True)
            assert reply["ok"] and reply["join_leave"] is True
        first = await connect_peer(host, 2, [5])
        second = await connect_peer(host, 2, [5])  # the user is in already: no second join
        other = await connect_peer(host, 3, [6])  # another channel: nothing for 5's members
        # (a join and a leave within one tick cancel out: wait for the join to be told)
        await member.wait_for(lambda f: any(x.get("type") == "join" for x in f))
        await first.close()  # 2 is still in through `second`: no leave
        await second.send({"type": "unsubscribe", "channel": 5})  # now 2 has left
        await member.wait_for(lambda f: any(x.get("type") == "leave" for x in f))
        told = [f for f in member.frames if f.get("type") in ("join", "leave")]
        assert told == [
            {"type": "join", "channel": 5, "user": 2},
            {"type": "leave", "channel": 5, "user": 2},
        ]
        for peer in (member, second, other):
            await peer.close()

    try:
        asyncio.run(scenario())
    finally:
        stream.close()
