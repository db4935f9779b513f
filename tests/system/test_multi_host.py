"""Many hosts linked by one Redis: cross-host broadcasts, cluster presence, Redis outages."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis

from actors.cluster import Layout
from shards.testing import TIME_FACTOR, Cluster, Peer, RedisServer, connect_peer, wait_until


def hosts(ucc_cluster, server: RedisServer, count: int, **kwargs) -> list[Cluster]:
    secret = "s" * 64
    return [
        ucc_cluster(shards=2, args=("--redis", server.url), secret=secret, **kwargs)
        for _ in range(count)
    ]


def wait_presence(client, users: list[int], timeout: float = 10.0) -> None:
    wait_until(lambda: client.get_online_users() == users, timeout, what=f"presence {users}")


async def settle(clusters: list[Cluster], peers: list[Peer]) -> None:
    """Every host sends a marker to every peer's user. Order holds per publisher, so once each
    peer has every host's marker, all earlier broadcasts have reached it (or never will)."""
    users = sorted({peer.user for peer in peers})
    for number, host in enumerate(clusters):
        host.client().broadcast_to_users(users, f"marker {number}")
    for peer in peers:
        for number in range(len(clusters)):
            await peer.wait_for(lambda f, n=number: any(x.get("data") == f"marker {n}" for x in f))
    for peer in peers:
        peer.frames[:] = [f for f in peer.frames if not str(f.get("data")).startswith("marker")]


def test_broadcasts_reach_exactly_the_right_connections_on_every_host(ucc_cluster, redis_server):
    a, b, c = hosts(ucc_cluster, redis_server, 3)
    # user u is on host u % 3; channel 1: every user; channel 2: odd users; channel 3: nobody
    layout = [(a, b, c)[u % 3] for u in range(7)]

    async def scenario() -> None:
        peers: list[Peer] = []
        for user in range(1, 7):
            channels = [1, 2] if user % 2 else [1]
            peers.append(await connect_peer(layout[user], user, channels))
        peers.append(await connect_peer(layout[4], 4, [1]))  # a second device of user 4
        for host in (a, b, c):
            wait_presence(host.client(), list(range(1, 7)))
        client = b.client()
        reply = client.broadcast_to_channel(1, "all")
        assert reply["cluster"] is True
        client.broadcast_to_channel(2, "odd")
        client.broadcast_to_channel(3, "nobody")
        a.client().broadcast_to_user(4, "four")
        c.client().broadcast_to_users([1, 5, 99], "list")
        await settle([a, b, c], peers)
        for peer in peers:
            got = [m["data"] for m in peer.messages]
            want = ["all"] + (["odd"] if peer.user % 2 else [])
            want += ["four"] if peer.user == 4 else []
            want += ["list"] if peer.user in (1, 5) else []
            assert sorted(got) == sorted(want), (peer.user, got)
        for peer in peers:
            await peer.close()

    asyncio.run(scenario())
