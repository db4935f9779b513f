"""The supervisor's bookkeeping, as plain objects: which news about a shard to believe, and
which connections handed to a shard are still ours (real sockets, no processes)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from actors.wire.tokens import Claims
from shards.handoff import Ack, encode
from shards.inflight import Handoffs, request_unread
from shards.supervisor import ShardProcess

REQUEST = b"GET /?token=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
CLAIMS = Claims(1, (), 0.0)


def spawned(shard: ShardProcess) -> ShardProcess:
    """What ``Supervisor._spawn`` records of a new incarnation."""
    shard.epoch += 1
    shard.running = True
    return shard


def test_news_about_the_live_incarnation_is_current():
    shard = spawned(ShardProcess(0))
    assert shard.current(1)
    assert not shard.current(0)  # an older incarnation's
    assert not ShardProcess(1).current(0)  # never spawned


def test_an_up_handled_after_the_process_exited_is_not_current():
    # the router's UP (from the shard's hello) and the pidfd's exit race to the supervisor's loop
    shard = spawned(ShardProcess(0))
    shard.running = False  # what Supervisor._exited records first
    assert not shard.current(1)
    spawned(shard)
    assert shard.current(2)
    assert not shard.current(1)


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """A factory's list of (client, ours): our end non-blocking, as the acceptor hands it over."""
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for client, ours in made:
        client.close()
        ours.close()


def connection(pairs, request: bytes = REQUEST) -> tuple[socket.socket, socket.socket]:
    client, ours = socket.socketpair()
    ours.setblocking(False)
    client.sendall(request)
    pairs.append((client, ours))
    return client, ours


def taken(pairs, then: bytes = b"") -> tuple[socket.socket, socket.socket]:
    """A connection whose request the shard has read (and the client sent ``then`` since)."""
    client, ours = connection(pairs)
    assert ours.recv(len(REQUEST)) == REQUEST  # as the shard does, through its own copy
    if then:
        client.sendall(then)
    return client, ours


def ack(*ids: int) -> bytes:
    return encode(Ack(ids))  # what the shard sends


def test_an_acknowledged_connection_is_released_exactly_once(pairs):
    handoffs = Handoffs()
    _, first = connection(pairs)
    _, second = connection(pairs)
    handoffs.sent(1, CLAIMS, first, now=0.0)
    handoffs.sent(2, CLAIMS, second, now=0.0)
    assert handoffs.ack(ack(1))
    assert first.fileno() == -1
    assert second.fileno() != -1
    assert handoffs.ack(ack(1, 7))  # again, and an id it was never given: ignored, counted
    assert list(handoffs.entries) == [2]
    assert handoffs.counters["acked"] == 1
    assert handoffs.counters["unknown_ids"] == 2


# every malformed shape decode_ack refuses is in test_handoff.py; here, what Handoffs does then
@pytest.mark.parametrize("data", [b"garbage", b'{"op": "ack", "ids": [true]}', b"[" * 100_000])
def test_a_malformed_ack_is_counted_and_releases_nothing(pairs, data):
    handoffs = Handoffs()
    _, ours = connection(pairs)
    handoffs.sent(1, CLAIMS, ours, now=0.0)
    assert handoffs.ack(data) is False
    assert handoffs.counters["malformed_acks"] == 1
    assert ours.fileno() != -1
    assert list(handoffs.entries) == [1]


def test_the_request_tells_whether_the_shard_took_the_connection(pairs):
    assert request_unread(connection(pairs)[1])
    assert not request_unread(taken(pairs)[1])
    assert not request_unread(taken(pairs, then=b"\x81\x85abcd")[1])  # a frame followed
    client, ours = taken(pairs)
    client.close()
    assert not request_unread(ours)  # and the client is gone


def test_a_taken_connection_whose_ack_was_lost_is_released_after_the_timeout(pairs):
    handoffs = Handoffs()
    _, old_taken = taken(pairs)
    _, old_unread = connection(pairs)
    _, young_taken = taken(pairs)
    handoffs.sent(1, CLAIMS, old_taken, now=0.0)
    handoffs.sent(2, CLAIMS, old_unread, now=0.0)
    handoffs.sent(3, CLAIMS, young_taken, now=9.0)
    assert handoffs.reconcile(now=10.0, timeout=2.0) == 1
    assert old_taken.fileno() == -1
    assert list(handoffs.entries) == [2, 3]  # not read yet; not late yet
    assert handoffs.counters["taken_unacked"] == 1
    assert handoffs.ack(ack(1, 3))  # the lost ack turns up after all: counted, not released twice
    assert handoffs.counters == {
        "acked": 1,
        "malformed_acks": 0,
        "unknown_ids": 1,
        "taken_unacked": 1,
    }


def test_when_the_shard_dies_only_unread_connections_wait_for_the_next_one(pairs):
    handoffs = Handoffs()
    _, unread = connection(pairs)
    _, read = taken(pairs)  # its ack was lost
    _, talking = taken(pairs, then=b"\x81\x85abcd")
    handoffs.sent(1, CLAIMS, unread, now=0.0)
    handoffs.sent(2, CLAIMS, read, now=0.0)
    handoffs.sent(3, CLAIMS, talking, now=0.0)
    waiting, closed = handoffs.orphaned()
    assert [entry.sock for entry in waiting] == [unread]
    assert closed == 2
    assert read.fileno() == talking.fileno() == -1
    assert unread.fileno() != -1  # the supervisor holds it for the next incarnation
    assert not handoffs.entries
