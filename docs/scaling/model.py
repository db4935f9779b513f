"""The capacity model of docs/scaling.md: hosts, Redis load and what saturates first.

    .venv/bin/python docs/scaling/model.py              # the 1M / 10M table
    .venv/bin/python docs/scaling/model.py --validate   # against the 6-host runs

Every unit cost below was measured on the 2-core box of docs/scaling.md ("Measured inputs"),
where the commands and dates are; docs/scaling/fit.py prints them from the raw results in
docs/scaling/results/. The model only adds and multiplies them. Nothing here talks to a server.
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
HOST_FIXED = 14_300 * US  # per host per second, with no user: probes, timers, snapshot loop
SUP_FIXED = 11_300 * US
HOST_PER_USER = 2.93 * US  # per connected user per second: heartbeats, its part of the snapshot
SUP_PER_USER = 0.44 * US
HOST_PER_MEMBERSHIP = 0.0  # per (user, channel) per second: below the noise here
SUP_PER_MEMBERSHIP = 0.31 * US
HOST_PER_SET = 4.40 * US  # per channel with members on the host, per second (its snapshot)
SUP_PER_SET = 3.09 * US
PUBLISH = 478 * US  # on the host that takes a broadcast command, beyond its own delivery
SUP_PUBLISH = 487 * US
RECEIVE = 439 * US  # on every host that listens to the channel (the publisher too), per message
SUP_RECEIVE = 300 * US
ROOM_FRAME = 2.89 * US  # per local recipient of a cross-host message (messages at 200/s)
BIG_FRAME = 8.7 * US  # per recipient of a big channel (`ucc bench fanout`, 1,000 members, 20/s)
SERVER_BYTES_PER_CONN = 7_100  # RSS per connection (`ucc bench fanout`, 1,000-10,000 members)

# Redis (one primary: today every key and topic of a cluster of hosts shares one hash tag)
REDIS_BASE = 2_000 * US  # per second: its own housekeeping and one host with no user
REDIS_PER_MESSAGE = 81 * US  # per broadcast: the APPEND script (offset, stream, PUBLISH)
REDIS_PER_LISTENER = 14.6 * US  # per listening host of that broadcast
REDIS_IN_PER_MESSAGE = 1085  # bytes in per broadcast (the script's text travels with EVAL)
REDIS_OUT_PER_MESSAGE = 35  # bytes out per broadcast (the script's reply)
REDIS_OUT_PER_LISTENER = 286  # bytes out per listening host
PRESENCE_PER_USER = 0.327 * US  # Redis CPU per user per second (the snapshot script)
PRESENCE_PER_MEMBERSHIP = 0.41 * US
PRESENCE_PER_SET = 4.33 * US  # per (host, channel) member set, rewritten every second
PRESENCE_IN_PER_USER = 14.4  # bytes into Redis per second
PRESENCE_IN_PER_MEMBERSHIP = 14.0
PRESENCE_IN_PER_SET = 14.1
# used_memory: 123 B per user in a room of 10 (users set, snapshot, its membership, a tenth of
# its room's set), 177 B if also in a big channel; so, the set counted apart:
REDIS_BYTES_PER_USER = 123 - 42  # and one membership
REDIS_BYTES_PER_MEMBERSHIP = 54  # each further one
REDIS_BYTES_PER_SET = 425  # a (host, channel) topic subscription (240) and its member set

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
        + (members - users) * REDIS_BYTES_PER_MEMBERSHIP
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


# -- the validation runs (docs/scaling/measure.py validate), read from docs/scaling/results/ ------

RESULTS = Path(__file__).parent / "results"
VALIDATIONS = {
    "val1": "6 hosts x 500 users",
    "val2": "6 hosts x 1,500 users",
    "val3": "6 hosts x 3,000 users",
    "val4": "6 hosts x 10,000 users",
}


def predicted(run: dict[str, Any], phase: str) -> dict[str, float]:
    """The model's figures for one validation run's idle or load window (% of a core, B/s),
    at the rates it achieved: messages sent divided by the window's length."""
    layout = run["layout"]
    users, hosts = layout["hosts"] * layout["users_per_host"], layout["hosts"]
    seconds = run["load"]["seconds"]
    rooms, big = (run["room_messages"] / seconds, run["big_messages"] / seconds)
    if phase == "idle":
        rooms, big = 0.0, 0.0
    got = load(users, hosts, big, rooms, layout["mean_hosts_per_room"])
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
    for prefix, title in VALIDATIONS.items():
        paths = [RESULTS / f"{prefix}.json", *sorted(RESULTS.glob(f"{prefix}_*.json"))]
        found = [json.loads(path.read_text()) for path in paths if path.exists()]
        if not found:
            continue
        print(f"{title}: {len(found)} run(s), {found[0]['command']}")
        for phase in ("idle", "load"):
            for key in ("hosts", "redis", "in", "out"):
                if phase == "idle" and key == "out":
                    continue  # not modelled: replies to probes and snapshots, ~1 kB/s
                model = statistics.median(predicted(run, phase)[key] for run in found)
                values = [measured(run, phase)[key] for run in found]
                real = statistics.median(values)
                error = 100 * (model - real) / real
                shown = ", ".join(f"{v:,.2f}" for v in values)
                print(f"  {phase} {key}: model {model:,.2f}, measured {real:,.2f} ({shown}), "
                      f"error {error:+.0f} %")  # fmt: skip


if __name__ == "__main__":
    main()
