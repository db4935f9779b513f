"""The host's event stream, in order: what the router publishes on ``--events``.

Owns: the host's sequence number (per host, from 1, gapless as published), the encoding of an
event (``{"seq":N,"host":H,"ts":T,"type":T,...}``, in that key order, so that every frame starts
with ``{"seq"``), the events waiting to be published (taken by the RouterActor, as websockets'
``data_to_send()``), a mirror of each shard's connections (connection id -> user, only with
events on) from which the router speaks for a shard that died (``disconnect`` for each of its
connections, ``offline`` for each of its users), and the patches that make a ``snapshot``
consistent with the stream. Must never do I/O or block; the wall clock is a parameter
(``clock``), so tests drive it.

A snapshot is consistent with the stream: the router asks every shard for its connections;
a shard's answer reflects every event it sent before it (one pipe, in order), and the events it
sends after are recorded here for that snapshot (:meth:`watch`, :meth:`answered`) and applied to
its answer when the snapshot is replied (:meth:`patch`), with the sequence number of that moment.
So applying the events with a higher sequence number to the snapshot gives the current state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from actors.ids import ShardIndex
from actors.wire import frames

ConnRecord = dict[
    str, Any
]  # {"conn","user","shard","channels","connected_at","last_activity","remote"}


SHARD_TYPES = frozenset(
    {
        "connect",
        "disconnect",
        "subscribe",
        "unsubscribe",
        "online",
        "offline",
        "slow_consumer",
        "send_failed",
        "limit",
    }
)


class EventLog:
    """The host's events: sequenced, encoded and queued for the PUB socket."""

    def __init__(self, host: str, enabled: bool, clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.enabled = enabled
        self.clock = clock
        self.seq = 0  # the last one published
        self._out: list[bytes] = []
        # per shard: connection id -> user, and user -> how many connections (events on only)
        self._conns: dict[ShardIndex, dict[str, int]] = {}
        self._users: dict[ShardIndex, dict[int, int]] = {}
        # snapshots in flight: query id -> shard -> events received from it after its answer
        self._watch: dict[int, dict[ShardIndex, list[dict[str, Any]]]] = {}
        self.counters = {"events_published": 0, "events_malformed": 0}

    def take(self) -> list[bytes]:
        """The encoded events queued since the last call, in order."""
        out, self._out = self._out, []
        return out

    def emit(self, kind: str, fields: dict[str, Any], ts: float | None = None) -> None:
        """Publish one event (nothing with events off)."""
        if not self.enabled:
            return
        self.seq += 1
        stamp = self.clock() if ts is None else ts
        event = {"seq": self.seq, "host": self.host, "ts": stamp, "type": kind, **fields}
        self._out.append(frames.dumps(event))  # keys in this order: "{"seq"..."
        self.counters["events_published"] += 1

    # -- from the shards -------------------------------------------------------------------

    def from_shard(self, index: ShardIndex, raw: bytes) -> None:
        """A shard's batch of events (shardwire ``E``): mirrored, recorded for the snapshots in
        flight, published. A malformed one (a bug in a shard) is counted and skipped."""
        try:
            batch = json.loads(raw)
        except (ValueError, RecursionError):
            self.counters["events_malformed"] += 1
            return
        if not isinstance(batch, list):
            self.counters["events_malformed"] += 1
            return
        for event in batch:
            if (
                not isinstance(event, dict)
                or event.get("type") not in SHARD_TYPES
                or not isinstance(event.get("ts"), int | float)
            ):
                self.counters["events_malformed"] += 1
                continue
            self._shard_event(index, event)

    def _shard_event(self, index: ShardIndex, event: dict[str, Any]) -> None:
        kind = event.pop("type")
        ts = event.pop("ts")
        if kind in ("connect", "disconnect"):
            self._mirror(index, kind, event)
        for watched in self._watch.values():
            after = watched.get(index)
            if after is not None:
                after.append({"type": kind, "ts": ts, **event})
        self.emit(kind, event, ts)

    def _mirror(self, index: ShardIndex, kind: str, event: dict[str, Any]) -> None:
        conns = self._conns.setdefault(index, {})
        users = self._users.setdefault(index, {})
        conn, user = event.get("conn"), event.get("user")
        if not isinstance(conn, str) or type(user) is not int:
            return
        if kind == "connect":
            if conn not in conns:
                conns[conn] = user
                users[user] = users.get(user, 0) + 1
        elif conns.pop(conn, None) is not None:
            left = users.get(user, 1) - 1
            if left > 0:
                users[user] = left
            else:
                users.pop(user, None)

    def shard_died(self, index: ShardIndex, epoch: int, cause: str) -> None:
        """Shard ``index`` (incarnation ``epoch``) is gone: ``shard_down``, then a ``disconnect``
        for each connection it had and an ``offline`` for each of its users (nobody else can
        say so), recorded for the snapshots in flight too."""
        self.emit("shard_down", {"shard": index, "epoch": epoch, "cause": cause})
        for watched in self._watch.values():  # not answered: it has no connection any more
            watched.setdefault(index, [])
        conns = self._conns.pop(index, {})
        users = self._users.pop(index, {})
        ts = self.clock()
        for conn, user in conns.items():
            fields = {"user": user, "conn": conn, "code": 1006, "reason": "shard died"}
            for watched in self._watch.values():
                if index in watched:
                    watched[index].append({"type": "disconnect", "ts": ts, **fields})
            self.emit("disconnect", fields, ts)
        for user in users:
            self.emit("offline", {"user": user}, ts)

    def shard_up(self, index: ShardIndex, epoch: int, cause: str) -> None:
        self.emit("shard_up", {"shard": index, "epoch": epoch, "cause": cause})

    # -- snapshots -------------------------------------------------------------------------

    def watch(self, qid: int, absent: Iterable[ShardIndex] = ()) -> None:
        """Snapshot ``qid`` is asked of the shards; those ``absent`` (not up) are not asked:
        they have no connection now, and whatever they announce from here on patches it."""
        self._watch[qid] = {index: [] for index in absent}

    def watching(self) -> int:
        """How many snapshots are in flight."""
        return len(self._watch)

    def answered(self, qid: int, index: ShardIndex) -> None:
        """Shard ``index`` answered snapshot ``qid``: from now on, its events patch the answer."""
        watched = self._watch.get(qid)
        if watched is not None:
            watched[index] = []

    def patch(self, qid: int, answers: dict[ShardIndex, list[ConnRecord]]) -> list[ConnRecord]:
        """Snapshot ``qid`` is complete: every shard's answer with the events it sent after it
        applied, all the connections in one list (by shard, then as the shards listed them)."""
        watched = self._watch.pop(qid, {})
        out: list[ConnRecord] = []
        for index in sorted(set(answers) | set(watched)):
            out += apply_events(answers.get(index, []), watched.get(index, ()))
        return out


def apply_events(records: list[ConnRecord], events: Iterable[dict[str, Any]]) -> list[ConnRecord]:
    """``records`` (connections) with ``events`` applied, in order: connect adds one (connected
    and last active at the event's time), disconnect removes it, subscribe and unsubscribe change
    its channels. Other events change no connection."""
    by_conn = {record["conn"]: dict(record) for record in records}
    for event in events:
        kind, conn = event.get("type"), event.get("conn")
        if kind == "connect":
            by_conn[conn] = {
                "conn": conn,
                "user": event.get("user"),
                "shard": event.get("shard"),
                "channels": list(event.get("channels", [])),
                "connected_at": event.get("ts"),
                "last_activity": event.get("ts"),
                "remote": event.get("remote"),
            }
        elif kind == "disconnect":
            by_conn.pop(conn, None)
        elif kind in ("subscribe", "unsubscribe") and conn in by_conn:
            channels: list[int] = by_conn[conn]["channels"]
            channel = event.get("channel")
            if not isinstance(channel, int):
                continue
            if kind == "subscribe" and channel not in channels:
                channels.append(channel)
            elif kind == "unsubscribe" and channel in channels:
                channels.remove(channel)
    return list(by_conn.values())
