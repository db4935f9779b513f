"""The five scenarios: who connects with which channels, what is published, what is measured.

Owns: the layout of each scenario (user ids, their channels), the sentinels of the fan-out
scenario (one member per shard held by the driver itself, so that ``--rate max`` publishes only
as fast as the slowest shard delivers), and one run of a scenario against one server: connect,
check the server registered everyone, measure, disconnect. Every wait is bounded (connect
timeout, publish deadline, delivery drain with a stall limit). Must never start or stop a
server (the runner does) and never assert on timings: it reports them.

Layouts (user ids from 1; M is ``--members``):

| scenario | connections | channels |
|---|---|---|
| ``idle``, ``connect``, ``rooms`` | N | connection *i* joins channel ``1 + i // M`` (rooms of M) |
| ``fanout`` | N (default M) | the first M join channel 1; the rest none |
| ``direct`` | N | none: messages go to a random user (``broadcast_to_user``) |
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from actors.ids import stable_hash
from shards.bench.fleet import Fleet, Plan, open_client, source_address
from shards.bench.loadclient import LoadClient, Stats, upgrade_request
from shards.bench.probes import CpuMeter, ThreadMeter, rss_bytes
from shards.bench.publisher import Publisher, PublishResult, Target, merge
from shards.bench.report import Progress, percentiles
from shards.bench.servers import Server
from shards.client import AsyncClient, UccError

SCENARIOS = ("idle", "fanout", "rooms", "direct", "connect")
POLL = 0.1  # how often the driver reads the clients' counters
STALL = 3.0  # a drain with no new frame for this long is over
IN_FLIGHT_FRAMES = 20_000  # --rate max fan-out: frames published, not yet seen by a sentinel


@dataclass(frozen=True)
class Options:
    scenario: str
    connections: int
    members: int
    rate: float | None  # None: as fast as the server absorbs
    messages: int | None
    duration: float
    payload: int = 100
    concurrency: int = 256
    connect_timeout: float = 30.0
    window: int = 1000
    seed: int = 1
    arrivals: str = "even"  # or "poisson" (see publisher.schedule)
    backends: int = 1  # more: each sends its next command only after the last one's reply


def layout(opts: Options) -> list[Plan]:
    """One (user, channels) per connection; see the module's table."""
    n, m = opts.connections, max(1, opts.members)
    if opts.scenario == "fanout":
        return [(i + 1, (1,) if i < m else ()) for i in range(n)]
    if opts.scenario == "direct":
        return [(i + 1, ()) for i in range(n)]
    return [(i + 1, (1 + i // m,)) for i in range(n)]


def pick_sentinels(plans: list[Plan], shards: int) -> tuple[list[Plan], list[Plan]]:
    """The first channel-1 member of each shard, taken out of ``plans`` (fan-out only)."""
    chosen: dict[int, Plan] = {}
    for plan in plans:
        if 1 in plan[1]:
            chosen.setdefault(stable_hash(plan[0], shards), plan)
        if len(chosen) == shards:
            break
    taken = {plan[0] for plan in chosen.values()}
    return [p for p in plans if p[0] not in taken], list(chosen.values())


class Run:
    """One scenario against one server. :meth:`execute` returns the figures as a dict."""

    def __init__(self, server: Server, fleet: Fleet, opts: Options, progress: Progress) -> None:
        self.server = server
        self.fleet = fleet
        self.opts = opts
        self.progress = progress
        self.host = socket.gethostbyname(server.host)
        self.sentinels: list[LoadClient] = []
        self.sentinel_stats: list[Stats] = []
        self.errors: list[str] = []
        self.members: dict[tuple[str, int], int] = {}  # target -> connections reached

    # -- phases -------------------------------------------------------------------------------

    async def execute(self) -> dict[str, Any]:
        opts = self.opts
        server_procs = self.server.processes()
        me = psutil.Process()
        client_procs = [me, *(psutil.Process(pid) for pid in self.fleet.pids)]
        plans = layout(opts)
        sentinel_plans: list[Plan] = []
        if opts.scenario == "fanout":
            plans, sentinel_plans = pick_sentinels(plans, self.server.shards)
        rss_before = rss_bytes(server_procs)
        result: dict[str, Any] = {
            "scenario": opts.scenario,
            "server": self.server.name,
            "shards": self.server.shards,
        }
        try:
            server_cpu = CpuMeter(server_procs).start()
            client_cpu = CpuMeter(client_procs).start()
            opened = await self._connect(plans, sentinel_plans)
            server_cpu.stop()
            client_cpu.stop()
            connected = opened["connected"]
            if opened["failed"] and self.server.log is not None:
                self.errors.append(f"server log: {self.server.log_tail(1500)}")
            await self._wait_registered(connected)
            rss_after = rss_bytes(self.server.processes())
            result.update(
                connections=connected,
                members=opts.members,
                connect_failures=opened["failed"],
                connect_retries_503=opened["retried"],
                server_rss_bytes_per_conn=(
                    round((rss_after - rss_before) / connected)
                    if connected and server_procs
                    else None
                ),
            )
            if opts.scenario == "connect":
                result.update(self._connect_figures(opened, server_cpu, client_cpu))
            elif opts.scenario == "idle":
                result.update(await self._idle(server_procs, client_procs))
            else:
                result.update(await self._traffic(server_procs, client_procs))
        finally:
            await self._disconnect()
        result["errors"] = self.errors
        return result

    async def _connect(self, plans: list[Plan], sentinel_plans: list[Plan]) -> dict[str, Any]:
        opts = self.opts
        total = len(plans) + len(sentinel_plans)
        self.progress.phase(f"{self.server.name}: opening {total:,} connections")
        workers = len(self.fleet.pipes)
        size = -(-len(plans) // workers) if plans else 0
        deadline = opts.connect_timeout + total / 200
        jobs = []
        for i in range(workers):
            chunk = plans[i * size : (i + 1) * size]
            if not chunk:
                continue
            spec = {
                "host": self.host,
                "port": self.server.port,
                "secret": self.server.secret,
                "plans": chunk,
                "first_index": i * size,
                "total": total,
                "concurrency": opts.concurrency,
                "timeout": opts.connect_timeout,
            }
            jobs.append(self.fleet.ask(i, "open", spec, timeout=deadline))
        gathered = asyncio.gather(*jobs)
        await self._open_sentinels(sentinel_plans, len(plans), total)
        while True:
            done, _ = await asyncio.wait([gathered], timeout=0.5)
            if done:
                break
            stats = await self.fleet.stats()
            self.progress.update(f"{stats['open']:,} / {total:,} connected")
        parts: list[dict[str, Any]] = gathered.result()
        failed: list[int] = [user for part in parts for user in part["failed"]]
        for part in parts:
            self.errors.extend(part["errors"])
        failed_set = set(failed)
        for user, channels in [*plans, *sentinel_plans]:
            if user in failed_set:
                continue
            self.members[("user", user)] = self.members.get(("user", user), 0) + 1
            for channel in channels:
                key = ("channel", channel)
                self.members[key] = self.members.get(key, 0) + 1
        upgrade: dict[int, int] = {}
        hello: dict[int, int] = {}
        for part in parts:
            for mine, theirs in ((upgrade, part["upgrade_hist"]), (hello, part["hello_hist"])):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
        t_first = min((p["t_first_ns"] for p in parts), default=0)
        t_last = max((p["t_last_ns"] for p in parts), default=0)
        return {
            "connected": total - len(failed),
            "failed": len(failed),
            "retried": sum(part["retried"] for part in parts),
            "upgrade_hist": upgrade,
            "hello_hist": hello,
            "seconds": max(1e-9, (t_last - t_first) / 1e9),
        }

    async def _open_sentinels(self, plans: list[Plan], first: int, total: int) -> None:
        from actors.wire.tokens import mint  # noqa: PLC0415 - only the fan-out scenario needs it

        loop = asyncio.get_running_loop()
        for offset, (user, channels) in enumerate(plans):
            token = mint(self.server.secret, user, list(channels), ttl=3600)
            request = upgrade_request(self.host, self.server.port, f"/?token={token}")
            stats = Stats()
            source = source_address(first + offset, total)
            client = await open_client(
                loop, self.host, self.server.port, request, stats, source,
                self.opts.connect_timeout,
            )  # fmt: skip
            self.sentinels.append(client)
            self.sentinel_stats.append(stats)

    async def _wait_registered(self, connected: int) -> None:
        """Wait until the server lists every connected user (its router then knows every
        membership: each shard sends its deltas before it answers a query)."""
        users = len({key for key in self.members if key[0] == "user"})
        deadline = time.monotonic() + 30.0
        async with AsyncClient(self.server.command, timeout=10.0) as client:
            while True:
                online = len(await client.get_online_users())
                if online >= users or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
        if online < users:
            self.errors.append(f"only {online} of {users} users registered after 30 s")

    async def _disconnect(self) -> None:
        for client in self.sentinels:
            client.close()
        self.sentinels.clear()
        await self.fleet.ask_all("close", timeout=30.0)

    # -- measurements ---------------------------------------------------------------------------

    def _connect_figures(
        self, opened: dict[str, Any], server_cpu: CpuMeter, client_cpu: CpuMeter
    ) -> dict[str, Any]:
        connected = opened["connected"]
        return {
            "connects_per_s": round(connected / opened["seconds"], 1),
            "handshake_ms": percentiles(opened["upgrade_hist"]),
            "hello_ms": percentiles(opened["hello_hist"]),
            "server_cpu_us_per_conn": (
                round(server_cpu.cpu * 1e6 / connected, 1) if connected else None
            ),
            "client_cpu_percent": round(client_cpu.percent, 1),
        }

    async def _idle(
        self, server_procs: list[psutil.Process], client_procs: list[psutil.Process]
    ) -> dict[str, Any]:
        self.progress.phase(f"{self.server.name}: holding for {self.opts.duration:g} s")
        server_cpu = CpuMeter(server_procs).start()
        client_cpu = CpuMeter(client_procs).start()
        await asyncio.sleep(self.opts.duration)  # the measurement window, not a synchronisation
        server_cpu.stop()
        client_cpu.stop()
        stats = await self.fleet.stats()
        return {
            "open_after_hold": stats["open"] + len(self.sentinels),
            "server_cpu_percent": round(server_cpu.percent, 2),
            "client_cpu_percent": round(client_cpu.percent, 2),
        }

    def _targets(self) -> tuple[Target, int | None]:
        """What each command targets, and the fan-out gate's window (None: no gate)."""
        opts = self.opts
        rng = random.Random(opts.seed)
        if opts.scenario == "fanout":
            members = max(1, self.members.get(("channel", 1), 1))
            window = max(4, min(5000, IN_FLIGHT_FRAMES // members))
            return (lambda _i: ("channel", 1)), (window if opts.rate is None else None)
        if opts.scenario == "rooms":
            channels = sorted(k[1] for k in self.members if k[0] == "channel")
            return (lambda _i: ("channel", rng.choice(channels))), None
        users = sorted(k[1] for k in self.members if k[0] == "user")
        return (lambda _i: ("user", rng.choice(users))), None

    async def _traffic(
        self, server_procs: list[psutil.Process], client_procs: list[psutil.Process]
    ) -> dict[str, Any]:
        opts = self.opts
        target, window = self._targets()
        if opts.rate is None:
            count = opts.messages or 10**9
        else:
            count = opts.messages or max(1, round(opts.rate * opts.duration))
        sentinel_stats = self.sentinel_stats

        def gate(sent: int) -> bool:
            if window is None or not sentinel_stats:
                return True
            return sent - min(s.frames for s in sentinel_stats) < window

        rate = "max" if opts.rate is None else f"{opts.rate:g}/s"
        self.progress.phase(f"{self.server.name}: {opts.scenario}, publishing at {rate}")
        await self.fleet.ask_all("reset")
        for sentinel in sentinel_stats:
            sentinel.reset()
        epochs_before = await self._epochs()
        # one backend pipelining up to ``window`` commands, or several with one each
        window = opts.window if opts.backends == 1 else 1
        publishers = [
            Publisher(self.server.command, opts.payload, window) for _ in range(opts.backends)
        ]
        server_threads = ThreadMeter(server_procs).start()
        server_cpu = CpuMeter(server_procs).start()
        client_cpu = CpuMeter(client_procs).start()
        try:
            deadline = time.monotonic() + (
                opts.duration if opts.rate is None else count / opts.rate + opts.duration
            )
            backends = len(publishers)
            so_far = [PublishResult() for _ in publishers]  # each one's, live: the progress

            def progress_of(i: int) -> Callable[[PublishResult], None]:
                def update(result: PublishResult) -> None:
                    so_far[i] = result
                    sent, acked = sum(r.sent for r in so_far), sum(r.acked for r in so_far)
                    self.progress.update(f"{sent:,} sent, {acked:,} acknowledged")

                return update

            runs = [
                asyncio.ensure_future(
                    publisher.run(
                        target,
                        count // backends + (i < count % backends),  # its share
                        opts.rate,
                        deadline,
                        gate,
                        progress_of(i),
                        opts.arrivals,
                    )
                )
                for i, publisher in enumerate(publishers)
            ]
            try:
                pub = merge(list(await asyncio.gather(*runs)))
            finally:  # one failed: the others stop before their sockets are closed
                for run in runs:
                    run.cancel()
                await asyncio.gather(*runs, return_exceptions=True)
        finally:
            for publisher in publishers:
                publisher.close()
        expected = sum(n * self.members.get(key, 0) for key, n in pub.counts.items())
        observed = await self._drain(expected)
        server_cpu.stop()
        server_threads.stop()
        client_cpu.stop()
        trusted = bool(server_procs) and not server_cpu.lost
        if server_cpu.lost:
            self.errors.append(
                f"server processes {server_cpu.lost} exited during the measurement (a shard"
                " restarted?): CPU figures withheld; server log:\n" + self.server.log_tail(1500)
            )
        if pub.errors:
            self.errors.append(f"{pub.errors} commands failed, e.g. {pub.first_error}")
        epochs_after = await self._epochs()
        restarts = (
            sum(after - before for before, after in zip(epochs_before, epochs_after, strict=True))
            if epochs_before is not None and epochs_after is not None
            else None
        )
        delivered = observed["frames"]
        seconds = max(1e-9, (max(observed["last_ns"], pub.t_first_ns + 1) - pub.t_first_ns) / 1e9)
        command_seconds = max(1e-9, (pub.t_last_ack_ns - pub.t_first_ns) / 1e9)
        figures: dict[str, Any] = {
            "rate": "max" if opts.rate is None else opts.rate,
            "arrivals": "flat out" if opts.rate is None else opts.arrivals,
            "backends": opts.backends,
            "commands_sent": pub.sent,
            "commands_acked": pub.acked - pub.refused - pub.errors,
            "commands_refused": pub.refused,
            "server_restarts": restarts,
            "expected_frames": expected,
            "delivered_frames": delivered,
            "delivery_ratio": round(delivered / expected, 6) if expected else None,
            "delivered_per_s": round(delivered / seconds, 1),
            "commands_per_s": round(pub.acked / command_seconds, 1),
            "latency_ms": percentiles(observed["hist"], observed["max_ns"]),
            "command_rtt_ms": percentiles(pub.rtt_hist, pub.rtt_max_ns),
            "server_cpu_us_per_frame": (
                round(server_cpu.cpu * 1e6 / delivered, 2) if delivered and trusted else None
            ),
            "server_cpu_us_per_broadcast": (
                round(server_cpu.cpu * 1e6 / pub.acked, 1) if pub.acked and trusted else None
            ),
            "server_cpu_percent": round(server_cpu.percent, 1) if trusted else None,
            "client_cpu_percent": round(client_cpu.percent, 1),
            # per thread: [CPU µs, context switches] per acknowledged command
            "server_threads_per_command": server_threads.per(pub.acked) if trusted else None,
        }
        return figures

    async def _epochs(self) -> list[int] | None:
        """Each ucc shard's incarnation number (None for another server, or no answer): the
        difference over a run is how many shards were restarted during it."""
        if self.server.name != "ucc":
            return None
        try:
            async with AsyncClient(self.server.command, timeout=5.0) as client:
                return [int(row["epoch"]) for row in (await client.status())["shards"]]
        except UccError:
            return None

    async def _drain(self, expected: int) -> dict[str, Any]:
        """Poll the clients until ``expected`` frames arrived or none came for ``STALL`` s."""
        last_frames, last_change = -1, time.monotonic()
        while True:
            stats = await self.fleet.stats()
            for sentinel in self.sentinel_stats:
                stats["frames"] += sentinel.frames
                stats["max_ns"] = max(stats["max_ns"], sentinel.max_ns)
                stats["last_ns"] = max(stats["last_ns"], sentinel.last_ns)
                for key, count in sentinel.hist.items():
                    stats["hist"][key] = stats["hist"].get(key, 0) + count
            now = time.monotonic()
            if stats["frames"] != last_frames:
                last_frames, last_change = stats["frames"], now
            self.progress.update(f"{stats['frames']:,} / {expected:,} frames delivered")
            if stats["frames"] >= expected or now - last_change >= STALL:
                return stats
            await asyncio.sleep(POLL)
