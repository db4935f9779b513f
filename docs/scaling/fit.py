"""The unit costs of docs/scaling/model.py, from the raw results in docs/scaling/results/.

    .venv/bin/python docs/scaling/fit.py

Reads the JSON that docs/scaling/measure.py printed (``message1.json``; ``idle1*.json``: users
in a room of 10; ``idle2*.json``: also in one big channel; ``subs1*.json``: channels of one
member), takes medians over repeated runs and prints each unit cost with what it came from.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def runs(prefix: str) -> list[dict[str, Any]]:
    """Every result file ``<prefix>.json`` and ``<prefix>_<n>.json``."""
    found = [RESULTS / f"{prefix}.json", *sorted(RESULTS.glob(f"{prefix}_*.json"))]
    return [json.loads(path.read_text()) for path in found if path.exists()]


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


if __name__ == "__main__":
    message()
    presence()
