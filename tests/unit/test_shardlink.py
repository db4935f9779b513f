"""actors.shardlink: the router ↔ shard hop over a real Unix socket, driven call by call on the
test's thread (no poller: the test reads and writes when it chooses, as the router's and a
shard's loops would on readiness)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from actors.shardlink import GREETING_TIMEOUT, Bounds, Outbox, RouterLink, ShardLinks
from actors.wire import shardwire
from actors.wire.stream import encode

IDENTITY = shardwire.identity(0, 1)
DEADLINE = 2000  # reads at most before a test gives up waiting for bytes (each non-blocking)


class Watched:
    """What ShardLinks asked the poller to watch: fd -> writable too."""

    def __init__(self) -> None:
        self.fds: dict[int, bool] = {}

    def watch_fd(self, fd: int, writable: bool = False) -> None:
        self.fds[fd] = writable

    def unwatch_fd(self, fd: int) -> None:
        del self.fds[fd]


@pytest.fixture
def links(tmp_path) -> Iterator[tuple[ShardLinks, Watched, str]]:
    watched = Watched()
    path = f"{tmp_path}/router.sock"
    router = ShardLinks(path, Bounds(messages=10, size=64 * 1024), watched)
    router.start()
    yield router, watched, path
    router.close()


def accept(router: ShardLinks) -> None:
    router.readable(router.listener.fileno())


def collect(router: ShardLinks, count: int) -> list[tuple[bytes, list[bytes]]]:
    got: list[tuple[bytes, list[bytes]]] = []
    for _ in range(DEADLINE):
        got += router.read_all()
        if len(got) >= count:
            return got
    raise AssertionError(f"{len(got)} of {count} messages arrived")


def connected(router: ShardLinks, path: str, bounds: Bounds | None = None) -> RouterLink:
    link = RouterLink(path, IDENTITY, bounds or Bounds(100, 1 << 20))
    accept(router)
    for _ in range(DEADLINE):
        assert router.read_all() == []  # the greeting is taken, not returned
        if IDENTITY in router.by_identity:
            return link
    raise AssertionError("the shard's greeting never registered it")


def test_a_shard_greets_with_its_identity_then_messages_flow_both_ways(links):
    router, watched, path = links
    link = connected(router, path)
    assert link.send(shardwire.pulse(3, 400))
    assert collect(router, 1) == [(IDENTITY, shardwire.pulse(3, 400))]
    assert router.by_identity.keys() == {IDENTITY}
    assert watched.fds == {router.listener.fileno(): False, next(iter(router.peers)): False}
    delivery = shardwire.channel_delivery(7, b"frame")
    assert router.send(IDENTITY, delivery)
    for _ in range(DEADLINE):
        if (message := link.receive()) is not None:
            break
    assert message == delivery
    assert link.receive() is None  # nothing more: no wait
    link.close()


def test_a_send_to_a_shard_not_connected_is_refused(links):
    router, _watched, _path = links
    assert not router.send(shardwire.identity(1, 1), shardwire.channel_delivery(1, b"x"))


def test_a_shard_that_does_not_read_fills_its_queue_then_is_refused_and_loses_nothing_queued(
    links,
):
    router, watched, path = links
    link = connected(router, path)
    accepted = 0
    for _ in range(10_000):  # the kernel's buffers, then the 64 KiB queue
        if not router.send(IDENTITY, shardwire.channel_delivery(accepted, b"x" * 16_000)):
            break
        accepted += 1
    else:
        raise AssertionError("never refused")
    (fd,) = router.peers
    assert watched.fds[fd] is True  # bytes wait: the poller watches for writing
    assert router.peers[fd].outbox.size <= 64 * 1024 + 16_100
    received: list[int] = []
    for _ in range(100_000):  # the shard reads; the router writes what waits as it can
        router.writable(fd)
        while (message := link.receive()) is not None:
            assert message[2] == b"x" * 16_000
            received.append(shardwire.channel_target(message[1])[0])
        if len(received) == accepted:
            break
    assert received == list(range(accepted))  # every accepted message, whole and in order
    assert watched.fds[fd] is False  # nothing waits: no more write readiness
    link.close()


def test_a_shard_that_leaves_is_dropped_and_sends_to_it_are_refused(links):
    router, watched, path = links
    link = connected(router, path)
    link.close()
    for _ in range(DEADLINE):
        router.read_all()
        if not router.peers:
            break
    assert not router.peers and IDENTITY not in router.by_identity
    assert list(watched.fds) == [router.listener.fileno()]
    assert not router.send(IDENTITY, shardwire.channel_delivery(1, b"x"))
    assert router.counters["shard_link_errors"] == 0  # a clean end is not an error


def test_the_router_leaving_ends_the_shard_link(links):
    router, _watched, path = links
    link = connected(router, path)
    assert router.send(IDENTITY, shardwire.indexed(1))
    router.close()
    assert link.receive() == shardwire.indexed(1)  # what was sent before still arrives
    with pytest.raises(ConnectionError):
        link.receive()
    assert not link.send(shardwire.pulse(1, 1))  # no exception: a refusal
    link.close()


def test_a_shard_killed_with_bytes_unread_still_has_its_last_messages_read(links):
    """A Unix socket closed with bytes unread makes the other end's read fail with ECONNRESET
    after what was sent before: those last messages are read, and it is no error."""
    router, _watched, path = links
    link = connected(router, path)
    for n in range(3):
        assert router.send(IDENTITY, shardwire.indexed(n))  # the shard never reads them
    assert link.send(shardwire.events([])) and link.send(shardwire.pulse(9, 9))
    link.close()
    got = collect(router, 2)
    assert got == [(IDENTITY, shardwire.events([])), (IDENTITY, shardwire.pulse(9, 9))]
    for _ in range(DEADLINE):
        router.read_all()
        if not router.peers:
            break
    assert not router.peers
    assert router.counters["shard_link_errors"] == 0


def test_a_failed_write_stops_the_writes_but_not_the_reads(links):
    """The router writes to a shard that has gone: the write fails, sends to it are refused,
    yet what the shard sent before it went is still read."""
    router, watched, path = links
    link = connected(router, path)
    assert link.send(shardwire.result(5, {"users": []}))
    link.close()
    (fd,) = router.peers
    refused = False
    for _ in range(DEADLINE):  # the kernel tells of the end on a write, sooner or later
        if not router.send(IDENTITY, shardwire.indexed(1)):
            refused = True
            break
    assert refused
    assert IDENTITY not in router.by_identity and watched.fds[fd] is False
    assert collect(router, 1) == [(IDENTITY, shardwire.result(5, {"users": []}))]


def test_a_partial_message_is_not_ready_and_a_whole_one_is(links):
    router, _watched, path = links
    link = connected(router, path)
    data = encode(shardwire.channel_delivery(1, b"y" * 1000))
    peer = router.by_identity[IDENTITY]
    peer.sock.sendall(data[:500])
    for _ in range(DEADLINE):
        assert link.receive() is None
        if link.decoder.buffered == 500:
            break
    assert not link.ready  # a shard's loop must not come back for it before more arrives
    peer.sock.sendall(data[500:])
    for _ in range(DEADLINE):
        if (message := link.receive()) is not None:
            break
    assert message == shardwire.channel_delivery(1, b"y" * 1000)
    link.close()


@pytest.mark.parametrize(
    "greeting",
    [encode([b"not-a-shard"]), encode([IDENTITY, b"extra"]), b"\xff" * 64],
    ids=["bad identity", "two frames", "garbage"],
)
def test_a_peer_that_does_not_greet_as_a_shard_is_dropped_and_counted(links, greeting):
    router, _watched, path = links
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
        intruder.connect(path)
        intruder.sendall(greeting)
        accept(router)
        for _ in range(DEADLINE):
            assert router.read_all() == []
            if not router.peers:
                break
    assert not router.peers and not router.by_identity
    assert router.counters["shard_link_errors"] == 1


def test_a_connection_that_never_greets_is_dropped_after_the_greeting_timeout(links):
    router, watched, path = links
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)
        accept(router)
        (peer,) = router.peers.values()
        assert peer.fd in watched.fds
        link = connected(router, path)  # a shard that greets, alongside
        router.drop_silent(peer.accepted + GREETING_TIMEOUT)  # not yet
        assert len(router.peers) == 2
        router.drop_silent(peer.accepted + GREETING_TIMEOUT + 0.001)
        assert list(router.by_identity) == [IDENTITY]  # the shard that greeted stays
        assert len(router.peers) == 1 and peer.fd not in watched.fds
        assert router.counters["shard_link_errors"] == 1
        silent.settimeout(5)
        assert silent.recv(1) == b""  # its descriptor was closed: it sees the end
        link.close()


def test_the_shard_end_refuses_past_its_bounds_while_the_router_does_not_read(links):
    router, _watched, path = links
    link = connected(router, path, Bounds(messages=5, size=1 << 20))
    sent = 0
    for _ in range(100_000):
        if not link.send(shardwire.pulse(sent, sent)):
            break
        sent += 1
    else:
        raise AssertionError("never refused")
    assert link.pending and link.outbox.messages <= 5
    got = collect(router, 1)
    for _ in range(100_000):
        link.flush()
        got += router.read_all()
        if len(got) == sent:
            break
    assert [shardwire.unpack_ids(m[1]) for _i, m in got] == [[n, n] for n in range(sent)]
    assert not link.pending
    link.close()


def test_an_outbox_is_bounded_in_messages_and_bytes_but_always_takes_one():
    box = Outbox(Bounds(messages=2, size=100))
    assert box.room(1000, 50)  # empty: one write of any size waits
    box.put(b"x" * 60, 1)
    assert box.room(40, 1) and not box.room(41, 1) and not box.room(10, 2)
    box.put(b"y" * 40, 1)
    assert not box.room(0, 1)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        box.write_to(a.send)
        assert not box and box.size == 0 and box.messages == 0
        assert b.recv(200) == b"x" * 60 + b"y" * 40
