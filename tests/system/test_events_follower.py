"""The event stream end to end (issue 12), from a consumer's side: ``EventFollower`` and the
CLI (``ucc events``, ``who``, ``snapshot``, ``channel``) against a real ``ucc serve --events``.

- connect / subscribe / unsubscribe / disconnect arrive in seq order with their fields, and the
  follower's state is the snapshot's;
- a subscriber with a tiny receive high-water mark that does not read during a churn burst sees
  a gap, resyncs, and ends with exactly the state a fresh snapshot gives;
- a SIGKILLed shard: ``shard_down``, a ``disconnect`` (1006) and ``offline`` for each of its
  connections and users, ``shard_up``; the follower's state loses them;
- the CLI prints the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shards.events import EventFollower, view_of
from shards.testing import Host, Peer, connect_peer
from shards.testing.waiting import TIME_FACTOR


@pytest.fixture
def events_endpoint() -> Iterator[str]:
    """An ipc endpoint in a short private directory (ipc paths are at most ~100 bytes; a unix
    socket's small buffers also make a lagging subscriber see its gap sooner)."""
    directory = tempfile.mkdtemp(prefix="ucc-ev-")
    try:
        yield f"ipc://{directory}/events"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start(ucc_host: Any, endpoint: str, shards: int = 2, *args: str) -> Host:
    host: Host = ucc_host(shards=shards, args=("--events", endpoint, *args))
    return host


def take(follower: EventFollower, until: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Items from ``follower`` until ``until(items)`` holds; AssertionError at the deadline."""
    items: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout * TIME_FACTOR
    while not until(items):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; last items: {str(items[-5:])[:800]}")
        item = follower.poll(min(left, 0.5))
        if item is not None:
            items.append(item)
    return items


def drain(follower: EventFollower, quiet: float = 0.5) -> list[dict[str, Any]]:
    """Every item until none came for ``quiet`` seconds."""
    items = []
    while (item := follower.poll(quiet * TIME_FACTOR)) is not None:
        items.append(item)
    return items


def of_type(items: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [item for item in items if item.get("type") in kinds]


def assert_in_sync(follower: EventFollower, host: Host) -> None:
    """Quiet now: the follower's state is exactly a fresh snapshot's, at the same seq."""
    drain(follower)
    with host.client() as client:
        snapshot = client.snapshot()
    drain(follower, 0.2)
    assert follower.state.seq == snapshot["seq"]
    assert follower.state.host == snapshot["host"]
    assert follower.state.view() == view_of(snapshot["connections"])


def test_lifecycle_events_arrive_in_order_with_their_fields(ucc_host, events_endpoint):
    host = start(ucc_host, events_endpoint)
    with EventFollower(events_endpoint, host.command, timeout=5 * TIME_FACTOR) as follower:
        first = take(follower, lambda items: len(items) >= 1)[0]
        assert first["type"] == "resync"
        assert first["connections"] == []  # (seq: the shards' shard_up at start, so far)
        host_id = first["host"]

        async def script() -> None:
            peer = await connect_peer(host, 7, [5, 6])
            await peer.send({"type": "unsubscribe", "channel": 6})
            await peer.wait_for(lambda f: any(x.get("type") == "unsubscribed" for x in f))
            await peer.close()

        asyncio.run(script())
        items = take(follower, lambda items: len(of_type(items, "offline")) >= 1)
        kinds = [item["type"] for item in items]
        assert kinds == ["online", "connect", "unsubscribe", "disconnect", "offline"]
        seqs = [item["seq"] for item in items]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert all(item["host"] == host_id for item in items)
        assert all(isinstance(item["ts"], float) for item in items)
        assert abs(items[0]["ts"] - time.time()) < 60
        online, connect, unsubscribe, disconnect, offline = items
        assert online["user"] == offline["user"] == 7
        conn = connect["conn"]
        assert isinstance(conn, str) and conn.startswith(f"{host.shard_of(7)}.")
        assert connect["user"] == 7
        assert connect["shard"] == host.shard_of(7)
        assert sorted(connect["channels"]) == [5, 6]
        assert connect["remote"].startswith("127.0.0.1:")
        assert (unsubscribe["conn"], unsubscribe["channel"], unsubscribe["user"]) == (conn, 6, 7)
        assert (disconnect["conn"], disconnect["user"]) == (conn, 7)
        assert isinstance(disconnect["code"], int)
        assert isinstance(disconnect["reason"], str)
        assert follower.connections == {}
        assert_in_sync(follower, host)


def test_the_state_follows_connections_and_matches_the_snapshot(ucc_host, events_endpoint):
    host = start(ucc_host, events_endpoint, 3)

    async def scenario() -> None:
        follower = EventFollower(events_endpoint, host.command, timeout=5 * TIME_FACTOR)
        try:
            await asyncio.to_thread(take, follower, lambda items: len(items) >= 1)
            peers: list[Peer] = []
            for user in range(1, 21):
                peers.append(await connect_peer(host, user, [user % 4 + 1, 9]))
            peers.append(await connect_peer(host, 3, [1]))  # a second device
            for peer in peers[:5]:
                await peer.send({"type": "unsubscribe", "channel": 9})
            for peer in peers[15:20]:
                await peer.close()
            with host.client() as client:
                reply = client.subscribe(2, 9)
                assert reply["ok"]
                devices = client.get_user_connections(3)
            assert len(devices) == 2
            assert {d["host"] for d in devices} == {follower.state.host}
            assert all(d["connected_at"] <= d["last_activity"] + 1 for d in devices)
            await asyncio.to_thread(assert_in_sync, follower, host)
            assert follower.state.users == {p.user for p in peers[:15]}
            assert sum(r["user"] == 3 for r in follower.connections.values()) == 2
            for peer in [*peers[:15], peers[20]]:
                await peer.close()
            await asyncio.to_thread(assert_in_sync, follower, host)
            assert follower.connections == {}
            assert follower.state.stats["resyncs"] == 1  # nothing was missed
        finally:
            follower.close()

    asyncio.run(scenario())


def test_a_lagging_subscriber_sees_a_gap_and_resyncs_to_the_exact_state(ucc_host, events_endpoint):
    host = start(
        ucc_host,
        events_endpoint,
        2,
        "--client-frame-rate",
        "1000000",
        "--client-frame-burst",
        "1000000",
    )
    churn = list(range(1, 41))

    async def scenario() -> None:
        # a follower that does not read while the burst goes on: a receive HWM of 1
        follower = EventFollower(events_endpoint, host.command, rcvhwm=1, timeout=5 * TIME_FACTOR)
        try:
            await asyncio.to_thread(take, follower, lambda items: len(items) >= 1)
            steady = [await connect_peer(host, 1000 + i, [i % 3 + 1]) for i in range(5)]
            churner = await connect_peer(host, 999, churn)
            for _ in range(60):  # 2 x 40 x 60 = 4,800 subscribe/unsubscribe events
                for channel in churn:
                    await churner.send({"type": "unsubscribe", "channel": channel})
                for channel in churn:
                    await churner.send({"type": "subscribe", "channel": channel})
            await churner.send({"type": "unsubscribe", "channel": 7})
            # every change answered: the shard's cache and the router's index have it all
            await churner.wait_for(
                lambda f: sum(x.get("type") == "unsubscribed" for x in f) == 60 * 40 + 1, 60
            )
            await steady[0].close()
            with host.client() as client:
                published = client.snapshot()["seq"]
            assert published > 4_800  # far more than the ~2,000 a lagging subscriber can hold
            items = await asyncio.to_thread(drain, follower, 1.0)
            resyncs = of_type(items, "resync")
            assert resyncs, "no gap was seen"
            assert follower.state.stats["gaps"] >= 1
            seqs = [item["seq"] for item in items]
            assert seqs == sorted(seqs)
            assert len(items) < published  # events were lost on the way, and made up for
            await asyncio.to_thread(assert_in_sync, follower, host)
            mine = [c for c in follower.connections.values() if c["user"] == 999]
            assert len(mine) == 1
            assert mine[0]["channels"] == [c for c in churn if c != 7]
            assert 1000 not in follower.state.users
            for peer in [churner, *steady[1:]]:
                await peer.close()
        finally:
            follower.close()

    asyncio.run(scenario())


def test_a_killed_shard_is_shard_down_disconnects_offlines_and_shard_up(ucc_host, events_endpoint):
    host = start(ucc_host, events_endpoint, 2)
    users = [u for u in range(1, 40) if host.shard_of(u) == 1][:3]
    others = [u for u in range(1, 40) if host.shard_of(u) == 0][:2]

    async def scenario() -> None:
        follower = EventFollower(events_endpoint, host.command, timeout=5 * TIME_FACTOR)
        try:
            await asyncio.to_thread(take, follower, lambda items: len(items) >= 1)
            peers = [await connect_peer(host, u, [1]) for u in users + others]
            await asyncio.to_thread(
                take, follower, lambda items: len(of_type(items, "connect")) >= len(peers)
            )
            doomed = {c for c, r in follower.connections.items() if r["user"] in users}
            assert len(doomed) == len(users)
            old = await host.aio.kill_shard(1)
            items = await asyncio.to_thread(
                take, follower, lambda items: len(of_type(items, "shard_up")) >= 1, 20.0
            )
            await host.aio.wait_shard_replaced(1, old)
            down = of_type(items, "shard_down")
            assert len(down) == 1 and down[0]["shard"] == 1
            assert {"epoch", "cause"} <= set(down[0])
            gone = of_type(items, "disconnect")
            assert {e["conn"] for e in gone} == doomed
            assert all(e["code"] == 1006 for e in gone)
            assert {e["user"] for e in of_type(items, "offline")} == set(users)
            up = of_type(items, "shard_up")[0]
            assert up["shard"] == 1
            assert items.index(down[0]) < items.index(up)
            assert not doomed & set(follower.connections)
            assert {r["user"] for r in follower.connections.values()} == set(others)
            await asyncio.to_thread(assert_in_sync, follower, host)
            for peer in peers:
                await peer.close()
        finally:
            follower.close()

    asyncio.run(scenario())


def ucc(*argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCC_")}
    return subprocess.run(
        [sys.executable, "-m", "shards.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout * TIME_FACTOR,
        env=env,
        check=False,
    )


def test_the_cli_prints_events_who_snapshot_and_sets_channels(ucc_host, events_endpoint):
    host = start(ucc_host, events_endpoint, 2)
    command = ("--command", host.command)

    async def scenario() -> None:
        listener = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shards.cli",
            "events",
            "--follow",
            "--endpoint",
            events_endpoint,
            *command,
            "--count",
            "4",
            "--duration",
            str(30 * TIME_FACTOR),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert listener.stdout is not None
        first = json.loads(await listener.stdout.readline())
        assert first["type"] == "resync"
        peers = [await connect_peer(host, 5, [1, 2]), await connect_peer(host, 5, [2])]
        out, err = await asyncio.wait_for(listener.communicate(), 30 * TIME_FACTOR)
        assert listener.returncode == 0, err
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert [line["type"] for line in lines] == ["online", "connect", "connect"]

        who = await asyncio.to_thread(ucc, "who", "5", *command)
        assert who.returncode == 0, who.stderr
        table = who.stdout.splitlines()
        assert table[0].split()[:3] == ["CONN", "HOST", "SHARD"]
        assert len(table) == 3
        assert {row.split()[0] for row in table[1:]} == {line["conn"] for line in lines[1:]}
        who_json = await asyncio.to_thread(ucc, "who", "5", "--json", *command)
        reply = json.loads(who_json.stdout)
        assert len(reply["connections"]) == 2
        assert sorted(sorted(c["channels"]) for c in reply["connections"]) == [[1, 2], [2]]

        snapshot = await asyncio.to_thread(ucc, "snapshot", *command)
        assert snapshot.returncode == 0, snapshot.stderr
        state = json.loads(snapshot.stdout)
        assert state["seq"] >= lines[-1]["seq"]
        assert view_of(state["connections"]) == {
            line["conn"]: (5, tuple(sorted(line["channels"]))) for line in lines[1:]
        }

        marked = await asyncio.to_thread(ucc, "channel", "2", "--join-leave", "on", *command)
        assert marked.returncode == 0, marked.stderr
        assert json.loads(marked.stdout)["join_leave"] is True
        member = peers[1]
        joiner = await connect_peer(host, 6, [2])
        await member.wait_for(lambda f: {"type": "join", "channel": 2, "user": 6} in f, 10)
        await joiner.close()
        await member.wait_for(lambda f: {"type": "leave", "channel": 2, "user": 6} in f, 10)
        unmarked = await asyncio.to_thread(ucc, "channel", "2", "--join-leave", "off", *command)
        assert json.loads(unmarked.stdout)["join_leave"] is False
        for peer in peers:
            await peer.close()

    asyncio.run(scenario())
