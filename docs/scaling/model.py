"""The capacity model of docs/scaling.md: hosts, Redis load and what saturates first.

    .venv/bin/python docs/scaling/model.py              # the 1M / 10M table
    .venv/bin/python docs/scaling/model.py --validate   # against the 6-host runs

Every unit cost below was measured on the 2-core box of docs/scaling.md ("Measured inputs"),
where the commands and dates are; docs/scaling/fit.py prints them from the raw results in
docs/scaling/results/. The model only adds and multiplies them. Nothing here talks to a server.
Presence has two sets of costs: ``DELTAS``, the code as it is now (f2170e6), which the answer
is for, and ``SNAPSHOTS``, the design before it (61cf9a8), kept as the comparison column and for
the validation runs made on that tree. The few terms that are derived rather than measured say
so where they are defined.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- measured unit costs (docs/scaling.md, "Measured inputs"), in CPU seconds and bytes --------

US = 1e-6
# a host (one `ucc serve`), its whole process tree; SUP_* is the part in its supervisor process
HOST_FIXED = 14_300 * US  # per host per second, with no user (1 shard): probes, timers, presence
SUP_FIXED = 11_300 * US
PUBLISH = 478 * US  # on the host that takes a broadcast command, beyond its own delivery
SUP_PUBLISH = 487 * US
RECEIVE = 439 * US  # on every host that listens to the channel (the publisher too), per message
SUP_RECEIVE = 300 * US
ROOM_FRAME = 2.89 * US  # per local recipient of a cross-host message (messages at 200/s)
BIG_FRAME = 8.7 * US  # per recipient of a big channel (`ucc bench fanout`, 1,000 members, 20/s)
SERVER_BYTES_PER_CONN = 7_100  # RSS per connection (`ucc bench fanout`, 1,000-10,000 members)

# Redis: messages (the APPEND script; each channel's topic and history under its own hash tag)
REDIS_PER_MESSAGE = 81 * US  # per broadcast: the APPEND script (offset, stream, PUBLISH)
REDIS_PER_LISTENER = 14.6 * US  # per listening host of that broadcast
REDIS_IN_PER_MESSAGE = 1085  # bytes in per broadcast (the script's text travels with EVAL)
REDIS_OUT_PER_MESSAGE = 35  # bytes out per broadcast (the script's reply)
REDIS_OUT_PER_LISTENER = 286  # bytes out per listening host
REDIS_BYTES_PER_SUBSCRIPTION = 240  # a (host, channel) topic subscription (bare SUBSCRIBE)


@dataclass(frozen=True)
class Presence:
    """What presence costs, per design: the hosts' per-user and per-set work, Redis's."""

    name: str
    host_per_user: float  # host CPU per connected user per second (heartbeats, presence)
    sup_per_user: float
    sup_per_membership: float
    host_per_set: float  # per channel with members on the host, per second
    sup_per_set: float
    host_per_change: float  # host CPU per presence change (half a reconnect: close or open)
    sup_per_change: float
    redis_base: float  # Redis CPU per second with one host (snapshots: and no user)
    redis_per_host: float  # Redis CPU per host per second (the heartbeat), one listener
    redis_per_user: float  # Redis CPU per user per second (the snapshot script)
    redis_per_membership: float
    redis_per_set: float  # per (host, channel) member set, rewritten every second
    redis_per_change: float  # Redis CPU per presence change
    redis_per_listener: float  # per host that hears one host's presence message, per second
    in_per_host: float  # bytes into Redis per host per second
    in_per_user: float
    in_per_membership: float
    in_per_set: float
    in_per_change: float
    out_per_listener: float  # bytes out per host per listening host per second
    out_per_change: float  # bytes out per change per listening host
    redis_bytes_per_user: float  # used_memory: a user and its first membership
    redis_bytes_per_membership: float
    redis_bytes_per_set: float  # a (host, channel) topic subscription, and its member set if any
    replica_bytes_per_user: float  # on every host, per user of the cluster (its replicas)


# Before deltas (commit 61cf9a8, measured 2026-12-01/02): a full sealed snapshot per host per
# second rewrote every (host, channel) member set in Redis; no replicas, no presence topic.
SNAPSHOTS = Presence(
    name="snapshots",
    host_per_user=2.93 * US,  # `idle` slopes, 5,000 -> 15,000 users
    sup_per_user=0.44 * US,
    sup_per_membership=0.31 * US,
    host_per_set=4.40 * US,  # `subs`: its part of the snapshot
    sup_per_set=3.09 * US,
    host_per_change=0.0,  # churn not modelled then
    sup_per_change=0.0,
    redis_base=2_000 * US,
    redis_per_host=0.0,
    redis_per_user=0.327 * US,
    redis_per_membership=0.41 * US,
    redis_per_set=4.33 * US,
    redis_per_change=0.0,
    redis_per_listener=0.0,  # snapshots were read on demand, not published
    in_per_host=0.0,
    in_per_user=14.4,
    in_per_membership=14.0,
    in_per_set=14.1,
    in_per_change=0.0,
    out_per_listener=0.0,
    out_per_change=0.0,
    # 123 B per user in a room of 10 (users set, snapshot, its membership, a tenth of its room's
    # set), 177 B if also in a big channel; the set counted apart
    redis_bytes_per_user=123 - 42,
    redis_bytes_per_membership=54,
    redis_bytes_per_set=425,  # topic subscription (240) and member set
    replica_bytes_per_user=0.0,
)

# `measure.py churn` with deltas (docs/scaling/results/churn_deltas*.json: idle windows, 3 runs;
# churn_deltas_gap*.json: churn windows with a presence pull between a close and its reconnect,
# 3 runs; medians; fit.py prints them). Redis CPU is read to 0.01 % of a core (100 us/s).
DELTA_REDIS_BASE = 2_000  # us/s: a Redis with one quiet host (0 users, measured before deltas)
DELTA_REDIS_PER_HOST = 2_800 - DELTA_REDIS_BASE  # us/s: the idle window (one host, 50,000 users)
DELTA_IN_PER_HOST = 1_155  # bytes in per host-second (the heartbeat script: its text and ARGV)
DELTA_OUT_PER_HOST = 374  # bytes out per host-second: the script's reply, the host's own listener
# per change: half of everything a reconnect costs (the churn window less the idle one), the
# connect's critical-messages check included; presence's own part is ~6 us, 22 B in, 13.5 B out
DELTA_REDIS_PER_CHANGE = 30.1  # us
DELTA_IN_PER_CHANGE = 448
DELTA_OUT_PER_CHANGE = 15.6  # per listening host
DELTA_HOST_PER_USER = 1.3  # us per user per second: (idle hosts' CPU - HOST_FIXED) / 50,000
DELTA_SUP_PER_USER = 0.1
DELTA_HOST_PER_CHANGE = 874  # us per change: a WebSocket close or open, and its presence
DELTA_SUP_PER_CHANGE = 392
# used_memory per user: 84 B (`idle --steps 5000,15000` on f2170e6, 1 run: the users set; the
# stored snapshot there was link-up's, empty) + 9 B of stored snapshot (docs/cluster.md)
DELTA_REDIS_BYTES_PER_USER = 84 + 9

# Now (deltas, HEAD f2170e6, measured 2026-12-02): once a second one PRESENCE_DELTA script per
# host (ZADD, PEXPIREs, SADD/SREM of the changed users, PUBLISH on the presence topic); every host
# keeps replicas of every other host's presence. From `measure.py churn`, 3 runs (fit.py).
DELTAS = Presence(
    name="deltas",
    host_per_user=DELTA_HOST_PER_USER * US,  # idle window at 50,000 users, less HOST_FIXED
    sup_per_user=DELTA_SUP_PER_USER * US,
    sup_per_membership=0.0,  # in sup_per_user (the run's users have one membership each)
    host_per_set=0.0,  # no per-second work per set: sets change only with their users
    sup_per_set=0.0,
    host_per_change=DELTA_HOST_PER_CHANGE * US,  # the churn window less the idle one
    sup_per_change=DELTA_SUP_PER_CHANGE * US,
    redis_base=DELTA_REDIS_BASE * US,
    redis_per_host=DELTA_REDIS_PER_HOST * US,  # the idle window less the base
    # the snapshot stored every 5 min (STORE_PRESENCE: the user set rewritten, one SET): not
    # caught in a window; derived as the snapshot design's per-user cost once per 300 s
    redis_per_user=0.327 * US / 300,
    redis_per_membership=0.0,
    redis_per_set=0.0,
    redis_per_change=DELTA_REDIS_PER_CHANGE * US,
    redis_per_listener=REDIS_PER_LISTENER,  # not measured for presence: a broadcast's figure
    in_per_host=DELTA_IN_PER_HOST,
    in_per_user=14.4 / 300,  # the same: the stored snapshot, every 5 min
    in_per_membership=0.0,
    in_per_set=0.0,
    in_per_change=DELTA_IN_PER_CHANGE,
    out_per_listener=DELTA_OUT_PER_HOST,  # the one listener's share of the idle window
    out_per_change=DELTA_OUT_PER_CHANGE,
    redis_bytes_per_user=DELTA_REDIS_BYTES_PER_USER,
    redis_bytes_per_membership=0.0,
    redis_bytes_per_set=REDIS_BYTES_PER_SUBSCRIPTION,  # no member sets any more
    replica_bytes_per_user=164,  # tracemalloc, docs/cluster.md "Presence"
)
DESIGNS = {"deltas": DELTAS, "snapshots": SNAPSHOTS}

# -- the workload and the deployment (assumptions, docs/scaling.md) ------------------------------

ROOM = 10  # members per room; every user is in one room
SENDERS_PER_MINUTE = 0.01  # share of users who send one room message a minute
CHURN_PER_MINUTE = 0.01  # share of users who leave and come back a minute (2 changes each)
BIG_RATE = 1.0  # messages per second to the big channel, of which every user is a member
TARGET = 0.6  # the share of a core (host or Redis) we plan to use; the rest is headroom
HOST_MEMORY_PER_CORE = 4 * 2**30  # bytes
MIN_PRIMARIES = 3  # a Redis Cluster's minimum, each with a replica for failover


@dataclass(frozen=True)
class Load:
    """What the whole deployment does per second (CPU in core-seconds per second)."""

    hosts: int
    host_cpu: float  # all hosts
    supervisor_cpu: float  # per host: one process, one core at most
    host_memory: float  # per host, bytes: connections and presence replicas
    redis_cpu: float  # all of it, as if on one primary
    redis_presence_cpu: float  # of which presence: on the primary of the {ucc:<cluster>} slot
    redis_in: float  # bytes/s
    redis_out: float
    subscriptions: float  # (host, channel) topic subscriptions
    redis_memory: float  # bytes
    primaries: int  # Redis Cluster primaries that keep each under TARGET (channels spread)


def hosts_per_room(hosts: int, room: int = ROOM) -> float:
    """Expected hosts holding at least one member of a room whose members land at random."""
    return hosts * (1 - (1 - 1 / hosts) ** room)


def load(
    users: int,
    hosts: int,
    big_rate: float = BIG_RATE,
    room_rate: float | None = None,
    spread: float | None = None,
    design: Presence = DELTAS,
    churn: float | None = None,
) -> Load:
    """The load of ``users`` (each in one room and in the big channel) on ``hosts``;
    ``room_rate`` (room messages per second, default: the mix's), ``spread`` (mean hosts per
    room, default: members placed at random) and ``churn`` (users leaving and coming back per
    second, default: the mix's) may be given, as for the validation runs."""
    p = design
    per_host = users / hosts
    rooms = users / ROOM
    room_rate = users * SENDERS_PER_MINUTE / 60 if room_rate is None else room_rate
    changes = 2 * (users * CHURN_PER_MINUTE / 60 if churn is None else churn)
    spread = hosts_per_room(hosts) if spread is None else spread
    sets = rooms * spread + hosts  # (host, room) sets, and the big channel's on each host
    members = 2 * users  # each user: its room and the big channel
    room_cpu = room_rate * (PUBLISH + spread * RECEIVE + ROOM * ROOM_FRAME)
    big_cpu = big_rate * (PUBLISH + hosts * RECEIVE + users * BIG_FRAME)
    # presence messages heard per host per second: every other host's heartbeat or delta (its
    # router reads them; a broadcast's supervisor cost stands in for it: not measured)
    heard = (hosts - 1) * SUP_RECEIVE if p.redis_per_listener else 0.0
    host_cpu = (
        hosts * (HOST_FIXED + heard)
        + users * p.host_per_user
        + sets * p.host_per_set
        + changes * p.host_per_change
        + room_cpu
        + big_cpu
    )
    supervisor = (  # per host: its share of everything, publishing included
        SUP_FIXED
        + heard
        + (users * p.sup_per_user + members * p.sup_per_membership + sets * p.sup_per_set) / hosts
        + changes * p.sup_per_change / hosts
        + (room_rate + big_rate) * SUP_PUBLISH / hosts
        + (room_rate * spread / hosts + big_rate) * SUP_RECEIVE
    )
    presence = (
        p.redis_base
        + hosts * p.redis_per_host
        + hosts * (hosts - 1) * p.redis_per_listener  # the host itself is in redis_per_host
        + users * p.redis_per_user
        + members * p.redis_per_membership
        + sets * p.redis_per_set
        + changes * p.redis_per_change
    )
    listeners = room_rate * spread + big_rate * hosts
    messages = (room_rate + big_rate) * REDIS_PER_MESSAGE + listeners * REDIS_PER_LISTENER
    presence_in = (
        hosts * p.in_per_host
        + users * p.in_per_user
        + members * p.in_per_membership
        + sets * p.in_per_set
        + changes * p.in_per_change
    )
    presence_out = hosts * hosts * p.out_per_listener + changes * hosts * p.out_per_change
    primaries = MIN_PRIMARIES  # channels spread over slots; presence stays on one primary
    while presence + messages / primaries > TARGET and primaries < 1000:
        primaries += 1
    return Load(
        hosts=hosts,
        host_cpu=host_cpu,
        supervisor_cpu=supervisor,
        host_memory=per_host * SERVER_BYTES_PER_CONN + users * p.replica_bytes_per_user,
        redis_cpu=presence + messages,
        redis_presence_cpu=presence,
        redis_in=presence_in + (room_rate + big_rate) * REDIS_IN_PER_MESSAGE,
        redis_out=presence_out
        + (room_rate + big_rate) * REDIS_OUT_PER_MESSAGE
        + listeners * REDIS_OUT_PER_LISTENER,
        subscriptions=sets,
        redis_memory=users * p.redis_bytes_per_user
        + (members - users) * p.redis_bytes_per_membership
        + sets * p.redis_bytes_per_set,
        primaries=primaries if presence <= TARGET else 0,  # 0: presence alone is too much
    )


def limits(got: Load, cores: int) -> dict[str, float]:
    """Each per-host bound's share of its TARGET (1.0: at the target)."""
    hosts = got.hosts
    return {
        "host CPU": got.host_cpu / hosts / (cores * TARGET),
        "supervisor": got.supervisor_cpu / TARGET,
        "host memory": got.host_memory / (cores * HOST_MEMORY_PER_CORE * TARGET),
    }


def hosts_needed(
    users: int, cores: int, big_rate: float = BIG_RATE, design: Presence = DELTAS
) -> tuple[int, str]:
    """The fewest hosts of ``cores`` cores (one process per core) that keep every host's CPU,
    its supervisor and its memory under TARGET; and which of them decided. (0, why) if no
    number of hosts does: every host holds the whole cluster's presence replicas."""
    budget = cores * HOST_MEMORY_PER_CORE * TARGET
    if users * design.replica_bytes_per_user >= budget:
        return 0, "host memory (replicas alone)"
    hosts = 1
    while True:
        got = load(users, hosts, big_rate, design=design)
        share = limits(got, cores)
        worst = max(share, key=lambda k: share[k])
        if share[worst] <= 1.0:
            return hosts, worst if hosts > 1 else "none: one host suffices"
        hosts = max(hosts + 1, math.floor(hosts * share[worst]))


def max_users_one_primary(spread: float, design: Presence, cores: int = 2) -> int:
    """The most users one Redis primary carries (every key and topic on it, as with a single
    Redis) under TARGET, when each room's members are on ``spread`` hosts (10: every member on
    its own host, as random placement over many hosts gives; 1: each room on one host)."""
    low, high = 1_000, 100_000_000
    while high - low > 1_000:
        mid = (low + high) // 2
        hosts, _ = hosts_needed(mid, cores, design=design)
        fits = hosts > 0 and load(mid, hosts, spread=spread, design=design).redis_cpu <= TARGET
        low, high = (mid, high) if fits else (low, mid)
    return low


def table(big_rate: float) -> None:
    mix = f"rooms of {ROOM}, {SENDERS_PER_MINUTE:.0%} of users send 1/min"
    print(
        f"big channel: every user, {big_rate:g} msg/s; {mix}; {CHURN_PER_MINUTE:.0%} of users "
        f"reconnect a minute; target {TARGET:.0%} of a core"
    )
    print(
        "users | cores/host | hosts | bound | host cores | supervisor | host memory | Redis CPU "
        "(presence) | primaries | Redis in | Redis out | topic subscriptions | Redis memory || "
        "snapshots: hosts | bound | Redis CPU (presence) | Redis in"
    )
    for users in (1_000_000, 10_000_000):
        for cores in (2, 8, 32):
            hosts, bound = hosts_needed(users, cores, big_rate)
            got = load(users, hosts, big_rate)
            old_hosts, old_bound = hosts_needed(users, cores, big_rate, SNAPSHOTS)
            old = load(users, old_hosts, big_rate, design=SNAPSHOTS)
            print(
                f"{users:,} | {cores} | {hosts} | {bound} | {got.host_cpu:.1f} | "
                f"{got.supervisor_cpu:.0%} | {got.host_memory / 2**30:.2f} GiB | "
                f"{got.redis_cpu:.2f} ({got.redis_presence_cpu:.3f}) | {got.primaries} | "
                f"{got.redis_in / 1e6:.2f} MB/s | {got.redis_out / 1e6:.1f} MB/s | "
                f"{got.subscriptions:,.0f} | {got.redis_memory / 2**30:.2f} GiB || "
                f"{old_hosts} | {old_bound} | {old.redis_cpu:.2f} ({old.redis_presence_cpu:.2f}) | "
                f"{old.redis_in / 1e6:.0f} MB/s"
            )
    for design in (DELTAS, SNAPSHOTS):
        spread = max_users_one_primary(10.0, design)
        local = max_users_one_primary(1.0, design)
        print(f"most users on one Redis primary ({design.name}): {spread:,} (each room over 10 "
              f"hosts), {local:,} (each room on one host)")  # fmt: skip
    most = 1
    while load(10_000_000, most + 1, big_rate).redis_presence_cpu <= TARGET:
        most += 1
    print(f"most hosts before presence's primary passes {TARGET:.0%} (10M users): {most}")
    for cores in (2, 8, 32):
        hosts, _ = hosts_needed(10_000_000, cores, big_rate)
        got = load(10_000_000, hosts, big_rate)
        shares = ", ".join(f"{k} {v * TARGET:.0%}" for k, v in limits(got, cores).items())
        print(f"10M on {hosts} hosts of {cores} cores, per host: {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-rate", type=float, default=BIG_RATE)
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args()
    if args.validate:
        validation()
    else:
        table(args.big_rate)


# -- the validation runs (docs/scaling/measure.py validate), read from docs/scaling/results/ ------

RESULTS = Path(__file__).parent / "results"
VALIDATIONS = {  # result prefix: (what, the presence design of the tree it ran on)
    "val1": ("6 hosts x 500 users, snapshots (61cf9a8)", SNAPSHOTS),
    "val2": ("6 hosts x 1,500 users, snapshots", SNAPSHOTS),
    "val3": ("6 hosts x 3,000 users, snapshots", SNAPSHOTS),
    "val4": ("6 hosts x 10,000 users, snapshots", SNAPSHOTS),
    "deltas_val1": ("6 hosts x 500 users, deltas (f2170e6)", DELTAS),
    "deltas_val4": ("6 hosts x 10,000 users, deltas (f2170e6)", DELTAS),
}


def predicted(run: dict[str, Any], phase: str, design: Presence) -> dict[str, float]:
    """The model's figures for one validation run's idle or load window (% of a core, B/s),
    at the rates it achieved: messages sent divided by the window's length."""
    layout = run["layout"]
    users, hosts = layout["hosts"] * layout["users_per_host"], layout["hosts"]
    seconds = run["load"]["seconds"]
    rooms, big = (run["room_messages"] / seconds, run["big_messages"] / seconds)
    if phase == "idle":
        rooms, big = 0.0, 0.0
    got = load(users, hosts, big, rooms, layout["mean_hosts_per_room"], design, churn=0.0)
    return {
        "hosts": got.host_cpu * 100,
        "redis": got.redis_cpu * 100,
        "in": got.redis_in,
        "out": got.redis_out,
    }


def measured(run: dict[str, Any], phase: str) -> dict[str, float]:
    window = run[phase]
    return {
        "hosts": sum(window["hosts_cpu_percent"]),
        "redis": window["redis_cpu_percent"],
        "in": window["redis_in_bytes_per_s"],
        "out": window["redis_out_bytes_per_s"],
    }


def validation() -> None:
    """Model against measurement for every validation run; the error of the medians."""
    for prefix, (title, design) in VALIDATIONS.items():
        paths = [RESULTS / f"{prefix}.json", *sorted(RESULTS.glob(f"{prefix}_[0-9]*.json"))]
        found = [json.loads(path.read_text()) for path in paths if path.exists()]
        if not found:
            continue
        print(f"{title}: {len(found)} run(s), {found[0]['command']}")
        for phase in ("idle", "load"):
            for key in ("hosts", "redis", "in", "out"):
                if phase == "idle" and key == "out" and design is SNAPSHOTS:
                    continue  # not modelled: replies to probes and snapshots, ~1 kB/s
                model = statistics.median(predicted(run, phase, design)[key] for run in found)
                values = [measured(run, phase)[key] for run in found]
                real = statistics.median(values)
                error = 100 * (model - real) / real
                shown = ", ".join(f"{v:,.2f}" for v in values)
                print(f"  {phase} {key}: model {model:,.2f}, measured {real:,.2f} ({shown}), "
                      f"error {error:+.0f} %")  # fmt: skip


if __name__ == "__main__":
    main()
