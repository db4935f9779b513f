"""Many hosts linked by a 3-node Redis Cluster (sharded pub/sub): the broadcast, presence,
clean-leave and outage scenarios of test_multi_host.py, and proof that the topics are shard
channels (SSUBSCRIBE, never SUBSCRIBE)."""

from __future__ import annotations

import asyncio
import signal
import time

from test_multi_host import (
    broadcast_everywhere_and_check,
    connect_three_hosts,
    hosts,
    outage_keeps_local_delivery_and_says_so,
    stop_one_and_check_it_left_at_once,
    wait_presence,
)

from actors.wire.cluster import Layout
from shards.testing import RedisClusterServer, connect_peer, wait_until_async

LAYOUT = Layout("default")


def test_broadcasts_reach_exactly_the_right_connections_on_every_host(
    redis_cluster_server: RedisClusterServer, ucc_host
):
    server = redis_cluster_server
    assert server.url.startswith("redis+cluster://")
    a, b, c = hosts(ucc_host, server.url, 3)

    def counts(channel: int) -> tuple[int, int]:
        """How many connections listen to ``channel``: (with SSUBSCRIBE, with SUBSCRIBE)."""
        topic = LAYOUT.channel_topic(channel)
        return server.subscribers(topic), server.subscribers(topic, sharded=False)

    async def listeners(channel: int) -> tuple[int, int]:
        return await asyncio.to_thread(counts, channel)  # redis-py's blocking cluster client

    async def listening(channel: int, wanted: tuple[int, int], what: str) -> None:
        async def counted() -> bool:
            return await listeners(channel) == wanted

        await wait_until_async(counted, 5, what=what)

    async def scenario() -> None:
        peers = await connect_three_hosts(a, b, c)
        # every host listens to channels 1 and 2 with SSUBSCRIBE (odd users 1, 3, 5 are on
        # hosts b, a, c), nobody with SUBSCRIBE, and nobody to channel 3
        for channel in (1, 2):
            await listening(channel, (3, 0), f"for channel {channel}")
        assert await listeners(3) == (0, 0)
        await broadcast_everywhere_and_check(a, b, c, peers)
        for peer in peers:
            await peer.close()
        await listening(1, (0, 0), "for every host to stop listening")

    asyncio.run(scenario())


def test_presence_is_cluster_wide_and_a_killed_host_fades_out(
    redis_cluster_server: RedisClusterServer, ucc_host
):
    a, b, c = hosts(ucc_host, redis_cluster_server.url, 3)

    async def scenario() -> None:
        on_a = [await connect_peer(a, u, [7]) for u in (1, 2, 3)]
        on_b = [await connect_peer(b, u, [7, 8]) for u in (4, 5)]
        on_c = [await connect_peer(c, 6, [8])]
        for host in (a, b, c):
            await wait_presence(host, [1, 2, 3, 4, 5, 6])
            client = host.aio.client()
            assert await client.get_online_users_in_channel(7) == [1, 2, 3, 4, 5]
            assert await client.get_online_users_in_channel(8) == [4, 5, 6]
            assert await client.is_user_online(6) is True
            online = await client.are_users_online([1, 5, 6, 9])
            assert online == {1: True, 5: True, 6: True, 9: False}
        await on_a[0].close()
        await wait_presence(c, [2, 3, 4, 5, 6])

        a.signal(signal.SIGKILL)  # power loss: no goodbye
        killed = time.monotonic()
        await wait_presence(b, [4, 5, 6], timeout=10)
        print(f"\npresence expiry after a host kill: {time.monotonic() - killed:.2f} s")
        await wait_presence(c, [4, 5, 6], timeout=1)
        assert await c.aio.client().get_online_users_in_channel(7) == [4, 5]
        assert await b.aio.client().is_user_online(2) is False
        assert not on_b[0].closed.is_set()  # the other hosts' clients are untouched by it

        # the host comes back (a new process): no ghosts of its old users
        (again,) = await asyncio.to_thread(hosts, ucc_host, redis_cluster_server.url, 1)
        back = await connect_peer(again, 9, [7])
        await wait_presence(b, [4, 5, 6, 9])
        await wait_presence(c, [4, 5, 6, 9])  # each host hears the new one on its own time
        assert await c.aio.client().get_online_users_in_channel(7) == [4, 5, 9]
        for peer in [back, *on_a, *on_b, *on_c]:
            await peer.close()

    asyncio.run(scenario())


def test_clean_shutdown_removes_a_host_at_once(redis_cluster_server: RedisClusterServer, ucc_host):
    a, b = hosts(ucc_host, redis_cluster_server.url, 2)
    asyncio.run(stop_one_and_check_it_left_at_once(a, b))


def test_losing_the_node_that_owns_the_slot_keeps_local_delivery_and_says_so(
    redis_cluster_server: RedisClusterServer, ucc_host
):
    server = redis_cluster_server
    a, b = hosts(ucc_host, server.url, 2)
    owner = server.node_of(LAYOUT.hosts)  # every key and topic of the cluster lives there

    def lose() -> None:
        server.stop_node(owner)

    async def restore() -> None:
        await asyncio.to_thread(server.start_node, owner)
        # a primary marked as failed rejoins after 2 node timeouts (4 s)
        await asyncio.to_thread(server.wait_ok, 15)

    asyncio.run(outage_keeps_local_delivery_and_says_so(a, b, lose, restore))
