"""actors.router_actor: how much of the commands socket one router turn reads
(RouterActor._drain), and the actor's own receive and send of whole messages. Real ZeroMQ
sockets (inproc) on the test's own thread; the router's core is replaced by one that records
each command and, for the slow case, spends a fixed time on it (a busy loop on the clock: the
work a command costs, not a wait for anything)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from actors.router_actor import ROUND, RouterActor, _recv, _send, drain_round

BOUND = 5.0  # seconds: the longest the test waits for its messages to be readable


class Core:
    """Records what the turn hands it: (envelope, payload, now) per command."""

    def __init__(self, cost: float = 0.0) -> None:
        self.cost = cost
        self.seen: list[tuple[list[bytes], bytes, float]] = []

    def command(self, envelope: list[bytes], raw: bytes, now: float) -> None:
        self.seen.append((envelope, raw, now))
        until = time.monotonic() + self.cost
        while time.monotonic() < until:
            pass


@pytest.fixture
def sockets() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx: zmq.Context[Any] = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # as the router's
    frontend.bind("inproc://commands")
    backend.setsockopt(zmq.ROUTING_ID, b"backend-1")
    backend.connect("inproc://commands")
    try:
        yield frontend, backend
    finally:
        frontend.close(linger=0)
        backend.close(linger=0)
        ctx.term()


def queued(frontend: zmq.Socket[bytes], backend: zmq.Socket[bytes], n: int) -> None:
    for i in range(n):
        backend.send_multipart([b"", b'{"n":%d}' % i])
    assert frontend.poll(int(BOUND * 1000)), "the commands never became readable"


def turn(core: Core, round_: float = ROUND) -> SimpleNamespace:
    """What _drain reads of the actor: its round, its batch window's counts, its core."""
    return SimpleNamespace(round=round_, senders=None, core=core)


def test_a_turn_reads_every_command_there_is_and_says_it_emptied_the_socket(sockets):
    """All of them, in order, each dated from the turn that reads it ("now", however old:
    the round is counted from the drain's own start)."""
    frontend, backend = sockets
    queued(frontend, backend, 200)
    core = Core()
    turn_start = time.monotonic() - 60.0
    assert RouterActor._drain(turn(core, round_=BOUND), frontend, turn_start) is True
    assert [raw for _env, raw, _now in core.seen] == [b'{"n":%d}' % i for i in range(200)]
    assert all(env == [b"backend-1", b""] for env, _raw, _now in core.seen)
    assert {now for _env, _raw, now in core.seen} == {turn_start}


def test_a_turn_of_slow_commands_stops_after_its_round(sockets):
    """Each command costs at least 1 ms and the round is 10: the turn stops after 11 of them
    at most (fewer if this thread was preempted; not after the 64 it read before looking at
    the clock once), and leaves the rest readable."""
    frontend, backend = sockets
    queued(frontend, backend, 100)
    core = Core(cost=0.001)
    assert RouterActor._drain(turn(core, round_=0.01), frontend, time.monotonic()) is False
    assert 1 <= len(core.seen) <= 11
    left = 0
    while frontend.poll(0):
        frontend.recv_multipart()
        left += 1
    assert left == 100 - len(core.seen)


@pytest.mark.parametrize("delay", [0.001, 0.02, 0.1, 5.0])
def test_the_round_leaves_the_shards_most_of_their_queue_delay(delay):
    """Two rounds of the router's own time count in a shard's backlog age: 10 ms at most,
    and a tenth of a --shard-queue-delay under 0.1 s."""
    assert drain_round(delay) == pytest.approx(min(0.01, delay / 10))
    assert 2 * drain_round(delay) <= delay / 5 + 1e-12


def test_messages_come_and_go_whole_through_the_actors_own_recv_and_send(sockets):
    frontend, backend = sockets
    with pytest.raises(zmq.Again):
        _recv(frontend)  # nothing yet: it never blocks
    sent = [[b"one"], [b"", b"two"], [b"", b"", b"three", b"x" * 70_000], [b""]]
    for message in sent:
        backend.send_multipart(message)
    assert frontend.poll(int(BOUND * 1000))
    assert [_recv(frontend) for _ in sent] == [[b"backend-1", *m] for m in sent]
    with pytest.raises(zmq.Again):
        _recv(frontend)
    assert _send(frontend, [b"backend-1", b"", b"reply"])
    assert backend.poll(int(BOUND * 1000))
    assert backend.recv_multipart() == [b"", b"reply"]
    assert not _send(frontend, [b"gone", b"", b"reply"])  # ROUTER_MANDATORY: no such peer
