"""Presence by deltas across real hosts on a real Redis: a host that missed another's deltas
finds the gap and syncs from its snapshot, exactly; a shard killed on one host takes its users
out of the other host's presence within the presence tick; the counters say what happened."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import psutil
import redis

from shards.testing import Host, Peer, connect_peer, wait_until_async

SECRET = "p" * 64


def presence(host: Host) -> dict[str, Any]:
    stats: dict[str, Any] = host.client().request("router_stats")["presence"]
    return stats


def listener_ids(host: Host, client: redis.Redis) -> list[int]:
    """Redis's ids of ``host``'s pub/sub connections (matched by the ports its process holds)."""
    ports = {
        conn.laddr.port
        for conn in psutil.Process(host.proc.pid).net_connections("tcp")
        if conn.raddr and conn.raddr.port == client.connection_pool.connection_kwargs["port"]
    }
    return [
        int(entry["id"])
        for entry in client.client_list()
        if int(entry["addr"].rsplit(":", 1)[1]) in ports and int(entry.get("sub", 0)) > 0
    ]


def test_a_host_that_missed_deltas_finds_the_gap_and_syncs_exactly(redis_server, ucc_host):
    a = ucc_host(shards=1, args=("--redis", redis_server.url), secret=SECRET)
    b = ucc_host(shards=2, args=("--redis", redis_server.url), secret=SECRET)
    client = redis.Redis(port=redis_server.port)

    async def scenario() -> None:
        peers: list[Peer] = [await connect_peer(b, user, [7]) for user in range(1, 21)]
        await a.aio.wait_online(list(range(1, 21)))
        before, seq = presence(a), presence(b)["seq"]
        assert before["presence_hosts"] == 1 and before["presence_syncing"] == 0
        # a's listener loses its connection and cannot get another one for a while: b's
        # deltas published meanwhile never reach a
        (listener,) = listener_ids(a, client)
        limit = client.config_get("maxclients")["maxclients"]
        client.config_set("maxclients", len(client.client_list()) - 1)  # none once it is out
        try:
            client.client_kill_filter(_id=listener)
            await wait_until_async(lambda: not listener_ids(a, client), what="a's listener gone")
            for peer in peers[:10]:
                await peer.close()
            peers[10:] = [*peers[10:], *[await connect_peer(b, u, [8]) for u in (31, 32)]]
            # b has published its changes (its own seq moved on) while a could not listen
            await wait_until_async(lambda: presence(b)["seq"] > seq, what="for b's deltas")
            assert listener_ids(a, client) == []  # a still cannot listen
        finally:
            client.config_set("maxclients", limit)
        expected = [*range(11, 21), 31, 32]
        await a.aio.wait_online(expected, timeout=10)
        await a.aio.wait_online(list(range(11, 21)), 7, timeout=5)
        await a.aio.wait_online([31, 32], 8, timeout=5)
        after = presence(a)
        assert after["presence_gaps"] >= 1  # it noticed
        assert after["presence_syncs"] > before["presence_syncs"]  # and synced again
        await asyncio.gather(*(peer.close() for peer in peers[10:]))
        await a.aio.wait_online([], timeout=5)

    try:
        asyncio.run(scenario())
    finally:
        client.close()


def test_a_killed_shard_s_users_leave_the_other_host_s_presence_and_come_back(redis_url, ucc_host):
    a = ucc_host(shards=1, args=("--redis", redis_url), secret=SECRET)
    b = ucc_host(shards=2, args=("--redis", redis_url), secret=SECRET)
    users = list(range(1, 41))

    async def scenario() -> None:
        peers = [await connect_peer(b, user, [5]) for user in users]
        await a.aio.wait_online(users, 5)
        pid = b.kill_shard(0)
        survivors = [u for u in users if b.shard_of(u) != 0]
        assert 0 < len(survivors) < len(users)
        await a.aio.wait_online(survivors, timeout=5)
        await a.aio.wait_online(survivors, 5, timeout=5)
        b.wait_shard_replaced(0, pid)
        back = [await connect_peer(b, u, [5]) for u in users if b.shard_of(u) == 0]
        await a.aio.wait_online(users, 5, timeout=5)
        assert presence(a)["presence_syncing"] == 0
        await asyncio.gather(*(p.close() for p in peers + back), return_exceptions=True)

    asyncio.run(scenario())


def test_presence_counters_and_a_clean_leave(redis_server, ucc_host):
    a = ucc_host(shards=1, args=("--redis", redis_server.url), secret=SECRET)
    b = ucc_host(shards=1, args=("--redis", redis_server.url), secret=SECRET)

    async def scenario() -> None:
        peer = await connect_peer(b, 9, [3])
        await a.aio.wait_online([9])
        stats = presence(b)
        assert stats["users"] == 1 and stats["seq"] >= 1
        assert presence(a)["presence_users"] == 1
        await peer.close()
        b.stop(signal.SIGTERM)  # a clean leave: gone from a's replicas at once, no expiry
        await wait_until_async(lambda: presence(a)["presence_hosts"] == 0, timeout=3)
        assert presence(a)["presence_expired"] == 0

    asyncio.run(scenario())


def test_a_user_set_lost_in_redis_is_rewritten_and_user_messages_reach_the_users_again(
    redis_server, ucc_host
):
    a = ucc_host(shards=1, args=("--redis", redis_server.url), secret=SECRET)
    b = ucc_host(shards=2, args=("--redis", redis_server.url), secret=SECRET)
    client = redis.Redis(port=redis_server.port)
    users = list(range(1, 11))

    async def scenario() -> None:
        peers = [await connect_peer(b, user, [5]) for user in users]
        await a.aio.wait_online(users)
        # the sets that route user messages vanish (evicted, expired, deleted by hand)
        keys = client.keys("{ucc:default}:h:*:users")
        assert len(keys) == 1  # b's: a has no user
        client.delete(*keys)
        # b notices at its next presence tick (the set holds fewer users than it has) and
        # rewrites it from a snapshot at the one after
        await wait_until_async(lambda: client.scard(keys[0]) == len(users), timeout=5)
        drift = b.client().request("router_stats")["redis"]["presence_drift"]
        assert drift >= 1
        reply = await a.aio.client().broadcast_to_user(5, "found")
        assert reply["cluster"] is True
        await peers[4].wait_for(lambda f: any(m.get("data") == "found" for m in f))
        await asyncio.gather(*(peer.close() for peer in peers))

    try:
        asyncio.run(scenario())
    finally:
        client.close()
