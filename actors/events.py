"""A shard's lifecycle events and join/leave changes, as plain data (issue 12).

Owns: :class:`ShardEvents`: the event dicts of one shard incarnation (``{"type", "ts", ...}``, as
the event stream carries them, less the router's ``seq`` and ``host``) and the join/leave changes
of marked channels (``(channel, user, joined)``), each pending in order until the CacheActor's
next flush (one ``E`` and one ``W`` message per flush: ``take_events``, ``take_changes``); what
a journaled cache change (:data:`actors.cache.Change`) and a close for cause
(:data:`CAUSE_EVENTS`) become. Must never do I/O, touch the cache or a connection, or decide on
its own when a connection counts as announced: the CacheActor says (``first``, ``last``,
``unannounced``). ``clock`` (``time.time``) stamps ``ts``.

Ordering, as the CacheActor calls it: ``online`` before a user's first ``connect`` (sent when
the connection's hello goes out), ``subscribe``/``unsubscribe`` only for an announced connection
(before, its changes are in its ``connect``'s channels), ``disconnect`` after them (a connection
gone, not its channels one by one: no ``unsubscribe`` for them), ``offline`` after the user's last
``disconnect``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable
from typing import Any

from actors.cache import Change
from actors.ids import ChannelId, ConnId, UserId
from actors.wire import shardwire

# the shard's counters of closes (and refusals) for cause that are events of their own, besides
# the connection's ``disconnect``: counter -> (event type, its ``what`` for a ``limit``)
CAUSE_EVENTS: dict[str, tuple[str, str]] = {
    "closed_slow_consumer": ("slow_consumer", ""),
    "connection_errors": ("send_failed", ""),
    "closed_rate_limit": ("limit", "inbound_rate"),
    "refused_per_user": ("limit", "connections_per_user"),
}


class ShardEvents:
    """Events and join/leave changes pending until the next flush, in the order they happened."""

    def __init__(self, index: int, epoch: int, clock: Callable[[], float] = time.time) -> None:
        self.index, self.epoch = index, epoch
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.changes: list[tuple[int, int, bool]] = []

    def conn_id(self, conn: ConnId) -> str:
        return shardwire.conn_id(self.index, self.epoch, conn)

    # -- events ---------------------------------------------------------------------------

    def connected(
        self,
        conn: ConnId,
        user: UserId,
        channels: Iterable[ChannelId],
        remote: str,
        first: bool,
    ) -> None:
        """``conn``'s hello goes out; ``first``: no other connection of ``user`` here is
        announced (the user comes online)."""
        ts = self.clock()
        if first:
            self.events.append({"type": "online", "ts": ts, "user": user})
        self.events.append(
            {
                "type": "connect",
                "ts": ts,
                "user": user,
                "conn": self.conn_id(conn),
                "shard": self.index,
                "channels": list(channels),
                "remote": remote,
            }
        )

    def disconnected(self, conn: ConnId, user: UserId, code: int, reason: str, last: bool) -> None:
        """An announced connection is gone; ``last``: it was its user's last one announced
        here (the user goes offline)."""
        ts = self.clock()
        event = {
            "type": "disconnect",
            "ts": ts,
            "user": user,
            "conn": self.conn_id(conn),
            "code": code,
            "reason": reason,
        }
        self.events.append(event)
        if last:
            self.events.append({"type": "offline", "ts": ts, "user": user})

    def subscription(
        self, conn: ConnId, user: UserId, channel: ChannelId, subscribed: bool
    ) -> None:
        kind = "subscribe" if subscribed else "unsubscribe"
        self.events.append(
            {
                "type": kind,
                "ts": self.clock(),
                "user": user,
                "conn": self.conn_id(conn),
                "channel": channel,
            }
        )

    def limit(self, user: UserId, what: str) -> None:
        self.events.append({"type": "limit", "ts": self.clock(), "user": user, "what": what})

    def incident(self, conn: ConnId, user: UserId, cause: str, detail: str) -> None:
        """A close (or refusal) for ``cause`` (a counter of the shard's); ``detail``: the error
        of a failed send. Causes without an event of their own (see :data:`CAUSE_EVENTS`) are
        in their connection's ``disconnect`` code only."""
        found = CAUSE_EVENTS.get(cause)
        if found is None:
            return
        kind, what = found
        if kind == "limit":
            self.limit(user, what)
            return
        event: dict[str, Any] = {
            "type": kind,
            "ts": self.clock(),
            "user": user,
            "conn": self.conn_id(conn),
        }
        if kind == "send_failed":
            event["error"] = detail
        self.events.append(event)

    # -- membership changes ---------------------------------------------------------------

    def membership(
        self,
        journal: Iterable[Change],
        unannounced: Container[ConnId],
        marks: Container[ChannelId],
        announce: bool,
    ) -> None:
        """The cache's journaled changes: ``subscribe``/``unsubscribe`` events when
        ``announce`` (the event stream is on, and the change is not a disconnect's) for the
        connections announced already; a join or leave for every user's first or last
        connection in a marked channel."""
        for conn, channel, user, subscribed, user_changed in journal:
            if announce and conn not in unannounced:
                self.subscription(conn, user, channel, subscribed)
            if user_changed and channel in marks:
                self.changes.append((channel, user, subscribed))

    # -- the flush --------------------------------------------------------------------------

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def take_changes(self) -> list[tuple[int, int, bool]]:
        changes, self.changes = self.changes, []
        return changes
