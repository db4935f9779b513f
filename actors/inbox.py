"""A pykka actor that also owns ZeroMQ sockets: its inbox waits on both.

Owns: :class:`PollingInbox` (pykka's inbox protocol over a deque plus a ``zmq.Poller`` that also
watches an eventfd, opened here and rung by ``put``) and :class:`SocketActor`, the base of the
RouterActor (the CacheActor runs on its shard's event loop instead: see ``loopactor``). The
actor's own thread reads its sockets and its mailbox in turn, so every socket has exactly one
owning thread and a message from a socket never takes an extra hop. Must never process messages
itself, nor read from the sockets it watches: readiness and timers become ordinary messages to
the actor (:class:`SocketsReady`, :class:`Tick`), and a due timer goes before anything else.
An actor may hold its sockets for a moment (``hold``) to take what arrives meanwhile in one turn.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pykka
import zmq
from pykka._envelope import Envelope


@dataclass(frozen=True, slots=True)
class SocketsReady:
    """Delivered to the actor when one of its sockets has something to read (``sockets``: the
    raw descriptors it watches first, then its ZeroMQ sockets in the order they were
    registered; a descriptor that hung up or failed counts as readable: its read says how),
    or when a descriptor watched for writing can be written (``writable``)."""

    sockets: tuple[zmq.Socket[bytes] | int, ...]
    writable: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Tick:
    """Delivered to the actor when its timer (``next_timer``) comes due. It carries no time:
    the actor reads the clock when it handles it (the only time that matters then)."""


# plain ints (zmq_poll's answers are ints; pyzmq's enum arithmetic costs per call). zmq_poll
# reports a raw descriptor's hang-up as POLLERR
_READABLE = int(zmq.POLLIN | zmq.POLLERR)
_IN = int(zmq.POLLIN)
_IN_OUT = int(zmq.POLLIN | zmq.POLLOUT)
_OUT = int(zmq.POLLOUT)
FD_SETSIZE = 1024  # select() takes descriptors below this only


class PollingInbox:
    """pykka's ``ActorInbox`` protocol: ``put`` from any thread, ``get`` on the actor's thread."""

    def __init__(self) -> None:
        self._queue: deque[Envelope[Any]] = deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = zmq.Poller()
        self._poller.register(self._wake, zmq.POLLIN)
        # a hold waits on the eventfd alone: with select, to the microsecond, if it can
        # (descriptors below FD_SETSIZE); else with poll, to the millisecond, never early
        self._hold_poll: select.poll | None = None
        if self._wake >= FD_SETSIZE:
            self._hold_poll = select.poll()
            self._hold_poll.register(self._wake, select.POLLIN)
        self._sockets: list[zmq.Socket[bytes] | int] = []
        self._writers: set[int] = set()  # raw descriptors also watched for writing
        self.next_timer: float | None = None
        # until then, the sockets are not polled (the mailbox and the timer are): what arrives
        # meanwhile is read in one turn (see RouterActor's batch window)
        self.hold_until: float | None = None

    def register(self, sock: zmq.Socket[bytes]) -> None:
        """Watch a ZeroMQ socket for reading (a raw descriptor: :meth:`watch_fd`)."""
        self._sockets.append(sock)
        self._poller.register(sock, zmq.POLLIN)

    def watch_fd(self, fd: int, writable: bool = False) -> None:
        """Watch a raw descriptor for reading, and with ``writable`` for writing too (called
        again: changes that). Raw descriptors come first in :class:`SocketsReady`."""
        if fd not in self._sockets:
            self._sockets.insert(0, fd)
        if writable:
            self._writers.add(fd)
        else:
            self._writers.discard(fd)
        self._poller.register(fd, _IN_OUT if writable else _IN)

    def unwatch_fd(self, fd: int) -> None:
        """Stop watching a raw descriptor (before it is closed)."""
        if fd in self._sockets:
            self._sockets.remove(fd)
            self._writers.discard(fd)
            self._poller.unregister(fd)

    def unregister_all(self) -> None:
        for sock in self._sockets:
            self._poller.unregister(sock)
        self._sockets.clear()
        self._writers.clear()

    def close(self) -> None:
        """Close the eventfd. Only once no thread can ``put`` any more (pykka may still hand
        a dead actor's inbox a message), so the RouterActor never does: its one inbox lives as
        long as its process. Tests, which make many, do."""
        self.unregister_all()
        self._poller.unregister(self._wake)
        os.close(self._wake)

    def put(self, envelope: Envelope[Any], /) -> None:
        self._queue.append(envelope)
        os.eventfd_write(self._wake, 1)

    def empty(self) -> bool:
        return not self._queue

    def get(self) -> Envelope[Any]:
        while True:
            # a due timer goes first: heartbeats and deadlines must not queue behind a flood
            timeout_ms: int | None = None
            if self.next_timer is not None:
                now = time.monotonic()
                if now >= self.next_timer:
                    self.next_timer = None
                    return Envelope(Tick())
                timeout_ms = max(1, int((self.next_timer - now) * 1000) + 1)
            if self._queue:
                return self._queue.popleft()
            if self.hold_until is not None and self._hold():
                continue
            ready = dict(self._poller.poll(timeout_ms))
            if self._wake in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            readable = tuple(s for s in self._sockets if ready.get(s, 0) & _READABLE)
            writable = tuple(fd for fd in self._writers if ready.get(fd, 0) & _OUT)
            if readable or writable:
                return Envelope(SocketsReady(readable, writable))

    def _hold(self) -> bool:
        """While ``hold_until`` is ahead: wait for the mailbox or the timer only (at most
        until then), and say so (True); the sockets are not polled. Once it is past: clear
        it (False)."""
        assert self.hold_until is not None
        now = time.monotonic()
        if now >= self.hold_until:
            self.hold_until = None
            return False
        until = (
            self.hold_until if self.next_timer is None else min(self.hold_until, self.next_timer)
        )
        # select: microseconds (zmq_poll counts in milliseconds, too coarse for a hold)
        wait = max(0.0, until - now)
        if self._hold_poll is not None:
            woken = bool(self._hold_poll.poll(wait * 1000))  # rounded up to a millisecond
        else:
            woken = bool(select.select([self._wake], [], [], wait)[0])
        if woken:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)
        return True


class SocketActor(pykka.ThreadingActor):
    """A ThreadingActor whose inbox also polls the ZeroMQ sockets it registers."""

    # a daemon thread: if the process's main thread dies, the process must die with it (and be
    # restarted), not linger with a live actor and a dead event loop
    use_daemon_thread = True

    actor_inbox: PollingInbox

    @staticmethod
    def _create_actor_inbox() -> PollingInbox:
        return PollingInbox()

    def watch(self, sock: zmq.Socket[bytes]) -> None:
        """Have readiness of ``sock`` delivered as :class:`SocketsReady` (actor thread only)."""
        self.actor_inbox.register(sock)

    def watch_fd(self, fd: int, writable: bool = False) -> None:
        """Have readiness of a raw descriptor delivered (see :meth:`PollingInbox.watch_fd`)."""
        self.actor_inbox.watch_fd(fd, writable)

    def unwatch_fd(self, fd: int) -> None:
        self.actor_inbox.unwatch_fd(fd)

    def hold(self, until: float) -> None:
        """Poll no socket before monotonic time ``until`` (the mailbox and the timer still
        wake the actor); then whatever arrived meanwhile is reported in one go."""
        self.actor_inbox.hold_until = until

    def set_timer(self, when: float | None) -> None:
        """Deliver a :class:`Tick` at monotonic time ``when`` (replaces any earlier timer)."""
        self.actor_inbox.next_timer = when

    def on_stop(self) -> None:
        self.actor_inbox.unregister_all()
