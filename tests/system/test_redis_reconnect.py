"""The Redis link against a real Redis server that goes away and comes back."""

from __future__ import annotations

import redis

from actors.wire.cluster import ClusterKey
from shards.redislink import RedisLink
from shards.testing import RedisServer, wait_until


def subscribers(server: RedisServer, topic: str) -> int:
    with redis.Redis(port=server.port, socket_timeout=2.0, socket_connect_timeout=1.0) as probe:
        _, count = probe.execute_command("PUBSUB", "NUMSUB", topic)
        return int(count)


def test_the_listener_backoff_starts_again_from_the_smallest_delay_after_a_reconnect(
    redis_server,
):
    key = ClusterKey(b"k" * 32)
    link = RedisLink(redis_server.url, "backoff-test", lambda _event: None, key)
    inbox = link.layout.host_topic(link.host)
    link.start()
    try:
        wait_until(lambda: subscribers(redis_server, inbox) == 1, 10, what="for the listener")
        redis_server.stop()
        # the listener fails over and over: its delays grow (0.05, 0.1, 0.2, ...)
        wait_until(lambda: link.listen_backoff.failures >= 3, 10, what="for failed attempts")
        redis_server.start()  # same port
        wait_until(lambda: subscribers(redis_server, inbox) == 1, 10, what="to resubscribe")
        # a successful resubscription resets the backoff: the next failure waits 0.05 s again
        wait_until(lambda: link.listen_backoff.failures == 0, 5, what="for the backoff to be reset")
    finally:
        link.close()
