"""Many hosts linked by one Redis: cross-host broadcasts, cluster presence, Redis outages."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import redis.asyncio

from actors.wire.cluster import Layout
from shards.testing import Host, Peer, RedisServer, connect_peer, wait_until_async

SECRET = "s" * 64  # every host of a cluster shares the token secret


def hosts(ucc_host, redis_url: str, count: int, shards: int = 2) -> list[Host]:
    """``count`` hosts linked by the Redis at ``redis_url``."""
    return [
        ucc_host(shards=shards, args=("--redis", redis_url), secret=SECRET) for _ in range(count)
    ]


async def wait_presence(host: Host, users: list[int], timeout: float = 10.0) -> None:
    await host.aio.wait_online(users, timeout=timeout)


async def settle(cluster: list[Host], peers: list[Peer]) -> None:
    """Every host sends a marker to every peer's user. Order holds per publisher, so once each
    peer has every host's marker, all earlier broadcasts have reached it (or never will)."""
    users = sorted({peer.user for peer in peers})
    for number, host in enumerate(cluster):
        await host.aio.client().broadcast_to_users(users, f"marker {number}")
    for peer in peers:
        for number in range(len(cluster)):
            await peer.wait_for(lambda f, n=number: any(x.get("data") == f"marker {n}" for x in f))
    for peer in peers:
        peer.frames[:] = [f for f in peer.frames if not str(f.get("data")).startswith("marker")]


async def connect_three_hosts(a: Host, b: Host, c: Host) -> list[Peer]:
    """User u on host u % 3; channel 1: every user; channel 2: odd users; channel 3: nobody;
    user 4 has a second device. Returns once every host sees everyone."""
    layout = [(a, b, c)[u % 3] for u in range(7)]
    peers: list[Peer] = []
    for user in range(1, 7):
        channels = [1, 2] if user % 2 else [1]
        peers.append(await connect_peer(layout[user], user, channels))
    peers.append(await connect_peer(layout[4], 4, [1]))
    for host in (a, b, c):
        await wait_presence(host, list(range(1, 7)))
    return peers


async def broadcast_everywhere_and_check(a: Host, b: Host, c: Host, peers: list[Peer]):
    """Channel, user and user-list broadcasts from different hosts reach exactly the right
    connections, once each."""
    client = b.aio.client()
    reply = await client.broadcast_to_channel(1, "all")
    assert reply["cluster"] is True
    await client.broadcast_to_channel(2, "odd")
    await client.broadcast_to_channel(3, "nobody")
    await a.aio.client().broadcast_to_user(4, "four")
    await c.aio.client().broadcast_to_users([1, 5, 99], "list")
    await settle([a, b, c], peers)
    for peer in peers:
        got = [m["data"] for m in peer.messages]
        want = ["all"] + (["odd"] if peer.user % 2 else [])
        want += ["four"] if peer.user == 4 else []
        want += ["list"] if peer.user in (1, 5) else []
        assert sorted(got) == sorted(want), (peer.user, got)


def test_broadcasts_reach_exactly_the_right_connections_on_every_host(redis_server, ucc_host):
    a, b, c = hosts(ucc_host, redis_server.url, 3)

    async def scenario() -> None:
        peers = await connect_three_hosts(a, b, c)
        await broadcast_everywhere_and_check(a, b, c, peers)
        link = (await b.aio.client().request("router_stats"))["redis"]  # the link's counters
        assert link["published"] >= 3
        assert link["received"] >= 1
        assert link["malformed"] == 0
        assert link["forged"] == 0  # hosts sharing the token secret share the cluster key
        for peer in peers:
            await peer.close()

    asyncio.run(scenario())


def test_presence_is_cluster_wide_and_a_killed_host_fades_out(redis_server, ucc_host):
    a, b = hosts(ucc_host, redis_server.url, 2)

    async def scenario() -> None:
        on_a = [await connect_peer(a, u, [7]) for u in (1, 2, 3)]
        on_b = [await connect_peer(b, u, [7, 8]) for u in (4, 5)]
        for host in (a, b):
            await wait_presence(host, [1, 2, 3, 4, 5])
            client = host.aio.client()
            assert await client.get_online_users_in_channel(7) == [1, 2, 3, 4, 5]
            assert await client.get_online_users_in_channel(8) == [4, 5]
            assert await client.is_user_online(4) is True
            assert await client.are_users_online([1, 5, 6]) == {1: True, 5: True, 6: False}
        await on_a[0].close()
        await wait_presence(b, [2, 3, 4, 5])

        a.signal(signal.SIGKILL)  # power loss: no goodbye
        killed = time.monotonic()
        await wait_presence(b, [4, 5], timeout=10)
        print(f"\npresence expiry after a host kill: {time.monotonic() - killed:.2f} s")
        assert await b.aio.client().is_user_online(2) is False
        await on_b[0].wait_for(lambda f: True)  # host b's clients are untouched by it
        assert not on_b[0].closed.is_set()

        # the host comes back (a new process): no ghosts of its old users
        (again,) = await asyncio.to_thread(hosts, ucc_host, redis_server.url, 1)
        back = await connect_peer(again, 9, [7])
        await wait_presence(b, [4, 5, 9])
        assert await b.aio.client().get_online_users_in_channel(7) == [4, 5, 9]
        for peer in [back, *on_a, *on_b]:
            await peer.close()

    asyncio.run(scenario())


async def stop_one_and_check_it_left_at_once(a: Host, b: Host) -> None:
    """SIGTERM host a: host b no longer sees a's users, without waiting for any expiry."""
    one, two = await connect_peer(a, 1), await connect_peer(b, 2)
    await wait_presence(b, [1, 2])
    assert await a.aio.stop() == 0
    assert await b.aio.client().get_online_users() == [2]  # at once: no expiry to wait for
    for peer in (one, two):
        await peer.close()


def test_clean_shutdown_removes_a_host_at_once(redis_server, ucc_host):
    a, b = hosts(ucc_host, redis_server.url, 2)
    asyncio.run(stop_one_and_check_it_left_at_once(a, b))


def test_interest_only_hosts_with_members_listen(redis_server, ucc_host):
    a, b = hosts(ucc_host, redis_server.url, 2)
    layout = Layout("default")

    async def scenario() -> None:
        async with redis.asyncio.Redis.from_url(redis_server.url) as r:

            async def listeners(channel: int) -> int:
                topic = layout.channel_topic(channel)
                return int(dict(await r.pubsub_numsub(topic))[topic.encode()])

            async def listening(channel: int, count: int, what: str) -> None:
                async def counted() -> bool:
                    return await listeners(channel) == count

                await wait_until_async(counted, 5, what=what)

            peer = await connect_peer(a, 1, [11])
            await listening(11, 1, "for host a to listen to channel 11")
            other = await connect_peer(b, 2, [11])
            await listening(11, 2, "for host b to listen too")
            await other.close()
            await listening(11, 1, "for host b to stop listening")
            assert await listeners(12) == 0
            # b has no members: it only publishes
            await b.aio.client().broadcast_to_channel(11, "from b")
            await peer.wait_for(lambda f: f[-1].get("data") == "from b")
            await peer.close()
            await listening(11, 0, "for nobody to listen")

    asyncio.run(scenario())


async def outage_keeps_local_delivery_and_says_so(
    a: Host, b: Host, lose: Callable[[], None], restore: Callable[[], Awaitable[None]]
) -> None:
    """While Redis is lost (``lose()``, blocking, run in a thread), host a goes on delivering to
    its own clients and its replies say ``"cluster": false``; once ``restore()`` has brought
    Redis back, cross-host delivery and presence come back too."""
    local = await connect_peer(a, 1, [5])
    remote = await connect_peer(b, 2, [5])
    await wait_presence(a, [1, 2])
    client = a.aio.client()
    await asyncio.to_thread(lose)
    # same-host delivery goes on; the reply says other hosts were not reached
    replies = [await client.broadcast_to_channel(5, {"n": n}) for n in range(20)]
    await local.wait_for(lambda f: sum(x["type"] == "message" for x in f) == 20)
    assert all(r["ok"] and r["shards"] == 1 for r in replies)
    assert [r["cluster"] for r in replies].count(False) >= 19  # the first may have raced
    online = await client.request("get_online_users")
    assert (online["cluster"], online["users"]) == (False, [1])  # it still answers for itself

    await restore()
    back = time.monotonic()

    async def delivered() -> bool:
        # each host relinks on its own: until b has subscribed again, a probe that a publishes
        # (and says reached the cluster) has nobody to reach there
        reply = await client.broadcast_to_channel(5, "probe")
        return reply["cluster"] and any(f.get("data") == "probe" for f in remote.frames)

    await wait_until_async(delivered, 10, interval=0.1, what="for cross-host delivery")
    print(f"\ncross-host delivery back {time.monotonic() - back:.2f} s after Redis")
    await wait_presence(a, [1, 2], timeout=5)
    await local.close()
    await remote.close()


def test_redis_outage_keeps_local_delivery_and_says_so(redis_server, ucc_host):
    a, b = hosts(ucc_host, redis_server.url, 2)

    async def restore() -> None:
        await asyncio.to_thread(redis_server.start)

    asyncio.run(outage_keeps_local_delivery_and_says_so(a, b, redis_server.stop, restore))


def test_subscribe_unsubscribe_and_disconnect_reach_the_users_host(redis_server, ucc_host):
    a, b = hosts(ucc_host, redis_server.url, 2)

    async def scenario() -> None:
        phone = await connect_peer(b, 42)
        await wait_presence(a, [42])
        client = a.aio.client()  # a backend talking to the host that does not hold user 42
        reply = await client.subscribe(42, 9)
        assert reply["connections"] == 0  # none here...
        assert reply["hosts"] == 1  # ...but host b has the user and applied it
        await a.aio.wait_online([42], channel=9, timeout=5)
        await client.broadcast_to_channel(9, "nine")
        await phone.wait_for(lambda f: f[-1].get("data") == "nine")
        assert (await client.unsubscribe(42, 9))["hosts"] == 1
        await a.aio.wait_online([], channel=9, timeout=5)
        assert (await client.disconnect(42))["hosts"] == 1
        await asyncio.wait_for(phone.closed.wait(), 5)
        assert phone.ws.close_code == 4001
        await wait_presence(a, [])
        await phone.close()

    asyncio.run(scenario())


def test_ids_beyond_double_precision_cross_hosts_exactly(redis_server, ucc_host):
    a, b = hosts(ucc_host, redis_server.url, 2)
    big = 2**53 + 1  # a Lua number (a double) would round it

    async def scenario() -> None:
        peer = await connect_peer(b, big, [3])
        await wait_presence(a, [big])
        client = a.aio.client()
        assert await client.is_user_online(big) is True
        assert await client.get_online_users_in_channel(3) == [big]
        assert (await client.broadcast_to_user(big, "exact"))["cluster"] is True
        await peer.wait_for(lambda f: f[-1].get("data") == "exact")
        await peer.close()

    asyncio.run(scenario())


def test_an_acl_user_with_a_password_links_hosts(ucc_host):
    server = RedisServer(args=("--user", "default", "off", "--user", "ucc", "on", ">s3cret",
                               "~*", "&*", "+@all"))  # fmt: skip
    try:
        a, b = hosts(ucc_host, f"redis://ucc:s3cret@127.0.0.1:{server.port}/0", 2, shards=1)

        async def scenario() -> None:
            peer = await connect_peer(b, 8, [2])
            await wait_presence(a, [8])
            assert (await a.aio.client().broadcast_to_channel(2, "through ACL"))["cluster"]
            await peer.wait_for(lambda f: f[-1].get("data") == "through ACL")
            await peer.close()

        asyncio.run(scenario())
    finally:
        server.close()


class FreezingProxy:
    """A TCP proxy to Redis that can silently stop delivering to pub/sub connections (the
    connection stays open, nothing more arrives): what a subscription does after some failovers.
    Its thread and sockets end in close()."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: list[tuple[threading.Event, threading.Event]] = []  # subscriber, frozen
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            state = (threading.Event(), threading.Event())
            self.connections.append(state)
            for src, dst, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, watch, *state), daemon=True
                ).start()

    def freeze_subscribers(self) -> None:
        """The subscriptions open now go silent; later ones work."""
        for subscriber, frozen in list(self.connections):
            if subscriber.is_set():
                frozen.set()

    def _pump(self, src, dst, watch: bool, subscriber, frozen) -> None:
        try:
            while not self.stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if watch and b"SUBSCRIBE" in data.upper():
                    subscriber.set()
                if not watch and frozen.is_set():
                    continue  # swallowed: the subscriber hears nothing, and is not told
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in [self.listener, *self.sockets]:
            sock.close()


def test_a_subscription_that_goes_silent_is_caught_by_the_probe(redis_server, ucc_host):
    proxy = FreezingProxy(redis_server.port)
    try:
        a, b = hosts(ucc_host, f"redis://127.0.0.1:{proxy.port}/0", 2, shards=1)

        async def scenario() -> None:
            peer = await connect_peer(b, 3, [4])
            await wait_presence(a, [3])
            proxy.freeze_subscribers()  # every open subscription hears nothing from now on
            frozen_at = time.monotonic()
            client = a.aio.client()

            async def delivered() -> bool:
                await client.broadcast_to_channel(4, "are you there")
                return any(f.get("data") == "are you there" for f in peer.frames)

            await wait_until_async(delivered, 15, interval=0.5, what="a resubscription")
            print(f"\nsilent subscription replaced after {time.monotonic() - frozen_at:.1f} s")
            await peer.close()

        asyncio.run(scenario())
    finally:
        proxy.close()
