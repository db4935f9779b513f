"""Many hosts linked by one Redis: cross-host broadcasts, cluster presence, Redis outages."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import redis

from actors.wire.cluster import Layout
from shards.testing import Cluster, Peer, RedisServer, connect_peer, wait_until


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


async def connect_three_hosts(a: Cluster, b: Cluster, c: Cluster) -> list[Peer]:
    """User u on host u % 3; channel 1: every user; channel 2: odd users; channel 3: nobody;
    user 4 has a second device. Returns once every host sees everyone."""
    layout = [(a, b, c)[u % 3] for u in range(7)]
    peers: list[Peer] = []
    for user in range(1, 7):
        channels = [1, 2] if user % 2 else [1]
        peers.append(await connect_peer(layout[user], user, channels))
    peers.append(await connect_peer(layout[4], 4, [1]))
    for host in (a, b, c):
        wait_presence(host.client(), list(range(1, 7)))
    return peers


async def broadcast_everywhere_and_check(a: Cluster, b: Cluster, c: Cluster, peers: list[Peer]):
    """Channel, user and user-list broadcasts from different hosts reach exactly the right
    connections, once each."""
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


def test_broadcasts_reach_exactly_the_right_connections_on_every_host(redis_server, ucc_cluster):
    a, b, c = hosts(ucc_cluster, redis_server, 3)

    async def scenario() -> None:
        peers = await connect_three_hosts(a, b, c)
        await broadcast_everywhere_and_check(a, b, c, peers)
        link = b.client().request("router_stats")["redis"]  # the link's own counters
        assert link["published"] >= 3
        assert link["received"] >= 1
        assert link["malformed"] == 0
        for peer in peers:
            await peer.close()

    asyncio.run(scenario())


def test_presence_is_cluster_wide_and_a_killed_host_fades_out(redis_server, ucc_cluster):
    a, b = hosts(ucc_cluster, redis_server, 2)

    async def scenario() -> None:
        on_a = [await connect_peer(a, u, [7]) for u in (1, 2, 3)]
        on_b = [await connect_peer(b, u, [7, 8]) for u in (4, 5)]
        for host in (a, b):
            client = host.client()
            wait_presence(client, [1, 2, 3, 4, 5])
            assert client.get_online_users_in_channel(7) == [1, 2, 3, 4, 5]
            assert client.get_online_users_in_channel(8) == [4, 5]
            assert client.is_user_online(4) is True
            assert client.are_users_online([1, 5, 6]) == {1: True, 5: True, 6: False}
        await on_a[0].close()
        wait_presence(b.client(), [2, 3, 4, 5])

        os.kill(a.proc.pid, signal.SIGKILL)  # power loss: no goodbye
        killed = time.monotonic()
        wait_presence(b.client(), [4, 5], timeout=10)
        print(f"\npresence expiry after a host kill: {time.monotonic() - killed:.2f} s")
        assert b.client().is_user_online(2) is False
        await on_b[0].wait_for(lambda f: True)  # host b's clients are untouched by it
        assert not on_b[0].closed.is_set()

        # the host comes back (a new process): no ghosts of its old users
        again = hosts(ucc_cluster, redis_server, 1)[0]
        back = await connect_peer(again, 9, [7])
        wait_presence(b.client(), [4, 5, 9])
        assert b.client().get_online_users_in_channel(7) == [4, 5, 9]
        await back.close()

    asyncio.run(scenario())


async def stop_one_and_check_it_left_at_once(a: Cluster, b: Cluster) -> None:
    """SIGTERM host a: host b no longer sees a's users, without waiting for any expiry."""
    await connect_peer(a, 1)
    await connect_peer(b, 2)
    wait_presence(b.client(), [1, 2])
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, a.stop) == 0
    assert b.client().get_online_users() == [2]  # at once: no expiry to wait for


def test_clean_shutdown_removes_a_host_at_once(redis_server, ucc_cluster):
    a, b = hosts(ucc_cluster, redis_server, 2)
    asyncio.run(stop_one_and_check_it_left_at_once(a, b))


def test_interest_only_hosts_with_members_listen(redis_server, ucc_cluster):
    a, b = hosts(ucc_cluster, redis_server, 2)
    layout = Layout("default")
    r = redis.Redis.from_url(redis_server.url)

    def listeners(channel: int) -> int:
        return int(
            dict(r.pubsub_numsub(layout.channel_topic(channel)))[
                layout.channel_topic(channel).encode()
            ]
        )

    async def scenario() -> None:
        peer = await connect_peer(a, 1, [11])
        wait_until(lambda: listeners(11) == 1, 5, what="for host a to listen to channel 11")
        other = await connect_peer(b, 2, [11])
        wait_until(lambda: listeners(11) == 2, 5, what="for host b to listen too")
        await other.close()
        wait_until(lambda: listeners(11) == 1, 5, what="for host b to stop listening")
        assert listeners(12) == 0
        b.client().broadcast_to_channel(11, "from b")  # b has no members: it only publishes
        await peer.wait_for(lambda f: f[-1].get("data") == "from b")
        await peer.close()
        wait_until(lambda: listeners(11) == 0, 5, what="for nobody to listen")

    try:
        asyncio.run(scenario())
    finally:
        r.close()


def test_redis_outage_keeps_local_delivery_and_says_so(redis_server, ucc_cluster):
    a, b = hosts(ucc_cluster, redis_server, 2)

    async def scenario() -> None:
        local = await connect_peer(a, 1, [5])
        remote = await connect_peer(b, 2, [5])
        wait_presence(a.client(), [1, 2])
        client = a.client()
        redis_server.stop()
        # same-host delivery goes on; the reply says other hosts were not reached
        replies = []
        for n in range(20):
            replies.append(client.broadcast_to_channel(5, {"n": n}))
        await local.wait_for(lambda f: sum(x["type"] == "message" for x in f) == 20)
        assert all(r["ok"] for r in replies)
        assert [r["cluster"] for r in replies].count(False) >= 19  # the first may have raced
        assert all(r["shards"] == 1 for r in replies)
        online = client.request("get_online_users")
        assert online["cluster"] is False
        assert online["users"] == [1]  # this host still answers for itself

        redis_server.start()
        back = time.monotonic()
        wait_until(lambda: client.broadcast_to_channel(5, "probe")["cluster"], 5, what="for Redis")
        await remote.wait_for(lambda f: f[-1].get("data") == "probe", 5)
        print(f"\ncross-host delivery back {time.monotonic() - back:.2f} s after Redis")
        wait_presence(client, [1, 2], timeout=5)
        await local.close()
        await remote.close()

    asyncio.run(scenario())


def test_subscribe_unsubscribe_and_disconnect_reach_the_users_host(redis_server, ucc_cluster):
    a, b = hosts(ucc_cluster, redis_server, 2)

    async def scenario() -> None:
        phone = await connect_peer(b, 42)
        wait_presence(a.client(), [42])
        client = a.client()  # a backend talking to the host that does not hold user 42
        reply = client.subscribe(42, 9)
        assert reply["connections"] == 0  # none here...
        assert reply["hosts"] == 1  # ...but host b has the user and applied it
        wait_until(
            lambda: client.get_online_users_in_channel(9) == [42], 5, what="for the membership"
        )
        client.broadcast_to_channel(9, "nine")
        await phone.wait_for(lambda f: f[-1].get("data") == "nine")
        assert client.unsubscribe(42, 9)["hosts"] == 1
        wait_until(lambda: client.get_online_users_in_channel(9) == [], 5, what="for the leave")
        assert client.disconnect(42)["hosts"] == 1
        await asyncio.wait_for(phone.closed.wait(), 5)
        assert phone.ws.close_code == 4001
        wait_presence(client, [])

    asyncio.run(scenario())


def test_ids_beyond_double_precision_cross_hosts_exactly(redis_server, ucc_cluster):
    a, b = hosts(ucc_cluster, redis_server, 2)
    big = 2**53 + 1  # a Lua number (a double) would round it

    async def scenario() -> None:
        peer = await connect_peer(b, big, [3])
        wait_presence(a.client(), [big])
        assert a.client().is_user_online(big) is True
        assert a.client().get_online_users_in_channel(3) == [big]
        assert a.client().broadcast_to_user(big, "exact")["cluster"] is True
        await peer.wait_for(lambda f: f[-1].get("data") == "exact")
        await peer.close()

    asyncio.run(scenario())


def test_an_acl_user_with_a_password_links_hosts(ucc_cluster):
    server = RedisServer(args=("--user", "default", "off", "--user", "ucc", "on", ">s3cret",
                               "~*", "&*", "+@all"))  # fmt: skip
    try:
        url = f"redis://ucc:s3cret@127.0.0.1:{server.port}/0"
        a, b = (ucc_cluster(shards=1, args=("--redis", url), secret="s" * 64) for _ in range(2))

        async def scenario() -> None:
            peer = await connect_peer(b, 8, [2])
            wait_presence(a.client(), [8])
            assert a.client().broadcast_to_channel(2, "through ACL")["cluster"] is True
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


def test_a_subscription_that_goes_silent_is_caught_by_the_probe(redis_server, ucc_cluster):
    proxy = FreezingProxy(redis_server.port)
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        a, b = (ucc_cluster(shards=1, args=("--redis", url), secret="s" * 64) for _ in range(2))

        async def scenario() -> None:
            peer = await connect_peer(b, 3, [4])
            wait_presence(a.client(), [3])
            proxy.freeze_subscribers()  # every open subscription hears nothing from now on
            frozen_at = time.monotonic()
            client = a.client()

            def delivered() -> bool:
                client.broadcast_to_channel(4, "are you there")
                return any(f.get("data") == "are you there" for f in peer.frames)

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, lambda: wait_until(delivered, 15, interval=0.5, what="a resubscription")
            )
            print(f"\nsilent subscription replaced after {time.monotonic() - frozen_at:.1f} s")
            await peer.close()

        asyncio.run(scenario())
    finally:
        proxy.close()
