"""Scatter/gather: a query in flight to some shards (and the Redis link), and how the answers
combine into one reply.

Owns: :class:`GatherSpec` (what a command asks, and of whom), :class:`Gather` (one query in
flight), the participant :data:`REDIS`, and the combiners, pure functions from the answers
received to the reply's fields. Must never send anything or read a clock: the RouterCore starts,
feeds and finishes gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from actors.hostlink import PresenceQuery, RedisOp
from actors.ids import ShardIndex
from actors.wire import shardwire

Combiner = Callable[["Gather"], dict[str, Any]]


class Redis(Enum):
    """The Redis link as a participant in gathers: it brings the other hosts' part of an answer.
    An enum member, so that it can never be mistaken for a shard's index."""

    LINK = "redis"


REDIS = Redis.LINK
Participant = ShardIndex | Redis  # who a gather waits for


@dataclass(frozen=True, slots=True)
class GatherSpec:
    """What a command asks, and of whom: built by a command's handler, started by the core.

    ``query(index)`` is the query sent to shard ``index`` (a ``shardwire.Query``);
    ``args`` are the command's arguments the combiner needs; ``remote(qid)``, in a cluster of
    hosts, is the operation that asks the other hosts (through the Redis link) for their part.
    """

    shards: Collection[ShardIndex]
    combine: Combiner
    query: Callable[[ShardIndex], shardwire.Query] | None  # None: no shard is asked
    args: Mapping[str, Any] = field(default_factory=dict)
    remote: Callable[[int], RedisOp | PresenceQuery] | None = None


@dataclass(slots=True)
class Gather:
    """A query sent to some participants, waiting for their answers until ``deadline``."""

    envelope: list[bytes] | None  # None: an internal gather (a presence pull)
    request: Any
    combine: Combiner
    deadline: float
    waiting: set[Participant]
    answers: dict[Participant, Any] = field(default_factory=dict)
    missing: set[Participant] = field(default_factory=set)
    args: Mapping[str, Any] = field(default_factory=dict)
    redis: bool = False  # the Redis link takes part (the reply says whether it answered)
    # the other hosts' part is there but may be incomplete (presence replicas syncing): the
    # reply says ``cluster: false`` with this as its ``cluster_error``
    cluster_error: str | None = None
    qid: int = 0  # its id in the core's gathers in flight
    command: str | None = None  # the command it answers, timed from ``started`` to its reply
    started: float = 0.0

    def answered(self, who: Participant, body: Any) -> None:
        """``who``'s answer (ignored if it was not waited for: late or unknown)."""
        if who in self.waiting:
            self.waiting.discard(who)
            self.answers[who] = body

    def gave_up(self, who: Participant) -> None:
        """``who`` will not answer (down, unreachable): the reply names it missing."""
        if who in self.waiting:
            self.waiting.discard(who)
            self.missing.add(who)

    def expire(self) -> None:
        """The deadline passed (or the router stops): whoever has not answered is missing."""
        self.missing |= self.waiting
        self.waiting.clear()

    def missing_shards(self) -> list[int]:
        return sorted(i for i in self.missing if not isinstance(i, Redis))


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
    """A broadcast's reply: what its handler put in ``args`` (``shards``, and more)."""
    return dict(gather.args)


def sum_connections(gather: Gather) -> dict[str, Any]:
    """subscribe, unsubscribe, disconnect: ``connections`` the command reached here, ``hosts``
    the other hosts told. A subscribe is applied to each connection that may hold one more
    channel (``--max-channels-per-connection``); ``limited`` counts those it was not (present
    only when some were). When it reached no connection at all because of the limit (none
    here took it, and no other host was told), the reply is an error ``limit`` (``ok: false``:
    its keys override the reply's)."""
    local = limited = 0
    for who, answer in gather.answers.items():
        if who is not REDIS:
            local += answer["connections"]
            limited += answer.get("limited", 0)
    result: dict[str, Any] = {"connections": local}
    if limited:
        result["limited"] = limited
    if REDIS in gather.answers:  # how many other hosts have the user and were told
        result["hosts"] = gather.answers[REDIS]["value"]
    if limited and not local and not result.get("hosts"):
        message = (
            f"not subscribed: each of the user's {limited} connection(s) holds the most "
            "channels a connection may (--max-channels-per-connection)"
        )
        return {"ok": False, "error": {"code": "limit", "message": message}, **result}
    return result
