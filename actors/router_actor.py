"""RouterActor: owns the command endpoint, the shards' socket and the :class:`RouterCore`.

Owns: the ZeroMQ ROUTER socket of backends' commands (``command``), the Unix socket the shards
connect to (:class:`actors.shardlink.ShardLinks`), the router's state (the core, and in a
cluster of hosts the Redis link), and the router's timers (gather deadlines, hang checks,
presence pulls). It reads commands and shard messages in batches, lets the core decide, and
sends what the core queued (``take_outbox``, ``take_replies``, ``take_events``,
``hosts.take_ops``) — never waiting: a full or missing shard costs a dropped message
(counted), never a wait. The Redis link reports to it with
ordinary actor messages (:mod:`actors.hostlink` events). Must never block on a shard or the
link, decide anything itself (the core does), or call back into another actor with ``ask``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from actors.hostlink import (
    ChannelMarks,
    Deliveries,
    LinkEvent,
    LinkState,
    PresenceDrift,
    PresenceHeard,
    PresenceLoaded,
    RedisOp,
    Results,
    TopicsReady,
)
from actors.hosts import OtherHosts
from actors.inbox import SocketActor, SocketsReady, Tick
from actors.osthread import name_this_thread
from actors.router import RETRY_TICK, RouterCore, RouterEvent
from actors.shardlink import Bounds, ShardLinks
from actors.wire import shardwire

log = logging.getLogger("ucc.router")

READ_BATCH = 1024  # messages read from one socket per turn at most
EVENTS_HWM = 1000  # events queued per subscriber at most (beyond: dropped, the seq shows it)
EVENTS_SNDBUF = 64 * 1024  # bytes of kernel send buffer per subscriber
# The longest a turn drains the commands socket before the shards' sockets and the timers get a
# turn. What a turn queues to the shards leaves at its end and their credit is read at the next
# turn's start, so up to two rounds of the router's own time count in a shard's backlog age
# (with a batch hold, when holding, and a mark's MARK_SPAN: see actors/credit.py). A tenth of
# ``--shard-queue-delay`` at most leaves most of it to the shards. With 0.05 s, a router
# saturated by `ucc bench direct` at ~45 µs a command spent the whole 0.1 s on itself, and
# refused commands ``overloaded`` for shards at ~13 % of a core. With only this constant
# changed (3 runs each): 7,253-9,235 of ~140,000 refused at 0.05, 0-813 at 0.01.
ROUND = 0.01


@dataclass(frozen=True, slots=True)
class ShardStarting:
    """From the supervisor: it started incarnation ``epoch`` of shard ``index``."""

    index: int
    epoch: int
    pid: int


@dataclass(frozen=True, slots=True)
class ShardDown:
    """From the supervisor: incarnation ``epoch`` of shard ``index`` exited (``cause``: how,
    e.g. ``signal SIGKILL``, for the event stream)."""

    index: int
    epoch: int
    cause: str = "exited"


@dataclass(frozen=True, slots=True)
class HostEvents:
    """From the supervisor: events of the host itself (the acceptor's refusals, coalesced),
    each (type, fields), for the event stream."""

    events: list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class MetricsWanted:
    """From the metrics server (any thread): the host's numbers (:meth:`RouterCore.metrics`)
    are wanted; ``reply`` is called with them on the router's thread, once (within
    ``--gather-timeout``). It must not block: e.g. set a ``concurrent.futures.Future``.
    ``top``: the host's largest channels and last restarts too (the admin page's)."""

    reply: Callable[[dict[str, Any]], None]
    top: int = 0


@dataclass(frozen=True, slots=True)
class RouterFailed:
    """For the supervisor: a bug killed the router (``reason``: the exception); the host must
    stop (exit 1) and be restarted rather than stay up and deaf."""

    reason: str


SupervisorEvent = RouterEvent | RouterFailed  # what ``on_event`` receives

LINK_EVENTS = (
    LinkState,
    Results,
    Deliveries,
    TopicsReady,
    ChannelMarks,
    PresenceHeard,
    PresenceLoaded,
    PresenceDrift,
)


class RateMeter:
    """Commands per second over about the last ``horizon`` seconds: weighted commands over
    weighted time, both decaying (a plain decaying count would start from 0 and take a few
    horizons to find a rate; this is right from the first turns). A gap longer than
    ``longest`` is a silence: the rate is measured afresh after it (``seconds`` says how much
    time it has seen since)."""

    __slots__ = ("commands", "horizon", "longest", "seconds")

    def __init__(self, horizon: float, longest: float) -> None:
        self.horizon, self.longest = horizon, longest
        self.commands = self.seconds = 0.0

    def add(self, commands: int, gap: float) -> None:
        """``commands`` came in over the last ``gap`` seconds."""
        if gap > self.longest:
            self.commands = self.seconds = 0.0
            return
        decay = math.exp(-gap / self.horizon)
        self.commands = self.commands * decay + commands
        self.seconds = self.seconds * decay + gap

    def fade(self, seconds: float) -> None:
        """``seconds`` went by unseen: what was seen before weighs less (same rate)."""
        if seconds > 0:
            decay = math.exp(-seconds / self.horizon)
            self.commands *= decay
            self.seconds *= decay

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds > 0 else 0.0


class BatchWindow:
    """The router's batch window (``--batch-window``, ``--batch-window-max``), decided turn by
    turn: a plain class.

    Holding the sockets for a moment after a turn lets what arrives meanwhile be read, decided
    and sent in one turn: each shard is woken once for all of it instead of once per command.
    Most of a turn's cost is per turn (waking the router and each shard it writes to), so a
    hold that gathers many commands pays, and one that gathers one only delays it.

    - **How long.** The command rate is estimated over the last TAU seconds of turns (a
      :class:`RateMeter`). A hold is sized to gather about TARGET commands at that rate, between
      ``window`` and ``budget`` (the most a command waits for its batch): at 1,000 commands/s
      8 ms, at 4,000/s and more ``window``.
    - **When.** Holding starts when a hold of that length is expected to gather START commands
      or more (so, with the default 10 ms budget, from ~400 commands/s), once the rate has been
      seen unheld over OBSERVE seconds and OBSERVED commands (time spent holding fades what
      was seen before it). It stops when the estimate falls below that. After a silence
      (no command for twice ``budget``, 50 ms at least) everything is measured afresh.
    - **Only if it pays.** Backends that send a command only after the reply to their last
      gather no more in a longer hold: holding only slows them. So every JUDGE held turns, the
      rate the commands came in at is compared with the rate seen unheld before holding began;
      below PAID of it, holding stops for a back-off (MIN_BACKOFF, doubled after each failure
      in a row up to MAX_BACKOFF, reset by a judgement that passes or a silence). Two held
      turns in a row that each brought fewer than GATHER (of START at least expected) back off
      too.
      Independent arrivals, as from many users, come in as fast held or not, and pass. The
      rate of independent arrivals is noisy (over JUDGE turns it varies by ~15 %), hence the
      low PAID; but backends waiting for their replies can be told by who sent the commands:
      one command in 3 of 4 judged turns or more, and never more than one (a backend that
      sends on its own at the rates that are held rarely looks like that). If such backends
      sent half of the commands or more, the bar is WAITED: they may come in a little slower held
      and still gain nothing, or as fast, when their round trip is longer than the hold (then
      a hold gathers one command from each, and pays). The rate they are compared with is
      the one measured before holding began, which may have been low (at their start, or at
      a busy moment): after REPROBE judgements passed in a row at WAITED, holding pauses for
      MIN_BACKOFF (not doubled) to measure it afresh. (Measured with `ucc serve` and 16
      backend processes each sending a command after the reply to their last: see README,
      Benchmarks, issue 14 fourth pass.)
      What is left: backends waiting for their replies that send less than half of the
      commands (among other traffic that pays for holding), or miss more than 2 of 8 holds
      (a very busy box), are judged at PAID: held, they may be slowed by up to half; and a
      backend that sends one command at a time among such traffic waits up to a hold per
      command.

    (Measured, rooms of 10 at 1,000 commands/s, fixed holds: server CPU per frame 35.2 µs
    without, 25.9 with 2 ms, 18.1 with 5 ms, ~15 with 10 ms; p50 latency 0.5, 1.5, 3.5, 6.4 ms.)
    """

    TARGET = 8  # commands a hold is sized to gather
    START = 4  # commands a hold must be expected to gather to start holding
    GATHER = 2  # a held turn that brought fewer (of START at least expected) is a miss
    TAU = 0.05  # seconds: the horizon of the rate estimates
    OBSERVE = 0.01  # seconds of turns not held that the rate must be seen over first...
    OBSERVED = 16  # ...and commands
    JUDGE = 8  # held turns between two judgements
    PAID = 0.5  # held, commands must come in at least this share of the rate seen unheld...
    WAITED = 0.85  # ...this share, if most of them came from backends waiting for replies
    REPROBE = 8  # judgements passed in a row at WAITED, then a pause to measure it afresh
    MIN_BACKOFF = 0.05  # seconds without holding after a judgement that failed...
    MAX_BACKOFF = 5.0  # ...doubled after each failure in a row, up to this

    def __init__(self, window: float, budget: float = 0.0) -> None:
        self.window = window
        self.budget = max(budget, window)
        self.current = window  # the hold in force's length
        self.misses = 0  # held turns in a row that brought fewer than GATHER
        self.holding = False
        self.last = float("-inf")  # when the last turn with commands ended
        self.silence = max(self.TAU, 2 * self.budget)  # a longer gap: no rate known
        self.rate = RateMeter(self.TAU, self.silence)  # every turn...
        self.free = RateMeter(self.TAU, self.silence)  # ...and the turns not held (faded by
        self.free_last = float("-inf")  # the time spent holding since the last of them)
        self.unheld = 0.0  # its rate when holding began
        self.turns = self.commands = 0  # held turns since the last judgement, their commands...
        self.seconds = 0.0  # ...and the time they took
        # ...and per backend: how many of those turns brought exactly one command from it, and
        # the backends that sent more in one of them
        self.regulars: dict[bytes, int] = {}
        self.crowded: set[bytes] = set()
        self.backoff = self.MIN_BACKOFF
        self.resume = float("-inf")  # no holding before then (a back-off)
        self.passed = 0  # judgements passed in a row at WAITED

    def stats(self, now: float) -> dict[str, float]:
        """For ``router_stats``: the flags, and the hold in force at ``now`` (0: not holding,
        or no command for the silence: holding ends with the next turn then)."""
        held = self.current if self.holding and now - self.last <= self.silence else 0.0
        return {"window": self.window, "max": self.budget if self.window else 0.0, "current": held}

    def turn(
        self, handled: int, now: float, senders: dict[bytes, int] | None = None
    ) -> float | None:
        """A turn that handled ``handled`` commands (and read every command there was) ended
        at ``now``: hold until when (None: do not hold). ``senders``: in a turn that followed
        a hold (:attr:`holding`), how many of them came from each backend."""
        if not handled or not self.window:
            return None
        gap, self.last = now - self.last, now
        self.rate.add(handled, gap)
        if gap > self.silence:  # after a silence, all is measured afresh
            self._stop()
            self.backoff = self.MIN_BACKOFF
        if self.holding:
            self.turns += 1
            self.commands += handled
            self.seconds += gap
            self._count_regulars(senders or {})
            if self.turns >= self.JUDGE:
                if not self._judge():
                    self._stop(back_off=now)
                    return None
                if self.passed >= self.REPROBE:  # the rate unheld, measured afresh: the one
                    self.passed = 0  # measured when holding began may have been too low (a
                    self._stop()  # start, a busy moment), and then holding passes for ever
                    self.resume = now + self.MIN_BACKOFF
                    return None
            if handled >= self.GATHER:
                self.misses = 0
            else:  # a second hold in a row that gathered (next to) nothing of the many
                self.misses += 1  # expected (START at least): the commands were waiting
                if self.misses >= 2:  # for their replies
                    self._stop(back_off=now)
                    return None
        else:
            if self.free_last > float("-inf"):  # what was seen before the last holding
                self.free.fade(now - gap - self.free_last)  # counts for less, the longer
            self.free.add(handled, gap)  # it held
            self.free_last = now
            if now < self.resume:
                return None
        rate = self.rate.rate
        if rate * self.budget < self.START:
            # too few for a hold to pay: the rate fell. The held turns so far still count
            # (the next holding's judgement weighs them too): holds that slow commands down
            # below this rate would otherwise stop before they are ever judged
            self.holding = False
            return None
        if not self.holding and (
            self.free.seconds < self.OBSERVE or self.free.commands < self.OBSERVED
        ):
            return None
        length = min(max(self.TARGET / rate, self.window), self.budget)
        if not self.holding:
            self.unheld = self.free.rate
        self.holding, self.current = True, length
        return now + length

    def _count_regulars(self, senders: dict[bytes, int]) -> None:
        """One more held turn (``self.turns`` counts it already): who sent how many."""
        regulars = self.regulars
        for who, count in senders.items():
            if count == 1:
                regulars[who] = regulars.get(who, 0) + 1
            else:
                self.crowded.add(who)

    def waiting(self) -> int:
        """The commands of the held turns since the last judgement that came from backends
        waiting for their replies: never more than one command in a turn, and one in 3 of 4
        turns or more (on a busy box, such a backend may miss a hold: it was not run in time;
        with fewer, backends that send on their own at the rates that are held look like that
        too often)."""
        turns, crowded = self.turns, self.crowded
        return sum(
            n for who, n in self.regulars.items() if 4 * n >= 3 * turns and who not in crowded
        )

    def _judge(self) -> bool:
        """Whether holding paid over the held turns since the last judgement."""
        rate = self.commands / self.seconds if self.seconds > 0 else float("inf")
        waited = 2 * self.waiting() >= self.commands
        paid = rate >= (self.WAITED if waited else self.PAID) * self.unheld
        self.passed = self.passed + 1 if paid and waited else 0
        self.turns = self.commands = 0
        self.seconds = 0.0
        self.regulars.clear()
        self.crowded.clear()
        if paid:
            self.backoff = self.MIN_BACKOFF
            return True
        return False

    def _stop(self, back_off: float | None = None) -> None:
        """Stop holding, and forget the held turns; with ``back_off`` (now), do not hold again
        for the back-off, and double it."""
        self.holding = False
        self.turns = self.commands = self.misses = 0
        self.seconds = 0.0
        self.regulars.clear()
        self.crowded.clear()
        self.passed = 0
        if back_off is not None:
            self.resume = back_off + self.backoff
            self.backoff = min(2 * self.backoff, self.MAX_BACKOFF)


class Link(Protocol):
    """The Redis link as the router sees it: it takes operations and never blocks."""

    def start(self) -> None: ...

    def submit(self, op: RedisOp) -> None: ...

    def stats(self) -> dict[str, int]:
        """A copy of the link's counters (published, received, malformed, reconnects),
        taken safely from any thread."""
        ...

    def close(self) -> None: ...


class CommandAuth(Protocol):
    """CURVE on the command endpoint as the router sees it: the server's secret key, and a ZAP
    handler already answering on the context's ``inproc://zeromq.zap.01`` (it decides which
    client keys get a session; the command socket's requests carry the domain ``domain``)."""

    @property
    def secret_key(self) -> bytes:
        """The server's z85 secret key."""
        ...

    @property
    def domain(self) -> bytes:
        """The ZAP domain of the command socket."""
        ...

    def stats(self) -> Mapping[str, int]:
        """A copy of its counters (admitted, denied, ...), taken safely from any thread."""
        ...

    def reload(self) -> None:
        """Re-read the admitted client keys."""
        ...

    def close(self) -> None: ...


class RouterActor(SocketActor):
    """Binds its sockets in the constructor (so a busy port fails the caller at once)."""

    def __init__(
        self,
        core: RouterCore,
        command_endpoint: str,
        shard_endpoint: str,
        on_event: Callable[[SupervisorEvent], None],
        hang_timeout: float,
        link: Callable[[Callable[[LinkEvent], None]], Link] | None = None,
        presence_interval: float = 1.0,
        context: zmq.Context[Any] | None = None,
        backend_queue: int = 1000,
        command_auth: CommandAuth | None = None,
        events_endpoint: str | None = None,
        batch_window: float = 0.0,
        batch_window_max: float = 0.0,
    ) -> None:
        """``on_event`` is called on the actor's thread (the supervisor hops to its loop).
        ``link``, in a cluster of hosts (``core.hosts`` set), makes the Redis link given a
        function to report to (any thread). ``backend_queue``: commands read ahead from, and
        replies held for, each backend. ``command_auth``: the command endpoint is a CURVE
        server (its counters appear in ``router_stats`` as ``curve``); the actor closes it
        when it stops. ``events_endpoint``: bind the event stream's PUB socket there (the
        core's events are published on it). ``batch_window``, ``batch_window_max``: see
        :class:`BatchWindow` (0: off)."""
        super().__init__()
        self.core = core
        self.on_event = on_event
        self.hang_timeout = hang_timeout
        self.context = context or zmq.Context.instance()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply that cannot be queued is
        # an error we count, not a silent drop
        # Per backend, ZeroMQ holds at most ``backend_queue`` commands read ahead (beyond, it
        # stops reading that backend's TCP stream: the backend feels backpressure, the others
        # do not, as the ROUTER reads its peers in turn) and ``backend_queue`` replies not yet
        # taken (beyond, replies to that backend are dropped and counted). A command larger
        # than twice the core's limit is not even read into memory (the peer is disconnected);
        # up to that, the core gives the clear "too_large" reply.
        # (replies: room for a backend's whole queue twice over, plus one round's worth, as
        # ZeroMQ counts what its I/O thread has not yet written: a backend that reads never
        # loses one)
        self.frontend.setsockopt(zmq.SNDHWM, 2 * backend_queue + READ_BATCH)
        self.frontend.setsockopt(zmq.RCVHWM, backend_queue)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, core.max_command * 2)
        self.command_auth = command_auth
        if command_auth is not None:  # before bind: no peer ever gets a plain session
            self.frontend.setsockopt(zmq.CURVE_SERVER, 1)
            self.frontend.setsockopt(zmq.CURVE_SECRETKEY, command_auth.secret_key)
            self.frontend.setsockopt(zmq.ZAP_DOMAIN, command_auth.domain)
            core.extra_stats["curve"] = command_auth.stats
        # the credit window bounds what is queued to a shard; this only has to be above it
        shard_bounds = Bounds(
            core.window.messages + core.max_queries + 1024, core.window.size + (16 << 20)
        )
        # the event stream: a subscriber that lags loses events at the high-water mark (it sees
        # a gap in seq, and resyncs), rather than growing a backlog here or in the kernel
        self.publisher: zmq.Socket[bytes] | None = None
        if events_endpoint is not None:
            self.publisher = self.context.socket(zmq.PUB)
            self.publisher.setsockopt(zmq.LINGER, 0)
            self.publisher.setsockopt(zmq.SNDHWM, EVENTS_HWM)
            self.publisher.setsockopt(zmq.SNDBUF, EVENTS_SNDBUF)
        self.links: ShardLinks | None = None
        try:
            self.frontend.bind(command_endpoint)
            self.links = ShardLinks(shard_endpoint, shard_bounds, self)
            if self.publisher is not None and events_endpoint is not None:
                self.publisher.bind(events_endpoint)
        except (zmq.ZMQError, OSError):
            self.frontend.close()
            if self.links is not None:
                self.links.close()
            if self.publisher is not None:
                self.publisher.close()
            if command_auth is not None:
                command_auth.close()
            raise
        links = self.shard_links
        # shards connected over the link's life, and links dropped for an error (a corrupt
        # stream, a failed read or write, a peer that did not greet as a shard)
        core.extra_stats["shard_links"] = lambda: dict(links.counters)
        self.command_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.events_endpoint = (
            self.publisher.getsockopt_string(zmq.LAST_ENDPOINT) if self.publisher else None
        )
        self.hosts: OtherHosts | None = core.hosts
        self.link = link(self.actor_ref.tell) if link and self.hosts is not None else None
        if self.hosts is not None and self.link is not None:
            self.hosts.link_stats = self.link.stats
        self.presence_interval = presence_interval
        self.next_presence = 0.0
        self.batcher = BatchWindow(batch_window, batch_window_max)
        self.round = drain_round(core.window.delay)
        self.senders: dict[bytes, int] | None = None  # per backend, this turn (while holding)
        self.counted = 0  # the core's commands counter when the batch window last saw a turn
        core.extra_stats["batch_window"] = lambda: self.batcher.stats(time.monotonic())

    def on_start(self) -> None:
        name_this_thread("ucc-router")
        # shards first: a membership (DELTA) must be in the index before a broadcast that
        # follows it, and heartbeats must not wait behind a burst of commands (the shards'
        # descriptors are watched as they connect, but SocketsReady lists them first)
        self.shard_links.start()
        self.watch(self.frontend)
        if self.link is not None:
            self.link.start()
        self._arm_timer()

    def on_stop(self) -> None:
        self.core.close_all()
        self._flush()
        if self.link is not None:
            self.link.close()
        super().on_stop()
        self.frontend.close()
        self.shard_links.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.command_auth is not None:
            self.command_auth.close()

    def reload_command_clients(self) -> None:
        """SIGHUP (through a proxy): re-read the admitted client keys, if CURVE is on."""
        if self.command_auth is None:
            log.info("SIGHUP: the command endpoint has no CURVE client keys to re-read")
        else:
            self.command_auth.reload()

    def on_receive(self, message: Any) -> Any:
        now = time.monotonic()
        if isinstance(message, SocketsReady):
            links = self.shard_links
            emptied = False
            self.senders = {} if self.batcher.holding else None
            for fd in message.writable:
                links.writable(fd)
            for sock in message.sockets:
                if isinstance(sock, int):
                    self._shard_messages(links.readable(sock))
                elif sock is self.frontend:
                    emptied = self._drain(sock, now)
            # no hold while commands wait (a backlog): the next turn reads them at once, and
            # the commands of a turn that stopped short count in the next one that empties it
            if emptied:
                total = self.core.counters["commands"]
                handled, self.counted = total - self.counted, total
                if handled:
                    self._batch(handled)
        elif isinstance(message, Tick):
            self.core.tick(now)
            self._shard_messages(self.shard_links.read_all())  # heartbeats here count first
            now = time.monotonic()
            self.shard_links.drop_silent(now)
            for slot in self.core.check_hung(now, self.hang_timeout):
                log.warning("shard %d (pid %d) stopped answering", slot.index, slot.pid)
            if self.hosts is not None and self.link is not None and now >= self.next_presence:
                self.next_presence = now + self.presence_interval
                self.hosts.presence_tick(now)
        elif isinstance(message, LINK_EVENTS):
            if self.hosts is not None:
                self.hosts.link_event(message, now)
                if isinstance(message, LinkState) and message.up:
                    self.next_presence = now  # publish presence (and a snapshot) at once
        elif isinstance(message, ShardStarting):
            self.core.shard_starting(message.index, message.epoch, message.pid)
        elif isinstance(message, ShardDown):
            self.core.shard_down(message.index, message.epoch, now, message.cause)
        elif isinstance(message, MetricsWanted):
            self.core.metrics(now, message.reply, message.top)
        elif isinstance(message, HostEvents):
            for kind, fields in message.events:
                self.core.observers.events.emit(kind, fields)
        self._flush()
        self._arm_timer()
        return None

    def on_failure(self, *exc_info: Any) -> None:
        """A bug killed the router: take the host down (exit 1) so that it gets restarted,
        rather than leave it up and deaf."""
        log.critical("router failed: the host stops", exc_info=exc_info)
        self.on_event(RouterFailed(repr(exc_info[1]) if len(exc_info) > 1 else "unknown"))

    def _shard_messages(self, received: list[tuple[bytes, list[bytes]]]) -> None:
        for identity, frames in received:
            self.core.shard_message(identity, frames, time.monotonic())

    def _batch(self, handled: int) -> None:
        """``handled`` commands this turn: hold the sockets for a window if they came in
        faster than one per window (see :class:`BatchWindow`)."""
        now = time.monotonic()
        until = self.batcher.turn(handled, now, self.senders)
        if until is not None:
            self.core.counters["batch_holds"] += 1
            self.hold(until)

    @property
    def shard_links(self) -> ShardLinks:
        assert self.links is not None  # set in the constructor, or it raised
        return self.links

    def _drain(self, sock: zmq.Socket[bytes], now: float) -> bool:
        """Commands: up to READ_BATCH messages, or until ``round`` seconds have passed since
        the drain began, whichever first; True if it read all there was. The clock is read
        after each command (~0.1 µs, against 10-50 for a command), so a turn of slow commands
        stops on time. Each command is dated ``now``, the turn's start: its time is counted
        from the turn that reads it (a batch window's wait before it is not in the router's
        latency figures), and its backlog marks in the credit window are up to a round old."""
        senders, core, clock = self.senders, self.core, time.monotonic
        deadline = clock() + self.round
        for _ in range(READ_BATCH):
            try:
                frames = _recv(sock)
            except zmq.Again:
                return True
            if senders is not None:  # the batch window's judgement (see BatchWindow)
                senders[frames[0]] = senders.get(frames[0], 0) + 1
            core.command(frames[:-1], frames[-1], now)
            if clock() > deadline:
                return False  # still readable: the inbox comes back to it after its timers
        return False

    def _flush(self) -> None:
        core = self.core
        # replies first: a write to a shard's socket wakes the shard at once, and on a busy box
        # it may take the CPU from this thread before the reply is queued (`fanout --members
        # 1000 --rate 20`: command round trip p99 9.8 ms with replies after, ~7 with them
        # first). Nothing below adds or changes a reply (``unsent`` counts and re-queues).
        replies = core.take_replies()
        for envelope, payload in replies:
            if not _send(self.frontend, [*envelope, payload]):  # the backend went away
                core.counters["dropped_replies"] += 1
        if replies:  # their commands' time from arrival to reply
            core.command_times.replied(time.monotonic())
        per_shard: dict[bytes, list[list[bytes]]] = {}
        for identity, msg in core.take_outbox():
            per_shard.setdefault(identity, []).append(msg)
        links = self.shard_links
        for identity, msgs in per_shard.items():
            frames = msgs[0] if len(msgs) == 1 else [
                shardwire.PACKED, shardwire.pack_messages(msgs)
            ]  # fmt: skip
            if not links.send(identity, frames, len(msgs)):  # the shard is gone, or its
                core.unsent(identity, msgs, time.monotonic())  # queue is full
        if self.hosts is not None:
            ops = self.hosts.take_ops()
            if self.link is not None:
                for op in ops:
                    self.link.submit(op)
        published = core.observers.events.take()
        if self.publisher is not None:
            for payload in published:  # a PUB socket drops at its high-water mark: no wait
                with contextlib.suppress(zmq.ZMQError):
                    self.publisher.send(payload, _LAST)
        for event in core.take_events():
            self.on_event(event)

    def _arm_timer(self) -> None:
        now = time.monotonic()
        when = self.core.next_tick(now, self.hang_timeout)
        if not self.shard_links.accepting:  # accept() failed: the tick tries again
            when = min(when, now + RETRY_TICK)
        if self.link is not None:
            when = min(when, self.next_presence)
        # never later than the one already set: messages arriving more often than the check
        # interval (pulses, a steady stream of commands) would otherwise push the Tick back
        # for ever, and with it hang checks, presence pulls and expiries
        armed = self.actor_inbox.next_timer
        self.set_timer(when if armed is None else min(armed, when))


def drain_round(queue_delay: float) -> float:
    """The longest a turn drains the commands socket (see ROUND): ROUND, or a tenth of
    ``--shard-queue-delay`` if that is less."""
    return min(ROUND, queue_delay / 10)


_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)  # plain ints: pyzmq's enum arithmetic costs per frame
_LAST = int(zmq.NOBLOCK)
# The backend socket's send, without pyzmq's Python method over it (a call with keyword
# arguments and a super() dispatch per frame): a 3-part reply ~7,300 instructions instead of
# ~12,100 (callgrind, pyzmq 27, Cython backend).
_send_frame = zmq.backend.Socket.send

if zmq.backend.Socket.__module__.startswith("zmq.backend.cython"):

    def _recv(sock: zmq.Socket[bytes]) -> list[bytes]:
        """One whole message without blocking (zmq.Again if there is none), as
        ``recv_multipart(NOBLOCK)`` returns it: each part's Frame says whether more follow,
        where recv_multipart asks the socket (``getsockopt(RCVMORE)``, for which pyzmq builds
        an enum member each time): a 3-part command ~22,500 instructions instead of ~37,700
        (callgrind)."""
        frame = sock.recv(_LAST, copy=False)
        parts = [frame.bytes]
        while frame.more:
            frame = sock.recv(_LAST, copy=False)
            parts.append(frame.bytes)
        return parts

else:  # pyzmq's cffi backend (PyPy): its Frames do not say ``more``

    def _recv(sock: zmq.Socket[bytes]) -> list[bytes]:
        return sock.recv_multipart(_LAST)


def _send(sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    """Send a multipart message without blocking; False if it could not be queued."""
    try:
        for frame in frames[:-1]:
            _send_frame(sock, frame, _MORE)
        _send_frame(sock, frames[-1], _LAST)
    except zmq.ZMQError:
        return False
    return True
