"""The fault-injection kit: start real ucc hosts in tests, connect clients, kill shards.

A public, documented API: applications use it to test themselves against ucc. Modules:

- :mod:`~shards.testing.host`: :class:`Host` (one ``ucc serve`` in its own process group, on
  free loopback ports, with a private secret; formerly ``Cluster``, still an alias) and its
  coroutine twin ``host.aio`` (:class:`AsyncHost`).
- :mod:`~shards.testing.peer`: :class:`Peer`, a WebSocket client that records every frame it
  receives, :func:`connect_peer`, and :func:`upgrade_request` for raw sockets.
- :mod:`~shards.testing.redis`: :class:`RedisServer` and :class:`RedisClusterServer` (a Redis
  Cluster), real servers that link hosts.
- :mod:`~shards.testing.stream`: :class:`BroadcastStream`, channel broadcasts from a thread
  of its own while a test does something to the host.
- :mod:`~shards.testing.waiting`: :data:`TIME_FACTOR`, :func:`wait_until` and
  :func:`wait_until_async`.
- :mod:`~shards.testing.plugin`: the pytest fixtures ``ucc_host`` (alias ``ucc_cluster``),
  ``redis_server`` and ``redis_cluster_server``, registered by the ``pytest11`` entry point.

Every process is started in its own process group and killed as a group by
:mod:`shards.procgroup` in ``finally``, even when the test fails: the kit never leaves a
process behind.

Example::

    def test_kill_a_shard(ucc_host):
        host = ucc_host(shards=2)
        old = host.shard_pid(0)
        host.kill_shard(0)
        host.wait_shard_replaced(0, old)
"""

from shards.testing.host import AsyncHost, Cluster, Host, refused_start
from shards.testing.peer import Peer, connect_peer, upgrade_request
from shards.testing.redis import (
    RedisClusterServer,
    RedisServer,
    free_port,
    redis_cli_binary,
    redis_server_binary,
)
from shards.testing.stream import BroadcastStream
from shards.testing.waiting import TIME_FACTOR, wait_until, wait_until_async

__all__ = [
    "TIME_FACTOR",
    "AsyncHost",
    "BroadcastStream",
    "Cluster",
    "Host",
    "Peer",
    "RedisClusterServer",
    "RedisServer",
    "connect_peer",
    "free_port",
    "redis_cli_binary",
    "redis_server_binary",
    "refused_start",
    "upgrade_request",
    "wait_until",
    "wait_until_async",
]
