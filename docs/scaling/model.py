"""The capacity model of docs/scaling.md: hosts, Redis load and what saturates first.

    .venv/bin/python docs/scaling/model.py              # the 1M / 10M table
    .venv/bin/python docs/scaling/model.py --validate   # the prediction for the 6-host run

Every unit cost below was measured on the 2-core box of docs/scaling.md ("Measured inputs"),
where the commands and dates are; the model only adds and multiplies them. Nothing here talks
to a server.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

# -- measured unit costs (docs/scaling.md, "Measured inputs"), in CPU seconds and bytes --------

US = 1e-6
# a host (one `ucc serve`), its whole process tree; SUP_* is the part in its supervisor process
HOST_FIXED = 10_000 * US  # per host per second, with no user: probes, timers, snapshot loop
SUP_FIXED = 10_000 * US
HOST_PER_USER = 3.1 * US  # per connected user per second: heartbeats, its part of the snapshot
SUP_PER_USER = 0.44 * US
HOST_PER_MEMBERSHIP = 0.0  # per (user, channel) per second: not measurable here (< 0.2 us)
SUP_PER_MEMBERSHIP = 0.4 * US
HOST_PER_SET = 3.3 * US  # per channel with members on the host, per second (its snapshot)
SUP_PER_SET = 1.9 * US
PUBLISH = 478 * US  # on the host that takes a broadcast command, beyond its own delivery
SUP_PUBLISH = 487 * US
RECEIVE = 439 * US  # on every host that listens to the channel (the publisher too), per message
SUP_RECEIVE = 300 * US
ROOM_FRAME = 2.89 * US  # per local recipient of a cross-host message (messages at 200/s)
BIG_FRAME = 8.7 * US  # per recipient of a big channel (`ucc bench fanout`, 1,000 members, 20/s)
SERVER_BYTES_PER_CONN = 7_100  # RSS per connection (`ucc bench fanout`, 1,000-10,000 members)

# Redis (one primary: today every key and topic of a cluster of hosts shares one hash tag)
REDIS_BASE = 2_800 * US  # per second, its own housekeeping and a host or a few
REDIS_PER_MESSAGE = 81 * US  # per broadcast: the APPEND script (offset, stream, PUBLISH)
REDIS_PER_LISTENER = 14.6 * US  # per listening host of that broadcast
REDIS_IN_PER_MESSAGE = 1085  # bytes in per broadcast (the script's text travels with EVAL)
REDIS_OUT_PER_MESSAGE = 35  # bytes out per broadcast (the script's reply)
REDIS_OUT_PER_LISTENER = 286  # bytes out per listening host
PRESENCE_PER_USER = 0.707 * US  # Redis CPU per user per second (the snapshot script)
PRESENCE_PER_MEMBERSHIP = 0.21 * US
PRESENCE_PER_SET = 4.53 * US  # per (host, channel) member set, rewritten every second
PRESENCE_IN_PER_USER = 14.4  # bytes into Redis per second
PRESENCE_IN_PER_MEMBERSHIP = 14.0
PRESENCE_IN_PER_SET = 14.1
REDIS_BYTES_PER_USER = 123  # used_memory per user (host users set, snapshot), in a room of 10
REDIS_BYTES_PER_MEMBERSHIP = 53
REDIS_BYTES_PER_SET = 424  # a (host, channel) topic subscription (240) and its member set

# -- the workload and the deployment (assumptions, docs/scaling.md) ------------------------------

ROOM = 10  # members per room; every user is in one room
SENDERS_PER_MINUTE = 0.01  # share of users who send one room message a minute
BIG_RATE = 1.0  # messages per second to the big channel, of which every user is a member
TARGET = 0.6  # the share of a core (host or Redis) we plan to use; the rest is headroom
HOST_MEMORY_PER_CORE = 4 * 2**30  # bytes


@dataclass(frozen=True)
class Load:
    """What the whole deployment does per second (CPU in core-seconds per second)."""

    hosts: int
    host_cpu: float  # all hosts
    supervisor_cpu: float  # per host: one process, one core at most
    host_memory: float  # per host, bytes (connections only)
    redis_cpu: float  # the one primary that holds the cluster's hash tag, today
    redis_presence_cpu: float
    redis_in: float  # bytes/s
    redis_out: float
    subscriptions: float  # (host, channel) topic subscriptions, each with a member set
    redis_memory: float  # bytes


def hosts_per_room(hosts: int, room: int = ROOM) -> float:
    """Expected hosts holding at least one member of a room whose members land at random."""
    return hosts * (1 - (1 - 1 / hosts) ** room)


def load(
    users: int,
    hosts: int,
    big_rate: float = BIG_RATE,
    room_rate: float | None = None,
    spread: float | None = None,
) -> Load:
    """The load of ``users`` (each in one room and in the big channel) on ``hosts``;
    ``room_rate`` (room messages per second, default: the mix's) and ``spread`` (mean hosts per
    room, default: members placed at random) may be given, as for the validation run."""
    per_host = users / hosts
    rooms = users / ROOM
    room_rate = users * SENDERS_PER_MINUTE / 60 if room_rate is None else room_rate
    spread = hosts_per_room(hosts) if spread is None else spread
    sets = rooms * spread + hosts  # (host, room) sets, and the big channel's on each host
    members = 2 * users  # each user: its room and the big channel
    room_cpu = room_rate * (PUBLISH + spread * RECEIVE + ROOM * ROOM_FRAME)
    big_cpu = big_rate * (PUBLISH + hosts * RECEIVE + users * BIG_FRAME)
    host_cpu = (
        hosts * HOST_FIXED
        + users * HOST_PER_USER
        + members * HOST_PER_MEMBERSHIP
        + sets * HOST_PER_SET
        + room_cpu
        + big_cpu
    )
    supervisor = (  # per host: its share of everything, publishing included
        SUP_FIXED
        + (users * SUP_PER_USER + members * SUP_PER_MEMBERSHIP + sets * SUP_PER_SET) / hosts
        + (room_rate + big_rate) * SUP_PUBLISH / hosts
        + (room_rate * spread / hosts + big_rate) * SUP_RECEIVE
    )
    presence = (
        users * PRESENCE_PER_USER + members * PRESENCE_PER_MEMBERSHIP + sets * PRESENCE_PER_SET
    )
    listeners = room_rate * spread + big_rate * hosts
    messages = (room_rate + big_rate) * REDIS_PER_MESSAGE + listeners * REDIS_PER_LISTENER
    presence_in = (
        users * PRESENCE_IN_PER_USER
        + members * PRESENCE_IN_PER_MEMBERSHIP
        + sets * PRESENCE_IN_PER_SET
    )
    return Load(
        hosts=hosts,
        host_cpu=host_cpu,
        supervisor_cpu=supervisor,
        host_memory=per_host * SERVER_BYTES_PER_CONN,
        redis_cpu=REDIS_BASE + presence + messages,
        redis_presence_cpu=presence,
        redis_in=presence_in + (room_rate + big_rate) * REDIS_IN_PER_MESSAGE,
        redis_out=(room_rate + big_rate) * REDIS_OUT_PER_MESSAGE
        + listeners * REDIS_OUT_PER_LISTENER,
        subscriptions=sets,
        redis_memory=users * REDIS_BYTES_PER_USER
        + members * REDIS_BYTES_PER_MEMBERSHIP
        + sets * REDIS_BYTES_PER_SET,
    )


def hosts_needed(users: int, cores: int, big_rate: float = BIG_RATE) -> tuple[int, str]:
    """The fewest hosts of ``cores`` cores (one process per core) that keep every host's CPU,
    its supervisor and its memory under TARGET; and which of them decided."""
    hosts = 1
    while True:
        got = load(users, hosts, big_rate)
        limits = {
            "host CPU": got.host_cpu / hosts / (cores * TARGET),
            "supervisor": got.supervisor_cpu / TARGET,
            "host memory": got.host_memory / (cores * HOST_MEMORY_PER_CORE * TARGET),
        }
        worst = max(limits, key=lambda k: limits[k])
        if limits[worst] <= 1.0:
            return hosts, worst
        hosts = max(hosts + 1, math.floor(hosts * limits[worst]))


CHURN_PER_MINUTE = 0.01  # after presence deltas: share of users who connect or leave a minute
DELTA_COST = 100 * US  # Redis CPU per presence delta (an estimate: one script, a few SADD/SREM)


def after_issue_15(users: int, hosts: int, big_rate: float = BIG_RATE) -> tuple[float, int]:
    """Redis CPU once presence travels as deltas (no per-second snapshot: churn only; an
    estimate, not measured), and the primaries that carry it once topics and keys spread over
    slots (at least 3, for failover with replicas)."""
    got = load(users, hosts, big_rate)
    cpu = got.redis_cpu - got.redis_presence_cpu + users * CHURN_PER_MINUTE / 60 * DELTA_COST
    return cpu, max(3, math.ceil(cpu / TARGET))


def max_users_today(spread: float, cores: int = 2) -> int:
    """The most users one Redis primary carries today (every key and topic on one primary)
    under TARGET, when each room's members are on ``spread`` hosts (10: every member on its own
    host, as random placement over many hosts gives; 1: each room on one host)."""
    low, high = 1_000, 10_000_000
    while high - low > 1_000:
        mid = (low + high) // 2
        hosts, _ = hosts_needed(mid, cores)
        fits = load(mid, hosts, spread=spread).redis_cpu <= TARGET
        low, high = (mid, high) if fits else (low, mid)
    return low


def table(big_rate: float) -> None:
    mix = f"rooms of {ROOM}, {SENDERS_PER_MINUTE:.0%} of users send 1/min"
    print(f"big channel: every user, {big_rate:g} msg/s; {mix}; target {TARGET:.0%} of a core")
    print(
        "users | cores/host | hosts | bound | host cores | supervisor | Redis CPU today "
        "(presence) | Redis in today | topic subscriptions | Redis memory | "
        "Redis CPU after deltas | primaries after"
    )
    for users in (1_000_000, 10_000_000):
        for cores in (2, 8, 32):
            hosts, bound = hosts_needed(users, cores, big_rate)
            got = load(users, hosts, big_rate)
            after, primaries = after_issue_15(users, hosts, big_rate)
            print(
                f"{users:,} | {cores} | {hosts} | {bound} | {got.host_cpu:.1f} | "
                f"{got.supervisor_cpu:.0%} | {got.redis_cpu:.2f} ({got.redis_presence_cpu:.2f}) | "
                f"{got.redis_in / 1e6:.0f} MB/s | {got.subscriptions:,.0f} | "
                f"{got.redis_memory / 2**30:.1f} GiB | {after:.2f} | {primaries}"
            )
    spread, local = max_users_today(10.0), max_users_today(1.0)
    print(f"most users on one primary today: {spread:,} (each room over 10 hosts), {local:,} "
          "(each room on one host)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-rate", type=float, default=BIG_RATE)
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args()
    if args.validate:
        validation()
    else:
        table(args.big_rate)


# the validation run (docs/scaling/measure.py validate --room-rate 60 --big-rate 2 --seconds 60,
# 2026-12-02 00:05 UTC): its layout as the run printed it, and what it measured (% of a core, B/s)
VALIDATION = {"users": 3000, "hosts": 6, "room_rate": 60.0, "big_rate": 2.0, "spread": 5.007}
MEASURED = {
    "idle": {"hosts": 8.87, "redis": 1.25, "in": 176_177, "out": 1_181},
    "load": {"hosts": 29.82, "redis": 2.09, "in": 243_607, "out": 92_386},
}


def validation() -> None:
    v = VALIDATION
    users, hosts, spread = int(v["users"]), int(v["hosts"]), v["spread"]
    for phase, (big, rooms) in (("idle", (0.0, 0.0)), ("load", (v["big_rate"], v["room_rate"]))):
        got = load(users, hosts, big, rooms, spread)
        predicted = {
            "hosts": got.host_cpu * 100,
            "redis": got.redis_cpu * 100,
            "in": got.redis_in,
            "out": got.redis_out,
        }
        if phase == "idle":
            del predicted["out"]  # not modelled: replies to probes and snapshots, ~1 kB/s
        for key, value in predicted.items():
            measured = MEASURED[phase][key]
            error = 100 * (value - measured) / measured
            print(f"{phase} {key}: model {value:,.2f}, measured {measured:,.2f}, {error:+.0f} %")


if __name__ == "__main__":
    main()
