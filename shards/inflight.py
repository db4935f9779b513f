"""Connections handed to a shard and not yet acknowledged: the supervisor's copies of them.

Owns: :class:`Handoffs` (one per shard incarnation: each connection handed over, with our copy
of its socket, until the shard acknowledges it) and :func:`request_unread`, which tells whether
a shard took a connection by peeking (never reading) at its bytes. Must never consume a byte of
a client's stream, nor hand a connection to a second owner.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from actors.wire.tokens import Claims
from shards.handoff import ControlError, decode_ack


def request_unread(sock: socket.socket) -> bool:
    """Whether the upgrade request is still unread in ``sock``. Only the shard that was handed
    the socket reads it (the acceptor only peeked), so once it is gone, that shard took the
    connection; what follows it is WebSocket frames (or nothing, or the end), not "GET " (a
    client that sends those bytes anyway can only mislead us about its own connection)."""
    try:
        return sock.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"GET "
    except OSError:  # nothing to read (it was read), reset, or closed
        return False


@dataclass(eq=False, slots=True)
class InFlight:
    claims: Claims
    sock: socket.socket
    sent: float  # monotonic


class Handoffs:
    """The connections handed to a shard that it has not acknowledged yet, with our copy of each
    socket: if the shard dies before taking one, we still hold it (its request unread) and can
    hand it to the next incarnation or answer 503, instead of dropping it silently.

    The bookkeeping is exact both ways. A connection the shard took is released (our copy closed,
    so that its TCP connection ends when the shard closes it) exactly once, whether its ack
    arrives, or is lost or malformed (:meth:`reconcile`); and it is never handed to another
    incarnation. A connection the shard did not take is never lost.
    """

    def __init__(self) -> None:
        self.entries: dict[int, InFlight] = {}
        self.counters = {
            "acked": 0,
            "malformed_acks": 0,
            "unknown_ids": 0,  # acked twice, after a reconcile, or not ours: ignored
            "taken_unacked": 0,  # taken by the shard without an ack that reached us
        }

    def __len__(self) -> int:
        return len(self.entries)

    def sent(self, handoff: int, claims: Claims, sock: socket.socket, now: float) -> None:
        self.entries[handoff] = InFlight(claims, sock, now)

    def ack(self, data: bytes) -> bool:
        """The shard's ack: release the connections it names. False (counted) if malformed;
        then its connections are released by :meth:`reconcile` or :meth:`orphaned`."""
        try:
            ack = decode_ack(data)  # defensive: whatever the bytes, a ControlError at worst
        except ControlError:
            self.counters["malformed_acks"] += 1
            return False
        for handoff in ack.ids:
            entry = self.entries.pop(handoff, None)
            if entry is None:
                self.counters["unknown_ids"] += 1
            else:
                self.counters["acked"] += 1
                entry.sock.close()
        return True

    def reconcile(self, now: float, timeout: float) -> int:
        """Release the connections left unacknowledged for ``timeout`` whose request has been
        read: the shard has them, and their ack was lost. Returns how many."""
        taken = [
            handoff
            for handoff, entry in self.entries.items()
            if now - entry.sent >= timeout and not request_unread(entry.sock)
        ]
        for handoff in taken:
            self.entries.pop(handoff).sock.close()
        self.counters["taken_unacked"] += len(taken)
        return len(taken)

    def orphaned(self) -> tuple[list[InFlight], int]:
        """The shard died: (the connections to hold for its next incarnation, how many were
        closed). Its copies died with it, so no connection can end up with two owners; but one
        whose request it read (acknowledged or not) is mid-handshake or mid-WebSocket, and
        another shard would take its frames for a request: it is closed, as are all the dead
        shard's clients, who reconnect. Only a connection whose request is still unread was
        never served, and can be served by the next incarnation as if it had just arrived."""
        waiting: list[InFlight] = []
        for entry in self.entries.values():
            if request_unread(entry.sock):
                waiting.append(entry)
            else:
                entry.sock.close()
        closed = len(self.entries) - len(waiting)
        self.counters["taken_unacked"] += closed
        self.entries.clear()
        return waiting, closed
