"""CacheActor: the single owner of a shard's :class:`UserConnectionCache`.

Owns: the cache, the shard's socket to the router (:class:`actors.shardlink.RouterLink`: its
heartbeat, credit and membership deltas), and the messages between the actor and its shard: what
the shard tells it (:class:`Opened`, :class:`Closed`, :class:`Subscribe`, ...) and what it asks
of the shard's connections (:data:`LoopAction`: :class:`Deliver`, :class:`Registered`,
:class:`Subscribed`, :class:`Refused`, :class:`CloseConnections`). It applies connection events
(a subscribe beyond ``--max-channels-per-connection`` is refused, error ``limit``), resolves
deliveries (channel or users → connection ids) and answers the router's queries. It is a
:class:`LoopActor`: it runs on the shard's event loop, one message at a time, so a broadcast
goes from the router's socket to the connections' writes without a thread hop; its actions go
out in one batch per round through ``post``. Must never touch a connection itself, nor ``ask``
anyone, nor block the loop.

Issue 12: with ``events`` (``--events``) it reports the shard's lifecycle events to the router
(one ``E`` message per flush, built by :class:`actors.events.ShardEvents`): a connection is
announced (``connect``, after ``online`` for its user's first) when its hello goes out, and its
channel changes from then on are ``subscribe``/``unsubscribe``; the ``connections`` queries list
the announced connections only, and events made before an answer go out before it, so that the
router's snapshot and the stream agree. For the channels the router marks (``J``) it reports
users joining and leaving (one ``W`` per flush), events or not. Neither costs anything on the
broadcast path, nor anything at all when off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from actors.cache import Delta, UserConnectionCache
from actors.critical import CriticalTracker
from actors.events import ShardEvents
from actors.ids import ChannelId, ConnId, UserId
from actors.loopactor import LoopActor
from actors.resume import Ask, Resumes
from actors.shardlink import Bounds, RouterLink
from actors.wire import shardwire

log = logging.getLogger("ucc.cache")

READ_BATCH = 512  # messages read per round at most (a shardwire batch is one)
WORK_PER_TURN = 20_000  # recipients per round at most, so that the event loop's turns stay short
BEAT_INTERVAL = 0.25  # seconds between two heartbeats (with credit) to the router
# what may wait to be written to the router beyond the kernel's buffer (the router reads
# continuously: this fills only if it is stuck, and then the shard's messages are dropped)
SEND_BOUNDS = Bounds(messages=100_000, size=64 << 20)

# -- what the actor asks of its shard's connections (one list per round, through ``post``) ------
#
# Deliver is on the broadcast hot path, so it was measured against the tuple it replaced:
# creating and dispatching 1e6 actions takes 0.34 s as frozen slotted dataclasses, 0.11 s as
# tuples (0.25 us more per action, one action per shard per broadcast), while a broadcast costs
# the server some 340 us of CPU. ``ucc bench rooms --connections 2000 --members 10 --rate 1000
# --messages 5000``: 34.2 us of server CPU per delivered frame with tuples, 34.0 with
# dataclasses (means of 3 and 2 runs, each within 32.6-36.1): noise. So a dataclass, like the rest.


@dataclass(frozen=True, slots=True)
class Deliver:
    """Write ``frame`` (one or more complete, pre-encoded server frames) to these connections.

    ``conns`` is not copied: for a channel it is the cache's own tuple (see
    :meth:`UserConnectionCache.recipients`), which ``coalesce`` in the shard compares by
    identity."""

    frame: bytes
    conns: Sequence[ConnId]


@dataclass(frozen=True, slots=True)
class Registered:
    """The connection is in the cache and the router has indexed it: send it hello."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A client's subscribe (``subscribed`` true) or unsubscribe is in effect: confirm it."""

    conn: ConnId
    channel: ChannelId
    subscribed: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """A client's request was not carried out: send it an error frame (``code``, ``message``),
    the connection stays open."""

    conn: ConnId
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class CloseConnections:
    """Close these connections with this WebSocket close code and reason; ``cause``: the
    shard's counter of closes for this cause ("": not one, as a backend's disconnect)."""

    conns: Sequence[ConnId]
    code: int
    reason: str
    cause: str = ""


LoopAction = Deliver | Registered | Subscribed | Refused | CloseConnections


# -- what the shard tells the actor ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    conn: ConnId
    user: UserId
    channels: tuple[ChannelId, ...]
    now: float


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is gone: the close code and reason it ended with (sent or received;
    1006 without a closing handshake; only filled in with the event stream on)."""

    conn: ConnId
    code: int = 1006
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Incident:
    """A connection closed (or refused) for ``cause`` (the shard's counter of it, see
    :data:`actors.events.CAUSE_EVENTS`); ``detail``: a failed send's error. Told with the event
    stream on only, before the connection's :class:`Closed`."""

    conn: ConnId
    user: UserId
    cause: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Subscribe:
    conn: ConnId
    channel: ChannelId


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    conn: ConnId
    channel: ChannelId


@dataclass(frozen=True, slots=True)
class Resume:
    """A client's resume of ``channel`` from ``offset`` in ``epoch`` (subscribing it if need
    be)."""

    conn: ConnId
    channel: ChannelId
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class ClientAck:
    """A client acknowledged critical message ``id``."""

    conn: ConnId
    id: str


@dataclass(frozen=True, slots=True)
class Activity:
    """Inbound activity since the last report: when each connection was last heard from, and
    the time of the report, all on the shard's monotonic clock (a wall-clock step must never
    make every idle connection look stale)."""

    last_seen: dict[ConnId, float]
    now: float


class CacheActor(LoopActor):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        epoch: int,
        router_endpoint: str,
        post: Callable[[list[LoopAction]], None],
        stale_timeout: float,
        fail: Callable[[], None],
        counters: Callable[[], dict[str, int]] | None = None,
        max_channels: int | None = None,
        ack_timeout: float = 10.0,
        ack_retries: int = 5,
        history: bool = True,
        events: bool = False,
        remote_of: Callable[[ConnId], str] = lambda _conn: "",
    ) -> None:
        """``counters``: the shard's own counters, added to its ``status`` answer.
        ``max_channels``: the channels a connection may hold (``--max-channels-per-connection``;
        None: no limit). ``ack_timeout``, ``ack_retries``: a critical message not acknowledged
        is sent again after ``ack_timeout`` seconds, ``ack_retries`` times at most. ``history``: the
        router keeps channel history (else channel messages carry no offset, and resumes have
        nothing to note). ``events``: report lifecycle events (``--events``). ``remote_of``: a
        connection's address, read from its transport when needed (kept nowhere: every byte per
        connection counts)."""
        super().__init__(loop)
        self.index, self.epoch = index, epoch
        self.cache = UserConnectionCache(max_channels)
        # subscribes refused for the channel limit: a client's, and connections left out of a
        # server-side subscribe (in the shard's ``status`` row)
        self.limits = {
            "refused_channel_limit": 0,
            "limited_server_subscribe": 0,
            "resume_failed": 0,
        }
        self.post = post
        self.fail = fail
        self.counters = counters
        # messages unpacked from a PACKED frame and not handled yet: a frame may carry a whole
        # round of the router's (1,024 commands); they are handled WORK_PER_TURN at a time
        self._unpacked: deque[tuple[bytes, bytes, bytes]] = deque()
        self.stale_timeout = stale_timeout
        # the router's socket exists before any shard starts: a failure here ends the shard
        self.link = RouterLink(router_endpoint, shardwire.identity(index, epoch), SEND_BOUNDS)
        self._writing = False  # the loop watches the socket for writing (bytes wait)
        self._actions: list[LoopAction] = []
        self._delta = Delta()
        # credit (see shardwire): router -> shard messages and bytes consumed, and reported
        self.consumed_messages = self.consumed_bytes = 0
        self._reported = (0, 0)
        self._beat_handle: asyncio.TimerHandle | None = None  # set by on_start
        # hello and subscribed wait for the router's index (see shardwire): the last membership
        # change sent and the last one the router confirmed, by sequence number
        self._seq = self._indexed = 0
        self._unconfirmed: list[LoopAction] = []  # this round's, not yet tagged
        self._held: list[tuple[int, LoopAction]] = []  # (the change they wait for, action)
        self._resync = False  # a membership change was dropped on the way to the router
        self._last_sweep = 0.0
        # issue 11: critical messages sent and not yet acknowledged (re-sent on the clock), and
        # the resumes under way by channel; ``_notices`` go to the router after the next delta
        self.tracker = CriticalTracker(ack_timeout, ack_retries)
        self.resumes = Resumes(history)
        self.remote_of = remote_of
        self._closing: set[ConnId] = set()  # stale connections told to close, not yet gone
        # connections whose hello waits for the router: what is for them waits behind it
        self._unregistered: set[ConnId] = set()
        self._notices: list[list[bytes]] = []
        self._now = time.monotonic()  # the shard's clock, as of its last Activity report
        # issue 12: events (only with ``emit_events``) and join/leave of the marked channels;
        # the cache journals its membership changes while either needs them
        self.emit_events = events
        self.events = ShardEvents(index, epoch)
        self.marks: frozenset[ChannelId] = frozenset()
        if events:
            self.cache.journal = []

    def on_start(self) -> None:
        self.loop.add_reader(self.link.fileno(), self._readable)
        self._send(shardwire.hello(self.index, self.epoch, os.getpid(), self.cache.channels()))
        self._beat_handle = self.loop.call_later(BEAT_INTERVAL, self._beat)
        self._recheck()  # a hello larger than the kernel's buffer: the rest when writable

    def on_stop(self) -> None:
        if self._beat_handle is not None:
            self._beat_handle.cancel()
        if not self.link.closed:
            self.loop.remove_reader(self.link.fileno())  # a no-op if never added
            self.loop.remove_writer(self.link.fileno())
            self.link.close()

    def on_failure(self, *exc_info: Any) -> None:
        """A bug killed the actor: stop beating (so the router sees the shard die) and have the
        process exit, so that the supervisor restarts it clean."""
        self.loop.call_soon(self.fail)  # first: nothing below may keep the shard alive
        if not self.link.closed:
            self.on_stop()

    def _readable(self) -> None:
        """The socket has news (or the router left: the shard then fails, and exits)."""
        if self.actor_stopped.is_set():
            return
        try:
            self._drain()
            self._flush()
        except ConnectionError as exc:  # the router is gone (its host is stopping, or died):
            log.warning("shard %d: %s: the shard exits", self.index, exc)  # not a bug
            self.loop.call_soon(self.fail)
            self._stop()
        except Exception:  # a bug: fail as pykka does for a message, and take the shard down
            self._actor_failed(*sys.exc_info())

    def _beat(self) -> None:
        """Heartbeat to the router: it runs on the loop, so it stops if the loop is stuck."""
        if self.actor_stopped.is_set():
            return
        self._report()
        if self._resync:
            self._seq += 1
            if self._send(shardwire.sync(self.cache.channels(), self._seq)):
                self._resync = False
        self._beat_handle = self.loop.call_later(BEAT_INTERVAL, self._beat)
        self._recheck()

    def _recheck(self) -> None:
        # what was read or unpacked but not handled waits for the next turn (the loop signals
        # only what is still in the kernel)
        if self._unpacked or self.link.ready:
            self.loop.call_soon(self._readable)
        self._watch_writes()

    def _watch_writes(self) -> None:
        """Have the loop call :meth:`_writable` while bytes wait for the router's socket."""
        if self.link.pending != self._writing:
            self._writing = self.link.pending
            if self._writing:
                self.loop.add_writer(self.link.fileno(), self._writable)
            else:
                self.loop.remove_writer(self.link.fileno())

    def _writable(self) -> None:
        self.link.flush()
        self._watch_writes()

    def on_receive(self, message: Any) -> Any:
        cache = self.cache
        if isinstance(message, Opened):
            delta = cache.connect(message.conn, message.user, message.channels, message.now)
            self._delta.merge(delta)
            self._unconfirmed.append(Registered(message.conn))
            self._unregistered.add(message.conn)
            # its user's pending critical messages, after hello (the router answers after the
            # delta's confirmation, which releases hello)
            self._notices.append(shardwire.new_connection(message.conn, message.user))
            if cache.journal is not None:
                self._journaled()  # joins only: the connection is not announced yet
        elif isinstance(message, Closed):
            self._closed(message)
        elif isinstance(message, Subscribe):
            if cache.can_join(message.conn, message.channel):
                self._delta.merge(cache.subscribe(message.conn, message.channel))
                self._unconfirmed.append(Subscribed(message.conn, message.channel, True))
                if cache.journal is not None:
                    self._journaled()
            elif (meta := cache.meta(message.conn)) is not None:  # at the limit (else: closed)
                self.limits["refused_channel_limit"] += 1
                if self.emit_events:
                    self.events.limit(meta.user, "channels_per_connection")
                text = (
                    f"cannot subscribe to channel {message.channel}: a connection holds at "
                    f"most {cache.max_channels} channels"
                )
                self._actions.append(Refused(message.conn, "limit", text))
        elif isinstance(message, Unsubscribe):
            self.resumes.ended(message.conn, message.channel)
            self._delta.merge(cache.unsubscribe(message.conn, message.channel))
            self._unconfirmed.append(Subscribed(message.conn, message.channel, False))
            if cache.journal is not None:
                self._journaled()
        elif isinstance(message, Resume):
            self._resume(message)
        elif isinstance(message, ClientAck):
            self._ack(message)
        elif isinstance(message, Incident):
            if self.emit_events:
                self.events.incident(message.conn, message.user, message.cause, message.detail)
        elif isinstance(message, Activity):
            self._now = message.now
            for conn, seen in message.last_seen.items():
                cache.touch(conn, seen)
            for again, frame in self.tracker.due(message.now):  # not acknowledged in time
                self._to_conn(ConnId(again), frame)
            self._resumes_failed(self.resumes.sweep(message.now))
            if message.now - self._last_sweep >= 1.0:  # the stale sweep walks every connection
                self._last_sweep = message.now
                # a connection being closed stays listed until its close completes (up to
                # CLOSE_TIMEOUT): it is closed, and counted, once
                stale = [c for c in cache.stale(message.now, self.stale_timeout)
                         if c not in self._closing]  # fmt: skip
                self._closing.update(stale)
                if stale:
                    self._actions.append(
                        CloseConnections(
                            stale, 4002, "heartbeat timeout", "closed_heartbeat_timeout"
                        )
                    )
        self._flush()
        return None

    def _drain(self) -> None:
        """Handle what the router sent, WORK_PER_TURN recipients at most per turn of the loop
        (the rest next turn: _flush's recheck schedules it), so that connections get theirs."""
        work = 0
        unpacked = self._unpacked
        for _ in range(READ_BATCH):
            while unpacked:
                if work > WORK_PER_TURN:
                    return
                work += self._handle(*unpacked.popleft())
            if work > WORK_PER_TURN:
                return
            msg = self.link.receive()
            if msg is None:
                return
            if msg[0] == shardwire.PACKED:
                unpacked.extend(shardwire.unpack_messages(msg[1]))
            else:
                work += self._handle(msg[0], msg[1], msg[2])

    def _handle(self, kind: bytes, argument: bytes, payload: bytes) -> int:
        """One message from the router; returns how many recipients it costs."""
        self.consumed_messages += 1
        self.consumed_bytes += shardwire.size(argument, payload)
        if kind == shardwire.INDEXED:
            self._indexed = max(self._indexed, shardwire.unpack_id(argument))
            confirmed = [action for seq, action in self._held if seq <= self._indexed]
            if confirmed:
                self._release(confirmed)
                self._held = [(seq, a) for seq, a in self._held if seq > self._indexed]
            return 1
        if kind == shardwire.CHANNEL:
            if len(argument) == 8:  # no history: no offset
                conns = self.cache.recipients(ChannelId(shardwire.unpack_id(argument)))
            else:
                channel, offset = shardwire.unpack_ids(argument)
                conns = self.cache.recipients(ChannelId(channel))
                resumes = self.resumes
                if resumes.resuming or resumes.unseen:  # else: nothing to decide
                    conns, asks = resumes.live(ChannelId(channel), offset, payload, conns)
                    for ask in asks:
                        self._ask(ask)
                    if resumes.resuming:
                        self._resumes_failed(resumes.overflowing())
            if conns:
                self._actions.append(Deliver(payload, conns))
            return len(conns)
        if kind == shardwire.USERS:
            targets = self.cache.recipients_of_users(shardwire.unpack_ids(argument))
            if targets:
                self._actions.append(Deliver(payload, targets))
            return len(targets)
        if kind == shardwire.CRITICAL:
            users = shardwire.unpack_ids(argument)
            messages = shardwire.unpack_criticals(payload)
            return self._critical(users, messages)
        if kind == shardwire.PENDING:
            meta = self.cache.meta(ConnId(shardwire.unpack_id(argument)))
            if meta is not None:
                conn = ConnId(shardwire.unpack_id(argument))
                self._send_critical(conn, meta.user, shardwire.unpack_criticals(payload))
            return 1
        if kind == shardwire.ACKED:
            self.tracker.forget(shardwire.unpack_id(argument), payload.decode(errors="replace"))
            return 1
        if kind == shardwire.RESUMED:
            self._resumed(argument, payload)
            return 1
        if kind == shardwire.QUERY:
            answer = self._answer(shardwire.decode_query(payload))
            # the events so far are reflected in the answer: they go before it (those that
            # _send_delta makes, a hello released, are not: after it)
            events = self.events.take_events() if self.events.events else None
            self._send_delta()  # the router must know a membership before its answer
            if events:
                self._send(shardwire.events(events))
            self._send([shardwire.RESULT, argument, json.dumps(answer).encode()])
            return 1
        if kind == shardwire.MARKS:
            self._marked(frozenset(ChannelId(c) for c in shardwire.unpack_ids(argument)))
        return 1

    # -- issue 12: events, join/leave, connection records --------------------------------------

    def _marked(self, marks: frozenset[ChannelId]) -> None:
        """The router's channels with join/leave (all of them): journal while needed."""
        self.marks = marks
        if self.emit_events or marks:
            if self.cache.journal is None:
                self.cache.journal = []
        else:
            self.cache.journal = None

    def _journaled(self, announce: bool = True) -> None:
        """The cache's changes since the last call: events, joins and leaves (see
        :meth:`ShardEvents.membership`); ``announce`` False for a disconnect's."""
        journal = self.cache.take_journal()
        if journal:
            announce = announce and self.emit_events
            self.events.membership(journal, self._unregistered, self.marks, announce)

    def _announced(self, user: UserId, besides: ConnId) -> bool:
        """Whether ``user`` has a connection announced here (its hello released), besides
        ``besides``."""
        unannounced = self._unregistered
        return any(c != besides and c not in unannounced for c in self.cache.connections_of(user))

    def _closed(self, message: Closed) -> None:
        conn, cache = message.conn, self.cache
        meta = cache.meta(conn)
        if meta is not None:
            for channel in meta.channels:
                self.resumes.ended(conn, channel)
        announced = meta is not None and conn not in self._unregistered
        self.tracker.closed(conn)
        self._closing.discard(conn)
        self._unregistered.discard(conn)
        self._delta.merge(cache.disconnect(conn))
        if cache.journal is not None:
            self._journaled(announce=False)  # leaves; no unsubscribe: the disconnect says it
        if announced and self.emit_events:
            assert meta is not None
            last = not self._announced(meta.user, conn)
            self.events.disconnected(conn, meta.user, message.code, message.reason, last)

    def _records(self, conns: Iterable[ConnId]) -> list[dict[str, Any]]:
        """The announced ones of ``conns``, as the ``connections`` queries answer them (times
        in unix seconds: the cache's are on the shard's monotonic clock)."""
        cache, unannounced = self.cache, self._unregistered
        offset = time.time() - time.monotonic()
        out = []
        for conn in conns:
            meta = cache.meta(conn)
            if meta is None or conn in unannounced:
                continue
            out.append(
                {
                    "conn": self.events.conn_id(conn),
                    "user": meta.user,
                    "shard": self.index,
                    "channels": list(meta.channels),
                    "connected_at": round(meta.connected_at + offset, 3),
                    "last_activity": round(meta.last_activity + offset, 3),
                    "remote": self.remote_of(conn),
                }
            )
        return out

    # -- issue 11: resume and critical messages -------------------------------------------------

    def _release(self, actions: list[LoopAction]) -> None:
        """Hello and subscribed go out: from now on, the connection is written the channels'
        live messages (before, it dropped them); the first one's offset is noted."""
        self._actions += actions
        for action in actions:
            if isinstance(action, Registered):
                self._unregistered.discard(action.conn)
                meta = self.cache.meta(action.conn)
                for channel in meta.channels if meta is not None else ():
                    self.resumes.opened(action.conn, channel, self._now)
                if self.emit_events and meta is not None:
                    first = not self._announced(meta.user, action.conn)
                    remote = self.remote_of(action.conn)
                    self.events.connected(action.conn, meta.user, meta.channels, remote, first)
            elif isinstance(action, Subscribed) and action.subscribed:
                self.resumes.opened(action.conn, action.channel, self._now)

    def _to_conn(self, conn: ConnId, frames: bytes) -> None:
        """Write ``frames`` to one connection: after its hello, if that still waits (a resume
        or pending critical messages can be answered before the router confirms it)."""
        action = Deliver(frames, (conn,))
        if conn not in self._unregistered:
            self._actions.append(action)
        elif any(isinstance(a, Registered) and a.conn == conn for a in self._unconfirmed):
            self._unconfirmed.append(action)  # its hello is not numbered yet: right behind it
        else:
            self._held.append((self._seq, action))

    def _resume(self, message: Resume) -> None:
        """Subscribe the connection if it is not yet, and ask the router (after the membership,
        so that nothing falls between the two): see :mod:`actors.resume`."""
        conn, channel = message.conn, message.channel
        meta = self.cache.meta(conn)
        if meta is None:
            return  # closed meanwhile
        if self.resumes.busy(conn, channel):
            text = f"a resume of channel {channel} is under way on this connection"
            self._actions.append(Refused(conn, "bad_frame", text))
            return
        if channel not in meta.channels:
            if not self.cache.can_join(conn, channel):
                self.limits["refused_channel_limit"] += 1
                if self.emit_events:
                    self.events.limit(meta.user, "channels_per_connection")
                text = (
                    f"cannot resume channel {channel}: a connection holds at most "
                    f"{self.cache.max_channels} channels"
                )
                self._actions.append(Refused(conn, "limit", text))
                return
            self._delta.merge(self.cache.subscribe(conn, channel))
            if self.cache.journal is not None:
                self._journaled()
        ask = self.resumes.start(conn, channel, message.offset, message.epoch, self._now)
        self._notices.append(_resume_message(ask))

    def _resumed(self, argument: bytes, payload: bytes) -> None:
        """The router's answer to a resume: write what :class:`Resumes` says, ask again if
        it says so."""
        conn_id, channel_id, latest = shardwire.unpack_ids(argument)
        epoch, frames = shardwire.parse_resumed(payload)
        conn, channel = ConnId(conn_id), ChannelId(channel_id)
        out, ask = self.resumes.answered(conn, channel, latest, epoch, frames, self._now)
        if out:
            self._to_conn(conn, out)
        if ask is not None:
            self._ask(ask)

    def _ask(self, ask: Ask) -> None:
        self._send(_resume_message(ask))

    def _resumes_failed(self, failed: list[tuple[ConnId, ChannelId]]) -> None:
        """Resumes that got no answer in time, or held too much meanwhile: close their
        connections (1013), whose clients reconnect and resume, rather than leave a gap."""
        if failed:
            self.limits["resume_failed"] += len(failed)
            conns = sorted({conn for conn, _channel in failed})
            closing = CloseConnections(
                conns, 1013, "resume failed: reconnect", "closed_resume_failed"
            )
            self._actions.append(closing)

    def _critical(self, users: list[int], messages: list[tuple[str, bytes]]) -> int:
        sent = 0
        for user in users:
            for conn in self.cache.connections_of(UserId(user)):
                self._send_critical(conn, UserId(user), messages)
                sent += 1
        return max(sent, 1)

    def _send_critical(self, conn: ConnId, user: UserId, messages: list[tuple[str, bytes]]) -> None:
        """Write the critical messages this connection does not have yet, and track them until
        acknowledged."""
        fresh = [f for i, f in messages if self.tracker.sent(conn, user, i, f, self._now)]
        if fresh:
            self._to_conn(conn, b"".join(fresh))

    def _ack(self, message: ClientAck) -> None:
        """Tell the router (which forgets the message, and tells the other hosts); the user's
        other connections here stop re-sending it."""
        user = self.tracker.acked(message.conn, message.id)
        if user is None:
            meta = self.cache.meta(message.conn)
            if meta is None:
                return
            user = meta.user
        self._send(shardwire.ack(user, message.id))

    def _answer(self, query: shardwire.Query) -> dict[str, Any]:
        cache = self.cache
        if isinstance(query, shardwire.QueryOnline):
            return {"users": cache.online_users()}
        if isinstance(query, shardwire.QueryOnlineIn):
            return {"users": cache.online_users_in_channel(ChannelId(query.channel))}
        if isinstance(query, shardwire.QueryAreOnline):
            return {"online": [u for u in query.users if cache.is_online(UserId(u))]}
        if isinstance(query, shardwire.UserSubscription):
            user, channel = UserId(query.user), ChannelId(query.channel)
            if not query.subscribe:
                delta, count = cache.unsubscribe_user(user, channel)
                self._delta.merge(delta)
                if cache.journal is not None:
                    self._journaled()
                return {"connections": count}
            # applied where the limit allows; ``limited``: the connections left out (the
            # router's sum_connections makes it an error ``limit`` when none took it)
            delta, count, limited = cache.subscribe_user(user, channel)
            self._delta.merge(delta)
            if cache.journal is not None:
                self._journaled()
            if not limited:
                return {"connections": count}
            self.limits["limited_server_subscribe"] += limited
            return {"connections": count, "limited": limited}
        if isinstance(query, shardwire.UserDisconnect):
            conns = sorted(cache.connections_of(UserId(query.user)))
            if conns:
                self._actions.append(CloseConnections(conns, 4001, "disconnected by the backend"))
            return {"connections": len(conns)}
        if isinstance(query, shardwire.QueryPresence):
            return {"users": cache.presence(query.full)}
        if isinstance(query, shardwire.QueryConnections):
            return {"connections": self._records(conn for conn, _meta in cache.connections())}
        if isinstance(query, shardwire.QueryUserConnections):
            return {"connections": self._records(sorted(cache.connections_of(UserId(query.user))))}
        extra = self.counters() if self.counters is not None else {}
        critical = {f"critical_{k}": v for k, v in self.tracker.stats().items()}
        answer: dict[str, Any] = {
            "pid": os.getpid(),
            **cache.stats(),
            **self.limits,
            **critical,
            **extra,
        }
        if isinstance(query, shardwire.QueryStatus) and query.top:
            largest = cache.largest_channels(query.top)
            answer["largest"] = [] if largest is None else largest
            if largest is None:
                answer["largest_skipped"] = True
        return answer

    def _send_delta(self) -> None:
        if self._delta:
            self._seq += 1
            if not self._send(shardwire.delta(self._delta.gained, self._delta.lost, self._seq)):
                self._resync = True  # the router's index of us is wrong: send it whole soon
            self._delta = Delta()
        if self._notices:  # after the membership they may depend on
            notices, self._notices = self._notices, []
            for notice in notices:
                self._send(notice)
        if self._unconfirmed:  # they wait for every change sent so far
            if self._seq > self._indexed:
                self._held += [(self._seq, action) for action in self._unconfirmed]
            else:
                self._release(self._unconfirmed)
            self._unconfirmed = []

    def _flush(self) -> None:
        # the router hears of new memberships before the loop confirms them to anyone, and
        # before the events that tell of them
        self._send_delta()
        events = self.events
        if events.events:
            self._send(shardwire.events(events.take_events()))
        if events.changes:
            self._send(shardwire.join_leave(events.take_changes()))
        if self._actions:
            actions, self._actions = self._actions, []
            self.post(actions)
        messages, size = self._reported
        if (
            self.consumed_messages - messages >= shardwire.CREDIT_MESSAGES
            or self.consumed_bytes - size >= shardwire.CREDIT_BYTES
        ):
            self._report()  # under load, credit goes back ahead of the heartbeat timer
        self._recheck()

    def _report(self) -> None:
        """Heartbeat and credit: what this shard has consumed so far."""
        if self._send(shardwire.pulse(self.consumed_messages, self.consumed_bytes)):
            self._reported = (self.consumed_messages, self.consumed_bytes)

    def _send(self, msg: list[bytes]) -> bool:
        if not self.link.send(msg):
            log.warning("router not reading: dropped a %r message", msg[0])
            return False
        return True


def _resume_message(ask: Ask) -> list[bytes]:
    return shardwire.resume(ask.conn, ask.channel, ask.offset, ask.epoch, ask.quiet, ask.before)
