"""Authenticated cluster messages and bans across hosts, with real processes and a real Redis:
what an intruder on Redis publishes or writes without the cluster key reaches nobody and is
counted (``forged``); a ``disconnect`` with ``ban`` refuses the user (HTTP 403) on every host
until it passes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from actors.wire import cluster, frames
from actors.wire.cluster import ClusterKey, Layout, Message, encode
from shards.testing import Host, Peer, connect_peer, wait_until_async

SECRET = "s" * 64  # every host of a cluster shares the token secret
LAYOUT = Layout("default")


def two_hosts(ucc_host, redis_url: str) -> tuple[Host, Host]:
    a, b = (ucc_host(shards=2, args=("--redis", redis_url), secret=SECRET) for _ in range(2))
    return a, b


def unsealed(message: Message) -> bytes:
    """What an intruder without the key publishes: a well-formed message with no MAC."""
    return encode(message, ClusterKey(b"a guess"))[32:]


async def forged_count(host: Host) -> int:
    stats = await host.aio.client().request("router_stats")
    count: int = stats["redis"]["forged"]
    return count


def test_a_forged_publish_reaches_no_client_and_is_counted(redis_server, ucc_host):
    a, b = two_hosts(ucc_host, redis_server.url)

    async def scenario() -> None:
        peer = await connect_peer(a, 1, [1])
        await a.aio.wait_online([1])
        await b.aio.wait_online([1])
        assert await forged_count(a) == 0
        fake = frames.text_frame(json.dumps({"type": "message", "data": "forged"}).encode())
        intruder = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            # a fake broadcast to the channel, without the key and with a wrong one
            for payload in (
                unsealed(Message("intruder", None, fake, channel=1)),
                encode(Message("intruder", None, fake, channel=1), ClusterKey(b"wrong")),
            ):
                assert await intruder.publish(LAYOUT.channel_topic(1), payload) == 1
            # and a fake disconnect to host a's users: its inbox is named in presence
            members = await intruder.zrange(LAYOUT.hosts, 0, -1)
            control = {"op": "disconnect", "user": 1}
            for host in members:
                inbox = LAYOUT.host_topic(host.decode())
                await intruder.publish(
                    inbox, unsealed(Message("intruder", [1], b"", False, control))
                )
        finally:
            await intruder.aclose()
        # host b's genuine broadcast travels after them on host a's subscription (one
        # connection, in order): once it arrives, the forged ones have been dealt with
        await b.aio.client().broadcast_to_channel(1, "genuine")
        await peer.wait_for(lambda f: any(m.get("data") == "genuine" for m in f))
        assert [m["data"] for m in peer.messages] == ["genuine"]
        assert not peer.closed.is_set()
        assert await forged_count(a) >= 3
        await peer.close()

    asyncio.run(scenario())


def test_a_forged_presence_entry_is_not_online(redis_server, ucc_host):
    a, b = two_hosts(ucc_host, redis_server.url)

    async def scenario() -> None:
        peer = await connect_peer(b, 1, [7])
        await a.aio.wait_online([1])
        before = await forged_count(a)
        intruder = redis.asyncio.Redis.from_url(redis_server.url)
        fake_users = list(range(100, 10_100))
        try:
            far = int(time.time() * 1000) + 10**12  # a far-future expiry
            now = int(time.time() * 1000)
            real = [h.decode() for h in await intruder.zrange(LAYOUT.hosts, 0, -1)]
            pipe = intruder.pipeline(transaction=False)
            pipe.zadd(LAYOUT.hosts, {"fake-host": far})
            pipe.sadd(LAYOUT.users_key("fake-host"), *fake_users)  # routing only
            # a snapshot sealed under a wrong key, for a fake host and over a real one's
            for host in ("fake-host", *real):
                forged = cluster.seal_snapshot(
                    ClusterKey(b"wrong"), host, "g", 10**6, dict.fromkeys(fake_users, (7,))
                )
                pipe.set(LAYOUT.snapshot_key(host), forged)
            await pipe.execute()
            # deltas without the key and with a wrong one, as a fake host and as the real ones
            changes = [(user, (7,)) for user in fake_users]
            for host in ("fake-host", *real):
                sealed = cluster.encode_presence(
                    ClusterKey(b"wrong"), host, "delta", "g", 10**6, now, changes
                )
                for payload in (sealed, sealed[32:]):
                    assert await intruder.publish(LAYOUT.presence_topic, payload) == 2
        finally:
            await intruder.aclose()
        # each of the 2 * (1 + 2) deltas reaches host a's listener and is refused there
        await wait_until_async(
            lambda: _at_least(forged_count(a), before + 6), what="for every forged delta"
        )
        client = a.aio.client()
        assert await client.get_online_users() == [1]
        assert await client.get_online_users_in_channel(7) == [1]
        assert await client.are_users_online([1, 100, 5000]) == {1: True, 100: False, 5000: False}
        assert await client.is_user_online(100) is False
        await peer.close()
        await a.aio.wait_online([])  # b's real deltas still come through: its user left

    asyncio.run(scenario())


async def _at_least(count: Any, floor: int) -> bool:
    return bool(await count >= floor)


async def attempt(host: Host, user: int) -> int:
    """Try to connect as ``user``: 101 if the upgrade succeeded (closed at once), else the
    HTTP status of the refusal."""
    try:
        ws = await connect(f"{host.url}/?token={host.token(user, [1])}", open_timeout=5)
    except InvalidStatus as refused:
        status: int = refused.response.status_code
        return status
    await ws.close()
    return 101


def test_a_ban_refuses_the_user_on_every_host_until_it_passes(redis_server, ucc_host):
    a, b = two_hosts(ucc_host, redis_server.url)
    ban = 3.0

    async def scenario() -> None:
        peer: Peer = await connect_peer(a, 5, [1])
        await b.aio.wait_online([5])
        banned_at = time.monotonic()
        reply: dict[str, Any] = await a.aio.client().request("disconnect", user=5, ban=ban)
        assert reply["connections"] == 1
        assert reply["banned"] == ban
        assert reply["cluster"] is True and reply["hosts"] == 1
        await peer.closed.wait()
        assert await attempt(a, 5) == 403  # at once on this host

        # on the other host as soon as the forwarded ban has arrived (well within the ban)
        async def refused_on_b() -> bool:
            return await attempt(b, 5) == 403

        await wait_until_async(refused_on_b, timeout=ban / 2, interval=0.05, what="403 on b")
        assert await attempt(a, 6) == 101  # nobody else is refused
        for host in (a, b):

            async def admitted(host: Host = host) -> bool:
                return await attempt(host, 5) == 101

            await wait_until_async(admitted, timeout=ban + 5, interval=0.1, what="the ban end")
            assert time.monotonic() - banned_at >= ban - 0.5
        again = await connect_peer(b, 5, [1])
        await again.close()

    asyncio.run(scenario())
