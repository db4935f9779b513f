"""The test kit's Redis servers (shards.testing.redis) when the port they chose is taken before
they bind it: a real server, a real socket bound to the port. ``free_port`` is made to
hand out the taken port first, which is what a race with any other socket looks like; the
server exits, and its first start goes on with a fresh port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis

from shards.testing import redis as kit


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port that a socket is bound to, not listening (as a client's connection
    holds its local port): a server cannot bind it, and connections to it are refused."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def first_the_taken_port(monkeypatch: pytest.MonkeyPatch, taken: int, times: int) -> None:
    real, left = kit.free_port, [taken] * times

    def free_port() -> int:
        return left.pop() if left else real()

    monkeypatch.setattr(kit, "free_port", free_port)


def test_a_server_whose_port_was_taken_starts_on_another(monkeypatch, taken):
    first_the_taken_port(monkeypatch, taken, 1)
    server = kit.RedisServer()
    try:
        assert server.port != taken
        assert redis.Redis.from_url(server.url, socket_timeout=5).ping()
        server.stop()
        server.start()  # a restart keeps its port
        assert redis.Redis.from_url(server.url, socket_timeout=5).ping()
    finally:
        server.close()


def test_a_server_given_a_taken_port_says_so(taken):
    with pytest.raises(AssertionError, match=f"port {taken} taken"):
        kit.RedisServer(port=taken)


def test_a_cluster_node_whose_port_was_taken_starts_on_another(monkeypatch, taken):
    first_the_taken_port(monkeypatch, taken, 1)
    cluster = kit.RedisClusterServer(nodes=3)
    try:
        assert taken not in cluster.ports
        client = redis.RedisCluster.from_url(cluster.url.replace("redis+cluster", "redis"))
        try:
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()
    finally:
        cluster.close()
