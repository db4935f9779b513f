"""Following a host's event stream (``ucc serve --events``): in order, with gaps detected and
repaired from a ``snapshot`` (docs/protocol.md, *Event stream*).

Owns: :class:`EventState`, the pure half (the current connections of one host, built from a
snapshot and the ``connect`` / ``disconnect`` / ``subscribe`` / ``unsubscribe`` events after
it; which event is next, which is old and which reveals a gap), :class:`GapCounter` (gaps
without repair, for a plain listener), and :class:`EventFollower`, the thin socket half (a
ZeroMQ SUB socket on the event endpoint and a command :class:`shards.client.Client` for the
snapshots). Must never hang (every wait is bounded: ``poll(timeout)``, the client's timeout for
a snapshot), never yield an event out of order or twice, and never touch the server's state:
it only reads the stream and asks for snapshots.

One follower follows one host: its ``--events`` endpoint and its own command endpoint (a
snapshot describes the host that answers it). For a cluster, run one follower per host.

How it follows: the first thing it yields is a ``resync`` item (the snapshot: ``{"type":
"resync", "seq": S, "host": H, "connections": [...]}``); then every event of H with seq
S+1, S+2, ... in order. An event with a seq at or below the last one is dropped (it was in the
snapshot already); one beyond the next, or one from another host (the host restarted: its id
is new and its seq starts at 1 again) is a gap: the follower takes a new snapshot and yields a
new ``resync`` item, and the events the SUB socket queued meanwhile follow if they are newer.
A gap at the tail of a burst (the last events dropped, nothing published since) shows only
when the next event comes; so after ``check_interval`` seconds (1 s) without one, the follower
asks the host where its stream is (``router_stats``' ``events.seq``, answered without asking
any shard) and resyncs when that is not the last seq it has.
A host that never answers the snapshot for the host the events come from (a follower whose
event and command endpoints are two different hosts) is noted as foreign after one snapshot,
and its events are dropped (counted in ``stats["foreign"]``) rather than resynced forever.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from enum import Enum
from types import TracebackType
from typing import Any, Self

import zmq

from shards.client import Calls, Client
from shards.config import DEFAULT_COMMAND

__all__ = [
    "DEFAULT_EVENTS",
    "EVENTS_ENV",
    "EventFollower",
    "EventState",
    "GapCounter",
    "Verdict",
    "view_of",
]

DEFAULT_EVENTS = "tcp://127.0.0.1:5556"
EVENTS_ENV = "UCC_EVENTS"
MAX_PENDING = 10_000  # events held while a snapshot is due, at most (beyond, the oldest go)

Event = dict[str, Any]
# a connection: {"conn", "user", "shard", "channels", "connected_at", "last_activity", "remote"}
Record = dict[str, Any]
View = dict[str, tuple[int, tuple[int, ...]]]


def default_events() -> str:
    """``$UCC_EVENTS``, else :data:`DEFAULT_EVENTS`."""
    return os.environ.get(EVENTS_ENV) or DEFAULT_EVENTS


def view_of(connections: Iterable[Record]) -> View:
    """``{conn: (user, sorted channels)}``: what a snapshot's connections and a follower's state
    can be compared by (times and addresses aside)."""
    return {
        str(record["conn"]): (record["user"], tuple(sorted(record.get("channels") or ())))
        for record in connections
    }


class Verdict(Enum):
    """What :meth:`EventState.offer` made of an event."""

    APPLY = "apply"  # the next one: applied, to be yielded
    DROP = "drop"  # old (in the snapshot already), or from a foreign host: not yielded
    RESYNC = "resync"  # a gap, a new host or no snapshot yet: held until the next snapshot


class EventState:
    """The connections of one host as the event stream says, and where the stream is.

    Pure: no socket, no clock. Feed it every event with :meth:`offer` and a snapshot with
    :meth:`resync` whenever :attr:`needs_resync` is true (at first, and after a gap).
    """

    def __init__(self) -> None:
        self.host: str | None = None  # the host of the last snapshot
        self.seq: int | None = None  # the last seq applied (the snapshot's at first)
        self.connections: dict[str, Record] = {}
        self.needs_resync = True
        self.pending: deque[Event] = deque()  # events met since a snapshot became due
        self.foreign: set[str] = set()
        self._suspect: str | None = None  # a host whose event asked for the pending snapshot
        self.stats = {
            "events": 0,
            "dropped": 0,
            "gaps": 0,
            "tail_gaps": 0,
            "resyncs": 0,
            "foreign": 0,
        }

    @property
    def users(self) -> set[int]:
        """The users with at least one connection."""
        return {record["user"] for record in self.connections.values()}

    def view(self) -> View:
        """The state as :func:`view_of` gives a snapshot's."""
        return view_of(self.connections.values())

    def offer(self, event: Event) -> Verdict:
        """Take the next event from the stream: applied when it is the next one, dropped when
        it is old, held (and a snapshot due) when it is not the next one."""
        host = event.get("host")
        seq = event.get("seq")
        if host in self.foreign:
            self.stats["foreign"] += 1
            return Verdict.DROP
        if self.needs_resync:
            self._hold(event)
            return Verdict.RESYNC
        if host != self.host:
            self._gap(event, host)
            return Verdict.RESYNC
        assert self.seq is not None  # synced: a snapshot set it
        if type(seq) is not int or seq <= self.seq:
            self.stats["dropped"] += 1
            return Verdict.DROP
        if seq != self.seq + 1:
            self._gap(event, None)
            return Verdict.RESYNC
        self.apply(event)
        return Verdict.APPLY

    def resync(self, snapshot: dict[str, Any]) -> list[Event]:
        """Start again from ``snapshot`` (a ``snapshot`` reply): returns what to yield, in
        order: the ``resync`` item, then the held events that follow it (any held event that
        does not follow it makes a snapshot due again, and is held)."""
        host = snapshot.get("host")
        seq = snapshot.get("seq")
        if not isinstance(host, str) or type(seq) is not int:
            raise ValueError("a snapshot needs a string 'host' and an integer 'seq'")
        if self._suspect is not None and self._suspect != host:
            self.foreign.add(self._suspect)  # it asked for this snapshot, and is not this host
        self._suspect = None
        records = snapshot.get("connections") or []
        self.host, self.seq = host, seq
        self.connections = {str(r["conn"]): _record(r) for r in records}
        self.needs_resync = False
        self.stats["resyncs"] += 1
        item: Event = {"type": "resync", "seq": seq, "host": host, "connections": list(records)}
        if snapshot.get("missing_shards"):
            item["missing_shards"] = list(snapshot["missing_shards"])
        out = [item]
        held, self.pending = self.pending, deque()
        while held:
            event = held.popleft()
            verdict = self.offer(event)
            if verdict is Verdict.APPLY:
                out.append(event)
            elif verdict is Verdict.RESYNC:
                self.pending.extend(held)  # behind the one that made it due, in order
                break
        return out

    def check(self, seq: int, host: str | None = None) -> bool:
        """Compare with where the host says its stream is (``seq``: the last one it published;
        ``host``: its id, when known): a snapshot is due when they differ, a gap at the tail of
        the stream (events dropped after the last one received, and nothing since to show it).
        Returns whether one is due. Nothing to compare before the first snapshot."""
        if self.needs_resync or self.seq is None:
            return self.needs_resync
        if seq == self.seq and (host is None or host == self.host):
            return False
        self.stats["gaps"] += 1
        self.stats["tail_gaps"] += 1
        self.needs_resync = True
        return True

    def apply(self, event: Event) -> None:
        """Apply one event to the connections, and note its seq as the last one."""
        seq = event.get("seq")
        if type(seq) is int:
            self.seq = seq
        self.stats["events"] += 1
        kind = event.get("type")
        conn = event.get("conn")
        if not isinstance(conn, str):
            return
        if kind == "connect":
            ts = event.get("ts")
            self.connections[conn] = {
                "conn": conn,
                "user": event.get("user"),
                "shard": event.get("shard"),
                "channels": sorted(set(event.get("channels") or ())),
                "connected_at": ts,
                "last_activity": ts,
                "remote": event.get("remote"),
            }
        elif kind == "disconnect":
            self.connections.pop(conn, None)
        elif kind in ("subscribe", "unsubscribe"):
            record = self.connections.get(conn)
            channel = event.get("channel")
            if record is None or channel is None:
                return
            channels = set(record["channels"])
            if kind == "subscribe":
                channels.add(channel)
            else:
                channels.discard(channel)
            record["channels"] = sorted(channels)

    def _gap(self, event: Event, new_host: Any) -> None:
        self.stats["gaps"] += 1
        self.needs_resync = True
        if isinstance(new_host, str):
            self._suspect = new_host
        self._hold(event)

    def _hold(self, event: Event) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()  # lost: the snapshot covers it, or a gap shows after it
        self.pending.append(event)


def _record(record: Record) -> Record:
    copy = dict(record)
    copy["channels"] = sorted(set(record.get("channels") or ()))
    return copy


class GapCounter:
    """Gaps in a stream without repair (a plain listener): per host, the last seq seen."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def see(self, event: Event) -> tuple[int, int] | None:
        """``(first, last)`` seqs missed just before ``event`` of its host, or None. A host's
        first event is not a gap (nothing was expected of it), nor is a seq that goes back (the
        host restarted)."""
        host, seq = event.get("host"), event.get("seq")
        if not isinstance(host, str) or type(seq) is not int:
            return None
        previous = self.last.get(host)
        self.last[host] = seq
        if previous is None or seq <= previous + 1:
            return None
        return previous + 1, seq - 1


def parse_event(frame: bytes) -> Event | None:
    """The event a frame carries, or None for one that is not a JSON object with an integer
    ``seq`` and a string ``host``."""
    try:
        event = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    if (
        not isinstance(event, dict)
        or type(event.get("seq")) is not int
        or not isinstance(event.get("host"), str)
    ):
        return None
    return event


def _millis(seconds: float) -> int:
    return max(0, int(seconds * 1000 + 0.999))


class EventFollower:
    """A host's events in order, with gaps repaired (see the module's docstring).

    ``for event in follower`` yields dicts: events, and ``resync`` items; it ends when nothing
    came for ``idle_timeout`` seconds (never, by default). :meth:`poll` waits for one item at
    most ``timeout`` seconds. ``follower.connections`` is the host's current connections (by
    connection id) as of the last item yielded. ``command=None`` (and no ``client``): no
    snapshots, no state: every event is yielded as it comes, and ``gaps`` counts the missed.

    Not thread-safe. ValueError for a bad endpoint or key.
    """

    def __init__(
        self,
        events: str | None = None,
        command: str | None = DEFAULT_COMMAND,
        *,
        client: Client | None = None,
        timeout: float = 5.0,
        idle_timeout: float | None = None,
        server_key: str | None = None,
        client_key_file: str | None = None,
        rcvhwm: int | None = None,
        check_interval: float | None = 1.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        """``events``: the PUB endpoint (default ``$UCC_EVENTS`` or :data:`DEFAULT_EVENTS`);
        ``command``/``client``: where snapshots come from (a ``client`` given is not closed by
        :meth:`close`); ``timeout``: the command client's; ``rcvhwm``: the SUB socket's
        receive high-water mark (ZeroMQ's default, 1000, when None); ``check_interval``: after
        this many seconds without an event, ask the host for its last seq (``router_stats``)
        to see a gap at the tail of the stream (None: never; only when following)."""
        self.endpoint = events if events is not None else default_events()
        self.idle_timeout = idle_timeout
        self.check_interval = check_interval
        self._next_check = time.monotonic() + (check_interval or 0.0)
        self._own_client = client is None and command is not None
        if client is None and command is not None:
            client = Client(command, timeout, server_key, client_key_file)
        self.client = client
        self.state = EventState()
        self.gaps = GapCounter()
        self.malformed = 0
        self._ready: deque[Event] = deque()
        context = context if context is not None else zmq.Context.instance()
        socket: zmq.Socket[bytes] = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            socket.setsockopt(zmq.RCVHWM, rcvhwm)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            if self._own_client and client is not None:
                client.close()
            raise ValueError(f"bad event endpoint {self.endpoint!r}: {exc}") from None
        self._socket: zmq.Socket[bytes] | None = socket

    @property
    def following(self) -> bool:
        """Whether gaps are repaired (there is a command client for snapshots)."""
        return self.client is not None

    @property
    def connections(self) -> dict[str, Record]:
        """The host's connections by connection id (empty before the first snapshot)."""
        return self.state.connections

    def poll(self, timeout: float) -> Event | None:
        """The next item within ``timeout`` seconds, or None. A snapshot, when one is due, is
        taken first (bounded by the command client's timeout; its UccError propagates)."""
        socket = self._socket
        if socket is None:
            raise RuntimeError("the follower is closed")
        deadline = time.monotonic() + timeout
        while True:
            if self._ready:
                return self._ready.popleft()
            if self.client is not None and self.state.needs_resync:
                call = Calls.snapshot()
                reply = call.result(self.client.request(call.cmd, **call.fields))
                self._ready.extend(self.state.resync(reply))
                continue
            now = time.monotonic()
            wait = deadline - now
            checking = self.client is not None and self.check_interval is not None
            if checking:
                wait = min(wait, self._next_check - now)
            if not socket.poll(_millis(wait), zmq.POLLIN):
                now = time.monotonic()
                if checking and now >= self._next_check:
                    self._check_position()
                    continue
                if now >= deadline:
                    return None
                continue
            try:
                frame = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            if self.check_interval is not None:
                self._next_check = time.monotonic() + self.check_interval
            event = parse_event(frame)
            if event is None:
                self.malformed += 1
                continue
            self.gaps.see(event)
            if self.client is None:
                return event
            if self.state.offer(event) is Verdict.APPLY:
                return event

    def _check_position(self) -> None:
        """Quiet for ``check_interval``: ask the host where its stream is (``router_stats``,
        answered without asking any shard) to see a gap at the tail of the stream."""
        assert self.client is not None and self.check_interval is not None
        reply = self.client.request("router_stats")
        self._next_check = time.monotonic() + self.check_interval
        events = reply.get("events")
        if not isinstance(events, dict):
            return  # a server without an event stream (or one older than it)
        seq, host = events.get("seq"), events.get("host")
        if type(seq) is int:
            self.state.check(seq, host if isinstance(host, str) else None)

    def __iter__(self) -> Iterator[Event]:
        return self.events(self.idle_timeout)

    def events(self, idle_timeout: float | None = None) -> Iterator[Event]:
        """Every item, until nothing came for ``idle_timeout`` seconds (None: forever)."""
        while True:
            item = self.poll(1.0 if idle_timeout is None else idle_timeout)
            if item is not None:
                yield item
            elif idle_timeout is not None:
                return

    def close(self) -> None:
        """Close the SUB socket, and the command client unless it was given. Idempotent."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._own_client and self.client is not None:
            self.client.close()

    @property
    def closed(self) -> bool:
        return self._socket is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
