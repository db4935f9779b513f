"""A shard process: an asyncio loop holding WebSocket connections, and the shard's CacheActor.

Owns: the connections handed over by the supervisor (file descriptors over a Unix socket), how
many connections each user has here (``--max-connections-per-user``: counted from the moment a
connection arrives, its handshake unread, so that a burst cannot slip past the limit), the
shard's clock (pings to idle clients, token expiry, liveness reports to the actor), the
slow-consumer bookkeeping (clients behind with their writes), the drain on shutdown, and
carrying out what the CacheActor decides (its :data:`LoopAction` list: deliveries, hello,
confirmations, closes). The CacheActor runs on this same loop (a :class:`LoopActor`), so its
decisions arrive as plain calls, with no thread in between. Must never read or change the cache
itself (only tell the actor), and never block the loop: no ``ask``.

Run by the supervisor as ``python -m shards.worker INDEX EPOCH CONTROL_FD ROUTER CONFIG_JSON``
(``CONFIG_JSON``: a :class:`ShardConfig`), with the token secret (which checks a client's
``refresh``) in the environment variable ``UCC_SECRET``, read once at start and removed from the
environment: never on the command line, which any local user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from typing import assert_never

import pykka

from actors.cache_actor import (
    Activity,
    CacheActor,
    ClientAck,
    CloseConnections,
    Closed,
    Deliver,
    Incident,
    LoopAction,
    Opened,
    Refused,
    Registered,
    Resume,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from actors.events import CAUSE_EVENTS
from actors.ids import ChannelId, ConnId, UserId
from actors.osthread import name_this_thread
from actors.wire import frames
from shards.connection import CLOSE_TIMEOUT, Connection, deliver
from shards.handoff import (
    Ack,
    ControlError,
    Handoff,
    ShardConfig,
    Shutdown,
    recv_connection,
    send_message,
)

log = logging.getLogger("ucc.shard")

TICK = 0.25  # seconds: liveness report to the actor (and through it, to the router); Shard.now
DRAIN_BATCHES = 10
REPORT_INTERVAL = 5.0  # seconds between two summaries of connections closed for cause
# the counters of closes (and refusals) for cause that are trouble: one WARNING line each per
# summary that has any (the others, routine, share one INFO line)
WARN_CAUSES = frozenset(
    {
        "closed_slow_consumer",
        "connection_errors",
        "closed_rate_limit",
        "closed_protocol_error",
        "closed_frame_too_big",
        "closed_invalid_utf8",
        "refused_per_user",
        "closed_resume_failed",
        "adopt_failed",
    }
)
SECRET_ENV = "UCC_SECRET"  # how the supervisor passes the token secret to a shard


class Shard:
    """One shard process's connections and clock, on its event loop; the ``ShardSide`` of
    each of its connections, and the carrier of its CacheActor's :data:`LoopAction` lists."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        index: int,
        epoch: int,
        control: socket.socket,
        router: str,
        config: ShardConfig,
        secret: str = "",
    ) -> None:
        """``secret``: the token secret, to check a client's ``refresh`` ("": every refresh
        is refused)."""
        self.loop = loop
        self.index, self.epoch = index, epoch
        self.control = control
        self.config = config
        self.secret = secret
        # each user's connections here, from their arrival (handshake unread) to their end
        self.per_user: dict[UserId, int] = {}
        # a connection whose write buffer is over this pauses writing: it is behind, and is
        # closed 4000 if it stays so for --slow-consumer-timeout (see ``_close_slow``)
        self.write_high = max(1, min(16 * 1024, config.write_buffer_limit // 4))
        self.paused: dict[ConnId, float] = {}  # connections paused writing, since when
        # what connections went through: closed for cause, failed (see ``count``)
        self.counters: dict[str, int] = {}
        # the host's totals for the metrics (summed by the router across restarts): frames
        # delivered and their bytes, counted per Deliver action (never per write), and closes
        # by close code
        self.frames_delivered = 0
        self.bytes_sent = 0
        self.closes: dict[int, int] = {}
        self._reported: dict[str, int] = {}  # the counters at the last summary line
        self._first: dict[str, str] = {}  # each cause's first occurrence since that line
        self._last_report = time.monotonic()
        self.conns: dict[ConnId, Connection] = {}
        # Coarse: refreshed once per TICK (0.25 s), not per event. Fine for what is measured in
        # seconds against it: when a client was last heard from (pings after --heartbeat, 25 s;
        # the stale sweep after --heartbeat-timeout, 60 s) and since when a client is behind
        # (--slow-consumer-timeout, 10 s). Whatever needs precision reads ``loop.time()`` (the
        # inbound budgets, the handshake and close deadlines) or ``time.monotonic()``.
        self.now = time.monotonic()
        self._next_conn = 1
        self._active: dict[ConnId, float] = {}
        self._last_ping = self.now
        self.stopped = loop.create_future()
        self.actor = CacheActor.start(
            loop,
            index,
            epoch,
            router,
            self.apply,
            config.heartbeat_timeout,
            lambda: self.stop(None),  # the actor failed: exit, and be restarted
            counters=self.totals,
            max_channels=config.max_channels_per_connection,
            ack_timeout=config.ack_timeout,
            ack_retries=config.ack_retries,
            history=config.history_size > 0,
            remote_of=self._remote_of,
            events=config.emit_events,
        )
        loop.add_reader(control.fileno(), self._on_control)
        self._tick_handle = loop.call_later(TICK, self._tick)

    # -- from the supervisor -----------------------------------------------------------------

    def _on_control(self) -> None:
        acks: list[int] = []
        try:
            for _ in range(256):
                if not self._control_message(acks):
                    break
        finally:
            if acks:  # the supervisor keeps its copy of each socket until we have it
                with contextlib.suppress(OSError):
                    send_message(self.control, Ack(tuple(acks)))

    def _control_message(self, acks: list[int]) -> bool:
        """Handle one message from the supervisor; False when there is nothing more to read."""
        try:
            received = recv_connection(self.control)
        except BlockingIOError:
            return False
        except ControlError as exc:  # a bug in the supervisor: never fatal to our clients
            log.error("shard %d: malformed control message: %s", self.index, exc)
            return True
        except OSError as exc:
            log.error("shard %d: control socket failed: %s", self.index, exc)
            received = None
        if received is None:  # the supervisor is gone: so are we
            log.warning("shard %d: supervisor gone, exiting", self.index)
            self.stop(None)
            return False
        message, sock = received
        if isinstance(message, Shutdown):
            if sock is not None:
                sock.close()
            self.stop(message.drain_window)
            return False
        if sock is None:
            return True
        acks.append(message.id)
        self._accept(message, sock)
        return True

    def _accept(self, handoff: Handoff, sock: socket.socket) -> None:
        conn_id = ConnId(self._next_conn)
        self._next_conn += 1
        # what the kernel may hold for a client on top of our write buffer: by default its own
        # (autotuned) size; a small one (--send-buffer) makes a client that falls behind show it
        # (pause_writing, then the slow-consumer rules) before seconds of data pile up there
        if self.config.send_buffer:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer)
        conn = Connection(self, conn_id, handoff.user, handoff.channels, handoff.exp)
        self.loop.create_task(self._adopt(sock, conn))

    async def _adopt(self, sock: socket.socket, conn: Connection) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except OSError as exc:
            self.count("adopt_failed")
            self._first.setdefault("adopt_failed", f"user {conn.user}: {exc}")
            sock.close()

    # -- from connections --------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """The counters for the shard's status answer: those of :meth:`count`, and the
        totals (``frames_delivered``, ``bytes_sent``, ``close_<code>``)."""
        closes = {f"close_{code}": n for code, n in self.closes.items()}
        return {
            **self.counters,
            "frames_delivered": self.frames_delivered,
            "bytes_sent": self.bytes_sent,
            **closes,
        }

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def closed_for_cause(self, conn: Connection, cause: str, detail: str = "") -> None:
        """Count it, keep the first occurrence of the interval for the summary line (never a
        line per connection), and tell the actor (an event) with the event stream on."""
        self.counters[cause] = self.counters.get(cause, 0) + 1
        if cause not in self._first:
            about = f"connection {conn.conn_id} of user {conn.user}"
            self._first[cause] = f"{about}: {detail}" if detail else about
        if self.config.emit_events and cause in CAUSE_EVENTS:
            self._tell(Incident(conn.conn_id, conn.user, cause, detail))

    def _tell(self, message: object) -> None:
        # once the actor has failed, the shard is on its way out: nothing more to tell it
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor.tell(message)

    def admit(self, conn: Connection) -> bool:
        held = self.per_user.get(conn.user, 0)
        if held >= self.config.max_connections_per_user:
            return False  # the connection answers 429 and counts it
        self.per_user[conn.user] = held + 1
        return True

    def connection_opened(self, conn: Connection) -> None:
        self.conns[conn.conn_id] = conn
        self._tell(Opened(conn.conn_id, conn.user, conn.channels, time.monotonic()))

    def writing_paused(self, conn: Connection) -> None:
        self.paused[conn.conn_id] = self.now

    def writing_resumed(self, conn: Connection) -> None:
        self.paused.pop(conn.conn_id, None)

    def connection_lost(self, conn: Connection) -> None:
        if conn.admitted:
            held = self.per_user.pop(conn.user, 0) - 1
            if held > 0:
                self.per_user[conn.user] = held
        self.paused.pop(conn.conn_id, None)
        if self.conns.pop(conn.conn_id, None) is not None:
            self._active.pop(conn.conn_id, None)
            code, reason = conn.close_status()
            self.closes[code] = self.closes.get(code, 0) + 1
            if self.config.emit_events:
                self._tell(Closed(conn.conn_id, code, reason))
            else:
                self._tell(Closed(conn.conn_id))

    def _remote_of(self, conn_id: ConnId) -> str:
        conn = self.conns.get(conn_id)
        return conn.remote() if conn is not None else ""

    def subscribe(self, conn: Connection, channel: ChannelId) -> None:
        self._tell(Subscribe(conn.conn_id, channel))

    def unsubscribe(self, conn: Connection, channel: ChannelId) -> None:
        self._tell(Unsubscribe(conn.conn_id, channel))

    def resume(self, conn: Connection, channel: ChannelId, offset: int, epoch: str) -> None:
        self._tell(Resume(conn.conn_id, channel, offset, epoch))

    def ack(self, conn: Connection, message_id: str) -> None:
        self._tell(ClientAck(conn.conn_id, message_id))

    # -- from the CacheActor -------------------------------------------------------------------

    def apply(self, actions: list[LoopAction]) -> None:
        conns = self.conns
        # the metrics: per Deliver action (before they are merged), never per write. Measured
        # (Python 3.11, this 2-core box): 170 ns per apply() with one Deliver, against ~6.8 ms
        # of server CPU for a broadcast to 1,000 members (`ucc bench fanout --members 1000`)
        delivered = sent = 0
        for action in actions:
            if type(action) is Deliver:
                recipients = len(action.conns)
                delivered += recipients
                sent += recipients * len(action.frame)
        self.frames_delivered += delivered
        self.bytes_sent += sent
        for action in coalesce(actions):
            if isinstance(action, Deliver):  # the hot path: first
                limit = self.config.write_buffer_limit
                deliver(map(conns.get, action.conns), action.frame, limit)
            elif isinstance(action, Registered):
                conn = conns.get(action.conn)
                if conn is not None:
                    conn.registered()
            elif isinstance(action, Subscribed):
                conn = conns.get(action.conn)
                if conn is not None:
                    conn.confirm(action.channel, action.subscribed)
            elif isinstance(action, Refused):
                conn = conns.get(action.conn)
                if conn is not None:
                    conn.send(frames.error(action.code, action.message))
            elif isinstance(action, CloseConnections):
                cause = action.cause
                for conn_id in action.conns:
                    conn = conns.get(conn_id)
                    if conn is not None:
                        if cause:
                            self.closed_for_cause(conn, cause)
                        conn.close(action.code, action.reason)
            else:
                assert_never(action)  # mypy: a new kind of action must be handled here

    # -- clock -------------------------------------------------------------------------------

    def mark_active(self, conn: Connection) -> None:
        self._active[conn.conn_id] = self.now

    def _tick(self) -> None:
        """Report activity (and that this loop is alive) to the actor; ping idle clients."""
        self.now = now = time.monotonic()
        active, self._active = self._active, {}
        self._tell(Activity(active, now))  # monotonic: a wall-clock step is no inactivity
        wall = time.time()  # only for the token's exp, which is wall-clock by definition
        if self.paused:
            self._close_slow(now)
        if now - self._last_report >= REPORT_INTERVAL:
            self._report(now)
        if now - self._last_ping >= self.config.heartbeat:
            self._last_ping = now
            for conn in list(self.conns.values()):
                # a token that ran out: the client must come back with a fresh one
                if conn.expires + self.config.token_leeway <= wall:
                    self.closed_for_cause(conn, "closed_token_expired")
                    conn.close(4003, "token expired")
                elif now - conn.last_inbound >= self.config.heartbeat:
                    conn.ping()
        self._tick_handle = self.loop.call_later(TICK, self._tick)

    def _report(self, now: float) -> None:
        """What happened to connections since the last summary: a WARNING line per cause of
        trouble (:data:`WARN_CAUSES`: how many, and the first one's detail), one INFO line for
        the rest. A storm of closes must not become a storm of log lines."""
        changed = {k: v - self._reported.get(k, 0) for k, v in self.counters.items()}
        changed = {k: v for k, v in changed.items() if v}
        if changed:
            seconds = now - self._last_report
            for cause in sorted(changed.keys() & WARN_CAUSES):
                first = self._first.get(cause, "?")
                log.warning(
                    "shard %d: %s: %d in the last %.0f s (first: %s)",
                    self.index,
                    cause,
                    changed[cause],
                    seconds,
                    first,
                )
            routine = sorted(changed.keys() - WARN_CAUSES)
            if routine:
                summary = ", ".join(f"{k}={changed[k]}" for k in routine)
                log.info("shard %d: in the last %.0f s: %s", self.index, seconds, summary)
            self._reported = dict(self.counters)
        self._first.clear()
        self._last_report = now

    def _close_slow(self, now: float) -> None:
        """Close the connections that have not taken their writes for ``slow_timeout``."""
        limit = now - self.config.slow_consumer_timeout
        for conn_id in [c for c, since in self.paused.items() if since < limit]:
            conn = self.conns.get(conn_id)
            del self.paused[conn_id]
            if conn is not None:
                self.closed_for_cause(conn, "closed_slow_consumer", "behind for too long")
                conn.close(4000, "slow consumer")

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, drain_window: float | None) -> None:
        """Stop serving: drain over ``drain_window`` seconds, or exit at once if None."""
        if self.stopped.done():
            return
        self._tick_handle.cancel()
        self.loop.remove_reader(self.control.fileno())
        self.stopped.set_result(drain_window)

    async def drain(self, window: float, grace: float = CLOSE_TIMEOUT) -> None:
        """Tell every client to reconnect (a drain frame, then close 1001), in batches spread
        over ``window`` seconds so that they do not all come back at once; then wait up to
        ``grace`` seconds for the closing handshakes (by then each connection has aborted its
        own, after the same ``CLOSE_TIMEOUT``)."""
        conns = list(self.conns.values())
        batches = max(1, min(DRAIN_BATCHES, len(conns)))
        size = max(1, -(-len(conns) // batches))
        for start in range(0, len(conns), size):
            for conn in conns[start : start + size]:
                conn.send(frames.DRAIN)
                conn.close(1001, "server shutting down")
            if window > 0 and start + size < len(conns):
                await asyncio.sleep(window / batches)
        deadline = self.loop.time() + grace
        while self.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.02)


def coalesce(actions: list[LoopAction]) -> list[LoopAction]:
    """Merge consecutive deliveries to the very same recipients into one: one ``write()`` per
    connection carries them all.

    "The very same" is identity (``is``), not equality: it relies on
    :meth:`UserConnectionCache.recipients` returning the same tuple object for a channel until
    that channel's membership changes (it caches one per channel). Comparing by identity costs
    nothing per delivery, and a run of broadcasts to one channel is what it is for; equal
    recipients in a new tuple (the channel changed in between, or a list of users) are simply
    not merged, which is correct, only less thrifty."""
    merged: list[LoopAction] = []
    runs: dict[int, list[bytes]] = {}  # position in merged of a run's first -> its frames
    for action in actions:
        last = merged[-1] if merged else None
        if isinstance(action, Deliver) and isinstance(last, Deliver) and action.conns is last.conns:
            runs.setdefault(len(merged) - 1, [last.frame]).append(action.frame)
        else:
            merged.append(action)
    for position, run in runs.items():
        first = merged[position]
        assert isinstance(first, Deliver)  # a run starts with a delivery
        merged[position] = Deliver(b"".join(run), first.conns)
    return merged


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies (belt and braces with the EOF)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _crash_requested(index: int, epoch: int, switch: str) -> bool:
    """Test-only switch ``UCC_TEST_CRASH_SHARD=INDEX[:FROM_EPOCH]``: crash on start."""
    target, _, from_epoch = switch.partition(":")
    return target == str(index) and epoch >= int(from_epoch or 1)


async def serve(
    index: int, epoch: int, control_fd: int, router: str, config: ShardConfig, secret: str = ""
) -> int:
    if _crash_requested(index, epoch, os.environ.get("UCC_TEST_CRASH_SHARD", "")):
        raise SystemExit(f"shard {index}: crashing on start (UCC_TEST_CRASH_SHARD)")
    loop = asyncio.get_running_loop()
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    shard = Shard(loop, index, epoch, control, router, config, secret)
    loop.add_signal_handler(signal.SIGTERM, shard.stop, 0.0)
    drain_window = await shard.stopped
    if drain_window is not None:
        await shard.drain(drain_window)
    shard.actor.stop(block=False)  # it runs on this loop: let it finish its turn
    await asyncio.sleep(0)
    return 0 if drain_window is not None else 1  # 1: the supervisor is gone, or the actor failed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    index, epoch, control_fd, router, raw_config = args
    config = ShardConfig.from_json(raw_config)
    secret = os.environ.pop(SECRET_ENV, "")  # once; our children (none) would not inherit it
    # the supervisor decides when we stop; a SIGHUP to the whole process group (a terminal
    # closing, `kill -HUP -PGID`) is the supervisor's to handle (it re-reads the client keys)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    name_this_thread(f"ucc-shard-{index}")
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s shard-{index} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection is noise
    import uvloop  # noqa: PLC0415 - a dependency; imported only in the shard process

    if not secret:
        log.warning(
            "shard %s: no %s in the environment: every refresh is refused", index, SECRET_ENV
        )
    return uvloop.run(serve(int(index), int(epoch), int(control_fd), router, config, secret))


if __name__ == "__main__":
    sys.exit(main())
