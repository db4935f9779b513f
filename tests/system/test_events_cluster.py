"""Issue 12 across hosts: join/leave pushed to a member on another host, and a user's
connections on two hosts in one get_user_connections reply (a single Redis and a Redis
Cluster)."""

from __future__ import annotations

import asyncio

from shards.testing import Host, connect_peer, wait_until_async

SECRET = "s" * 64
CHANNEL = 9


def two_hosts(ucc_host, url: str) -> tuple[Host, Host]:
    return (
        ucc_host(shards=2, args=("--redis", url), secret=SECRET),
        ucc_host(shards=2, args=("--redis", url), secret=SECRET),
    )


async def host_id(host: Host) -> str:
    stats = await host.aio.client().request("router_stats")
    return str(stats["events"]["host"])


def test_a_member_on_another_host_is_told_joins_and_leaves(ucc_host, redis_url):
    a, b = two_hosts(ucc_host, redis_url)

    async def scenario() -> None:
        reply = await a.aio.client().set_channel(CHANNEL, join_leave=True)
        assert reply["join_leave"] is True and reply["cluster"] is True

        async def b_knows() -> bool:
            stats = await b.aio.client().request("router_stats")
            return bool(stats["join_leave"]["channels"] == 1)

        await wait_until_async(b_knows, 10.0)
        member = await connect_peer(b, 1, [CHANNEL])
        await a.aio.wait_online([1], channel=CHANNEL)  # a hears b's member (presence)
        joiner = await connect_peer(a, 2, [CHANNEL])
        await member.wait_for(lambda f: {"type": "join", "channel": CHANNEL, "user": 2} in f)
        await joiner.close()
        await member.wait_for(lambda f: {"type": "leave", "channel": CHANNEL, "user": 2} in f)
        mine = [f for f in member.frames if f.get("type") in ("join", "leave") and f["user"] == 2]
        assert [f["type"] for f in mine] == ["join", "leave"]  # once each, in order
        # unmarked (from the other host): no more
        await b.aio.client().set_channel(CHANNEL, join_leave=False)

        async def a_forgot() -> bool:
            stats = await a.aio.client().request("router_stats")
            return bool(stats["join_leave"]["channels"] == 0)

        await wait_until_async(a_forgot, 10.0)
        again = await connect_peer(a, 3, [CHANNEL])
        await a.aio.client().broadcast_to_channel(CHANNEL, "marker")
        await member.wait_for(lambda f: any(x.get("data") == "marker" for x in f))
        assert not any(f.get("user") == 3 for f in member.frames if f.get("type") == "join")
        await again.close()
        await member.close()

    asyncio.run(scenario())


def test_a_users_connections_on_two_hosts_in_one_reply(ucc_host, redis_url):
    a, b = two_hosts(ucc_host, redis_url)
    user = 5

    async def scenario() -> None:
        phone = await connect_peer(a, user, [1, 2])
        laptop = await connect_peer(b, user, [3])
        ids = {await host_id(a), await host_id(b)}
        for asking in (a, b):
            # each host publishes its presence about every second: until the other's names
            # the user, it is not asked (the user is online here already, so wait_online
            # cannot tell)
            async def both(asking: Host = asking) -> list[dict]:
                connections = await asking.aio.client().get_user_connections(user)
                return connections if {c["host"] for c in connections} == ids else []

            connections = await wait_until_async(both, 10.0)
            by_host = {c["host"]: c for c in connections}
            assert sorted(c["channels"] for c in connections) == [[1, 2], [3]]
            for record in by_host.values():
                assert set(record) >= {
                    "conn",
                    "host",
                    "shard",
                    "connected_at",
                    "last_activity",
                    "channels",
                    "remote",
                }
                assert record["remote"].startswith("127.0.0.1:")
                assert record["last_activity"] >= record["connected_at"] > 1.7e9
        await phone.close()
        await laptop.close()

    asyncio.run(scenario())
