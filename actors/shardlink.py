"""The router ↔ shard hop: one Unix stream socket per shard incarnation, no I/O threads.

Owns: :class:`ShardLinks`, the router's end (a listening socket in the host's private run
directory, and one :class:`Peer` per connected shard, known by the identity it sends first),
and :class:`RouterLink`, a shard's end. Both carry :mod:`actors.wire.shardwire` messages framed
by :mod:`actors.wire.stream`, and never block: a write the kernel does not take whole waits in
the sender's own bounded queue (:class:`Outbox`) until the socket is writable; past the queue's
bounds the message is refused (``send`` returns False), and the caller counts it (the router's
``unsent``, the shard's resync), as it did with ZeroMQ's high-water mark. Must never decide
anything about the messages themselves.

Why not ZeroMQ for this hop (issue 14): each ZeroMQ hop wakes an I/O thread on both sides, and
at chat rates (a message every few milliseconds) those wake-ups were most of the CPU of a small
room's broadcast. The router still speaks ZeroMQ to backends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from actors.wire import shardwire
from actors.wire.stream import Decoder, StreamError, encode

log = logging.getLogger("ucc.shardlink")

READ_SIZE = 256 * 1024  # bytes per recv()
READ_TURN = 4  # recv() calls per readable socket per turn at most (the kernel keeps the rest)
SOCKET_BUFFER = 1 << 20  # bytes of kernel buffer asked for each way (the kernel may cap it)
# seconds a connection may take to greet (a shard greets as it connects): one that has not by
# then is no shard, or a stuck one, and its descriptor is taken back
GREETING_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a sender may have waiting in its own queue (beyond the kernel's buffer)."""

    messages: int
    size: int


class Outbox:
    """Bytes the kernel did not take yet, in order; bounded in messages and bytes. A plain
    class: the caller writes (``write_to``) when its socket is writable."""

    __slots__ = ("bounds", "chunks", "messages", "size")

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.chunks: deque[tuple[memoryview, int]] = deque()  # (bytes left, messages in it)
        self.messages = self.size = 0

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def room(self, size: int, messages: int) -> bool:
        """Whether this much more may wait (an empty queue always takes one write)."""
        if not self.chunks:
            return True
        return (
            self.size + size <= self.bounds.size
            and self.messages + messages <= self.bounds.messages
        )

    def put(self, data: bytes | memoryview, messages: int) -> None:
        self.chunks.append((memoryview(data), messages))
        self.size += len(data)
        self.messages += messages

    def write_to(self, send: Callable[[memoryview], int]) -> None:
        """Write what the kernel takes (``send``: a non-blocking ``socket.send``, which may
        raise ``OSError``); the rest stays, in order."""
        chunks = self.chunks
        while chunks:
            data, messages = chunks[0]
            try:
                sent = send(data)
            except BlockingIOError:
                return
            self.size -= sent
            if sent < len(data):
                chunks[0] = (data[sent:], messages)
                return
            chunks.popleft()
            self.messages -= messages


def _send_now(sock: socket.socket, outbox: Outbox, data: bytes, messages: int) -> bool:
    """Queue ``data`` behind what waits (written when the socket is writable), or write it at
    once if nothing does; False if the outbox has no room. ``OSError`` (the peer is gone) is
    the caller's."""
    if outbox:
        if not outbox.room(len(data), messages):
            return False
        outbox.put(data, messages)
        return True
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        outbox.put(memoryview(data)[sent:], messages)
    return True


def _read(sock: socket.socket, decoder: Decoder) -> bool:
    """Read what is there, READ_TURN reads at most, into ``decoder``; False at end of stream.
    A reset is an end too: a Unix socket whose peer closed with bytes unread in its own buffer
    gets ECONNRESET after the data sent before (a shard killed while the router was writing
    to it). Another ``OSError`` is the caller's."""
    for _ in range(READ_TURN):
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return True
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not data:
            return False
        decoder.feed(data)
        if len(data) < READ_SIZE:
            return True
    return True


def _tune(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.setblocking(False)


# -- the router's end ----------------------------------------------------------------------------


class Watcher(Protocol):
    """What :class:`ShardLinks` needs of the router's poller: readiness of raw descriptors,
    to read, and with ``writable`` to write too (watching again changes it)."""

    def watch_fd(self, fd: int, writable: bool = False) -> None: ...

    def unwatch_fd(self, fd: int) -> None: ...


class Peer:
    """One shard incarnation's connection, as the router holds it."""

    __slots__ = ("accepted", "decoder", "fd", "identity", "outbox", "sock")

    def __init__(self, sock: socket.socket, bounds: Bounds, accepted: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.accepted = accepted  # monotonic: it must greet within GREETING_TIMEOUT
        self.identity: bytes | None = None  # its first message
        self.decoder = Decoder()
        self.outbox = Outbox(bounds)


class ShardLinks:
    """The router's end: listens at ``path`` (created here; the directory must be private to
    the host's user), and keeps one :class:`Peer` per connected shard. On the router's thread
    only."""

    def __init__(self, path: str, bounds: Bounds, watcher: Watcher) -> None:
        self.path = path
        self.bounds = bounds
        self.watcher = watcher
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
            self.listener.listen(128)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self.peers: dict[int, Peer] = {}  # by descriptor
        self.by_identity: dict[bytes, Peer] = {}  # the peers that can be written to
        self.accepting = True  # False after accept() failed (out of descriptors) until a tick
        self.counters = {"shard_links": 0, "shard_link_errors": 0}

    def start(self) -> None:
        """Watch the listening socket (once the watcher's thread runs)."""
        self.watcher.watch_fd(self.listener.fileno())

    def readable(self, fd: int) -> list[tuple[bytes, list[bytes]]]:
        """What the socket behind ``fd`` brought: (identity, message) pairs; for the listening
        socket, new peers are accepted (and nothing is returned)."""
        if fd == self.listener.fileno():
            self._accept()
            return []
        peer = self.peers.get(fd)
        if peer is None:
            return []
        received: list[tuple[bytes, list[bytes]]] = []
        failure = ""
        try:
            alive = _read(peer.sock, peer.decoder)
        except OSError as exc:
            alive, failure = False, f"read failed: {exc}"
        try:  # what arrived before an end or a failure is the shard's last words: kept
            while (message := peer.decoder.next()) is not None:
                if peer.identity is None:
                    if not self._identify(peer, message):
                        return received
                    continue
                received.append((peer.identity, message))
        except StreamError as exc:
            self._drop(peer, str(exc))
            return received
        if not alive:
            self._drop(peer, failure)
        return received

    def read_all(self) -> list[tuple[bytes, list[bytes]]]:
        """Whatever every peer has sent (without waiting for readiness); and accept again if
        a failed accept paused it."""
        if not self.accepting:
            self.accepting = True
            self.watcher.watch_fd(self.listener.fileno())
        received: list[tuple[bytes, list[bytes]]] = []
        for fd in list(self.peers):
            received += self.readable(fd)
        return received

    def drop_silent(self, now: float) -> None:
        """Drop the connections that have not greeted within GREETING_TIMEOUT (counted as
        errors): after read_all, on the router's tick."""
        for peer in list(self.peers.values()):
            if peer.identity is None and now - peer.accepted > GREETING_TIMEOUT:
                self._drop(peer, f"no greeting within {GREETING_TIMEOUT:g} s")

    def send(self, identity: bytes, frames: Sequence[bytes], messages: int = 1) -> bool:
        """Queue a message (``messages``: how many shardwire messages it carries, for the
        bound) to the shard incarnation ``identity``; False if it is not connected or its
        queue is full."""
        peer = self.by_identity.get(identity)
        if peer is None:
            return False
        had_backlog = bool(peer.outbox)
        try:
            if not _send_now(peer.sock, peer.outbox, encode(frames), messages):
                return False
        except OSError:
            self._stop_writing(peer)
            return False
        if peer.outbox and not had_backlog:
            self.watcher.watch_fd(peer.fd, writable=True)
        return True

    def writable(self, fd: int) -> None:
        peer = self.peers.get(fd)
        if peer is None:  # dropped earlier in the same turn
            return
        try:  # (after a failed write, the outbox is empty: nothing is written)
            peer.outbox.write_to(peer.sock.send)
        except OSError:
            self._stop_writing(peer)
            return
        if not peer.outbox:
            self.watcher.watch_fd(peer.fd)

    def close(self) -> None:
        """Drop every peer and stop listening (once; again: nothing)."""
        if self.listener.fileno() < 0:
            return
        for peer in list(self.peers.values()):
            self._drop(peer, "")
        with contextlib.suppress(OSError):
            self.watcher.unwatch_fd(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: the shard retries by restarting
                self.counters["shard_link_errors"] += 1
                log.warning("accepting a shard failed: %s", exc)
                # the listener stays readable: not watched again until the next tick, lest
                # the router spin on it
                self.accepting = False
                self.watcher.unwatch_fd(self.listener.fileno())
                return
            _tune(sock)
            peer = Peer(sock, self.bounds, time.monotonic())
            self.peers[peer.fd] = peer
            self.watcher.watch_fd(peer.fd)

    def _identify(self, peer: Peer, message: list[bytes]) -> bool:
        if len(message) != 1 or shardwire.parse_identity(message[0]) is None:
            self._drop(peer, f"not a shard's greeting: {message[:2]!r}")
            return False
        peer.identity = message[0]
        old = self.by_identity.get(peer.identity)
        if old is not None:  # cannot happen (an incarnation connects once): the newer wins
            self._drop(old, "replaced by a new connection of the same incarnation")
        self.by_identity[peer.identity] = peer
        self.counters["shard_links"] += 1
        return True

    def _stop_writing(self, peer: Peer) -> None:
        """A write failed (the shard is gone): sends to it fail from now on, and what waited
        for it is dropped; but the socket stays open and read until its end, so that what the
        shard sent before it went is still read (its last answers, events, changes)."""
        self._unroute(peer)
        peer.outbox = Outbox(self.bounds)
        self.watcher.watch_fd(peer.fd)

    def _unroute(self, peer: Peer) -> None:
        """No send reaches ``peer`` any more."""
        if peer.identity is not None and self.by_identity.get(peer.identity) is peer:
            del self.by_identity[peer.identity]

    def _drop(self, peer: Peer, why: str) -> None:
        if self.peers.pop(peer.fd, None) is None:
            return
        self._unroute(peer)
        if why:
            self.counters["shard_link_errors"] += 1
            log.warning("shard link %r dropped: %s", peer.identity, why)
        with contextlib.suppress(OSError):
            self.watcher.unwatch_fd(peer.fd)
        peer.sock.close()


# -- a shard's end -------------------------------------------------------------------------------


class RouterLink:
    """A shard's end: connects to the router's socket at ``path`` at once (it exists before
    any shard is started; OSError if not) and greets it with ``identity``. The owner reads
    when the descriptor is readable (``receive``), and calls ``flush`` when it is writable
    while ``pending``."""

    def __init__(self, path: str, identity: bytes, bounds: Bounds) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        _tune(self.sock)
        self.decoder = Decoder()
        self.outbox = Outbox(bounds)
        self.closed = False
        self.send([identity])

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> bool:
        """Bytes wait for the socket to be writable."""
        return bool(self.outbox)

    @property
    def ready(self) -> bool:
        """A whole message waits in the decoder (read already): ``receive`` returns it without
        reading the socket."""
        return self.decoder.ready()

    def send(self, frames: Sequence[bytes]) -> bool:
        """False if the queue is full (the router is not reading) or the router is gone."""
        if self.closed:
            return False
        try:
            return _send_now(self.sock, self.outbox, encode(frames), 1)
        except OSError:
            return False

    def flush(self) -> None:
        with contextlib.suppress(OSError):  # a gone router shows on the read side
            self.outbox.write_to(self.sock.send)

    def receive(self) -> list[bytes] | None:
        """The next message from the router, reading the socket if none is buffered; None if
        none has arrived. Raises ``ConnectionError`` once the router has gone and everything it
        sent was taken, ``StreamError`` if the stream is corrupt."""
        message = self.decoder.next()
        if message is not None:
            return message
        failure = ""
        try:
            alive = _read(self.sock, self.decoder)
        except OSError as exc:
            alive, failure = False, f"the router's socket failed: {exc}"
        message = self.decoder.next()
        if message is None and not alive:
            raise ConnectionError(failure or "the router closed the shard's socket")
        return message

    def close(self) -> None:
        self.closed = True
        self.sock.close()
