"""Channel history and critical messages in Redis (issue 11), through real Redis links: two
:class:`~shards.redislink.RedisLink` instances (two hosts) against a real single Redis and a real
3-node Redis Cluster (sharded pub/sub), driven directly with operations; every wait has a
deadline and polls what it waits for (no sleep stands for synchronisation)."""

from __future__ import annotations

import itertools
import queue
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from actors.hostlink import (
    AckCritical,
    AppendChannel,
    ChannelMarks,
    Deliveries,
    Delivery,
    FetchCritical,
    LinkEvent,
    LinkState,
    PresenceHeard,
    PresenceLoaded,
    PublishPresence,
    ReadHistory,
    RedisRequest,
    Results,
    StoreCritical,
    Subscribe,
    TopicsReady,
)
from actors.ids import ChannelId
from actors.presence import PresenceNews
from actors.wire import cluster, frames
from shards.redislink import RedisLink, cluster_seed
from shards.testing import RedisClusterServer, RedisServer
from shards.testing.waiting import TIME_FACTOR

KEY = cluster.ClusterKey(b"history test cluster key")
TTL_MS = 60_000
BIG_USER = 2**63 - 1  # beyond a double's exact integers: ids must travel as strings
_qids = itertools.count(1)

Server = RedisServer | RedisClusterServer


def raw_client(server: Server) -> redis.Redis | RedisCluster:
    """A plain client of the server, to look at (or tamper with) what the links keep."""
    seed = cluster_seed(server.url)
    if seed is not None:
        return RedisCluster.from_url(seed)
    return redis.Redis.from_url(server.url)


class Host:
    """A started RedisLink and everything it reported."""

    def __init__(self, server: Server, name: str) -> None:
        self.server = server
        self.events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self.link = RedisLink(server.url, name, self.events.put, KEY)
        self.deliveries: list[Delivery] = []
        self.results: dict[int, Any] = {}
        self.ready: set[int] = set()  # channels whose topic Redis confirmed (TopicsReady)
        self.presence: list[PresenceNews] = []  # what other hosts published, as heard
        self.link.start()
        self.wait(lambda: self.link.up, what="for the link to connect")

    def close(self) -> None:
        self.link.close()

    def pump(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=0.01)
            except queue.Empty:
                return
            if isinstance(event, Deliveries):
                self.deliveries.extend(event.deliveries)
            elif isinstance(event, Results):
                for result in event.results:
                    self.results[result.qid] = result
            elif isinstance(event, TopicsReady):
                self.ready.update(event.channels)
            elif isinstance(event, PresenceHeard):
                self.presence.extend(event.news)
            else:
                assert isinstance(event, LinkState | ChannelMarks | PresenceLoaded)

    def wait(self, condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while True:
            self.pump()
            value = condition()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting {what}")

    def run(self, make: Callable[[int], RedisRequest]) -> dict[str, Any]:
        """Submit the operation made with a fresh qid; its result's body (it must succeed)."""
        qid = next(_qids)
        self.link.submit(make(qid))
        result = self.wait(lambda: self.results.get(qid), what=f"for result {qid}")
        assert result.ok, result
        body: dict[str, Any] = result.body
        return body

    def append(self, channel: int, data: bytes, size: int = 64, ttl_ms: int = TTL_MS) -> Any:
        return self.run(lambda q: AppendChannel(q, ChannelId(channel), data, size, ttl_ms))

    def read(
        self, channel: int, since: int = 0, limit: int = 100, probe: bool = False
    ) -> dict[str, Any]:
        return self.run(lambda q: ReadHistory(q, ChannelId(channel), since, limit, TTL_MS, probe))

    def store(
        self, users: list[int], id: str, data: bytes, ttl_ms: int = TTL_MS, per_user: int = 100
    ) -> dict[str, Any]:
        return self.run(lambda q: StoreCritical(q, users, id, data, ttl_ms, per_user))

    def fetch(self, user: int) -> list[list[str]]:
        messages: list[list[str]] = self.run(lambda q: FetchCritical(q, user))["messages"]
        return messages

    def received(self, count: int, what: str = "") -> list[Delivery]:
        """Wait until at least ``count`` deliveries arrived; all of them."""
        self.wait(lambda: len(self.deliveries) >= count, what=what or f"for {count} deliveries")
        return list(self.deliveries)

    def listeners(self, topic: str) -> int:
        if isinstance(self.server, RedisClusterServer):
            return self.server.subscribers(topic)
        with redis.Redis.from_url(self.server.url) as client:
            return int(client.pubsub_numsub(topic)[0][1])


@pytest.fixture
def hosts(server: Server) -> Iterator[tuple[Host, Host]]:
    """Two hosts (links with different host ids) of a cluster of hosts of its own name."""
    name = f"t{secrets.token_hex(4)}"
    a, b = Host(server, name), Host(server, name)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def subscribe(channel: int, *hosts: Host) -> None:
    for host in hosts:
        host.link.submit(Subscribe(ChannelId(channel)))
    topic = hosts[0].link.layout.channel_topic(channel)
    hosts[0].wait(lambda: hosts[0].listeners(topic) == len(hosts), what="for the subscriptions")
    for host in hosts:  # and each link said so (the router waits for this before hello)
        host.wait(lambda h=host: channel in h.ready, what="for the topic's confirmation")


def online(host: Host, other: Host, users: list[int]) -> None:
    """``other`` publishes its presence with ``users``; wait until ``host`` sees them (and
    until ``other`` listens to its inbox)."""
    changes = tuple((user, ()) for user in users)
    other.link.submit(PublishPresence("g", 1, changes, len(users)))
    inbox = other.link.layout.host_topic(other.link.host)
    other.wait(lambda: other.listeners(inbox) == 1, what="for the inbox subscription")

    def seen() -> bool:  # the delta script updates the user set, then publishes the delta
        return any(
            news.host == other.link.host and {u for u, _ in news.changes} >= set(users)
            for news in host.presence
        )

    host.wait(seen, what=f"for {users} to be online on the other host")


# -- history ------------------------------------------------------------------------------------


def test_appends_get_offsets_and_every_host_delivers_them_the_origin_too(hosts):
    a, b = hosts
    subscribe(5, a, b)
    answers = [a.append(5, b'"m%d"' % n) for n in (1, 2, 3)]
    epoch = answers[0]["epoch"]
    assert [x["offset"] for x in answers] == [1, 2, 3]
    assert len(epoch) == 12 and all(x["epoch"] == epoch for x in answers)
    assert b.append(5, b'"m4"') == {"offset": 4, "epoch": epoch}  # the other host continues
    for host in (a, b):
        got = host.received(4, "for the 4 channel messages")
        assert [d.offset for d in got] == [1, 2, 3, 4]
        assert all(d.channel == 5 and d.users == [] and d.critical_id is None for d in got)
        assert got[0].frame == frames.channel_message(5, b'"m1"', 1, epoch)
        assert got[3].frame == frames.channel_message(5, b'"m4"', 4, epoch)
    stats = a.link.stats()
    assert stats["history_appended"] == 3 and stats["published"] >= 3
    assert stats["forged"] == stats["malformed"] == stats["replayed"] == 0


def test_reading_history_gives_the_kept_slice_and_the_first_kept_offset(hosts):
    a, b = hosts
    empty = a.read(9)
    assert empty["offset"] == 0 and empty["first"] == 1 and empty["messages"] == []
    assert b.read(9)["epoch"] == empty["epoch"]  # created by the read, stable while it lives
    for n in range(1, 6):
        assert a.append(9, b'{"n":%d}' % n, size=3) == {"offset": n, "epoch": empty["epoch"]}
    stream, _meta = a.link.layout.history_keys(9)
    with raw_client(a.server) as client:
        assert client.xlen(stream) == 3  # MAXLEN: the oldest dropped, offsets keep counting
    everything = b.read(9)
    assert everything["epoch"] == empty["epoch"]
    assert everything["offset"] == 5 and everything["first"] == 3
    assert everything["messages"] == [[3, '{"n":3}'], [4, '{"n":4}'], [5, '{"n":5}']]
    assert b.read(9, since=3)["messages"] == [[4, '{"n":4}'], [5, '{"n":5}']]
    assert b.read(9, since=3, limit=1)["messages"] == [[4, '{"n":4}']]
    assert b.read(9, since=5)["messages"] == []
    assert b.read(9, since=2**63 - 1)["messages"] == []  # a huge offset: nothing, no error
    assert b.link.stats()["history_read"] == 6


def test_a_reads_probe_comes_back_to_its_host_after_every_message_read(hosts):
    # what a resume from nothing waits for: the messages up to the offset read reached this
    # host through the topic (another host's among them), then the probe
    a, b = hosts
    subscribe(8, a, b)
    assert [b.append(8, b'"m%d"' % n)["offset"] for n in (1, 2)] == [1, 2]
    qid = next(_qids)
    a.link.submit(ReadHistory(qid, ChannelId(8), 0, 100, TTL_MS, probe=True))
    back = Delivery(ChannelId(8), [], b"", {"op": "probe_back", "qid": qid})
    a.wait(lambda: back in a.deliveries, what="for the read's probe")
    assert a.results[qid].ok and a.results[qid].body["offset"] == 2
    assert [d.offset for d in a.deliveries] == [1, 2, 0]  # the messages read, then the probe
    b.append(8, b'"m3"')  # after the probe on b's topic too: b delivered nothing for it
    assert [d.offset for d in b.received(3, "for the 3 channel messages")] == [1, 2, 3]
    assert all(d.control is None for d in b.deliveries)
    assert a.link.stats()["malformed"] == b.link.stats()["malformed"] == 0


def test_a_channel_state_lives_ttl_after_its_last_message_then_a_new_epoch_starts(hosts):
    a, _b = hosts
    first = a.append(3, b"1", ttl_ms=300)
    assert a.append(3, b"2", ttl_ms=300)["offset"] == 2
    stream, meta = a.link.layout.history_keys(3)
    with raw_client(a.server) as client:
        a.wait(lambda: client.exists(stream, meta) == 0, what="for the state to expire")
    again = a.append(3, b"3", ttl_ms=TTL_MS)
    assert again["offset"] == 1 and again["epoch"] != first["epoch"]
    read = a.read(3)
    assert read["epoch"] == again["epoch"] and read["messages"] == [[1, "3"]]


def test_a_forged_or_moved_kept_message_is_skipped_counted_and_not_bridged(hosts):
    a, _b = hosts
    for n in (1, 2):
        a.append(4, b"%d" % n)
    a.append(8, b'"other channel"')
    stream, meta = a.link.layout.history_keys(4)
    other_stream, _ = a.link.layout.history_keys(8)
    with raw_client(a.server) as client:
        moved = client.xrange(other_stream)[0][1][b"m"]  # sealed for channel 8
        unsealed = b"x" * 40
        client.xadd(stream, {"m": unsealed}, id="3-1")
        client.xadd(stream, {"m": moved}, id="4-1")
        client.hincrby(meta, "offset", 2)
    assert a.append(4, b"5")["offset"] == 5
    read = a.read(4)
    # messages 1 and 2 are kept, but the forged 3 and 4 make a gap: nothing before it is given
    assert read["offset"] == 5 and read["first"] == 5
    assert read["messages"] == [[5, "5"]]
    assert a.link.stats()["forged"] == 2


# -- critical messages ----------------------------------------------------------------------------


def test_a_user_at_the_bound_refuses_the_whole_message(hosts):
    a, _b = hosts
    assert a.store([1, BIG_USER], "c-1", b'"one"', per_user=2) == {"value": 0}
    assert a.store([BIG_USER], "c-2", b'"two"', per_user=2) == {"value": 0}
    assert a.store([1, BIG_USER], "c-3", b'"three"', per_user=2) == {"limit": BIG_USER}
    assert a.fetch(1) == [["c-1", '"one"']]  # nothing stored for user 1 either
    assert a.fetch(BIG_USER) == [["c-1", '"one"'], ["c-2", '"two"']]
    stats = a.link.stats()
    assert stats["critical_stored"] == 2 and stats["critical_refused"] == 1


def test_fetch_gives_a_users_unexpired_messages_in_order_and_expired_ones_free_room(hosts):
    a, _b = hosts
    a.store([6], "x-1", b"1")
    a.store([6], "x-2", b"2", ttl_ms=300)
    a.store([6], "x-3", b"3")
    assert [id for id, _ in a.fetch(6)] == ["x-1", "x-2", "x-3"]
    assert a.wait(lambda: a.fetch(6) == [["x-1", "1"], ["x-3", "3"]], what="for expiry")
    assert a.store([6], "x-4", b"4", per_user=3) == {"value": 0}  # x-2 no longer counts
    assert a.fetch(6)[-1] == ["x-4", "4"]
    assert a.fetch(7) == []


def test_a_critical_message_reaches_the_other_host_and_an_ack_there_stops_it(hosts):
    a, b = hosts
    online(a, b, [7, BIG_USER])
    assert a.store([7, 8], "k-1", b'{"important":true}') == {"value": 1}  # b has user 7
    (got,) = b.received(1, "for the critical message")
    assert got == Delivery(
        None, [7, 8], frames.critical_message("k-1", b'{"important":true}'), critical_id="k-1"
    )
    a.store([BIG_USER], "k-2", b'"big"')
    assert b.received(2)[1].users == [BIG_USER]
    a.link.submit(AckCritical(7, "unknown"))  # nothing to forget: nobody is told
    a.link.submit(AckCritical(7, "k-1"))
    deliveries = b.received(3, "for the ack")
    assert deliveries[2] == Delivery(None, [7], b"", control={"op": "acked", "id": "k-1"})
    assert a.fetch(7) == [] and a.fetch(8) == [["k-1", '{"important":true}']]
    a.wait(lambda: a.link.stats()["acks"] == 2, what="for the acks to be counted")
    b.link.submit(AckCritical(BIG_USER, "k-2"))
    b.wait(lambda: b.fetch(BIG_USER) == [], what="for the ack on b")
    assert len(b.deliveries) == 3 and len(a.deliveries) == 0  # the acking host is not told


def test_a_forged_critical_message_is_left_out_and_counted(hosts):
    a, _b = hosts
    a.store([2], "f-1", b"1")
    a.store([3], "f-2", b"2")
    ids, data, expiries = a.link.layout.critical_keys(2)
    with raw_client(a.server) as client:
        stolen = client.hget(a.link.layout.critical_keys(3)[1], "f-2")
        client.rpush(ids, "f-2", "f-3")  # user 3's message, and one not sealed at all
        client.hset(data, mapping={"f-2": stolen, "f-3": b"x" * 40})
        client.zadd(expiries, {"f-2": 2**52, "f-3": 2**52})
    assert a.fetch(2) == [["f-1", "1"]]
    assert a.link.stats()["forged"] == 2
