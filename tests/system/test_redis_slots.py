"""Channels spread over a Redis Cluster's slots: each channel's topic and history live in a
slot of their own, so a 3-primary cluster carries channels on every primary, with cross-host
delivery exact. And a channel's slot moved to another primary while the hosts run (CLUSTER
SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE, as an operator's resharding does) loses no
subscription: cross-host broadcasts keep arriving, and presence still answers."""

from __future__ import annotations

import asyncio
import time

import redis

from actors.wire.cluster import Layout
from shards.client import UccError
from shards.testing import Host, Peer, RedisClusterServer, connect_peer, wait_until_async

SECRET = "k" * 64
CHANNEL = 5


def node_ids(server: RedisClusterServer) -> dict[int, str]:
    """Each node's port -> its cluster node id."""
    ids = {}
    for port in server.ports:
        with redis.Redis(port=port) as node:
            ids[port] = node.execute_command("CLUSTER", "MYID").decode()
    return ids


def owner_of(server: RedisClusterServer, slot: int) -> int:
    """The port of the primary that serves ``slot``."""
    with redis.Redis(port=server.ports[0]) as node:
        for start, end, primary, *_replicas in node.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    raise AssertionError(f"no node serves slot {slot}")


def shard_subscribers(port: int, topic: str) -> int:
    """How many connections listen to ``topic`` (SSUBSCRIBE) on the node on ``port``."""
    with redis.Redis(port=port) as node:
        _, count = node.execute_command("PUBSUB", "SHARDNUMSUB", topic)
    return int(count)


def migrate_slot(server: RedisClusterServer, slot: int, source: int, target: int) -> int:
    """Move ``slot`` (its keys too) from the node on port ``source`` to ``target``; the number
    of keys moved."""
    ids = node_ids(server)
    moved = 0
    with redis.Redis(port=source) as src, redis.Redis(port=target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        # the new owner first, then the old one, then the others (as Redis's manual says)
        others = [port for port in server.ports if port not in (target, source)]
        for port in (target, source, *others):
            with redis.Redis(port=port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    return moved


async def delivered(sender: Host, member: Peer, channel: int, text: str, timeout: float) -> float:
    """Broadcast ``text`` to ``channel`` through ``sender`` until ``member`` (on another host)
    has it, each try a new message (a refused one, e.g. unavailable while a slot has no
    primary, is tried again); the seconds it took."""
    started = time.monotonic()

    async def got() -> bool:
        try:
            await sender.aio.client().broadcast_to_channel(channel, text)
        except UccError:
            return False
        try:
            await member.wait_for(
                lambda frames: any(f.get("data") == text for f in frames), timeout=0.5
            )
        except AssertionError:
            return False
        return True

    await wait_until_async(got, timeout, what=f"for {text!r} on the other host")
    return time.monotonic() - started


def test_moving_the_topics_slot_loses_no_subscription(ucc_host, redis_cluster_server):
    server = redis_cluster_server
    a = ucc_host(shards=1, args=("--redis", server.url), secret=SECRET)
    b = ucc_host(shards=1, args=("--redis", server.url), secret=SECRET)
    topic = Layout("default").channel_topic(CHANNEL)
    with redis.Redis(port=server.ports[0]) as node:
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", topic))
    source = owner_of(server, slot)
    target = next(port for port in server.ports if port != source)

    async def scenario() -> None:
        member = await connect_peer(b, 42, [CHANNEL])
        await a.aio.wait_online([42], CHANNEL, timeout=10)

        await delivered(a, member, CHANNEL, "before", 10)
        assert await asyncio.to_thread(shard_subscribers, source, topic) == 1  # host b
        moved = await asyncio.to_thread(migrate_slot, server, slot, source, target)
        assert moved > 0  # the channel's history keys live in its slot
        assert await asyncio.to_thread(owner_of, server, slot) == target
        # after the move: delivery resumes (each try is a new message; the first that arrives
        # ends the wait) and presence still answers from both hosts
        await delivered(a, member, CHANNEL, "after", 15)
        # host b listens on the topic's new owner now, and no longer on the old one
        assert await asyncio.to_thread(shard_subscribers, target, topic) == 1
        assert await asyncio.to_thread(shard_subscribers, source, topic) == 0
        await a.aio.wait_online([42], CHANNEL, timeout=10)
        await b.aio.wait_online([42], CHANNEL, timeout=10)
        await member.close()

    asyncio.run(scenario())


def test_channels_spread_over_every_primary_with_exact_delivery(ucc_host, redis_cluster_server):
    server = redis_cluster_server
    layout = Layout("default")
    a = ucc_host(shards=1, args=("--redis", server.url), secret=SECRET)
    b = ucc_host(shards=1, args=("--redis", server.url), secret=SECRET)
    # channels 1, 2, ... until every primary serves at least one of them
    owners: dict[int, int] = {}  # channel -> port of its slot's primary
    with redis.Redis(port=server.ports[0]) as node:
        channel = 0
        while len(set(owners.values())) < len(server.ports):
            channel += 1
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", layout.channel_topic(channel)))
            owners[channel] = owner_of(server, slot)
            for key in layout.history_keys(channel):  # the channel's history: its topic's slot
                assert int(node.execute_command("CLUSTER", "KEYSLOT", key)) == slot
    channels = sorted(owners)

    async def scenario() -> None:
        member = await connect_peer(b, 42, channels)
        await a.aio.wait_online([42], channels[-1], timeout=10)
        client = a.aio.client()
        replies = {c: await client.broadcast_to_channel(c, f"to {c}") for c in channels}
        assert all(r["ok"] and r["cluster"] is True for r in replies.values()), replies
        await member.wait_for(
            lambda frames: sum(f.get("type") == "message" for f in frames) >= len(channels),
            timeout=10,
        )
        got = sorted(
            (f["channel"], f["data"], f["offset"])
            for f in member.frames
            if f.get("type") == "message"
        )
        assert got == [(c, f"to {c}", replies[c]["offset"]) for c in channels]  # each once
        # host b listens to each channel on the primary that serves it, and each primary
        # keeps the history of its own channels
        for c in channels:
            topic = layout.channel_topic(c)
            assert await asyncio.to_thread(shard_subscribers, owners[c], topic) == 1
            stream, _meta = layout.history_keys(c)
            with redis.Redis(port=owners[c]) as owner:
                assert owner.exists(stream) == 1
        assert len(set(owners.values())) == len(server.ports)
        await member.close()

    asyncio.run(scenario())
