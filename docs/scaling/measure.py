"""Measure the inputs of docs/scaling.md on this machine, and run its scaled-down validation.

Five runs, each on 127.0.0.1 only, bounded in count and time, every process it starts (a Redis,
the `ucc serve` hosts, the client processes) killed in `finally`:

    .venv/bin/python docs/scaling/measure.py message   # Redis and host CPU per broadcast
    .venv/bin/python docs/scaling/measure.py subs      # Redis memory and CPU per channel topic
    .venv/bin/python docs/scaling/measure.py validate  # 6 hosts, rooms of 10 + a big channel
    .venv/bin/python docs/scaling/measure.py idle      # 1 host, idle users in rooms of 10
    .venv/bin/python docs/scaling/measure.py churn     # 1 host: presence's Redis traffic, churn

Each prints one JSON object on stdout (progress on stderr). Redis figures come from its own
`INFO cpu` / `INFO stats` / `INFO memory` / `INFO commandstats` before and after a window; a
host's CPU is the user + system time of its process tree (psutil). Idle windows measure what
runs anyway (presence snapshots every second, probes, heartbeats) and are subtracted from the
load windows, per second of window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import redis

from shards.bench.fleet import Fleet, Plan
from shards.bench.probes import cpu_seconds, raise_open_files_limit
from shards.bench.publisher import Publisher
from shards.testing import Host, RedisClusterServer, RedisServer

SHARDED = False  # --cluster: a Redis Cluster's sharded pub/sub (SSUBSCRIBE, SHARDNUMSUB)
SECRET = "c" * 64  # every host of one cluster shares it
PREFIX = "{ucc:default}"
# as `ucc bench` starts its server: the load comes from one address, hundreds of handshakes at a
# time, so the per-address handshake cap and connect rate are lifted
LOAD_ARGS = ("--log-level", "WARNING", "--max-pending-per-address", "100000")
LOAD_ARGS += (
    "--connect-rate",
    "1000000",
)  # the cluster's hash tag (docs/cluster.md, "Key and topic layout")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- reading Redis and the hosts ------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTotals:
    cpu: float  # seconds, user + system, main thread and others
    commands: int
    net_in: int
    net_out: int
    memory: int
    pubsub_channels: int
    evals: int


def redis_totals(client: redis.Redis) -> RedisTotals:
    cpu = client.info("cpu")
    stats = client.info("stats")
    memory = client.info("memory")
    commands = client.info("commandstats")
    return RedisTotals(
        cpu=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        commands=int(stats["total_commands_processed"]),
        net_in=int(stats["total_net_input_bytes"]),
        net_out=int(stats["total_net_output_bytes"]),
        memory=int(memory["used_memory"]),
        pubsub_channels=int(stats.get("pubsub_channels", 0))
        + int(stats.get("pubsubshard_channels", 0)),
        evals=int(commands.get("cmdstat_eval", {}).get("calls", 0)),
    )


def host_procs(host: Host) -> list[psutil.Process]:
    """The host's supervisor and every process under it (its shards)."""
    root = psutil.Process(host.proc.pid)
    return [root, *root.children(recursive=True)]


@dataclass
class Window:
    """Redis and per-host CPU (and Redis traffic) over a stretch of wall time."""

    seconds: float
    redis_cpu: float
    commands: int
    net_in: int
    net_out: int
    evals: int
    hosts_cpu: list[float]
    supervisors_cpu: list[float]  # the part of hosts_cpu spent in the supervisor process

    def per_second(self) -> dict[str, Any]:
        s = self.seconds
        return {
            "seconds": round(s, 2),
            "redis_cpu_percent": round(100 * self.redis_cpu / s, 2),
            "redis_commands_per_s": round(self.commands / s, 1),
            "redis_in_bytes_per_s": round(self.net_in / s),
            "redis_out_bytes_per_s": round(self.net_out / s),
            "hosts_cpu_percent": [round(100 * c / s, 2) for c in self.hosts_cpu],
            "supervisors_cpu_percent": [round(100 * c / s, 2) for c in self.supervisors_cpu],
        }


class Meter:
    def __init__(self, client: redis.Redis, hosts: Sequence[Host]) -> None:
        self.client = client
        self.procs = [host_procs(h) for h in hosts]
        self._r0 = redis_totals(client)
        self._h0 = [cpu_seconds(p) for p in self.procs]
        self._s0 = [cpu_seconds(p[:1]) for p in self.procs]
        self._t0 = time.monotonic()

    def stop(self) -> Window:
        r1 = redis_totals(self.client)
        h1 = [cpu_seconds(p) for p in self.procs]
        s1 = [cpu_seconds(p[:1]) for p in self.procs]
        r0 = self._r0
        return Window(
            seconds=time.monotonic() - self._t0,
            redis_cpu=r1.cpu - r0.cpu,
            commands=r1.commands - r0.commands,
            net_in=r1.net_in - r0.net_in,
            net_out=r1.net_out - r0.net_out,
            evals=r1.evals - r0.evals,
            hosts_cpu=[b - a for a, b in zip(self._h0, h1, strict=True)],
            supervisors_cpu=[b - a for a, b in zip(self._s0, s1, strict=True)],
        )


async def idle(client: redis.Redis, hosts: Sequence[Host], seconds: float) -> Window:
    meter = Meter(client, hosts)
    await asyncio.sleep(seconds)  # the measurement window itself
    return meter.stop()


# -- connecting users -----------------------------------------------------------------------------


async def open_users(
    fleet: Fleet, hosts: Sequence[Host], plans: Sequence[list[Plan]], timeout: float = 180.0
) -> int:
    """Open ``plans[i]`` on host i (client process i modulo the fleet); returns how many failed.
    ``timeout``: for each client process's whole share."""
    total = sum(len(p) for p in plans)
    failed = 0
    first = 0
    asks = []
    for index, (host, chunk) in enumerate(zip(hosts, plans, strict=True)):
        address, port = host.address
        request = {
            "host": address,
            "port": port,
            "secret": SECRET,
            "plans": chunk,
            "first_index": first,
            "total": total,
            "concurrency": 64,
            "timeout": 30.0,
        }
        first += len(chunk)
        asks.append(fleet.ask(index % len(fleet.pipes), "open", request, timeout=timeout))
    for result in await asyncio.gather(*asks):
        failed += len(result["failed"])
        for error in result["errors"]:
            say(f"connect error: {error}")
    return failed


def channel_topic(channel: int) -> str:
    """A channel's topic: a hash tag of its own since ad4e715 (docs/cluster.md, "Key and topic
    layout"); the runs on 61cf9a8 named it ``{PREFIX}:c:<channel>``."""
    return "{ucc:default:c:" + str(channel) + "}"


async def wait_registered(
    client: redis.Redis, users: int, topics: dict[int, int], timeout: float = 60.0
) -> None:
    """Until the hosts' presence sets hold ``users`` users and each channel topic has the
    expected number of listening hosts (``PUBSUB NUMSUB``)."""
    deadline = time.monotonic() + timeout
    while True:
        hosts = [h.decode() for h in client.zrange(f"{PREFIX}:hosts", 0, -1)]
        online = sum(int(client.scard(f"{PREFIX}:h:{h}:users")) for h in hosts)
        names = [channel_topic(c) for c in topics]
        kind = "SHARDNUMSUB" if SHARDED else "NUMSUB"
        reply = client.execute_command("PUBSUB", kind, *names) if names else []
        counts = dict(zip(reply[::2], reply[1::2], strict=True))
        listening = all(
            int(counts.get(channel_topic(c).encode(), 0)) == n for c, n in topics.items()
        )
        if online == users and listening:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"registered {online} of {users} users; topics ok: {listening}")
        await asyncio.sleep(0.5)


async def frames_after(fleet: Fleet, expected: int, stall: float = 3.0) -> int:
    """Frames the clients counted since the last reset, once ``expected`` or a stall."""
    last, since = -1, time.monotonic()
    while True:
        frames = int((await fleet.stats())["frames"])
        if frames >= expected:
            return frames
        if frames != last:
            last, since = frames, time.monotonic()
        elif time.monotonic() - since > stall:
            return frames
        await asyncio.sleep(0.2)


async def publish(
    hosts: Sequence[Host],
    targets: Sequence[Callable[[int], tuple[str, int]]],
    count: int,
    rate: float,
) -> int:
    """``count`` broadcasts at ``rate``/s through each host's command endpoint at once (one
    publisher per host, its own target function); returns the replies that were not ok."""
    publishers = [Publisher(h.command, payload=100) for h in hosts]
    try:
        deadline = time.monotonic() + count / rate + 10.0
        results = await asyncio.gather(
            *(
                p.run(target, count, rate, deadline)
                for p, target in zip(publishers, targets, strict=True)
            )
        )
    finally:
        for p in publishers:
            p.close()
    return sum(r.sent - sum(r.counts.values()) for r in results)


# -- the runs -------------------------------------------------------------------------------------


def start_hosts(
    stack: contextlib.ExitStack,
    url: str,
    count: int,
    shards: int = 1,
    extra: tuple[str, ...] = (),
) -> list[Host]:
    return [
        stack.enter_context(
            Host(shards=shards, args=(*LOAD_ARGS, *extra, "--redis", url), secret=SECRET)
        )
        for _ in range(count)
    ]


async def run_message(fleet: Fleet, client: redis.Redis, hosts: list[Host], args: Any) -> Any:
    """4 hosts with 250/500/1000/2000 users; channel 3 has members on host 0 only, channel 2
    on hosts 0-1, channel 1 on hosts 0-3 (10, 10, 100, 400 members). Host 0 publishes."""
    sizes = [250, 500, 1000, 2000]
    members = {3: [10, 0, 0, 0], 2: [10, 10, 0, 0], 1: [10, 10, 100, 400]}
    plans: list[list[Plan]] = []
    for h, size in enumerate(sizes):
        chunk: list[Plan] = []
        n = 0
        for channel, counts in members.items():
            for _ in range(counts[h]):
                chunk.append((h * 100_000 + n + 1, (channel,)))
                n += 1
        chunk.extend((h * 100_000 + m + 1, ()) for m in range(n, size))
        plans.append(chunk)
    say(f"connecting {sum(sizes)} users to 4 hosts")
    failed = await open_users(fleet, hosts, plans)
    topics = {c: sum(1 for x in counts if x) for c, counts in members.items()}
    await wait_registered(client, sum(sizes) - failed, topics)
    await asyncio.sleep(2.0)
    say(f"idle window {args.idle:g} s")
    base = await idle(client, hosts, args.idle)
    phases = []
    for rep in range(args.repeat):
        for channel in (3, 2, 1):
            await fleet.ask_all("reset")
            say(f"rep {rep}: {args.count} broadcasts to channel {channel} at {args.rate:g}/s")
            meter = Meter(client, hosts)
            bad = await publish(
                hosts[:1], [lambda _i, c=channel: ("channel", c)], args.count, args.rate
            )
            expected = args.count * sum(members[channel])
            frames = await frames_after(fleet, expected)
            window = meter.stop()
            phases.append(per_message(channel, topics[channel], window, base, args.count, bad))
            phases[-1]["frames"], phases[-1]["expected_frames"] = frames, expected
            phases[-1]["members_per_host"] = members[channel]
    return {"sizes": sizes, "idle": base.per_second(), "phases": phases}


def per_message(
    channel: int, listeners: int, window: Window, base: Window, count: int, bad: int
) -> dict[str, Any]:
    """The window's costs per broadcast, net of the idle window's rate over as many seconds."""
    k = window.seconds / base.seconds
    return {
        "channel": channel,
        "listening_hosts": listeners,
        "messages": count,
        "not_ok": bad,
        "seconds": round(window.seconds, 2),
        "redis_cpu_us": round((window.redis_cpu - k * base.redis_cpu) * 1e6 / count, 2),
        "redis_commands": round((window.commands - k * base.commands) / count, 3),
        "redis_evals": round((window.evals - k * base.evals) / count, 3),
        "redis_in_bytes": round((window.net_in - k * base.net_in) / count, 1),
        "redis_out_bytes": round((window.net_out - k * base.net_out) / count, 1),
        "hosts_cpu_us": [
            round((w - k * b) * 1e6 / count, 1)
            for w, b in zip(window.hosts_cpu, base.hosts_cpu, strict=True)
        ],
        "supervisors_cpu_us": [
            round((w - k * b) * 1e6 / count, 1)
            for w, b in zip(window.supervisors_cpu, base.supervisors_cpu, strict=True)
        ],
    }


async def run_subs(fleet: Fleet, client: redis.Redis, hosts: list[Host], args: Any) -> Any:
    """One host; connections with 100 distinct channels each, in two steps; and a bare
    redis-py client subscribed to as many topics (pub/sub alone, no member sets)."""
    per_conn = 100
    steps = []
    say(f"idle window {args.idle:g} s, no users")
    before = redis_totals(client)
    windows = [await idle(client, hosts, args.idle)]
    memories = [before.memory]
    users = 0
    for step in range(2):
        plans: list[Plan] = []
        for i in range(users, users + args.conns):
            plans.append((i + 1, tuple(range(1 + i * per_conn, 1 + (i + 1) * per_conn))))
        users += args.conns
        say(f"step {step}: {users} users, {users * per_conn} channels")
        await open_users(fleet, hosts, [plans])
        await wait_registered(client, users, {})
        while redis_totals(client).pubsub_channels < users * per_conn + 1:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)
        windows.append(await idle(client, hosts, args.idle))
        memories.append(redis_totals(client).memory)
    for count, (window, memory) in enumerate(zip(windows, memories, strict=True)):
        steps.append({
            "topics": count * args.conns * per_conn,
            "used_memory": memory,
            **window.per_second(),
        })  # fmt: skip
    # pub/sub alone: one connection subscribed to as many topics, then gone
    topics = users * per_conn
    m0 = redis_totals(client).memory
    bare = redis.Redis(port=client.connection_pool.connection_kwargs["port"])
    pubsub = bare.pubsub()
    for start in range(0, topics, 1000):
        pubsub.subscribe(*(f"bare:{n}" for n in range(start, start + 1000)))
    deadline = time.monotonic() + 30.0
    while redis_totals(client).pubsub_channels < 2 * topics and time.monotonic() < deadline:
        pubsub.get_message(timeout=0.1)
    m1 = redis_totals(client).memory
    pubsub.close()
    bare.close()
    return {
        "steps": steps,
        "bare_pubsub_topics": topics,
        "bare_pubsub_bytes_per_topic": round((m1 - m0) / topics, 1),
    }


async def run_validate(fleet: Fleet, client: redis.Redis, hosts: list[Host], args: Any) -> Any:
    """6 hosts of ``args.users`` users each; every user in the big channel 1 and in one room of
    10 (channels 2..), rooms drawn at random across hosts. Each host publishes room messages at
    ``args.room_rate / 6`` per second to random rooms; host 0 publishes to channel 1 at
    ``args.big_rate``."""
    rng = random.Random(15)
    count = len(hosts)
    everyone = [(h, h * 100_000 + n + 1) for h in range(count) for n in range(args.users)]
    rng.shuffle(everyone)
    room_of = {user: 2 + i // 10 for i, (_, user) in enumerate(everyone)}
    rooms = sorted(set(room_of.values()))
    plans: list[list[Plan]] = [[] for _ in range(count)]
    for h, user in sorted(everyone):
        plans[h].append((user, (1, room_of[user])))
    hosts_of_room: dict[int, set[int]] = {}
    members_on: dict[tuple[int, int], int] = {}
    for h, user in everyone:
        hosts_of_room.setdefault(room_of[user], set()).add(h)
        members_on[(room_of[user], h)] = members_on.get((room_of[user], h), 0) + 1
    layout = {
        "hosts": count,
        "users_per_host": args.users,
        "rooms": len(rooms),
        "mean_hosts_per_room": round(sum(len(s) for s in hosts_of_room.values()) / len(rooms), 3),
        "room_topic_subscriptions": sum(len(s) for s in hosts_of_room.values()),
    }
    say(f"connecting {len(everyone)} users to {count} hosts: {layout}")
    failed = await open_users(fleet, hosts, plans)
    topics = {1: count, **{r: len(hosts_of_room[r]) for r in rooms}}
    await wait_registered(client, len(everyone) - failed, topics)
    await asyncio.sleep(2.0)
    say(f"idle window {args.idle:g} s")
    base = await idle(client, hosts, args.idle)
    await fleet.ask_all("reset")
    per_host = args.room_rate / count
    room_count = max(1, round(per_host * args.seconds))
    big_count = max(1, round(args.big_rate * args.seconds))
    say(f"load: {room_count} room messages per host, {big_count} to channel 1, {args.seconds:g} s")
    targets = [room_picker(random.Random(h), rooms) for h in range(count)]
    meter = Meter(client, hosts)
    bad = await asyncio.gather(
        publish(hosts, targets, room_count, per_host),
        publish(hosts[:1], [lambda _i: ("channel", 1)], big_count, args.big_rate),
    )
    expected = room_count * count * 10 + big_count * len(everyone)
    frames = await frames_after(fleet, expected)
    window = meter.stop()
    return {
        "layout": layout,
        "room_messages": room_count * count,
        "big_messages": big_count,
        "not_ok": sum(bad),
        "frames": frames,
        "expected_frames": expected,
        "idle": base.per_second(),
        "load": window.per_second(),
    }


def room_picker(rng: random.Random, rooms: list[int]) -> Callable[[int], tuple[str, int]]:
    return lambda _i: ("channel", rng.choice(rooms))


async def run_idle(fleet: Fleet, client: redis.Redis, hosts: list[Host], args: Any) -> Any:
    """One host, idle windows at growing numbers of users, each in one room of 10 (and, with
    ``--big``, also in channel 1): what a connection costs when nothing is sent."""
    steps = [{"users": 0, **(await idle(client, hosts, args.idle)).per_second()}]
    users = 0
    for target in args.steps:
        extra = 1 if args.big else 0
        plans: list[Plan] = [(u + 1, (1,) * extra + (2 + u // 10,)) for u in range(users, target)]
        say(f"{target} users")
        await open_users(fleet, hosts, [plans])
        users = target
        await wait_registered(client, users, {}, timeout=120.0)
        await asyncio.sleep(3.0)
        window = await idle(client, hosts, args.idle)
        memory = redis_totals(client).memory
        steps.append({"users": users, "used_memory": memory, **window.per_second()})
    return {"big": args.big, "steps": steps}


def command_calls(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Redis's ``INFO commandstats``: command -> (calls, microseconds) since its start."""
    return {
        name.removeprefix("cmdstat_"): (int(entry["calls"]), int(entry["usec"]))
        for name, entry in client.info("commandstats").items()
    }


class ChurnMeter(Meter):
    """A :class:`Meter` that also counts each Redis command over the window."""

    def __init__(self, client: redis.Redis, hosts: Sequence[Host]) -> None:
        self._c0 = command_calls(client)
        super().__init__(client, hosts)

    def stop_with_commands(self, top: int = 16) -> dict[str, Any]:
        window = self.stop()
        c1 = command_calls(self.client)
        s = window.seconds
        deltas = []
        for name, (calls, usec) in c1.items():
            calls0, usec0 = self._c0.get(name, (0, 0))
            if calls > calls0:
                deltas.append((calls - calls0, usec - usec0, name))
        deltas.sort(reverse=True)
        return {
            **window.per_second(),
            "redis_commands_top": {
                name: {"calls_per_s": round(calls / s, 1), "usec_per_s": round(usec / s)}
                for calls, usec, name in deltas[:top]
            },
        }


async def run_churn(fleet: Fleet, client: redis.Redis, hosts: list[Host], args: Any) -> Any:
    """One host (``--shards``) of ``--users`` users, one connection each, each in one room of
    10 (as in ``idle``): what the host's presence costs Redis, per second, in an idle window
    (``--idle``, default as long as ``--seconds``) and then in a window of ``--seconds`` during
    which ``--churn`` of the users per minute disconnect and come back (same user, same room):
    once a second, that many random users (a fraction carried over to the next second) close
    their connection, and each reconnects ``--reconnect-after`` seconds later (0.5 by default:
    the host's presence is pulled once a second too, so such a reconnect may fall between two
    pulls and change nothing; 1.5 s puts a pull between the close and the reconnect: 2 changes)."""
    (host,) = hosts
    users = args.users
    procs = len(fleet.pipes)
    # the users split into one consecutive share per client process (process i holds share i)
    shares: list[list[Plan]] = [[] for _ in range(procs)]
    room_of = {u + 1: 2 + u // 10 for u in range(users)}
    proc_of: dict[int, int] = {}
    for u in range(users):
        share = u * procs // users
        shares[share].append((u + 1, (room_of[u + 1],)))
        proc_of[u + 1] = share
    say(f"connecting {users} users to 1 host of {host.shards} shards")
    t_open = time.monotonic()
    failed = await open_users(fleet, [host] * procs, shares, timeout=600.0)
    say(f"{users - failed} connected in {time.monotonic() - t_open:.0f} s; waiting for presence")
    await wait_registered(client, users - failed, {}, timeout=300.0)
    await asyncio.sleep(args.settle)
    idle_seconds = args.idle if args.idle is not None else args.seconds
    say(f"idle window {idle_seconds:g} s")
    meter = ChurnMeter(client, [host])
    await asyncio.sleep(idle_seconds)
    quiet = {**meter.stop_with_commands(), "online_after": online(client)}

    rng = random.Random(15)
    per_second = users * args.churn / 60.0
    ticks = max(1, int(args.seconds))
    busy: set[int] = set()  # users between their close and their reconnect
    drops = reconnects = reconnect_failed = 0
    errors: list[str] = []
    pending: set[asyncio.Task[None]] = set()

    async def come_back(chosen: list[int], at: float) -> None:
        nonlocal reconnects, reconnect_failed
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        by_proc: dict[int, list[Plan]] = {}
        for user in chosen:
            by_proc.setdefault(proc_of[user], []).append((user, (room_of[user],)))
        address, port = host.address
        results = await asyncio.gather(
            *(
                fleet.ask(
                    index,
                    "open",
                    {
                        "host": address,
                        "port": port,
                        "secret": SECRET,
                        "plans": plans,
                        "first_index": 0,
                        "total": len(plans),  # few: the kernel picks the source address
                        "concurrency": 64,
                        "timeout": 10.0,
                    },
                    timeout=30.0,
                )
                for index, plans in by_proc.items()
            )
        )
        for result in results:
            reconnects += result["ok"]
            reconnect_failed += len(result["failed"])
            errors.extend(result["errors"][: max(0, 3 - len(errors))])
        busy.difference_update(chosen)

    say(f"churn window {args.seconds:g} s: {per_second:.2f} users/s disconnect and reconnect")
    online_users = [u + 1 for u in range(users)]
    meter = ChurnMeter(client, [host])
    t0 = time.monotonic()
    for tick in range(ticks):
        await asyncio.sleep(max(0.0, t0 + tick - time.monotonic()))
        count = int((tick + 1) * per_second) - int(tick * per_second)
        chosen: list[int] = []
        while len(chosen) < count and len(busy) < users:
            user = rng.choice(online_users)
            if user not in busy:
                busy.add(user)
                chosen.append(user)
        if not chosen:
            continue
        by_proc: dict[int, list[int]] = {}
        for user in chosen:
            by_proc.setdefault(proc_of[user], []).append(user)
        dropped = await asyncio.gather(
            *(fleet.ask(index, "drop", some, timeout=10.0) for index, some in by_proc.items())
        )
        drops += sum(dropped)
        task = asyncio.create_task(come_back(chosen, t0 + tick + args.reconnect_after))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
    in_window = reconnects
    churn = meter.stop_with_commands()
    if pending:
        await asyncio.wait(pending, timeout=40.0)
    for error in errors:
        say(f"reconnect error: {error}")
    with contextlib.suppress(TimeoutError):  # the last reconnects: in the next snapshot
        await wait_registered(client, users - failed, {}, timeout=5.0)
    online_after = online(client)
    return {
        "users": users,
        "connect_failed": failed,
        "shards": host.shards,
        "hang_timeout": args.hang_timeout,
        "churn_per_minute": args.churn,
        "churn_users_per_s": round(per_second, 3),
        "reconnect_after": args.reconnect_after,
        "idle": quiet,
        "churn": {
            **churn,
            "disconnects": drops,
            "reconnects": in_window,
            "reconnects_after_window": reconnects - in_window,
            "reconnect_failed": reconnect_failed,
            "online_after": online_after,  # once every reconnect is done
        },
        # every user online after each window, so no shard restart lost some on the way
        "complete": quiet["online_after"] == online_after == users - failed,
    }


def online(client: redis.Redis) -> int:
    """The users in the hosts' presence sets."""
    hosts = client.zrange(f"{PREFIX}:hosts", 0, -1)
    return sum(int(client.scard(f"{PREFIX}:h:{h.decode()}:users")) for h in hosts)


RUNS = {
    "churn": (1, run_churn),
    "idle": (1, run_idle),
    "message": (4, run_message),
    "subs": (1, run_subs),
    "validate": (6, run_validate),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", choices=sorted(RUNS))
    parser.add_argument("--idle", type=float, help="idle window, s (30; churn: --seconds)")
    parser.add_argument("--count", type=int, default=2000, help="message: broadcasts per phase")
    parser.add_argument("--rate", type=float, default=200.0, help="message: broadcasts per s")
    parser.add_argument("--repeat", type=int, default=3, help="message: rounds of 3 phases")
    parser.add_argument("--conns", type=int, default=50, help="subs: connections per step")
    parser.add_argument("--users", type=int, help="users per host (validate 500, churn 50000)")
    parser.add_argument("--room-rate", type=float, default=30.0, help="validate: msgs/s, all")
    parser.add_argument("--big-rate", type=float, default=1.0, help="validate: msgs/s, ch. 1")
    parser.add_argument("--seconds", type=float, help="load time, s (validate 60, churn 120)")
    parser.add_argument("--churn", type=float, default=0.01, help="churn: users per minute")
    parser.add_argument("--settle", type=float, default=5.0, help="churn: s before windows")
    parser.add_argument(
        "--reconnect-after", type=float, default=0.5, help="churn: s from a close to its reconnect"
    )
    parser.add_argument("--shards", type=int, default=2, help="churn: the host's shards")
    parser.add_argument(
        "--hang-timeout", type=float, default=10.0, help="churn: the host's, s (ucc's: 1.5)"
    )
    parser.add_argument("--steps", type=lambda t: [int(x) for x in t.split(",")], default=[5000])
    parser.add_argument("--big", action="store_true", help="idle: users also in channel 1")
    parser.add_argument("--cluster", action="store_true", help="a 3-primary Redis Cluster")
    parser.add_argument("--client-procs", type=int, default=2, help="load client processes")
    args = parser.parse_args()
    churn = args.run == "churn"
    if args.idle is None and not churn:
        args.idle = 30.0
    if args.users is None:
        args.users = 50_000 if churn else 500
    if args.seconds is None:
        args.seconds = 120.0 if churn else 60.0
    global SHARDED
    SHARDED = args.cluster
    if churn:  # tens of thousands of sockets per client process and per shard (inherited)
        limit = raise_open_files_limit() - 1000  # the rest: Redis, ZeroMQ, pipes, files
        for what, count in (("--shards", args.shards), ("--client-procs", args.client_procs)):
            if args.users > limit * count:
                parser.error(f"{args.users} users need {what} >= {-(-args.users // limit)}")
    host_count, run = RUNS[args.run]
    fleet = Fleet(args.client_procs)  # forked before any event loop or server
    server: RedisServer | RedisClusterServer | None = None
    try:
        with contextlib.ExitStack() as stack:
            if args.cluster:  # measured: the primary that holds the cluster's hash tag
                server = RedisClusterServer(3)
                port = server.ports[server.node_of(f"{PREFIX}:hosts")]
            else:
                server = RedisServer()
                port = server.port
            client = redis.Redis(port=port)
            stack.callback(client.close)
            if churn:  # a shard of ~17,000 users on 2 busy cores was seen silent > 1.5 s
                extra = ("--hang-timeout", str(args.hang_timeout))
                hosts = start_hosts(stack, server.url, host_count, args.shards, extra)
            else:
                hosts = start_hosts(stack, server.url, host_count)

            async def go() -> Any:
                fleet.attach(asyncio.get_running_loop())
                result = await run(fleet, client, hosts, args)
                await fleet.ask_all("close")
                return result

            limit = 900.0 + ((args.idle or args.seconds) + args.seconds if churn else 0.0)
            result = asyncio.run(asyncio.wait_for(go(), limit))
    finally:
        fleet.close()
        if server is not None:
            server.close()
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["command"] = " ".join(sys.argv[1:])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
