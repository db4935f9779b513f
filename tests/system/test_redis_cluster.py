"""Many hosts linked by a 3-node Redis Cluster (sharded pub/sub): the broadcast, presence,
clean-leave and outage scenarios of test_multi_host.py, and proof that the topics are shard
channels (SSUBSCRIBE, never SUBSCRIBE)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from test_multi_host import (
    broadcast_everywhere_and_check,
    connect_three_hosts,
    hosts,
    stop_one_and_check_it_left_at_once,
    wait_presence,
)

from actors.wire.cluster import Layout
from shards.testing import RedisClusterServer, connect_peer, wait_until

LAYOUT = Layout("default")


def test_broadcasts_reach_exactly_the_right_connections_on_every_host(
    redis_cluster_server: RedisClusterServer, ucc_cluster
):
    server = redis_cluster_server
    assert server.url.startswith("redis+cluster://")
    a, b, c = hosts(ucc_cluster, server, 3)

    def listeners(channel: int) -> tuple[int, int]:
        topic = LAYOUT.channel_topic(channel)
        return server.subscribers(topic), server.subscribers(topic, sharded=False)

    async def scenario() -> None:
        peers = await connect_three_hosts(a, b, c)
        # every host listens to channels 1 and 2 with SSUBSCRIBE (odd users 1, 3, 5 are on
        # hosts b, a, c), nobody with SUBSCRIBE, and nobody to channel 3
        for channel in (1, 2):
            wait_until(lambda ch=channel: listeners(ch) == (3, 0), 5, what=f"channel {channel}")
        assert listeners(3) == (0, 0)
        await broadcast_everywhere_and_check(a, b, c, peers)
        for peer in peers:
            await peer.close()
        wait_until(lambda: listeners(1) == (0, 0), 5, what="for every host to stop listening")

    asyncio.run(scenario())


def test_presence_is_cluster_wide_and_a_killed_host_fades_out(
    redis_cluster_server: RedisClusterServer, ucc_cluster
):
    a, b, c = hosts(ucc_cluster, redis_cluster_server, 3)

    async def scenario() -> None:
        on_a = [await connect_peer(a, u, [7]) for u in (1, 2, 3)]
        on_b = [await connect_peer(b, u, [7, 8]) for u in (4, 5)]
        on_c = [await connect_peer(c, 6, [8])]
        for host in (a, b, c):
            client = host.client()
            wait_presence(client, [1, 2, 3, 4, 5, 6])
            assert client.get_online_users_in_channel(7) == [1, 2, 3, 4, 5]
            assert client.get_online_users_in_channel(8) == [4, 5, 6]
            assert client.is_user_online(6) is True
            assert client.are_users_online([1, 5, 6, 9]) == {1: True, 5: True, 6: True, 9: False}
        await on_a[0].close()
        wait_presence(c.client(), [2, 3, 4, 5, 6])

        os.kill(a.proc.pid, signal.SIGKILL)  # power loss: no goodbye
        killed = time.monotonic()
        wait_presence(b.client(), [4, 5, 6], timeout=10)
        print(f"\npresence expiry after a host kill: {time.monotonic() - killed:.2f} s")
        wait_presence(c.client(), [4, 5, 6], timeout=1)
        assert c.client().get_online_users_in_channel(7) == [4, 5]
        assert b.client().is_user_online(2) is False
        assert not on_b[0].closed.is_set()  # the other hosts' clients are untouched by it

        # the host comes back (a new process): no ghosts of its old users
        again = hosts(ucc_cluster, redis_cluster_server, 1)[0]
        back = await connect_peer(again, 9, [7])
        wait_presence(b.client(), [4, 5, 6, 9])
        assert c.client().get_online_users_in_channel(7) == [4, 5, 9]
        for peer in [back, *on_b, *on_c]:
            await peer.close()

    asyncio.run(scenario())


def test_clean_shutdown_removes_a_host_at_once(
    redis_cluster_server: RedisClusterServer, ucc_cluster
):
    a, b = hosts(ucc_cluster, redis_cluster_server, 2)
    asyncio.run(stop_one_and_check_it_left_at_once(a, b))


def test_losing_the_node_that_owns_the_slot_keeps_local_delivery_and_says_so(
    redis_cluster_server: RedisClusterServer, ucc_cluster
):
    server = redis_cluster_server
    a, b = hosts(ucc_cluster, server, 2)
    owner = server.node_of(LAYOUT.hosts)  # every key and topic of the cluster lives there

    async def scenario() -> None:
        local = await connect_peer(a, 1, [5])
        remote = await connect_peer(b, 2, [5])
        wait_presence(a.client(), [1, 2])
        client = a.client()
        server.stop_node(owner)
        replies = [client.broadcast_to_channel(5, {"n": n}) for n in range(20)]
        await local.wait_for(lambda f: sum(x["type"] == "message" for x in f) == 20)
        assert all(r["ok"] and r["shards"] == 1 for r in replies)
        assert [r["cluster"] for r in replies].count(False) >= 19  # the first may have raced
        online = client.request("get_online_users")
        assert (online["cluster"], online["users"]) == (False, [1])

        server.start_node(owner)
        server.wait_ok(15)  # a primary marked as failed rejoins after 2 node timeouts (4 s)
        back = time.monotonic()
        wait_until(lambda: client.broadcast_to_channel(5, "probe")["cluster"], 5, what="for Redis")
        await remote.wait_for(lambda f: f[-1].get("data") == "probe", 5)
        print(f"\ncross-host delivery back {time.monotonic() - back:.2f} s after the cluster")
        wait_presence(client, [1, 2], timeout=5)
        await local.close()
        await remote.close()

    asyncio.run(scenario())
