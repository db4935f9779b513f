"""Cluster-wide join/leave marks and a user's connections across hosts (issue 12), through real
Redis links: :class:`~shards.redislink.RedisLink` instances (hosts) against a real single Redis
and a real 3-node Redis Cluster (sharded pub/sub), driven directly with operations; the tests
play the router (they answer a ``who`` with :class:`~actors.hostlink.AnswerUserConnections`).
Every wait has a deadline and polls what it waits for (no sleep stands for synchronisation)."""

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
    AnswerUserConnections,
    ChannelMarks,
    Deliveries,
    Delivery,
    LinkEvent,
    LinkState,
    OpResult,
    PresenceHeard,
    PresenceLoaded,
    PublishPresence,
    RedisRequest,
    Results,
    SetChannel,
    TopicsReady,
    UserConnections,
)
from actors.ids import ChannelId
from actors.presence import PresenceNews
from actors.wire import cluster
from shards.redislink import RedisLink, cluster_seed
from shards.testing import RedisClusterServer, RedisServer
from shards.testing.waiting import TIME_FACTOR

KEY = cluster.ClusterKey(b"events test cluster key")
BIG = 2**63 - 1  # beyond a double's exact integers: ids must travel as strings
_qids = itertools.count(1)

Server = RedisServer | RedisClusterServer


def raw_client(server: Server) -> redis.Redis | RedisCluster:
    seed = cluster_seed(server.url)
    if seed is not None:
        return RedisCluster.from_url(seed)
    return redis.Redis.from_url(server.url)


def record(conn: str, **extra: Any) -> dict[str, Any]:
    """A connection record as a shard answers QueryUserConnections (no "host")."""
    return {
        "conn": conn,
        "shard": 0,
        "connected_at": 1700000000.5,
        "last_activity": 1700000001.25,
        "channels": [5, BIG],
        "remote": "127.0.0.1:4000",
        **extra,
    }


class Host:
    """A started RedisLink, everything it reported, and (if ``records``) the router's part of
    the ``who`` RPC: each ``who`` is answered with ``records[user]``."""

    def __init__(
        self,
        server: Server,
        name: str,
        records: dict[int, list[dict[str, Any]]] | None = None,
        ask_timeout: float = 5.0,
    ) -> None:
        self.server = server
        self.events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self.link = RedisLink(server.url, name, self.events.put, KEY, ask_timeout=ask_timeout)
        self.records = records
        self.deliveries: list[Delivery] = []
        self.results: dict[int, OpResult] = {}
        self.marks: list[list[int]] = []  # every ChannelMarks, in order
        self.group: list[Host] = [self]  # the hosts pumped while this one waits
        self.presence: list[PresenceNews] = []  # what other hosts published, as heard
        self.seq = 0  # of this host's presence deltas
        self.link.start()
        self.wait(lambda: self.link.up and self.marks, what="for the link and its marks")

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
                for delivery in event.deliveries:
                    control = delivery.control or {}
                    if control.get("op") == "who" and self.records is not None:
                        found = self.records.get(control["user"], [])
                        to, qid = control["reply_to"], control["qid"]
                        self.link.submit(AnswerUserConnections(to, qid, found))
            elif isinstance(event, Results):
                for result in event.results:
                    self.results[result.qid] = result
            elif isinstance(event, ChannelMarks):
                self.marks.append(list(event.channels))
            elif isinstance(event, PresenceHeard):
                self.presence.extend(event.news)
            else:
                assert isinstance(event, LinkState | TopicsReady | PresenceLoaded)

    def wait(self, condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout * TIME_FACTOR
        while True:
            for host in self.group:
                host.pump()
            value = condition()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting {what}")

    def start(self, make: Callable[[int], RedisRequest]) -> int:
        qid = next(_qids)
        self.link.submit(make(qid))
        return qid

    def result(self, qid: int, timeout: float = 10.0) -> dict[str, Any]:
        result = self.wait(lambda: self.results.get(qid), timeout, what=f"for result {qid}")
        assert result.ok, result
        body: dict[str, Any] = result.body
        return body

    def run(self, make: Callable[[int], RedisRequest]) -> dict[str, Any]:
        """Submit the operation made with a fresh qid; its result's body (it must succeed)."""
        return self.result(self.start(make))

    def controls(self, op: str) -> list[Delivery]:
        return [d for d in self.deliveries if (d.control or {}).get("op") == op]

    def listeners(self, topic: str) -> int:
        if isinstance(self.server, RedisClusterServer):
            return self.server.subscribers(topic)
        with redis.Redis.from_url(self.server.url) as client:
            return int(client.pubsub_numsub(topic)[0][1])

    def publish_presence(self, users: list[int]) -> None:
        self.seq += 1
        changes = tuple((user, ()) for user in users)
        self.link.submit(PublishPresence("g", self.seq, changes, len(users)))
        inbox = self.link.layout.host_topic(self.link.host)
        self.wait(lambda: self.listeners(inbox) == 1, what="for the inbox subscription")


def online(host: Host, other: Host, users: list[int]) -> None:
    """``other`` publishes its presence with ``users``; wait until ``host`` sees them."""
    other.publish_presence(users)

    def seen() -> bool:  # the delta script updates the user set, then publishes the delta
        return any(
            news.host == other.link.host and {u for u, _ in news.changes} >= set(users)
            for news in host.presence
        )

    host.wait(seen, what=f"for {users} to be online on the other host")


@pytest.fixture
def name() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def started(server: Server, name: str) -> Iterator[Callable[..., Host]]:
    """Start hosts of the cluster ``name``; closed at the end."""
    hosts: list[Host] = []

    def start(**kwargs: Any) -> Host:
        host = Host(server, name, **kwargs)
        hosts.append(host)
        host.group = hosts  # each pumps them all: the others' "routers" answer while it waits
        return host

    try:
        yield start
    finally:
        for host in hosts:
            host.close()


def kill_pubsub_connections(server: Server) -> None:
    """Cut every pub/sub connection (the listeners'): they subscribe again."""
    if isinstance(server, RedisClusterServer):
        urls = [f"redis://127.0.0.1:{port}" for port in server.ports]
    else:
        urls = [server.url]
    for url in urls:
        with redis.Redis.from_url(url) as node:
            node.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


# -- join/leave marks ---------------------------------------------------------------------------


def test_a_mark_reaches_the_other_live_hosts_and_a_host_started_later_reads_it(started):
    a, b = started(), started()
    assert a.marks == [[]] and b.marks == [[]]
    b.publish_presence([])  # alive for the others (its inbox is subscribed)
    a.wait(lambda: a.run(lambda q: SetChannel(q, ChannelId(5), True)) == {"value": 1})
    got = b.wait(lambda: b.controls("set_channel"), what="for the mark on b")
    assert got[0] == Delivery(
        None, [], b"", control={"op": "set_channel", "channel": 5, "join_leave": True}
    )
    assert a.run(lambda q: SetChannel(q, ChannelId(BIG), True))["value"] == 1
    assert a.run(lambda q: SetChannel(q, ChannelId(7), True))["value"] == 1
    assert a.run(lambda q: SetChannel(q, ChannelId(7), False))["value"] == 1
    b.wait(lambda: len(b.controls("set_channel")) == 4, what="for every change, in order")
    changes = [(d.control or {})["channel"] for d in b.controls("set_channel")]
    assert changes == [5, BIG, 7, 7]
    assert [(d.control or {})["join_leave"] for d in b.controls("set_channel")][2:] == [
        True,
        False,
    ]
    assert a.controls("set_channel") == []  # the host that set it is not told
    c = started()
    assert c.marks == [[5, BIG]]
    assert a.link.stats()["marks_set"] == 4


def test_marks_are_read_again_after_the_listener_resubscribes(started, server, name):
    a = started()
    a.run(lambda q: SetChannel(q, ChannelId(3), True))
    with raw_client(server) as client:  # marked by someone else, without telling a
        client.sadd(a.link.layout.marks, "9", "not-an-id")
    count = len(a.marks)
    kill_pubsub_connections(server)
    a.wait(lambda: len(a.marks) > count, what="for the marks after the resubscription")
    assert a.marks[-1] == [3, 9]
    assert a.link.stats()["malformed"] >= 1  # "not-an-id" is counted and left out


# -- a user's connections across hosts ----------------------------------------------------------


def test_user_connections_gather_the_records_of_every_host_that_has_the_user(started):
    a = started()
    b = started(records={7: [record("0.1.1"), record("1.1.4")], BIG: [record("0.1.9")]})
    c = started(records={7: [record("2.3.1", shard=2)]})
    d = started(records={7: [record("9.9.9")]})  # does not have user 7: never asked
    online(a, b, [7, BIG])
    online(a, c, [7])
    online(a, d, [8])
    body = a.run(lambda q: UserConnections(q, 7))
    assert body["missing_hosts"] == []
    by_host = sorted((r["host"], r["conn"]) for r in body["connections"])
    assert by_host == sorted(
        [(b.link.host, "0.1.1"), (b.link.host, "1.1.4"), (c.link.host, "2.3.1")]
    )
    first = next(r for r in body["connections"] if r["conn"] == "0.1.1")
    assert first == {**record("0.1.1"), "host": b.link.host}
    assert d.controls("who") == []
    (asked,) = b.controls("who")
    assert asked.users == [7] and asked.control is not None
    assert asked.control["reply_to"] == a.link.host and asked.control["user"] == 7
    big = a.run(lambda q: UserConnections(q, BIG))
    assert [r["conn"] for r in big["connections"]] == ["0.1.9"]
    assert a.run(lambda q: UserConnections(q, 12345)) == {"connections": [], "missing_hosts": []}
    stats = a.link.stats()
    assert stats["who_asked"] == 3 and stats["who_answers"] == 3
    assert b.link.stats()["who_replied"] == 2


def test_a_host_that_does_not_answer_is_missing_at_the_deadline(started):
    a = started(ask_timeout=0.5)
    b = started(records={7: [record("0.1.1")]})
    silent = started()  # has the user but its "router" never answers
    online(a, b, [7])
    online(a, silent, [7])
    qid = a.start(lambda q: UserConnections(q, 7))
    body = a.result(qid)
    assert body["missing_hosts"] == [silent.link.host]
    assert [(r["host"], r["conn"]) for r in body["connections"]] == [(b.link.host, "0.1.1")]
    assert a.link.stats()["who_partial"] == 1
    # its answer, late, is dropped and counted
    (asked,) = silent.wait(lambda: silent.controls("who"), what="for the request")
    silent.link.submit(AnswerUserConnections(a.link.host, qid, [record("late")]))
    a.wait(lambda: a.link.stats()["who_answers_dropped"] == 1, what="for the late answer")
    assert asked.control is not None and asked.control["qid"] == qid


def test_an_answer_is_capped_and_forged_or_oversized_ones_are_counted_and_dropped(started, server):
    a = started(ask_timeout=1.0)
    many = [record(f"0.1.{n}") for n in range(cluster.MAX_ANSWER_RECORDS + 5)]
    b = started(records={7: many})
    online(a, b, [7])
    body = a.run(lambda q: UserConnections(q, 7))
    assert len(body["connections"]) == cluster.MAX_ANSWER_RECORDS and body["truncated"] is True

    # a "who" in flight from a to b: b's router does not answer; others do, badly
    b.records = None
    qid = a.start(lambda q: UserConnections(q, 7))
    b.wait(lambda: len(b.controls("who")) == 2, what="for the second request")
    inbox = a.link.layout.host_topic(a.link.host)
    publish = "SPUBLISH" if a.link.sharded else "PUBLISH"
    now_ms = int(time.time() * 1000)

    with raw_client(server) as client:
        oversized = {"op": "answer", "to": a.link.host, "qid": qid, "connections": many}
        forged = KEY.seal(b"x")[: cluster.MAC_SIZE] + b"\x00" * 40
        other_host = {"op": "answer", "to": "someone-else", "qid": qid, "connections": []}
        unasked = {"op": "answer", "to": a.link.host, "qid": qid, "connections": []}
        for raw in (
            cluster.encode(
                cluster.Message(b.link.host, None, b"", control=oversized, sent_ms=now_ms), KEY
            ),
            forged,
            cluster.encode(
                cluster.Message(b.link.host, None, b"", control=other_host, sent_ms=now_ms), KEY
            ),
            cluster.encode(
                cluster.Message("not-asked", None, b"", control=unasked, sent_ms=now_ms), KEY
            ),
        ):
            client.execute_command(publish, inbox, raw)

    def counted() -> bool:
        stats = a.link.stats()
        return (
            stats["oversized"] == 1 and stats["forged"] == 2 and stats["who_answers_dropped"] == 1
        )

    a.wait(counted, what="for the bad answers to be counted")
    assert qid not in a.results  # none of them was taken
    b.link.submit(AnswerUserConnections(a.link.host, qid, [record("ok")]))
    assert [r["conn"] for r in a.result(qid)["connections"]] == ["ok"]
