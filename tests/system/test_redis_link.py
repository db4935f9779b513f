"""The Redis link against real servers: the nodes a new cluster client starts from (the seeds,
then every node the last client discovered), a first seed that is dead, and the link's state
(up only once its listener is subscribed too)."""

from __future__ import annotations

import threading
from typing import Any

from actors.hostlink import LinkState
from actors.wire.cluster import ClusterKey
from shards.redislink import RedisLink
from shards.testing import RedisClusterServer, RedisServer, free_port, wait_until

KEY = ClusterKey(b"k" * 32)


def test_a_cluster_link_starts_from_its_seeds_then_from_every_node_it_discovered(
    redis_cluster_server: RedisClusterServer,
):
    server = redis_cluster_server
    dead = free_port()  # nobody listens there
    seeds = [("127.0.0.1", dead), ("127.0.0.1", server.ports[1])]
    link = RedisLink(
        f"redis+cluster://127.0.0.1:{dead},127.0.0.1:{server.ports[1]}", "unit", print, KEY
    )
    assert link.startup_nodes() == seeds
    client = link._client()  # the first seed is dead: discovered through the second
    try:
        client.exists("anything")
        nodes = [("127.0.0.1", port) for port in server.ports]
        assert link.startup_nodes()[:2] == seeds  # the seeds first, as named
        assert sorted(set(link.startup_nodes()) - set(seeds)) == sorted(set(nodes) - set(seeds))
    finally:
        link._close_client(client)
    # once closed, what it knew stays for the next client (the seeds alone are one dead node
    # and one live one: any node of the cluster will do)
    assert set(nodes) <= set(link.startup_nodes())
    again = link._client()
    try:
        assert again.exists("anything") == 0
    finally:
        link._close_client(again)


def test_the_link_says_it_is_up_only_once_its_listener_is_subscribed(
    redis_server: RedisServer,
):
    """The worker connects first (its own client), but reports the link up only when the
    listener has its subscriptions: until then, this host would not hear what it publishes."""
    events: list[object] = []
    link = RedisLink(redis_server.url, "unit", events.append, KEY)
    polls = threading.Semaphore(0)
    drain = link._drain

    def counted(wait: float) -> list[Any]:  # our own method, counted: Redis is real
        polls.release()
        return drain(wait)

    link._drain = counted  # type: ignore[method-assign]
    worker = threading.Thread(target=link._work, daemon=True)
    listener = threading.Thread(target=link._listen, daemon=True)
    worker.start()
    try:
        for _ in range(3):  # connected to a real Redis, polled three times: still down
            assert polls.acquire(timeout=5)
        assert not link.up and events == []
        listener.start()  # subscribes for real: then the link is up
        wait_until(lambda: link.up, 10, what="for the link to be up")
        assert [e for e in events if isinstance(e, LinkState)] == [LinkState(True)]
    finally:
        link.stopping.set()
        worker.join(10)
        if listener.ident is not None:
            listener.join(10)
    assert not worker.is_alive() and not listener.is_alive()
