"""The router's logic: the channel → shards index, shard liveness, routing and scatter/gather.

Owns: which shards are up (and in which incarnation, the *epoch*), which shards hold members of
which channel, the credit window to each shard, and the queries in flight. Commands are handled
by one method each (:attr:`RouterCore.handlers`). What must be sent is queued inside and taken
by the RouterActor (as websockets' ``data_to_send()``): :meth:`RouterCore.take_outbox` (to
shards), :meth:`RouterCore.take_replies` (to backends), :meth:`RouterCore.take_events` (to the
supervisor). In a cluster of hosts, the Redis half (:class:`actors.hosts.OtherHosts`,
``core.hosts``) adds the other hosts to gathers and queues the Redis link's operations.
Must never do I/O, read a clock (``now`` is a parameter) or block: a shard that is down or slow
only ever costs a missing answer in a reply, never a wait.

Flow control: the core counts what it queues to each shard and what the shard reports it has
consumed (``shardwire``'s credit). A broadcast whose target shards have no room (more than
``window.messages`` messages or ``window.size`` bytes in flight, or a backlog whose oldest
message is older than ``window.delay``: :mod:`actors.credit`) is refused whole with
``overloaded``, and nothing of it is queued: an ``ok: true`` means the message was queued to
every shard holding members. Queries count in the window but are never refused by it (they are
small, and at most ``max_queries`` are in flight); deliveries from other hosts that find no room
are dropped and counted.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from actors.credit import CreditWindow, WindowLimits
from actors.critical import CriticalStore
from actors.eventlog import EventLog
from actors.gather import (
    Combiner,
    Gather,
    GatherSpec,
    Participant,
    are_online,
    broadcast,
    is_online,
    sum_connections,
    union_users,
)
from actors.guarantees import INTERNAL, Guarantees
from actors.history import HistoryStore
from actors.hostlink import (
    AreOnline,
    OnlineInChannel,
    OnlineUsers,
    PublishChannel,
    PublishHosts,
    PublishUsers,
    RedisOp,
)
from actors.hosts import OtherHosts
from actors.ids import ChannelId, ShardIndex, stable_hash
from actors.observe import Observers
from actors.wire import commands, frames, shardwire
from actors.wire.commands import Command, CommandError

log = logging.getLogger("ucc.router")

DEFAULT_WINDOW = WindowLimits()

# the counters of a shard's status answer that are host totals (with ``close_<code>``)
SHARD_TOTALS = frozenset({"frames_delivered", "bytes_sent", "refused_per_user"})
RESTART_LOG = 10  # restarts remembered for the admin page
# The router's tick (:meth:`RouterCore.next_tick`): every wake-up of its thread costs ~100 to
# 200 CPU-µs on a virtual machine, whatever it does, so it ticks when something is due only
HOUSEKEEPING = 1.0  # seconds between two ticks at most (history's and critical messages' expiry)
RETRY_TICK = 0.1  # seconds between two ticks while something waits to be retried or released
HANG_MARGIN = 0.001  # seconds past a shard's hang deadline that its check comes
# ucc_command_seconds' buckets (seconds): a reply within half a millisecond up to a gather that
# waited for its deadline (--gather-timeout, 1 s by default) and more
COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Users whose shard is remembered, at most: ``stable_hash`` costs ~1.8 µs on this box (a
# SplitMix64 step and a jump hash in Python), a dict look-up ~0.05; at most ~1.3 MB. Beyond,
# forgotten all at once (so commands that cycle through more users than this gain nothing).
SHARD_CACHE = 1 << 14


def is_total(key: str) -> bool:
    """Whether a key of a shard's status answer is one of the host's totals (frames delivered,
    bytes sent, closes by code, connections refused by the shard: 429 beyond
    ``--max-connections-per-user``): kept across the shard's restarts
    (:attr:`RouterCore.retired`)."""
    return key in SHARD_TOTALS or key.startswith("close_")


class CommandTimes:
    """Commands answered, by (command, result), and the time from their arrival at the router
    to their reply (a histogram). Plain: the core says when a command arrived
    (:meth:`answered`), the RouterActor says when the replies went out (:meth:`replied`)."""

    def __init__(self, buckets: tuple[float, ...] = COMMAND_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.results: dict[tuple[str, str], int] = {}
        self._pending: list[tuple[str, str, float]] = []  # (command, result, arrival)

    def answered(self, command: str, result: str, arrival: float) -> None:
        """The reply to ``command`` (arrived at ``arrival``) is queued, with ``result``."""
        self._pending.append((command, result, arrival))

    def replied(self, now: float) -> None:
        """The replies queued so far went out at ``now``: count and time them."""
        pending, self._pending = self._pending, []
        for command, result, arrival in pending:
            key = (command, result)
            self.results[key] = self.results.get(key, 0) + 1
            seconds = max(0.0, now - arrival)
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    def statistics(self) -> dict[str, Any]:
        return {
            "buckets": list(self.buckets),
            "counts": list(self.counts),
            "sum": self.sum,
            "results": [[c, r, n] for (c, r), n in sorted(self.results.items())],
        }


Handler = Callable[[list[bytes], Command, float], None]


class ShardState(Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


@dataclass(slots=True)
class ShardSlot:
    index: ShardIndex
    state: ShardState = ShardState.DOWN
    epoch: int = -1
    pid: int = 0
    last_seen: float = 0.0
    channels: set[ChannelId] = field(default_factory=set)
    window: CreditWindow = field(default_factory=CreditWindow)  # this incarnation's
    reported: dict[str, int] = field(default_factory=dict)  # its last totals (``is_total``)
    cause: str = ""  # how its last incarnation ended (``shard_down``'s cause)
    # the identity of incarnation ``_named``: every message to the shard is keyed by it
    _identity: bytes = field(default=b"", init=False, repr=False, compare=False)
    _named: int = field(default=-2, init=False, repr=False, compare=False)

    @property
    def identity(self) -> bytes:
        if self._named != self.epoch:
            self._identity, self._named = shardwire.identity(self.index, self.epoch), self.epoch
        return self._identity


@dataclass(frozen=True, slots=True)
class ShardEvent:
    """For the supervisor: a shard's incarnation came up (its hello reached the router, which
    indexed its channels). The core only reports ``state`` UP this way; a shard it declares
    hung is a :class:`ShardHung`."""

    index: ShardIndex
    state: ShardState
    epoch: int
    pid: int


@dataclass(frozen=True, slots=True)
class ShardHung:
    """For the supervisor: the router declared incarnation ``epoch`` of shard ``index`` down
    because its heartbeats stopped; the supervisor kills it (and restarts it)."""

    index: ShardIndex
    epoch: int
    pid: int


@dataclass(frozen=True, slots=True)
class UserBanned:
    """For the supervisor: ``user``'s new connections are refused for ``seconds`` (a
    ``disconnect`` with ``ban``, on this host or forwarded from another); the acceptor does it."""

    user: int
    seconds: float


RouterEvent = ShardEvent | ShardHung | UserBanned


def largest_channels(answers: Iterable[Mapping[str, Any]], top: int) -> list[list[int]]:
    """The host's ``top`` largest channels, ``[[channel, users], ...]`` largest first, from
    the shards' own (a user lives on one shard, so a channel's users on the host are the sum
    of its users on each shard; a channel outside every shard's own top is not counted)."""
    users: dict[int, int] = {}
    for answer in answers:
        for channel, count in answer.get("largest", ()):
            users[channel] = users.get(channel, 0) + count
    ranked = sorted(users.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [[channel, count] for channel, count in ranked]


def _banned(seconds: float) -> Combiner:
    """The reply of a ``disconnect`` with ``ban``: ``sum_connections``'s, and ``banned``."""

    def combine(gather: Gather) -> dict[str, Any]:
        return {**sum_connections(gather), "banned": seconds}

    return combine


class RouterCore:
    """The router's decisions, driven synchronously: feed it shard messages
    (:meth:`shard_message`), commands (:meth:`command`), the supervisor's news
    (:meth:`shard_starting`, :meth:`shard_down`) and the time (:meth:`tick`,
    :meth:`check_hung`); take what it queued with the ``take_*`` methods."""

    def __init__(
        self,
        shards: int,
        gather_timeout: float = 1.0,
        max_command: int = 1 << 20,
        redis: bool = False,
        window: WindowLimits = DEFAULT_WINDOW,
        max_queries: int = 10_000,
        history: HistoryStore | None = None,
        critical: CriticalStore | None = None,
        events: EventLog | None = None,
    ) -> None:
        """``redis``: this host has a Redis link to other hosts (``self.hosts`` is its half).
        ``history``: the channels' history (None: none kept, frames carry no offset);
        ``critical``: where critical messages wait for their acknowledgement. ``events``: the
        host's event stream (None: none published; snapshots still answer)."""
        self.window = window
        self.max_queries = max_queries
        self.slots = [ShardSlot(ShardIndex(i)) for i in range(shards)]
        self._shard_cache: dict[int, ShardIndex] = {}  # user -> stable_hash (see SHARD_CACHE)
        self.index: dict[ChannelId, set[ShardIndex]] = {}
        self.gather_timeout = gather_timeout
        self.max_command = max_command
        self.pending: dict[int, Gather] = {}
        self._next_qid = 1
        # (identity, frames) and (envelope, payload) stay tuples: one per message to a shard or
        # reply, the router's hottest path. Measured on this 2-core box (Python 3.11): appending
        # a tuple costs 47 ns, a frozen slotted dataclass 426 ns (a plain slotted one 124 ns).
        self._outbox: list[tuple[bytes, list[bytes]]] = []
        self._replies: list[tuple[list[bytes], bytes]] = []
        self._events: list[RouterEvent] = []
        self.hosts = OtherHosts(self) if redis else None
        self.guarantees = Guarantees(
            self,
            history or HistoryStore(0, 300.0, 0),
            critical or CriticalStore(100, 64 * 1024 * 1024),
        )
        self.observers = Observers(self, events or EventLog("local", enabled=False))
        # the totals of the shards' dead incarnations (their last reported), for the metrics
        self.retired: dict[str, int] = {}
        self.restarts = 0  # shard incarnations started after the first
        # the last restarts, oldest first: {"shard", "epoch", "pid", "at" (Unix time), "cause"}
        self.restart_log: deque[dict[str, Any]] = deque(maxlen=RESTART_LOG)
        # where the host listens and since when ("websocket", "metrics", "started_at"), set by
        # the supervisor once known: in the status reply, with "uptime"
        self.host_info: dict[str, Any] = {"started_at": time.time()}
        self.command_times = CommandTimes()
        self._timed: str | None = None  # the command being handled, until its reply is queued
        # counters kept elsewhere (the command endpoint's CURVE: "curve"), by key, in statistics
        self.extra_stats: dict[str, Callable[[], Any]] = {}
        self.counters = {
            "commands": 0,
            "errors": 0,
            "stale_messages": 0,
            "dropped_to_shards": 0,
            "dropped_replies": 0,
            "commands_refused": 0,  # answered overloaded: nothing of them was queued
            "remote_dropped": 0,  # deliveries from other hosts that found no room
            "internal_errors": 0,  # a bug met while handling a command (logged)
            # a resume, a critical fetch, another host's question: not asked (max_queries)
            "internal_refused": 0,
            "batch_holds": 0,  # turns after which the RouterActor held its sockets (batching)
        }
        # one handler per command (commands.COMMANDS names them; a test keeps both in step)
        self.handlers: dict[str, Handler] = {
            "broadcast_to_channel": self._broadcast_to_channel,
            "broadcast_to_user": self._broadcast_to_users,
            "broadcast_to_users": self._broadcast_to_users,
            "get_online_users_in_channel": self._online_in_channel,
            "get_online_users": self._online,
            "is_user_online": self._are_online,
            "are_users_online": self._are_online,
            "subscribe": self._user_control,
            "unsubscribe": self._user_control,
            "disconnect": self._user_control,
            "router_stats": self._router_stats,
            "status": self._status,
            "history": self.guarantees.history_command,
            "snapshot": self.observers.snapshot,
            "get_user_connections": self.observers.user_connections,
            "set_channel": self.observers.set_channel,
        }

    # -- outputs, taken by the RouterActor -------------------------------------------------

    def take_outbox(self) -> list[tuple[bytes, list[bytes]]]:
        """Messages to shards queued since the last call: (shard identity, frames), in order."""
        outbox, self._outbox = self._outbox, []
        return outbox

    def unsent(self, identity: bytes, messages: list[list[bytes]], now: float) -> None:
        """The actor could not queue ``messages`` (the last taken for ``identity``) to that
        shard: counted, taken back out of its credit window (else the window would wait
        forever for them), and a confirmation of its index among them is queued again."""
        self.counters["dropped_to_shards"] += len(messages)
        parsed = shardwire.parse_identity(identity)
        if parsed is None or not 0 <= parsed[0] < len(self.slots):
            return
        slot = self.slots[parsed[0]]
        if slot.epoch != parsed[1]:
            return  # an old incarnation's: its window is gone already
        size = sum(shardwire.size(m[1], m[2]) for m in messages)
        slot.window.dropped(len(messages), size)
        confirmations = [m for m in messages if m[0] == shardwire.INDEXED]
        if confirmations:  # without it, the shard would hold its clients' hello
            self.send(slot.index, confirmations[-1], now)
        for msg in messages:  # a critical message must reach a live connection: again later
            if msg[0] in (shardwire.CRITICAL, shardwire.PENDING):
                self.guarantees.undelivered(slot.index, msg)

    def take_replies(self) -> list[tuple[list[bytes], bytes]]:
        """Replies to backends queued since the last call: (envelope, payload), in order."""
        replies, self._replies = self._replies, []
        return replies

    def take_events(self) -> list[RouterEvent]:
        """News for the supervisor since the last call."""
        events, self._events = self._events, []
        return events

    # -- shard lifecycle -------------------------------------------------------------------

    def shard_starting(self, index: int, epoch: int, pid: int) -> None:
        """The supervisor started incarnation ``epoch`` of shard ``index``."""
        slot = self.slots[index]
        if epoch > slot.epoch:
            self._drop(slot)
            slot.epoch, slot.pid, slot.state = epoch, pid, ShardState.STARTING
            if epoch > 1:
                self.restarts += 1
                self.restart_log.append(
                    {"shard": index, "epoch": epoch, "pid": pid, "at": time.time()}
                    | {"cause": slot.cause or "unknown"}
                )

    def shard_down(self, index: int, epoch: int, now: float, cause: str = "exited") -> None:
        """Incarnation ``epoch`` of shard ``index`` died or was killed (``cause``: how, for the
        event stream)."""
        slot = self.slots[index]
        if slot.epoch == epoch and slot.state is not ShardState.DOWN:
            self._drop(slot)
            slot.state = ShardState.DOWN
            slot.cause = cause
            self.observers.events.shard_died(slot.index, epoch, cause)
            self.observers.shard_died(slot.index, now)

    def check_hung(self, now: float, timeout: float) -> list[ShardSlot]:
        """Declare down the up shards silent for ``timeout`` seconds, and report them to the
        supervisor (:class:`ShardHung`), which kills them. A shard's heartbeat is a timer on its
        event loop, so it stops when the loop stops turning (SIGSTOP, an endless callback); a
        busy loop still turns (every turn's work is bounded: connections' reads by their budget,
        deliveries by the shard's work cap, and the router never queues more than the credit
        window), so load alone does not look hung."""
        hung = [s for s in self.up_shards() if now - s.last_seen > timeout]
        for slot in hung:
            self.shard_down(slot.index, slot.epoch, now, "hung")
            self._events.append(ShardHung(slot.index, slot.epoch, slot.pid))
        return hung

    def _drop(self, slot: ShardSlot) -> None:
        """Forget a shard's memberships and stop waiting for it; keep its last totals."""
        for key, value in slot.reported.items():
            self.retired[key] = self.retired.get(key, 0) + value
        slot.reported = {}
        for channel in slot.channels:
            self._unindex(channel, slot.index)
        slot.channels = set()
        slot.window = CreditWindow()
        self._give_up(slot.index)

    def _give_up(self, who: Participant) -> None:
        """``who`` will answer none of the gathers in flight: finish those it completes."""
        for qid, gather in list(self.pending.items()):
            if who in gather.waiting:
                gather.gave_up(who)
                if not gather.waiting:
                    self.finish(qid)

    def up_shards(self) -> list[ShardSlot]:
        return [slot for slot in self.slots if slot.state is ShardState.UP]

    # -- messages from shards --------------------------------------------------------------

    def shard_message(self, sender: bytes, msg: list[bytes], now: float) -> None:
        parsed = shardwire.parse_identity(sender)
        if parsed is None or not 0 <= parsed[0] < len(self.slots) or not msg:
            self.counters["stale_messages"] += 1
            return
        slot = self.slots[parsed[0]]
        kind = msg[0]
        if kind == shardwire.HELLO:
            self._hello(slot, parsed[1], msg, now)
            return
        if parsed[1] != slot.epoch or slot.state is not ShardState.UP:
            self.counters["stale_messages"] += 1  # an old incarnation's last words
            return
        slot.last_seen = now
        if kind == shardwire.PULSE and len(msg) > 1:
            consumed = shardwire.unpack_ids(msg[1])
            if len(consumed) == 2:
                slot.window.credit(consumed[0], consumed[1])
        elif kind == shardwire.DELTA:
            gained = shardwire.unpack_ids(msg[1])
            self._delta(slot, gained, shardwire.unpack_ids(msg[2]))
            self._indexed(slot, msg[3:], gained, now)
        elif kind == shardwire.RESULT:
            self._result(slot, shardwire.unpack_id(msg[1]), json.loads(msg[2]))
        elif kind == shardwire.SYNC:  # the whole truth, after the shard dropped a delta
            channels = {ChannelId(c) for c in shardwire.unpack_ids(msg[1])}
            gained = list(channels - slot.channels)
            self._delta(slot, gained, list(slot.channels - channels))
            self._indexed(slot, msg[2:], gained, now)
        elif kind == shardwire.RESUME:
            self.guarantees.resume(slot, msg[1], msg[2], now)
        elif kind == shardwire.ACK:
            self.guarantees.ack(msg[1], msg[2])
        elif kind == shardwire.NEW_CONNECTION:
            self.guarantees.new_connection(slot, msg[1], now)
        elif kind == shardwire.EVENTS:
            self.observers.events.from_shard(slot.index, msg[1])
        elif kind == shardwire.JOIN_LEAVE:
            self.observers.joins_and_leaves(slot.index, msg[1], now)

    def _indexed(self, slot: ShardSlot, seq: list[bytes], gained: list[int], now: float) -> None:
        """Confirm a numbered membership change: the shard holds its clients' hello and
        subscribed frames until then (see shardwire). In a cluster, once the host listens to
        the topics of the channels it gained, too (:meth:`OtherHosts.hold`)."""
        if not seq:
            return
        number = shardwire.unpack_id(seq[0])
        channels = [ChannelId(c) for c in gained]
        if self.hosts is not None and self.hosts.hold(slot, channels, number, now):
            return
        self.send(slot.index, shardwire.indexed(number), now)

    def _hello(self, slot: ShardSlot, epoch: int, msg: list[bytes], now: float) -> None:
        body = json.loads(msg[1])
        if epoch < slot.epoch or (epoch == slot.epoch and slot.state is ShardState.DOWN):
            self.counters["stale_messages"] += 1  # an old or already-dead incarnation
            return
        self._drop(slot)
        slot.epoch, slot.pid, slot.state, slot.last_seen = epoch, body["pid"], ShardState.UP, now
        self._delta(slot, body["channels"], [])
        self._events.append(ShardEvent(slot.index, ShardState.UP, epoch, slot.pid))
        self.observers.events.shard_up(slot.index, epoch, "started" if epoch == 1 else "restarted")
        self.observers.shard_up(slot, now)

    def _delta(self, slot: ShardSlot, gained: list[int], lost: list[int]) -> None:
        for raw in gained:
            channel = ChannelId(raw)
            slot.channels.add(channel)
            shards = self.index.get(channel)
            if shards is None:
                shards = self.index[channel] = set()
                if self.hosts is not None:  # the host's first member
                    self.hosts.channel_gained(channel)
            shards.add(slot.index)
        for raw in lost:
            channel = ChannelId(raw)
            slot.channels.discard(channel)
            self._unindex(channel, slot.index)

    def _unindex(self, channel: ChannelId, index: ShardIndex) -> None:
        shards = self.index.get(channel)
        if shards is not None:
            shards.discard(index)
            if not shards:
                del self.index[channel]
                if self.hosts is not None:  # the host's last member left
                    self.hosts.channel_lost(channel)

    def _result(self, slot: ShardSlot, qid: int, body: Any) -> None:
        gather = self.pending.get(qid)
        if gather is None or slot.index not in gather.waiting:
            return  # answered after its deadline: already replied without it
        if isinstance(body, dict) and "frames_delivered" in body:  # a status answer: its totals
            slot.reported = {k: v for k, v in body.items() if is_total(k)}
        self.observers.events.answered(qid, slot.index)  # a snapshot's: its later events patch
        gather.answered(slot.index, body)
        if not gather.waiting:
            self.finish(qid)

    # -- commands from backends ------------------------------------------------------------

    def command(self, envelope: list[bytes], raw: bytes, now: float) -> None:
        self.counters["commands"] += 1
        # timed from ``now`` to its reply: here if answered at once, else by its gather (which
        # takes ``_timed`` over)
        self._timed = "invalid"
        result = "ok"
        try:
            cmd = commands.decode(raw, self.max_command)
            self._timed = cmd.name
            self.handlers[cmd.name](envelope, cmd, now)
        except CommandError as exc:
            result = exc.code
            self.counters["commands_refused" if exc.code == "overloaded" else "errors"] += 1
            request = commands.request_id(raw) if exc.code != "too_large" else None
            self._replies.append((envelope, commands.error_reply(request, exc.code, exc.message)))
        except (RecursionError, OverflowError, ValueError, TypeError, KeyError) as exc:
            result = "internal_error"
            # a hole in validation (a bug) must cost this command, never the router: said once
            # in the log with its traceback, counted, and answered
            self.counters["internal_errors"] += 1
            log.exception("router: a command could not be processed: %.200r", raw)
            reply = commands.error_reply(
                commands.request_id(raw), "internal_error", f"cannot process: {exc!r}"[:200]
            )
            self._replies.append((envelope, reply))
        if self._timed is not None:
            self.command_times.answered(self._timed, result, now)
            self._timed = None

    def _broadcast_to_channel(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        if self.guarantees.history.enabled:
            self.guarantees.broadcast_to_channel(envelope, cmd, now)
            return
        channel = cmd.args["channel"]
        frame = frames.channel_message(channel, cmd.data_json)
        self.check_frame(frame)
        shards = self.index.get(channel, ())
        message = shardwire.channel_delivery(channel, frame)  # encoded once, for every shard
        self._queue_all(dict.fromkeys(shards, message), now)
        self.finish_broadcast(
            envelope, cmd, now, len(shards), lambda qid: PublishChannel(qid, channel, frame)
        )

    def _broadcast_to_users(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        args = cmd.args
        users = [args["user"]] if cmd.name == "broadcast_to_user" else args["users"]
        if args.get("critical"):
            self.guarantees.broadcast_critical(envelope, cmd, users, now)
            return
        frame = frames.direct_message(cmd.data_json)
        self.check_frame(frame)
        groups = self.up_groups(users)
        self._queue_all({i: shardwire.users_delivery(g, frame) for i, g in groups.items()}, now)
        self.finish_broadcast(
            envelope, cmd, now, len(groups), lambda qid: PublishUsers(qid, users, frame)
        )

    def _online_in_channel(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        channel = cmd.args["channel"]
        query = shardwire.QueryOnlineIn(channel)
        spec = GatherSpec(
            set(self.index.get(channel, ())),
            union_users,
            lambda _index: query,
            remote=lambda qid: OnlineInChannel(qid, channel),
        )
        self.start_gather(envelope, cmd.id, spec, now)

    def _online(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        query = shardwire.QueryOnline()
        spec = GatherSpec(self._all(), union_users, lambda _index: query, remote=OnlineUsers)
        self.start_gather(envelope, cmd.id, spec, now)

    def _are_online(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        one = cmd.name == "is_user_online"
        users = [cmd.args["user"]] if one else cmd.args["users"]
        groups = self._by_shard(users)
        spec = GatherSpec(
            set(groups),
            is_online if one else are_online,
            lambda index: shardwire.QueryAreOnline(tuple(groups[index])),
            {"users": users},
            lambda qid: AreOnline(qid, users),
        )
        self.start_gather(envelope, cmd.id, spec, now)

    def _user_control(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        """subscribe, unsubscribe, disconnect: to the user's shard and, in a cluster, to the
        hosts that have the user (``connections`` counts ours, ``hosts`` how many others).
        A ``disconnect`` with ``ban`` also bans the user here (:class:`UserBanned`) and goes to
        every other host, whether it has the user or not; its reply says ``banned``."""
        user = cmd.args["user"]
        query = shardwire.user_control(cmd.name, user, cmd.args.get("channel"))
        control = {"op": cmd.name, **cmd.args}  # as the other hosts read it (wire.cluster)
        ban = cmd.args.get("ban")
        if ban is not None:
            self.ban(user, ban)
        spec = GatherSpec(
            {self._shard_of(user)},
            sum_connections if ban is None else _banned(ban),
            lambda _index: query,
            remote=lambda qid: (
                PublishUsers(qid, [user], b"", control)
                if ban is None
                else PublishHosts(qid, [user], control)
            ),
        )
        self.start_gather(envelope, cmd.id, spec, now)

    def ban(self, user: int, seconds: float) -> None:
        """Refuse ``user``'s new connections on this host for ``seconds`` (the supervisor's
        acceptor does it)."""
        self._events.append(UserBanned(user, seconds))

    def _router_stats(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        self.reply(envelope, cmd, self.statistics())

    def _status(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        spec = GatherSpec(self._all(), self._status_rows, lambda _index: shardwire.QueryStatus())
        self.start_gather(envelope, cmd.id, spec, now)

    def finish_broadcast(
        self,
        envelope: list[bytes],
        cmd: Command,
        now: float,
        shards: int,
        publish: Callable[[int], RedisOp],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Reply at once on one host; in a cluster, once Redis has taken the message. The reply
        says ``shards`` and whatever ``extra`` holds."""
        result = {"shards": shards, **(extra or {})}
        if self.hosts is None:
            self.reply(envelope, cmd, result)
            return
        spec = GatherSpec((), broadcast, None, result, publish)
        self.start_gather(envelope, cmd.id, spec, now)

    def check_frame(self, frame: bytes) -> None:
        self.check_size(len(frame))

    def check_size(self, size: int) -> None:
        """CommandError ``too_large`` if a frame of ``size`` bytes exceeds the limit."""
        if size > self.max_command:
            raise CommandError("too_large", "the message exceeds the frame size limit")

    # -- services: to shards, with the credit window ---------------------------------------

    def members(self, channel: ChannelId) -> Collection[ShardIndex]:
        """The shards that hold members of ``channel``."""
        return self.index.get(channel, ())

    def up_groups(self, users: list[int]) -> dict[ShardIndex, list[int]]:
        """``users`` by shard, for the shards that are up."""
        groups = self._by_shard(users)
        return {i: g for i, g in groups.items() if self.slots[i].state is ShardState.UP}

    def _room(self, index: ShardIndex, size: int, now: float) -> str | None:
        """Why one more message of ``size`` bytes does not fit in shard ``index``'s window,
        or None if it does."""
        reason = self.slots[index].window.refusal(size, now, self.window)
        return None if reason is None else f"shard {index}: {reason}"

    def _queue_all(self, messages: Mapping[ShardIndex, list[bytes]], now: float) -> None:
        """Queue each shard its message, or refuse (CommandError ``overloaded``) unless every
        one of them has room for its own: all or nothing."""
        sizes = {index: shardwire.size(msg[1], msg[2]) for index, msg in messages.items()}
        self.refuse_unless_room(sizes, now)
        for index, msg in messages.items():
            self.send(index, msg, now, sizes[index])

    def refuse_unless_room(self, sizes: Mapping[ShardIndex, int], now: float) -> None:
        """CommandError ``overloaded`` unless each shard has room for a message of its size."""
        for index, size in sizes.items():
            reason = self._room(index, size, now)
            if reason is not None:
                raise CommandError("overloaded", f"{reason}; nothing was sent, retry later")

    def offer(self, index: ShardIndex, msg: list[bytes], now: float) -> bool:
        """Queue ``msg`` to shard ``index`` if its window has room; False if not (not sent)."""
        size = shardwire.size(msg[1], msg[2])
        if self._room(index, size, now) is not None:
            return False
        self.send(index, msg, now, size)
        return True

    def send(self, index: ShardIndex, msg: list[bytes], now: float, size: int = -1) -> None:
        """Queue ``msg`` to shard ``index``, counted in its window (``size``: its
        ``shardwire.size``, if known already)."""
        slot = self.slots[index]
        slot.window.queued(shardwire.size(msg[1], msg[2]) if size < 0 else size, now)
        self._outbox.append((slot.identity, msg))

    def shard_of(self, user: int) -> ShardIndex:
        return self._shard_of(user)

    def _shard_of(self, user: int) -> ShardIndex:
        cache = self._shard_cache
        index = cache.get(user)
        if index is None:
            if len(cache) >= SHARD_CACHE:
                cache.clear()
            index = cache[user] = stable_hash(user, len(self.slots))
        return index

    def _by_shard(self, users: list[int]) -> dict[ShardIndex, list[int]]:
        groups: dict[ShardIndex, list[int]] = {}
        for user in users:
            groups.setdefault(self._shard_of(user), []).append(user)
        return groups

    def _all(self) -> set[ShardIndex]:
        return {slot.index for slot in self.slots}

    def reply(self, envelope: list[bytes], cmd: Command, result: dict[str, Any]) -> None:
        self._replies.append((envelope, commands.reply(cmd.id, result)))

    # -- gathers ---------------------------------------------------------------------------

    def start_internal(self, spec: GatherSpec, now: float) -> int | None:
        """A gather no backend waits for (its combiner does the work), started from a shard's
        or another host's message: beyond ``max_queries`` it is not started (counted; None),
        never an exception into the router's loop."""
        try:
            return self.start_gather(None, INTERNAL, spec, now)
        except CommandError:
            self.counters["internal_refused"] += 1
            return None

    def start_gather(
        self, envelope: list[bytes] | None, request: Any, spec: GatherSpec, now: float
    ) -> int:
        """Ask ``spec.shards`` (and, in a cluster, the other hosts with ``spec.remote``); reply
        to ``envelope`` (None: hand the result to ``hosts``) when all have answered or at the
        deadline, with what came back. Refused ``overloaded`` beyond ``max_queries``. Returns
        the gather's id (it may be over already: no shard to ask)."""
        if len(self.pending) >= self.max_queries:
            raise CommandError(
                "overloaded", f"{len(self.pending)} queries in flight (limit {self.max_queries})"
            )
        qid = self._next_qid
        self._next_qid += 1
        deadline = now + self.gather_timeout
        gather = Gather(envelope, request, spec.combine, deadline, set(), args=spec.args, qid=qid)
        if envelope is not None and self._timed is not None:  # a command's: timed to its reply
            gather.command, gather.started, self._timed = self._timed, now, None
        self.pending[qid] = gather
        if self.hosts is not None and spec.remote is not None:
            self.hosts.join(qid, gather, spec.remote, now)
        for index in sorted(spec.shards):
            if self.slots[index].state is not ShardState.UP:
                gather.missing.add(index)
                continue
            assert spec.query is not None, "a gather that asks shards needs a query"
            self.send(index, shardwire.query(qid, spec.query(index)), now)
            gather.waiting.add(index)
        if not gather.waiting:
            self.finish(qid)
        return qid

    def tick(self, now: float) -> None:
        """Answer the queries whose deadline has passed with what they have; forget the history
        and critical messages whose time is up."""
        self.guarantees.tick(now)
        self.observers.flush(now)
        if self.hosts is not None:
            self.hosts.tick(now)
        for qid, gather in list(self.pending.items()):
            if now >= gather.deadline:
                gather.expire()
                self.finish(qid)

    def next_deadline(self) -> float | None:
        deadlines = [g.deadline for g in self.pending.values()]
        flush = self.observers.next_deadline()
        if flush is not None:
            deadlines.append(flush)
        return min(deadlines, default=None)

    def next_tick(self, now: float, hang_timeout: float) -> float:
        """When :meth:`tick` and :meth:`check_hung` (with ``hang_timeout``) are due at the
        latest: the first gather's deadline or join/leave flush; the moment the first up shard
        would have been silent for ``hang_timeout`` (its heartbeats move that on: a check
        that finds none hung costs a turn per ``hang_timeout``, not ten a second); within
        RETRY_TICK while something waits to be retried or released; else within HOUSEKEEPING
        (expiries are in seconds)."""
        when = now + HOUSEKEEPING
        if self.guarantees.retrying() or (self.hosts is not None and self.hosts.holding()):
            when = now + RETRY_TICK
        for slot in self.slots:
            if slot.state is ShardState.UP:
                when = min(when, slot.last_seen + hang_timeout + HANG_MARGIN)
        deadline = self.next_deadline()
        return when if deadline is None else min(when, deadline)

    def finish(self, qid: int) -> None:
        """Gather ``qid`` is over: combine what came back into its reply."""
        gather = self.pending.pop(qid)
        result = gather.combine(gather)
        if gather.envelope is None:  # no reply: the combiner did the work, or a presence pull
            if self.hosts is not None and gather.request != INTERNAL:
                self.hosts.presence_done(gather)
            return
        result["missing_shards"] = gather.missing_shards()
        if self.hosts is not None:
            self.hosts.annotate(gather, result)
        if gather.command is not None:
            outcome = "ok" if not gather.missing else "partial"
            self.command_times.answered(gather.command, outcome, gather.started)
        self._replies.append((gather.envelope, commands.reply(gather.request, result)))

    def _status_rows(self, gather: Gather) -> dict[str, Any]:
        rows = []
        for slot in self.slots:
            row: dict[str, Any] = {
                "index": slot.index,
                "pid": slot.pid,
                "epoch": slot.epoch,
                "state": slot.state.value,
            }
            answer = gather.answers.get(slot.index)
            if answer is None and slot.state is ShardState.UP:
                row["state"] = "unresponsive"
            row.update(answer or {"connections": 0, "users": 0, "channels": 0})
            row.pop("largest", None)
            row.pop("largest_skipped", None)
            rows.append(row)
        info = dict(self.host_info)
        info["uptime"] = round(time.time() - info["started_at"], 3)
        return {**info, "shards": rows, "channels_indexed": len(self.index)}

    def metrics(self, now: float, done: Callable[[dict[str, Any]], None], top: int = 0) -> None:
        """Ask every shard for its status and hand the host's numbers to ``done`` (called
        once: when all have answered, at the deadline, or at once beyond ``max_queries``).
        With ``top``, the host's ``top`` largest channels too, and the last restarts (for the
        admin page)."""
        query = shardwire.QueryStatus(top)
        spec = GatherSpec(self._all(), lambda g: self._metrics(g, done, top), lambda _i: query)
        if self.start_internal(spec, now) is None:
            self._metrics(Gather(None, INTERNAL, spec.combine, now, set()), done, top)

    def _metrics(
        self, gather: Gather, done: Callable[[dict[str, Any]], None], top: int = 0
    ) -> dict[str, Any]:
        totals = dict(self.retired)
        for slot in self.slots:  # answered or not: a silent shard's totals do not go back
            for key, value in slot.reported.items():
                totals[key] = totals.get(key, 0) + value
        redis = presence = gaps = None
        if self.hosts is not None:
            hosts = self.hosts.statistics()
            redis = {"up": self.hosts.up, **hosts.get("redis", {})}
            presence, gaps = hosts["presence"], hosts["topic_gaps"]
        status = self._status_rows(gather)
        result = {
            **{k: v for k, v in status.items() if k not in ("shards", "channels_indexed")},
            "shards": status["shards"],
            "channels": len(self.index),
            "totals": totals,
            "restarts": self.restarts,
            "commands": self.command_times.statistics(),
            "redis": redis,
            "presence": presence,
            "topic_gaps": gaps,
        }
        if top:
            result["largest"] = largest_channels(gather.answers.values(), top)
            # shards that did not look (too many channels), or did not answer
            result["largest_missing"] = sorted(
                slot.index
                for slot in self.slots
                if (answer := gather.answers.get(slot.index)) is None
                or answer.get("largest_skipped")
            )
            result["restart_log"] = list(self.restart_log)
        done(result)
        return result

    def statistics(self) -> dict[str, Any]:
        """The router's own counters, answered at once without asking any shard."""
        return {
            **self.counters,
            "pending_queries": len(self.pending),
            "channels_indexed": len(self.index),
            "shards": {slot.index: slot.state.value for slot in self.slots},
            # [messages, bytes] queued to each shard and not yet consumed (its credit window)
            "queued_to_shards": {s.index: list(s.window.in_flight()) for s in self.slots},
            **(self.hosts.statistics() if self.hosts is not None else {}),
            **self.guarantees.statistics(),
            **self.observers.statistics(),
            **{name: dict(source()) for name, source in self.extra_stats.items()},
        }

    def close_all(self) -> None:
        """Shutting down: answer every query in flight with what it has."""
        for qid in list(self.pending):
            self.pending[qid].expire()
            self.finish(qid)
