"""One host end to end: routing by user, channel/user broadcasts, presence, backend commands."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter

import psutil
from websockets.asyncio.client import connect

from shards.testing import Host, Peer, connect_peer


def test_ready_line_and_status_list_every_shard(ucc_host):
    host: Host = ucc_host(shards=3)
    assert host.ready_line.endswith(" shards=3")
    assert host.url.startswith("ws://127.0.0.1:")
    rows = host.status()["shards"]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert all(row["state"] == "up" for row in rows)
    children = {p.pid for p in psutil.Process(host.proc.pid).children(recursive=True)}
    assert {row["pid"] for row in rows} <= children


def test_broadcasts_and_presence_match_the_truth(ucc_host):
    host: Host = ucc_host(shards=3)
    rng = random.Random(7)
    users = list(range(1, 151))
    devices = {user: 2 if user % 5 == 0 else 1 for user in users}  # 180 connections

    async def scenario() -> None:
        client = host.aio.client()
        peers: list[Peer] = []
        channels_of: dict[int, set[int]] = {}
        for user in users:
            channels = rng.sample(range(1, 21), rng.randint(0, 4))
            channels_of[user] = set(channels)
            for _ in range(devices[user]):
                peers.append(await connect_peer(host, user, channels))

        # each user's connections sit on stable_hash(user) mod N
        expected = Counter(host.shard_of(p.user) for p in peers)
        rows = (await host.aio.status())["shards"]
        assert {row["index"]: row["connections"] for row in rows} == {
            i: expected.get(i, 0) for i in range(3)
        }

        # presence
        assert await client.get_online_users() == users
        for channel in range(1, 22):
            members = sorted(u for u in users if channel in channels_of[u])
            assert await client.get_online_users_in_channel(channel) == members
        assert await client.is_user_online(5) is True
        assert await client.is_user_online(999) is False
        assert await client.are_users_online([1, 2, 999]) == {1: True, 2: True, 999: False}

        # a channel broadcast reaches exactly its online members, once each
        for channel in range(1, 21):
            reply = await client.broadcast_to_channel(channel, {"n": channel})
            assert reply["ok"] is True
        assert (await client.broadcast_to_channel(21, "nobody"))["shards"] == 0
        # a direct marker follows the same router → shard → connection path, in order: once a
        # peer has it, every channel message meant for it has arrived (and no extra one)
        await client.broadcast_to_users(users, "marker")
        for peer in peers:
            await peer.wait_for(lambda f: any(x.get("data") == "marker" for x in f))
        for peer in peers:
            assert peer.messages[-1] == {"type": "message", "data": "marker"}
            got = sorted(m["channel"] for m in peer.messages[:-1])
            assert got == sorted(channels_of[peer.user]), peer.user
            assert all(m["data"] == {"n": m["channel"]} for m in peer.messages[:-1])

        # a user broadcast reaches every device of that user, without a channel key
        for peer in peers:
            peer.frames.clear()
        await client.broadcast_to_user(10, {"to": 10})
        await client.broadcast_to_users([15, 20, 999], [1, "two", None])
        targets = [p for p in peers if p.user in (10, 15, 20)]
        assert len(targets) == 6
        for peer in targets:
            await peer.wait_for(lambda f: len(f) >= 1)
        for peer in targets:
            (message,) = peer.messages
            assert "channel" not in message
            assert message["data"] == ({"to": 10} if peer.user == 10 else [1, "two", None])

        # disconnects show up in presence
        leaving = [p for p in peers if p.user <= 30]
        for peer in leaving:
            await peer.close()
        remaining = [u for u in users if u > 30]
        await host.aio.wait_online(remaining)
        assert await client.is_user_online(1) is False
        for channel in range(1, 21):
            members = sorted(u for u in remaining if channel in channels_of[u])
            assert await client.get_online_users_in_channel(channel) == members
        for peer in peers:
            if peer not in leaving:
                await peer.close()

    asyncio.run(scenario())


def test_backend_subscribe_unsubscribe_and_disconnect(ucc_host):
    host: Host = ucc_host(shards=2)

    async def scenario() -> None:
        client = host.aio.client()
        phone = await connect_peer(host, 42, [1])
        laptop = await connect_peer(host, 42)
        other = await connect_peer(host, 43, [1])
        assert (await client.subscribe(42, 9))["connections"] == 2  # not limited by token claims
        assert await client.get_online_users_in_channel(9) == [42]
        await client.broadcast_to_channel(9, "nine")
        for peer in (phone, laptop):
            await peer.wait_for(lambda f: any(x.get("data") == "nine" for x in f))
        assert (await client.unsubscribe(42, 9))["connections"] == 2
        assert await client.get_online_users_in_channel(9) == []
        assert (await client.subscribe(7777, 9))["connections"] == 0  # offline: not an error

        assert (await client.disconnect(42))["connections"] == 2
        for peer in (phone, laptop):
            await asyncio.wait_for(peer.closed.wait(), 5)
            assert peer.ws.close_code == 4001
        await host.aio.wait_online([43])
        await client.broadcast_to_channel(1, "still here")
        await other.wait_for(lambda f: any(x.get("data") == "still here" for x in f))
        for peer in (phone, laptop, other):
            await peer.close()

    asyncio.run(scenario())


def test_sigterm_drains_clients_with_1001_and_exits_zero(ucc_host):
    host: Host = ucc_host(shards=2, args=("--drain-window", "0.5"))

    async def scenario() -> list[Peer]:
        peers = [await connect_peer(host, user, [1]) for user in range(1, 41)]
        pids = [row["pid"] for row in (await host.aio.status())["shards"]]
        assert await host.aio.stop(signal.SIGTERM, 10.0) == 0
        for peer in peers:
            await asyncio.wait_for(peer.closed.wait(), 5)
            await peer.close()
        assert not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
        )
        return peers

    peers = asyncio.run(scenario())
    assert {peer.ws.close_code for peer in peers} == {1001}
    for peer in peers:  # told to reconnect before the close
        assert peer.frames[-1]["type"] == "drain"


def test_cli_token_broadcast_and_online(ucc_host):
    host: Host = ucc_host(shards=2)
    env = {**os.environ, "UCC_SECRET": host.secret, "UCC_COMMAND": host.command}

    async def ucc(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shards.cli", *args,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode().strip()

    token = asyncio.run(ucc("token", "77", "--channels", "3,4"))

    async def scenario() -> None:
        async with connect(f"{host.url}/?token={token}") as ws:
            hello = json.loads(await ws.recv())
            assert hello["user"] == 77
            assert hello["channels"] == [3, 4]
            assert json.loads(await ucc("online", "--channel", "3")) == [77]
            await ucc("broadcast", "--channel", "4", '{"a": [1]}')
            message = json.loads(await ws.recv())
            assert message == {
                "type": "message",
                "channel": 4,
                "offset": 1,
                "epoch": message["epoch"],
                "data": {"a": [1]},
            }

    asyncio.run(scenario())


def test_a_connection_does_not_outlive_its_token(ucc_host):
    host: Host = ucc_host(shards=2, args=("--heartbeat", "0.3"))

    async def scenario() -> None:
        ws = await connect(f"{host.url}/?token={host.token(5, ttl=2)}")
        assert json.loads(await ws.recv())["type"] == "hello"
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 4003
        await ws.close()

    asyncio.run(scenario())


def test_a_taken_endpoint_is_a_clear_error(ucc_host):
    host: Host = ucc_host(shards=1)
    env = {**os.environ, "UCC_SECRET": host.secret}
    done = subprocess.run(
        [sys.executable, "-m", "shards.cli", "serve", "--shards", "1", "--port", "0",
         "--command", host.command],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"command endpoint {host.command}" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # no ready line
