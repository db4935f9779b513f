"""Scatter/gather: a query in flight to some shards (and the Redis link), and how the answers
combine into one reply.

Owns: :class:`Gather` and the combiners, pure functions from the answers received to the reply's
fields. Must never send anything or read a clock: the RouterCore starts, feeds and finishes
gathers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.ids import ShardIndex

Combiner = Callable[["Gather"], dict[str, Any]]
REDIS = ShardIndex(-1)  # the Redis link, as a participant in gathers
RedisOp = tuple[Any, ...]  # (operation, gather id or 0, arguments...)


@dataclass(slots=True)
class Gather:
    """A query sent to some shards, waiting for their answers until ``deadline``."""

    envelope: list[bytes] | None  # None: an internal gather (a presence snapshot)
    request: Any
    combine: Combiner
    deadline: float
    waiting: set[ShardIndex]
    answers: dict[ShardIndex, Any] = field(default_factory=dict)
    missing: set[ShardIndex] = field(default_factory=set)
    args: dict[str, Any] = field(default_factory=dict)
    redis: bool = False  # the Redis link takes part


def union_users(gather: Gather) -> dict[str, Any]:
    users: set[int] = set()
    for answer in gather.answers.values():
        users.update(answer["users"])
    return {"users": sorted(users)}


def _online_set(gather: Gather) -> set[int]:
    online: set[int] = set()
    for answer in gather.answers.values():
        online.update(answer["online"])
    return online


def is_online(gather: Gather) -> dict[str, Any]:
    return {"online": gather.args["users"][0] in _online_set(gather)}


def are_online(gather: Gather) -> dict[str, Any]:
    online = _online_set(gather)
    return {"online": {str(user): user in online for user in gather.args["users"]}}


def broadcast(gather: Gather) -> dict[str, Any]:
    return {"shards": gather.args["shards"]}


def presence_snapshot(gather: Gather) -> dict[str, Any]:
    users: list[int] = []
    channels: dict[str, list[int]] = {}
    for answer in gather.answers.values():
        users += answer["users"]
        for channel, members in answer["channels"].items():
            channels.setdefault(channel, []).extend(members)
    return {"users": users, "channels": channels}


def sum_connections(gather: Gather) -> dict[str, Any]:
    local = sum(a["connections"] for i, a in gather.answers.items() if i != REDIS)
    result: dict[str, Any] = {"connections": local}
    if REDIS in gather.answers:  # how many other hosts have the user and were told
        result["hosts"] = gather.answers[REDIS]["value"]
    return result
