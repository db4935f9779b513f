"""actors.gather: a gather's bookkeeping, the Redis participant and the combiners."""

from __future__ import annotations

import json
from typing import Any

from actors.gather import (
    REDIS,
    Gather,
    GatherSpec,
    are_online,
    broadcast,
    is_online,
    sum_connections,
    union_users,
)
from actors.hostlink import OnlineUsers
from actors.ids import ShardIndex
from actors.wire import commands

S0, S1, S2 = ShardIndex(0), ShardIndex(1), ShardIndex(2)


def gather(*waiting: Any, args: dict[str, Any] | None = None) -> Gather:
    return Gather([b"env"], 1, union_users, 10.0, set(waiting), args=args or {})


def test_the_redis_participant_is_no_shard_index():
    assert REDIS != -1 and not isinstance(REDIS, int)
    g = gather(S0, REDIS)
    g.gave_up(REDIS)
    g.gave_up(S0)
    assert g.missing == {S0, REDIS}
    assert g.missing_shards() == [0]


def test_answers_are_kept_only_from_those_waited_for():
    g = gather(S0, S1)
    g.answered(S0, {"users": [1]})
    g.answered(S0, {"users": [2]})  # a second answer: ignored
    g.answered(S2, {"users": [3]})  # never asked
    assert g.answers == {S0: {"users": [1]}}
    assert g.waiting == {S1}


def test_giving_up_on_one_that_answered_changes_nothing():
    g = gather(S0)
    g.answered(S0, {"users": []})
    g.gave_up(S0)
    assert g.missing == set() and S0 in g.answers


def test_expiry_counts_every_silent_participant_missing():
    g = gather(S0, S1, S2, REDIS)
    g.answered(S1, {"users": []})
    g.expire()
    assert g.waiting == set()
    assert g.missing == {S0, S2, REDIS}
    assert g.missing_shards() == [0, 2]


def test_a_spec_defaults_to_no_args_and_no_other_hosts():
    spec = GatherSpec({S0}, union_users, lambda _index: {"op": "online"})
    assert spec.args == {} and spec.remote is None
    remote = GatherSpec((), union_users, lambda _i: {}, remote=OnlineUsers).remote
    assert remote is not None and remote(7) == OnlineUsers(7)


def test_union_users_merges_shards_and_the_other_hosts():
    g = gather(S0, S1, REDIS)
    g.answered(S0, {"users": [3, 1]})
    g.answered(REDIS, {"users": [1, 9]})
    assert union_users(g) == {"users": [1, 3, 9]}


def test_online_combiners_answer_for_the_users_asked():
    g = gather(S0, REDIS, args={"users": [4, 5, 6]})
    g.answered(S0, {"online": [4]})
    g.answered(REDIS, {"online": [6]})
    assert are_online(g) == {"online": {"4": True, "5": False, "6": True}}
    assert is_online(g) == {"online": True}


def test_sum_connections_counts_local_connections_and_the_hosts_told():
    g = gather(S0, REDIS)
    g.answered(S0, {"connections": 2})
    assert sum_connections(g) == {"connections": 2}
    g.answered(REDIS, {"value": 3})
    assert sum_connections(g) == {"connections": 2, "hosts": 3}


def test_sum_connections_reports_the_connections_a_subscribe_left_out_for_the_limit():
    g = gather(S0)
    g.answered(S0, {"connections": 1, "limited": 2})
    assert sum_connections(g) == {"connections": 1, "limited": 2}  # applied where it could be


def test_sum_connections_is_an_error_limit_when_no_connection_could_take_the_channel():
    g = gather(S0)
    g.answered(S0, {"connections": 0, "limited": 2})
    result = sum_connections(g)
    assert result["ok"] is False
    assert result["error"]["code"] == "limit"
    assert "2 connection" in result["error"]["message"]
    assert result["limited"] == 2
    # as the router sends it: its keys override the reply's ``ok: true``
    reply = json.loads(commands.reply(9, result))
    assert (reply["id"], reply["ok"], reply["error"]["code"]) == (9, False, "limit")


def test_sum_connections_is_no_error_when_another_host_was_told_or_nobody_is_online():
    g = gather(S0, REDIS)
    g.answered(S0, {"connections": 0, "limited": 1})
    g.answered(REDIS, {"value": 1})  # the other host may have applied it
    assert sum_connections(g) == {"connections": 0, "limited": 1, "hosts": 1}
    g = gather(S0)
    g.answered(S0, {"connections": 0})  # the user is not online here: nothing was limited
    assert sum_connections(g) == {"connections": 0}


def test_broadcast():
    assert broadcast(gather(args={"shards": 2})) == {"shards": 2}
