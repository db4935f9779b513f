"""actors.inbox.PollingInbox: pykka's inbox protocol over a deque, an eventfd and a zmq.Poller.

Real eventfds and real ZeroMQ sockets (inproc), on the test's own thread: ``get`` is called
only when it has something to return, or with a timer as its bound (a :class:`Tick` at worst),
so no wait is unbounded and nothing sleeps to synchronise. One test uses a second thread, as
``put`` from another thread is what the eventfd is for.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from pykka._envelope import Envelope

from actors.inbox import PollingInbox, SocketsReady, Tick

BOUND = 5.0  # seconds: the longest any get() here may block (a failing test, not a slow one)


@pytest.fixture
def inbox() -> Iterator[PollingInbox]:
    box = PollingInbox()
    yield box
    box.close()


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def pair(context) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A connected PAIR of inproc sockets: (the inbox's end, the peer)."""
    ours, peer = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    address = f"inproc://inbox-{id(ours)}"
    ours.bind(address)
    peer.connect(address)
    yield ours, peer
    ours.close(0)
    peer.close(0)


def bounded_get(box: PollingInbox) -> Any:
    """``get`` with a timer at BOUND as its bound; the message delivered."""
    if box.next_timer is None:
        box.next_timer = time.monotonic() + BOUND
    return box.get().message


def wake_pending(box: PollingInbox) -> bool:
    """Whether the inbox's eventfd has been rung and not yet read."""
    readable, _, _ = select.select([box._wake], [], [], 0)
    return bool(readable)


def test_messages_come_out_in_the_order_they_were_put(inbox):
    for n in range(3):
        inbox.put(Envelope(n))
    assert not inbox.empty()
    assert [inbox.get().message for _ in range(3)] == [0, 1, 2]
    assert inbox.empty()


def test_put_rings_the_eventfd_and_a_stale_ring_is_absorbed_not_delivered(inbox):
    inbox.put(Envelope("a"))
    assert wake_pending(inbox)
    assert inbox.get().message == "a"  # from the queue, without polling
    inbox.next_timer = time.monotonic() + 0.05
    # the ring left over from "a" wakes the poll once: read and forgotten, then the timer
    assert isinstance(inbox.get().message, Tick)
    assert not wake_pending(inbox)


def test_a_due_timer_goes_before_queued_messages_and_is_delivered_once(inbox):
    inbox.put(Envelope("queued"))
    inbox.next_timer = time.monotonic() - 1.0
    assert isinstance(inbox.get().message, Tick)
    assert inbox.next_timer is None  # one Tick per timer: the actor sets the next one
    assert inbox.get().message == "queued"


def test_a_future_timer_waits_until_due(inbox):
    due = time.monotonic() + 0.05
    inbox.next_timer = due
    assert isinstance(inbox.get().message, Tick)
    assert time.monotonic() >= due


def test_a_readable_socket_is_reported_without_being_read(inbox, pair):
    ours, peer = pair
    inbox.register(ours)
    peer.send(b"hello")
    message = bounded_get(inbox)
    assert message == SocketsReady((ours,))
    assert ours.recv(zmq.NOBLOCK) == b"hello"  # still there for the actor to read


def test_only_the_sockets_that_are_readable_are_reported(inbox, context):
    socks = []
    for n in range(3):
        ours, peer = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        ours.bind(f"inproc://many-{id(inbox)}-{n}")
        peer.connect(f"inproc://many-{id(inbox)}-{n}")
        inbox.register(ours)
        socks.append((ours, peer))
    try:
        socks[2][1].send(b"x")
        socks[0][1].send(b"y")
        assert bounded_get(inbox) == SocketsReady((socks[0][0], socks[2][0]))  # in order
    finally:
        for ours, peer in socks:
            ours.close(0)
            peer.close(0)


def test_queued_messages_go_before_socket_readiness(inbox, pair):
    ours, peer = pair
    inbox.register(ours)
    peer.send(b"x")
    inbox.put(Envelope("first"))
    assert inbox.get().message == "first"
    assert bounded_get(inbox) == SocketsReady((ours,))


def test_unregistered_sockets_are_no_longer_watched(inbox, pair):
    ours, peer = pair
    inbox.register(ours)
    inbox.unregister_all()
    peer.send(b"x")
    inbox.next_timer = time.monotonic() + 0.05
    assert isinstance(inbox.get().message, Tick)  # not SocketsReady


@pytest.fixture
def stream_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of Unix stream sockets: (the inbox's end, the peer)."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def test_raw_descriptors_are_reported_readable_first_and_writable_when_asked(
    inbox, pair, stream_pair
):
    zsock, zpeer = pair
    ours, peer = stream_pair
    inbox.register(zsock)
    inbox.watch_fd(ours.fileno())
    zpeer.send(b"x")
    peer.send(b"y")
    # raw descriptors first; not writable (not asked, though it could be written)
    assert bounded_get(inbox) == SocketsReady((ours.fileno(), zsock))
    assert ours.recv(10) == b"y"  # not read by the inbox
    assert zsock.recv(zmq.NOBLOCK) == b"x"
    inbox.watch_fd(ours.fileno(), writable=True)
    assert bounded_get(inbox) == SocketsReady((), (ours.fileno(),))
    inbox.watch_fd(ours.fileno())  # reading only again
    inbox.next_timer = time.monotonic() + 0.05
    assert isinstance(inbox.get().message, Tick)


def test_a_descriptor_whose_peer_hung_up_is_reported_readable(inbox, stream_pair):
    ours, peer = stream_pair
    inbox.watch_fd(ours.fileno())
    peer.close()
    assert bounded_get(inbox) == SocketsReady((ours.fileno(),))
    assert ours.recv(10) == b""  # its read says how: the end


def test_an_unwatched_descriptor_is_no_longer_reported(inbox, stream_pair):
    ours, peer = stream_pair
    inbox.watch_fd(ours.fileno(), writable=True)
    inbox.unwatch_fd(ours.fileno())
    inbox.unwatch_fd(ours.fileno())  # again: nothing
    peer.send(b"x")
    inbox.next_timer = time.monotonic() + 0.05
    assert isinstance(inbox.get().message, Tick)


def test_a_put_from_another_thread_wakes_a_waiting_get(inbox):
    started = threading.Event()

    def producer() -> None:
        started.set()
        inbox.put(Envelope("from afar"))

    thread = threading.Thread(target=producer)
    inbox.next_timer = time.monotonic() + BOUND  # the bound: a Tick if the wake-up were lost
    began = time.monotonic()
    thread.start()
    assert started.wait(BOUND)
    message = inbox.get().message
    thread.join(BOUND)
    assert message == "from afar"
    assert time.monotonic() - began < BOUND


def test_close_releases_the_eventfd():
    box = PollingInbox()
    fd = box._wake
    box.close()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.fixture
def waiting(inbox, pair) -> zmq.Socket[bytes]:
    """The inbox's end of a pair, registered, with a message waiting on it."""
    ours, peer = pair
    inbox.register(ours)
    peer.send(b"x")
    return ours


def held_then_reported(box: PollingInbox, ours: zmq.Socket[bytes]) -> None:
    """A socket with a message waiting is reported once a 50 ms hold is over, not before."""
    began = time.monotonic()
    box.hold_until = began + 0.05
    assert bounded_get(box) == SocketsReady((ours,))  # once the hold is over
    assert time.monotonic() >= began + 0.05
    assert box.hold_until is None


def mail_wakes_the_hold(box: PollingInbox) -> None:
    """Mail put from another thread during a long hold is delivered at once."""
    began = time.monotonic()
    box.hold_until = began + BOUND
    box.next_timer = began + BOUND
    mailer = threading.Timer(0.01, lambda: box.put(Envelope("mail")))
    mailer.start()
    try:
        assert box.get().message == "mail"  # woken by it, inside the hold
        assert time.monotonic() - began < BOUND / 2
        assert box.hold_until is not None  # the hold goes on: the socket waits for it
    finally:
        mailer.join(BOUND)


def test_a_hold_keeps_sockets_unreported_until_it_ends(inbox, waiting):
    held_then_reported(inbox, waiting)


def test_mail_put_during_a_hold_is_delivered_at_once(inbox, waiting):
    mail_wakes_the_hold(inbox)


def test_a_timer_due_during_a_hold_still_fires_on_time(inbox, waiting):
    now = time.monotonic()
    inbox.hold_until = now + BOUND
    inbox.next_timer = now + 0.02
    assert isinstance(inbox.get().message, Tick)  # not after the hold
    assert time.monotonic() < now + BOUND


@pytest.fixture
def high_inbox() -> Iterator[PollingInbox]:
    """An inbox whose eventfd is 1024 or above, where select() cannot go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1023:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        box = PollingInbox()
    finally:
        for fd in fillers:
            os.close(fd)
    assert box._wake >= 1024
    yield box
    box.close()


def test_an_inbox_whose_eventfd_select_cannot_watch_still_holds_and_wakes(high_inbox, pair):
    ours, peer = pair
    high_inbox.register(ours)
    peer.send(b"x")
    held_then_reported(high_inbox, ours)
    mail_wakes_the_hold(high_inbox)
