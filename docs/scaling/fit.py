"""The unit costs of docs/scaling/model.py, from the raw results in docs/scaling/results/.

    .venv/bin/python docs/scaling/fit.py

Reads the JSON that docs/scaling/measure.py printed (``message1.json``; ``idle1*.json``: users
in a room of 10; ``idle2*.json``: also in one big channel; ``subs1*.json``: channels of one
member; ``churn_snapshot*.json`` and ``churn_deltas*.json``: one host of 50,000 users, idle and
with 1 % of them reconnecting a minute, before and after presence deltas), takes medians over
repeated runs and prints each unit cost with what it came from.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def runs(prefix: str) -> list[dict[str, Any]]:
    """Every result file ``<prefix>.json`` and ``<prefix>_<n>.json``."""
    found = [RESULTS / f"{prefix}.json", *sorted(RESULTS.glob(f"{prefix}_[0-9]*.json"))]
    return [json.loads(p.read_text()) for p in found if p.exists() and p.stat().st_size]


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares: (intercept, slope)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def steps_slope(run: dict[str, Any], key: str, per: str = "users") -> float:
    """Per unit of ``per`` between the last two steps of an idle or subs run; a ``%`` figure
    (of a core) becomes microseconds per second."""
    a, b = run["steps"][-2], run["steps"][-1]
    scale = 1e4 if key.endswith("percent") else 1.0
    value_a, value_b = a[key], b[key]
    if isinstance(value_a, list):
        value_a, value_b = value_a[0], value_b[0]
    return (value_b - value_a) * scale / (b[per] - a[per])


def median_slope(prefix: str, key: str, per: str = "users") -> tuple[float, list[float]]:
    values = [steps_slope(run, key, per) for run in runs(prefix)]
    return statistics.median(values), [round(v, 2) for v in values]


def message() -> None:
    (run,) = runs("message1")
    phases = run["phases"]

    def median(channel: int, key: str, index: int | None = None) -> float:
        values = [
            p[key] if index is None else p[key][index] for p in phases if p["channel"] == channel
        ]
        return float(statistics.median(values))

    listeners = [1, 2, 4]  # channels 3, 2, 1
    channels = [3, 2, 1]
    a, b = line(listeners, [median(c, "redis_cpu_us") for c in channels])
    print(f"REDIS_PER_MESSAGE {a:.1f} us, REDIS_PER_LISTENER {b:.1f} us")
    a, b = line(listeners, [median(c, "redis_out_bytes") for c in channels])
    print(f"REDIS_OUT_PER_MESSAGE {a:.0f} B, REDIS_OUT_PER_LISTENER {b:.0f} B")
    print(f"REDIS_IN_PER_MESSAGE {median(1, 'redis_in_bytes'):.0f} B")
    # receiving hosts: (local members, CPU per message)
    points = [(10, median(2, "hosts_cpu_us", 1)), (10, median(1, "hosts_cpu_us", 1))]
    points += [(100, median(1, "hosts_cpu_us", 2)), (400, median(1, "hosts_cpu_us", 3))]
    r0, r1 = line([p[0] for p in points], [p[1] for p in points])
    print(f"RECEIVE {r0:.0f} us, ROOM_FRAME {r1:.2f} us  from {points}")
    sup = [median(2, "supervisors_cpu_us", 1)] + [
        median(1, "supervisors_cpu_us", i) for i in (1, 2, 3)
    ]
    sup_receive = statistics.median(sup)
    print(f"SUP_RECEIVE {sup_receive:.0f} us  from {sup}")
    publish = [median(c, "hosts_cpu_us", 0) - (r0 + 10 * r1) for c in channels]
    sup_publish = [median(c, "supervisors_cpu_us", 0) - sup_receive for c in channels]
    print(f"PUBLISH {statistics.median(publish):.0f} us  from {[round(p) for p in publish]}")
    print(f"SUP_PUBLISH {statistics.median(sup_publish):.0f} us")


def presence() -> None:
    room, room_all = median_slope("idle1", "redis_cpu_percent")
    big, big_all = median_slope("idle2", "redis_cpu_percent")
    sets, sets_all = median_slope("subs1", "redis_cpu_percent", "topics")
    membership = big - room  # one more membership, in a set that exists already
    per_set = sets - membership  # a subs channel: one membership and one set
    per_user = room - membership - 0.1 * per_set  # a user, its membership, a tenth of a set
    alone = [run["steps"][0]["redis_cpu_percent"] for run in runs("idle1") + runs("idle2")]
    alone += [run["steps"][0]["redis_cpu_percent"] for run in runs("subs1")]
    print(f"REDIS_BASE {statistics.median(alone):.2f} % of a core  from one host, 0 users: {alone}")
    print(f"Redis CPU slopes (us/s): user in a room {room_all}, + big {big_all}, set {sets_all}")
    print(
        f"PRESENCE_PER_USER {per_user:.3f} us, PRESENCE_PER_MEMBERSHIP {membership:.3f} us, "
        f"PRESENCE_PER_SET {per_set:.2f} us"
    )
    room, _ = median_slope("idle1", "redis_in_bytes_per_s")
    big, _ = median_slope("idle2", "redis_in_bytes_per_s")
    sets, _ = median_slope("subs1", "redis_in_bytes_per_s", "topics")
    membership = big - room
    per_set = sets - membership
    per_user = room - membership - 0.1 * per_set
    print(
        f"PRESENCE_IN_PER_USER {per_user:.1f} B, _PER_MEMBERSHIP {membership:.1f} B, "
        f"_PER_SET {per_set:.1f} B"
    )
    for key, name in (("hosts_cpu_percent", "HOST"), ("supervisors_cpu_percent", "SUP")):
        room, room_all = median_slope("idle1", key)
        big, big_all = median_slope("idle2", key)
        sets, sets_all = median_slope("subs1", key, "topics")
        print(f"{name} slopes (us/s): user in a room {room_all}, + big {big_all}, set {sets_all}")
        if name == "HOST":  # a membership's cost is below the noise here (big - room < 0)
            membership = 0.0
            per_user = (room + big) / 2 - 0.1 * sets
        else:
            membership = big - room
            per_user = room - membership - 0.1 * (sets - membership)
        print(
            f"{name}_PER_USER {per_user:.2f} us, {name}_PER_MEMBERSHIP {membership:.2f} us, "
            f"{name}_PER_SET {sets - membership:.2f} us"
        )
        intercepts = [
            run["steps"][-2][key][0] - run["steps"][-2]["users"] * steps_slope(run, key) / 1e4
            for run in runs("idle1") + runs("idle2")
        ]
        alone = [run["steps"][0][key][0] for run in runs("idle1") + runs("idle2") + runs("subs1")]
        fixed = statistics.median(alone)  # a host with no user, measured directly
        print(f"{name}_FIXED {fixed:.2f} % of a core  from the 0-user windows {alone}")
        print(f"  (intercepts of the slopes, not used: {[round(i, 2) for i in intercepts]})")
    for prefix in ("idle1", "idle2"):
        memory, values = median_slope(prefix, "used_memory")
        print(f"Redis used_memory per user ({prefix}): {memory:.0f} B  from {values}")
    memory, values = median_slope("subs1", "used_memory", "topics")
    print(f"Redis used_memory per (host, channel) subscription and set: {memory:.0f} B {values}")


# the model's fixed cost of a host (1 shard, no user: the 0-user windows above), % of a core
HOST_FIXED_PERCENT, SUP_FIXED_PERCENT = 1.43, 1.13


def churn_table(prefix: str) -> dict[str, float]:
    """Medians over the ``<prefix>*.json`` churn runs of what a host's presence costs: Redis
    traffic idle (per host-second: the heartbeat or snapshot) and per presence change (a
    reconnect is 2 changes: offline, then online), and the host's CPU."""
    found = runs(prefix)
    out: dict[str, float] = {}

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    for window in ("idle", "churn"):
        for key in (
            "redis_cpu_percent",
            "redis_commands_per_s",
            "redis_in_bytes_per_s",
            "redis_out_bytes_per_s",
        ):
            out[f"{window} {key}"] = med([run[window][key] for run in found])
        for key in ("hosts_cpu_percent", "supervisors_cpu_percent"):
            out[f"{window} {key}"] = med([run[window][key][0] for run in found])

    def rate(run: dict[str, Any]) -> float:  # presence changes per second: closes and opens
        return (run["churn"]["disconnects"] + run["churn"]["reconnects"]) / run["churn"]["seconds"]

    out["changes_per_s"] = med([rate(run) for run in found])

    def value(run: dict[str, Any], window: str, key: str) -> float:
        got = run[window][key]
        return float(got[0] if isinstance(got, list) else got)

    def per_change(key: str, scale: float = 1.0) -> list[float]:
        return [
            (value(run, "churn", key) - value(run, "idle", key)) * scale / rate(run)
            for run in found
        ]

    def show(name: str, values: list[float], unit: str) -> float:
        value = med(values)
        print(f"  {name}: {value:,.1f} {unit}  from {[round(v, 1) for v in values]}")
        return value

    print(f"{prefix}: {len(found)} run(s), {found[0]['command']}, users {found[0]['users']}")
    for window in ("idle", "churn"):
        calls = {
            name: med([run[window]["redis_commands_top"].get(name, {}).get("calls_per_s", 0.0)
                       for run in found])
            for name in ("eval", "sadd", "srem", "publish", "set")
        }  # fmt: skip
        print(f"  {window}: Redis calls/s (medians) {calls}")
    for window in ("idle", "churn"):
        parts = [f"{key.split(' ')[1]} {value:,.2f}" for key, value in out.items()
                 if key.startswith(window)]  # fmt: skip
        print(f"  {window} (medians): " + ", ".join(parts))
    users = found[0]["users"]
    idle_redis = [run["idle"]["redis_cpu_percent"] * 1e4 for run in found]
    out["redis_idle_us"] = show("Redis CPU per host-second, idle", idle_redis, "us")
    out["redis_idle_in"] = show(
        "Redis in per host-second, idle",
        [run["idle"]["redis_in_bytes_per_s"] for run in found],
        "B",
    )
    out["redis_idle_out"] = show(
        "Redis out per host-second, idle (1 listener: the host itself)",
        [run["idle"]["redis_out_bytes_per_s"] for run in found],
        "B",
    )
    out["redis_change_us"] = show(
        "Redis CPU per presence change", per_change("redis_cpu_percent", 1e4), "us"
    )
    out["redis_change_in"] = show("Redis in per change", per_change("redis_in_bytes_per_s"), "B")
    out["redis_change_out"] = show("Redis out per change", per_change("redis_out_bytes_per_s"), "B")
    out["redis_change_commands"] = show(
        "Redis commands per change", per_change("redis_commands_per_s"), ""
    )
    out["host_change_us"] = show(
        "host CPU per change (half a reconnect: close or open)",
        per_change("hosts_cpu_percent", 1e4),
        "us",
    )
    out["sup_change_us"] = show(
        "  of it in the supervisor", per_change("supervisors_cpu_percent", 1e4), "us"
    )
    per_user = [
        (run["idle"]["hosts_cpu_percent"][0] - HOST_FIXED_PERCENT) * 1e4 / users for run in found
    ]
    out["host_user_us"] = show(
        f"host CPU per user per second (idle, less the fixed {HOST_FIXED_PERCENT} %)",
        per_user,
        "us",
    )
    sup_user = [
        (run["idle"]["supervisors_cpu_percent"][0] - SUP_FIXED_PERCENT) * 1e4 / users
        for run in found
    ]
    out["sup_user_us"] = show(
        f"  of it in the supervisor (less {SUP_FIXED_PERCENT} %)", sup_user, "us"
    )
    return out


def deltas_idle() -> None:
    """The `idle` run on the deltas tree: Redis memory per user and the host's per-user slope."""
    found = runs("deltas_idle1")
    if not found:
        return
    memory, values = median_slope("deltas_idle1", "used_memory")
    print(f"deltas: Redis used_memory per user (users set; the stored snapshot is the empty one "
          f"of link-up): {memory:.0f} B  from {values}")  # fmt: skip
    for key in ("hosts_cpu_percent", "supervisors_cpu_percent", "redis_cpu_percent"):
        slope, values = median_slope("deltas_idle1", key)
        print(f"deltas: {key} slope per user, 5,000 -> 15,000 users: {slope:.2f} us  {values}")


def churn() -> None:
    """Presence's Redis traffic and host CPU, before (snapshots) and after deltas."""
    prefixes = [p for p in ("churn_snapshot", "churn_deltas", "churn_deltas_gap") if runs(p)]
    tables = {prefix: churn_table(prefix) for prefix in prefixes}
    print("medians, 1 host of 50,000 users: " + " -> ".join(prefixes))
    for key in tables[prefixes[0]]:
        if " " in key:
            print(f"  {key}: " + " -> ".join(f"{t[key]:,.2f}" for t in tables.values()))
    if "churn_deltas_gap" in tables and "churn_deltas" in tables:
        # a reconnect after 0.5 s fell between two presence pulls (no change), after 1.5 s not
        gap, same = tables["churn_deltas_gap"], tables["churn_deltas"]
        print("presence's own part of a change (the 1.5 s runs less the 0.5 s runs):")
        for key in ("redis_change_us", "redis_change_in", "redis_change_out", "host_change_us"):
            print(f"  {key}: {gap[key]:,.1f} - {same[key]:,.1f} = {gap[key] - same[key]:,.1f}")


if __name__ == "__main__":
    message()
    presence()
    deltas_idle()
    churn()
