"""The supervisor: ``ucc serve`` itself. Spawns the shards, runs the acceptor and the RouterActor,
restarts shards that die, and shuts everything down on SIGTERM/SIGINT.

Owns: the shard processes (their pids, pidfds, control sockets, incarnation numbers and
configuration), the public listening socket, the connections on their way to a shard (held
while it restarts, handed over and not yet acknowledged, in :class:`~shards.inflight.Handoffs`)
and the RouterActor's lifetime. The decisions live in plain classes (:class:`RestartPolicy`,
:class:`RouterCore`, :class:`Handoffs`); this module carries them out. Must never read a
client's bytes nor touch the router's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka
import zmq

from actors.credit import WindowLimits
from actors.critical import CriticalStore
from actors.eventlog import EventLog
from actors.history import HistoryStore
from actors.hostlink import LinkEvent
from actors.ids import stable_hash
from actors.osthread import name_this_thread
from actors.policy import RestartPolicy
from actors.router import RouterCore, ShardEvent, ShardHung, ShardState, UserBanned
from actors.router_actor import (
    HostEvents,
    MetricsWanted,
    RouterActor,
    RouterFailed,
    ShardDown,
    ShardStarting,
    SupervisorEvent,
)
from actors.wire.cluster import ClusterKey
from actors.wire.tokens import Claims
from shards import limits, ready
from shards.acceptor import Acceptor
from shards.admin import TOP_CHANNELS, AdminRoutes
from shards.config import ServeConfig, effective_batch_window_max
from shards.curve import command_auth
from shards.handoff import (
    MAX_HEADER,
    Handoff,
    ShardConfig,
    Shutdown,
    control_pair,
    send_connection,
    send_message,
)
from shards.inflight import Handoffs
from shards.metrics import MetricsServer, ask_with_timeout
from shards.redislink import RedisLink, host_id

log = logging.getLogger("ucc.supervisor")

# the acceptor's refusals that are an address's limits: ``limit`` events (with --events)
ADDRESS_LIMITS = frozenset(
    {"refused_per_address", "refused_pending", "rate_limited", "forbidden_origin", "banned"}
)

START_TIMEOUT = 20.0  # a shard that has not said hello by then is killed
HOLD_TIME = 2.0  # how long a connection may wait for its restarting shard before a 503
HOLD_LIMIT = 1000  # connections held per shard at most; more get a 503 at once
RETRY_HAND = 0.05  # a full hand-off queue: try a held connection again this much later
ACK_TIMEOUT = 2.0  # a hand-off not acknowledged by then: look whether the shard has read it


@dataclass(eq=False)
class Held:
    """A connection waiting for its shard, its request unread, until ``deadline``."""

    claims: Claims
    sock: socket.socket
    deadline: float


@dataclass
class ShardProcess:
    index: int
    epoch: int = 0
    running: bool = False  # incarnation ``epoch`` has been spawned and has not exited yet
    proc: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    pidfd: int = -1
    ready: bool = False
    started_at: float = 0.0
    start_timer: asyncio.TimerHandle | None = None
    # connections handed over but not yet acknowledged, and the timer that looks for lost acks
    handoffs: Handoffs = field(default_factory=Handoffs)
    sweep_timer: asyncio.TimerHandle | None = None
    # connections that arrived while the shard was restarting, waiting for it (bounded)
    held: list[Held] = field(default_factory=list)

    def current(self, epoch: int) -> bool:
        """Whether the router's news about incarnation ``epoch`` concerns our live process."""
        # not an older incarnation's; nor this one's once its process has exited: the router's
        # UP (from its hello) can reach us after the pidfd told us that it died, and would mark a
        # dead shard ready and answer its held connections 503
        return self.running and epoch == self.epoch


class Supervisor:
    def __init__(self, config: ServeConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.policy = RestartPolicy()
        self.shards = [ShardProcess(i) for i in range(config.shards)]
        self.rundir = tempfile.mkdtemp(prefix="ucc-")
        self.shard_endpoint = os.path.join(self.rundir, "router.sock")
        self.stopping = False
        self.exit_code = 0
        self.done: asyncio.Future[int] = loop.create_future()
        self.announced = False
        self._handoffs = 0
        try:
            self.listener = self._listen()
        except OSError:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise
        redis_url, name = config.redis, config.cluster_name
        cluster_key = ClusterKey.of(config.secret, config.cluster_secret)
        # the host's id: in its events, its replies' records, and (the same) on Redis
        self.host_id = host_id()
        self._refusals: dict[tuple[str, str], int] = {}  # (address, reason) -> count, this second
        self._refusals_timer: asyncio.TimerHandle | None = None
        core = RouterCore(
            config.shards,
            config.gather_timeout,
            config.max_command,
            redis=bool(redis_url),
            window=WindowLimits(
                config.shard_queue_messages, config.shard_queue_bytes, config.shard_queue_delay
            ),
            max_queries=config.max_queries,
            history=HistoryStore(config.history_size, config.history_ttl, config.history_memory),
            critical=CriticalStore(config.critical_per_user, config.critical_memory),
            events=EventLog(self.host_id, enabled=config.events is not None),
        )
        # the acceptor's counters in router_stats (read on the router's thread: a copy of a dict
        # of ints, which the GIL keeps whole; empty until the acceptor exists)
        core.extra_stats["acceptor"] = self._acceptor_counters
        # where the host listens, in the status reply (the metrics port's is added by _run)
        host, port = self.listener.getsockname()[:2]
        core.host_info["websocket"] = f"ws://{ready.url_host(host)}:{port}"
        self.host_info = core.host_info
        try:
            self.router = RouterActor.start(
                core,
                config.command,
                self.shard_endpoint,
                lambda event: loop.call_soon_threadsafe(self._shard_event, event),
                config.hang_timeout,
                (
                    (lambda notify: self._link(redis_url, name, notify, cluster_key))
                    if redis_url
                    else None
                ),
                backend_queue=config.backend_queue,
                command_auth=command_auth(config.command_key, config.command_clients),
                events_endpoint=config.events,
                batch_window=config.batch_window,
                batch_window_max=effective_batch_window_max(
                    config.batch_window_max, config.shard_queue_delay
                ),
            )
        except zmq.ZMQError as exc:  # the command endpoint is taken or malformed
            self.listener.close()
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise OSError(f"command endpoint {config.command}: {exc}") from None
        self.command_endpoint: str = self.router.proxy().command_endpoint.get()
        self.acceptor: Acceptor | None = None
        self.shard_config = ShardConfig.of(config)  # on each shard's command line, as JSON

    def _link(
        self, url: str, name: str, notify: Callable[[LinkEvent], None], key: ClusterKey
    ) -> RedisLink:
        # one id for the host, on Redis (its inbox) and in its events
        return RedisLink(url, name, notify, key, host=self.host_id)

    def _refused(self, reason: str, address: str) -> None:
        """The acceptor refused a connection: a ``limit`` event, coalesced per address and
        reason per second (a storm of refusals is one event per address each second). Only
        the refusals that are limits of an address (not a failed accept, not a bad request)."""
        if reason not in ADDRESS_LIMITS:
            return
        key = (address, reason)
        self._refusals[key] = self._refusals.get(key, 0) + 1
        if self._refusals_timer is None:
            self._refusals_timer = self.loop.call_later(1.0, self._report_refusals)

    def _report_refusals(self) -> None:
        self._refusals_timer = None
        refusals, self._refusals = self._refusals, {}
        events = [
            ("limit", {"address": address, "what": reason, "count": count})
            for (address, reason), count in refusals.items()
        ]
        if events:
            self._tell_router(HostEvents(events))

    async def metrics_snapshot(self, top: int = 0) -> dict[str, Any] | None:
        """The host's numbers for the metrics port: the router's (it asks every shard; None
        if it did not answer in time), the acceptor's counters, and whether we accept. With
        ``top``: the largest channels and the last restarts too (the admin page)."""
        snapshot = await ask_with_timeout(
            lambda reply: self._tell_router(MetricsWanted(reply, top)),
            self.config.gather_timeout + 1.0,
        )
        if snapshot is not None:
            snapshot["acceptor"] = self._acceptor_counters()
            snapshot["accepting"] = self.announced and not self.stopping
        return snapshot

    def _acceptor_counters(self) -> dict[str, int]:
        acceptor = getattr(self, "acceptor", None)
        return dict(acceptor.counters) if acceptor is not None else {}

    def _listen(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.config.host, self.config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _name, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(4096)
        return sock

    # -- shards ------------------------------------------------------------------------------

    def start(self) -> None:
        for shard in self.shards:
            self._spawn(shard)

    def _spawn(self, shard: ShardProcess) -> None:
        if self.stopping:
            return
        shard.epoch += 1
        ours, theirs = control_pair()
        args = [
            sys.executable,
            "-m",
            "shards.worker",
            str(shard.index),
            str(shard.epoch),
            str(theirs.fileno()),
            self.shard_endpoint,
            self.shard_config.to_json(),
        ]
        # the token secret (a client's refresh is checked in its shard) goes in the shard's
        # environment, readable by its owner only: the command line is anyone's to read
        env = {**os.environ, "UCC_SECRET": self.config.secret}
        shard.proc = subprocess.Popen(args, pass_fds=(theirs.fileno(),), env=env)
        shard.running = True
        theirs.close()
        ours.setblocking(False)
        shard.control = ours
        self.loop.add_reader(ours.fileno(), self._acks, shard)
        shard.ready = False
        shard.started_at = time.monotonic()
        pid = shard.proc.pid
        self._tell_router(ShardStarting(shard.index, shard.epoch, pid))
        shard.pidfd = os.pidfd_open(pid)
        self.loop.add_reader(shard.pidfd, self._exited, shard, shard.epoch)
        shard.start_timer = self.loop.call_later(
            START_TIMEOUT, self._start_timeout, shard, shard.epoch
        )
        log.debug("shard %d: started pid %d (epoch %d)", shard.index, pid, shard.epoch)

    def _tell_router(self, message: object) -> None:
        # after a router failure the host is shutting down: the news has nowhere to go
        with contextlib.suppress(pykka.ActorDeadError):
            self.router.tell(message)

    def _start_timeout(self, shard: ShardProcess, epoch: int) -> None:
        if shard.epoch == epoch and not shard.ready:
            log.error("shard %d: not ready after %.0f s, killing it", shard.index, START_TIMEOUT)
            self._kill(shard)

    def _kill(self, shard: ShardProcess) -> None:
        if shard.proc is not None and shard.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                shard.proc.send_signal(signal.SIGKILL)

    def _exited(self, shard: ShardProcess, epoch: int) -> None:
        shard.running = False
        self.loop.remove_reader(shard.pidfd)
        os.close(shard.pidfd)
        shard.pidfd = -1
        assert shard.proc is not None
        code = shard.proc.wait()
        if shard.start_timer is not None:
            shard.start_timer.cancel()
        if shard.sweep_timer is not None:
            shard.sweep_timer.cancel()
            shard.sweep_timer = None
        if shard.control is not None:
            self._acks(shard)  # what it acknowledged before dying is released
            self.loop.remove_reader(shard.control.fileno())
            shard.control.close()
            shard.control = None
        shard.ready = False
        waiting, closed = shard.handoffs.orphaned()
        if closed:
            log.info("shard %d: closed %d connections it took without an ack", shard.index, closed)
        for entry in waiting:  # never read: they wait for the next incarnation
            self._hold(shard, entry.claims, entry.sock)
        how = _how(code)
        self._tell_router(ShardDown(shard.index, epoch, "stopped" if self.stopping else how))
        if self.stopping:
            self._maybe_done()
            return
        decision = self.policy.on_exit(shard.index, time.monotonic())
        if not decision.restart:
            log.error(
                "shard %d (pid %d) died with %s: %d restarts within %.0f s, giving up",
                shard.index,
                shard.proc.pid,
                how,
                decision.restarts_in_period,
                self.policy.period,
            )
            self.shutdown(exit_code=1)
            return
        log.warning(
            "shard %d (pid %d) died with %s; restart %d in the last %.0f s",
            shard.index,
            shard.proc.pid,
            how,
            decision.restarts_in_period,
            self.policy.period,
        )
        self.loop.call_later(decision.delay, self._spawn, shard)

    def _acks(self, shard: ShardProcess) -> None:
        """Release our copies of the connections the shard has taken."""
        control = shard.control
        while control is not None:
            try:
                data = control.recv(MAX_HEADER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the shard's end closed: _exited follows
                self.loop.remove_reader(control.fileno())
                return
            if not shard.handoffs.ack(data):  # a bug, or a truncated message: never fatal
                log.warning(
                    "shard %d: malformed hand-off ack (%d so far): %r",
                    shard.index,
                    shard.handoffs.counters["malformed_acks"],
                    data[:100],
                )

    def _shard_event(self, event: SupervisorEvent) -> None:
        """News from the router (on the loop): a shard is up or hung, or the router died."""
        if isinstance(event, RouterFailed):  # a bug: stop, so that systemd restarts us
            log.critical("the router failed (%s); shutting down", event.reason)
            self.shutdown(exit_code=1)
            return
        if isinstance(event, UserBanned):  # here or forwarded from another host
            if self.acceptor is not None:
                self.acceptor.ban(event.user, event.seconds)
            else:  # not accepting yet: nothing to refuse, the ban is lost (logged)
                log.warning("ban of user %d before the host accepts: not applied", event.user)
            return
        shard = self.shards[event.index]
        if not shard.current(event.epoch):
            return
        if isinstance(event, ShardEvent) and event.state is ShardState.UP:
            shard.ready = True
            if shard.start_timer is not None:
                shard.start_timer.cancel()
                shard.start_timer = None
            for entry in list(shard.held):
                self._release(shard, entry)
            if not self.announced and all(s.ready for s in self.shards):
                self._announce()
        elif isinstance(event, ShardHung) and not self.stopping:
            log.error("shard %d (pid %d): hung, killing it", shard.index, event.pid)
            self._kill(shard)

    def _announce(self) -> None:
        self.announced = True
        host, port = self.listener.getsockname()[:2]
        self.acceptor = Acceptor(
            self.loop,
            self.listener,
            self.config.secret,
            self._place,
            self.config.handshake_timeout,
            max_pending=self.config.max_pending,
            max_pending_per_address=self.config.max_pending_per_address,
            allowed_origins=self.config.allowed_origins,  # checked by run() before the start
            connect_rate=self.config.connect_rate,
            token_audience=self.config.token_audience,
            token_issuer=self.config.token_issuer,
            token_leeway=self.config.token_leeway,
            max_channels_per_connection=self.config.max_channels_per_connection,
        )
        if self.config.events is not None:
            self.acceptor.on_refusal = self._refused
        print(ready.format_line(host, port, self.command_endpoint, len(self.shards)), flush=True)

    def _place(self, claims: Claims, sock: socket.socket) -> None:
        shard = self.shards[stable_hash(claims.user, len(self.shards))]
        if not (shard.ready and shard.control is not None and self._hand(shard, claims, sock)):
            self._hold(shard, claims, sock)

    def _hold(self, shard: ShardProcess, claims: Claims, sock: socket.socket) -> None:
        """The shard is restarting (usually a few hundred ms), or just died, or is not keeping
        up: hold the connection, its request unread, and hand it over once the shard is ready,
        or answer 503 after HOLD_TIME."""
        if self.stopping or len(shard.held) >= HOLD_LIMIT:
            self._refuse(sock)
            return
        entry = Held(claims, sock, time.monotonic() + HOLD_TIME)
        shard.held.append(entry)
        self.loop.call_later(HOLD_TIME, self._release, shard, entry)

    def _refuse(self, sock: socket.socket) -> None:
        if self.acceptor is not None:
            self.acceptor.refuse_unavailable(sock)
        else:
            sock.close()

    def _hand(self, shard: ShardProcess, claims: Claims, sock: socket.socket) -> bool:
        """Send the connection to its shard; False if the shard cannot take it now."""
        assert shard.control is not None
        self._handoffs += 1
        handoff = Handoff(self._handoffs, claims.user, claims.channels, claims.exp)
        try:
            send_connection(shard.control, handoff, sock)
        except OSError:  # the shard is not keeping up (or just died)
            return False
        shard.handoffs.sent(self._handoffs, claims, sock, time.monotonic())
        if shard.sweep_timer is None:
            shard.sweep_timer = self.loop.call_later(ACK_TIMEOUT, self._sweep, shard, shard.epoch)
        return True

    def _sweep(self, shard: ShardProcess, epoch: int) -> None:
        """Release the connections the shard took whose ack never came (lost or malformed):
        else our copies would keep their TCP connections open after the shard closes them."""
        shard.sweep_timer = None
        if not shard.current(epoch):
            return
        self._acks(shard)  # acks already here first
        taken = shard.handoffs.reconcile(time.monotonic(), ACK_TIMEOUT)
        if taken:
            log.warning("shard %d: %d connections taken without an ack", shard.index, taken)
        if shard.handoffs:
            shard.sweep_timer = self.loop.call_later(ACK_TIMEOUT, self._sweep, shard, epoch)

    def _release(self, shard: ShardProcess, entry: Held) -> None:
        """The shard is ready, or the entry's time is up: hand it over, or answer 503. A ready
        shard whose hand-off queue is full (many held at once) gets more tries until then."""
        if entry not in shard.held:
            return  # already released (entries compare by identity)
        ready = shard.ready and shard.control is not None and not self.stopping
        if ready and self._hand(shard, entry.claims, entry.sock):
            shard.held.remove(entry)
        elif ready and time.monotonic() < entry.deadline:
            self.loop.call_later(RETRY_HAND, self._release, shard, entry)
        else:
            shard.held.remove(entry)
            self._refuse(entry.sock)

    # -- stopping ----------------------------------------------------------------------------

    def shutdown(self, exit_code: int = 0) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = exit_code
        log.info("shutting down")
        if self.acceptor is not None:
            self.acceptor.close()
        else:
            self.listener.close()
        for shard in self.shards:
            for entry in list(shard.held):
                self._release(shard, entry)  # stopping: a 503 each
            if shard.control is not None:
                with contextlib.suppress(OSError):
                    send_message(shard.control, Shutdown(self.config.drain_window))
        self.loop.call_later(self.config.shutdown_timeout, self._kill_stragglers)
        self._maybe_done()

    def _kill_stragglers(self) -> None:
        for shard in self.shards:
            if shard.pidfd >= 0:
                log.warning("shard %d did not stop in time, killing it", shard.index)
                self._kill(shard)

    def _maybe_done(self) -> None:
        if all(s.pidfd < 0 for s in self.shards) and not self.done.done():
            self.done.set_result(self.exit_code)

    def close(self) -> None:
        self.router.stop()
        shutil.rmtree(self.rundir, ignore_errors=True)


async def _run(config: ServeConfig) -> int:
    loop = asyncio.get_running_loop()
    supervisor = Supervisor(config, loop)
    metrics: MetricsServer | None = None
    try:
        if config.metrics:  # before the shards: a taken port fails the start (exit 2)
            admin = AdminRoutes(
                lambda: supervisor.metrics_snapshot(top=TOP_CHANNELS), config.admin_token
            )
            metrics = MetricsServer(
                supervisor.metrics_snapshot, lambda: not supervisor.stopping, admin
            )
            try:
                host, port = await metrics.start(config.metrics)
            except ValueError as exc:
                raise OSError(str(exc)) from None
            except OSError as exc:
                raise OSError(f"metrics address {config.metrics}: {exc}") from None
            log.info("metrics on http://%s:%d/metrics", host, port)
            # one key added to a dict the router's thread copies: atomic under the GIL
            supervisor.host_info["metrics"] = f"http://{ready.url_host(host)}:{port}"
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.shutdown)
        # SIGHUP: re-read the admitted CURVE client keys (--command-clients)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: supervisor.router.proxy().reload_command_clients()
        )
        supervisor.start()
        return await supervisor.done
    finally:
        if metrics is not None:
            metrics.close()
        for shard in supervisor.shards:
            supervisor._kill(shard)
        supervisor.close()


def run(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT (SIGHUP re-reads the admitted command client keys); the exit
    code (non-zero when restarts were exhausted)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop handles it: never fatal
    name_this_thread("ucc-supervisor")
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s supervisor %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from actors.origins import Origins  # noqa: PLC0415

    try:  # the acceptor is made once the shards are up: check its settings before anything
        Origins(config.allowed_origins)
    except ValueError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    # before anything opens a socket or starts a shard (shards inherit the limit)
    nofile = limits.raise_open_files_limit()
    log.info("%s", nofile.describe())
    if not nofile.allows(config.max_pending):
        log.warning(
            "open files limit %d is below --max-pending %d: accepts will fail (EMFILE) first",
            nofile.after,
            config.max_pending,
        )
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(_run(config))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 2


def _how(code: int) -> str:
    """How a process ended, from its exit status: ``exit code N`` or ``signal NAME`` (a signal
    with no name, a real-time one, by number)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
