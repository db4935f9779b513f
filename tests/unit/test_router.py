"""actors.router: RouterCore routing, shard liveness and scatter/gather, message by message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.credit import WindowLimits
from actors.history import HistoryStore
from actors.ids import stable_hash
from actors.router import (
    HANG_MARGIN,
    HOUSEKEEPING,
    RETRY_TICK,
    SHARD_CACHE,
    RouterCore,
    ShardEvent,
    ShardHung,
    ShardState,
    UserBanned,
)
from actors.wire import frames, shardwire
from actors.wire.commands import COMMANDS, Field

ENV = [b"backend-1"]
N = 3


def pid_of(index: int, epoch: int) -> int:
    return 1000 + 10 * index + epoch


def start(core: RouterCore, index: int, epoch: int = 1, channels=(), now: float = 0.0) -> None:
    """What the supervisor and the shard do: starting, then the shard's hello."""
    core.shard_starting(index, epoch, pid_of(index, epoch))
    hello(core, index, epoch, channels, now)


def hello(core: RouterCore, index: int, epoch: int, channels=(), now: float = 0.0) -> None:
    msg = shardwire.hello(index, epoch, pid_of(index, epoch), list(channels))
    core.shard_message(shardwire.identity(index, epoch), msg, now)


def delta(core, index, epoch, gained=(), lost=(), now=0.0, seq=1) -> None:
    """A shard's membership change; the router's confirmation (INDEXED, if any: a stale
    delta has none) is taken from the outbox (test_a_membership_change_is_confirmed_to_its_shard
    checks it): call it only with nothing else there."""
    msg = shardwire.delta(gained, lost, seq)
    core.shard_message(shardwire.identity(index, epoch), msg, now)
    assert {m[0] for _who, m in core.take_outbox()} <= {shardwire.INDEXED}


def heartbeat(core, index, epoch, now) -> None:
    core.shard_message(shardwire.identity(index, epoch), [shardwire.PULSE], now)


def answer(core, index, epoch, qid, body, now=0.0) -> None:
    core.shard_message(shardwire.identity(index, epoch), shardwire.result(qid, body), now)


def command(core: RouterCore, body: Any, now: float = 0.0, envelope=ENV) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    core.command(envelope, data, now)


def take_replies(core: RouterCore) -> list[dict[str, Any]]:
    return [json.loads(payload) for _envelope, payload in core.take_replies()]


def take_reply(core: RouterCore) -> dict[str, Any]:
    replies = take_replies(core)
    assert len(replies) == 1, replies
    return replies[0]


def take_queries(core: RouterCore) -> dict[int, tuple[int, dict[str, Any]]]:
    """Queries in the outbox: shard index -> (query id, body)."""
    queries = {}
    for identity, msg in core.take_outbox():
        assert msg[0] == shardwire.QUERY
        index, _epoch = shardwire.parse_identity(identity)
        assert index not in queries
        queries[index] = (shardwire.unpack_id(msg[1]), json.loads(msg[2]))
    return queries


@pytest.fixture
def core() -> RouterCore:
    core = RouterCore(N, gather_timeout=1.0)
    for index in range(N):
        start(core, index)
    core.take_outbox()
    core.take_events()
    return core


def user_on(shard: int, shards: int = N, exclude=()) -> int:
    return next(u for u in range(1, 10_000) if stable_hash(u, shards) == shard and u not in exclude)


# -- shard lifecycle --------------------------------------------------------------------------


def test_slots_start_down():
    core = RouterCore(2)
    assert [slot.state for slot in core.slots] == [ShardState.DOWN, ShardState.DOWN]
    assert core.up_shards() == []


def test_starting_then_hello_brings_a_shard_up():
    core = RouterCore(2)
    core.shard_starting(1, 4, 555)
    slot = core.slots[1]
    assert (slot.state, slot.epoch, slot.pid) == (ShardState.STARTING, 4, 555)
    assert core.up_shards() == []
    core.shard_message(shardwire.identity(1, 4), shardwire.hello(1, 4, 556, [8, 9]), now=3.0)
    assert (slot.state, slot.epoch, slot.pid, slot.last_seen) == (ShardState.UP, 4, 556, 3.0)
    assert core.up_shards() == [slot]
    assert core.index == {8: {1}, 9: {1}}
    assert core.take_events() == [ShardEvent(1, ShardState.UP, 4, 556)]
    assert slot.identity == b"shard-1-4"


def test_shard_down_forgets_channels(core):
    delta(core, 0, 1, gained=[5])
    delta(core, 1, 1, gained=[5, 6])
    core.shard_down(1, 1, now=2.0)
    assert core.slots[1].state is ShardState.DOWN
    assert core.slots[1].channels == set()
    assert core.index == {5: {0}}
    assert [slot.index for slot in core.up_shards()] == [0, 2]
    core.shard_down(1, 1, now=3.0)  # already down: harmless
    assert core.slots[1].state is ShardState.DOWN


def test_shard_down_of_another_epoch_is_ignored(core):
    core.shard_down(0, 0, now=1.0)
    core.shard_down(0, 2, now=1.0)
    assert core.slots[0].state is ShardState.UP
    assert core.take_events() == []


def test_shard_starting_an_older_epoch_is_ignored(core):
    delta(core, 0, 1, gained=[5])
    core.shard_starting(0, 1, 9)
    core.shard_starting(0, 0, 9)
    assert core.slots[0].state is ShardState.UP
    assert core.index == {5: {0}}


def test_restart_drops_the_old_incarnations_channels(core):
    delta(core, 0, 1, gained=[5, 6])
    delta(core, 1, 1, gained=[5])
    core.shard_starting(0, 2, 77)
    assert core.index == {5: {1}}
    assert core.slots[0].state is ShardState.STARTING
    hello(core, 0, 2, channels=[6])
    assert core.index == {5: {1}, 6: {0}}


def test_hello_without_starting_is_accepted_for_a_newer_epoch():
    core = RouterCore(1)
    hello(core, 0, 3, channels=[1])
    assert core.slots[0].state is ShardState.UP
    assert core.slots[0].epoch == 3


# -- stale messages ---------------------------------------------------------------------------


def test_messages_from_an_old_epoch_are_ignored(core):
    core.shard_starting(0, 2, 77)
    hello(core, 0, 2, channels=[1])
    delta(core, 0, 1, gained=[9])  # the old incarnation's last words
    assert 9 not in core.index
    assert core.counters["stale_messages"] == 1
    hello(core, 0, 1, channels=[9])  # an old hello too
    assert core.slots[0].epoch == 2
    assert core.index == {1: {0}}
    assert core.counters["stale_messages"] == 2


def test_messages_before_hello_are_ignored():
    core = RouterCore(1)
    core.shard_starting(0, 1, 5)
    delta(core, 0, 1, gained=[9])
    assert core.index == {}
    assert core.counters["stale_messages"] == 1


@pytest.mark.parametrize(
    ("sender", "msg"),
    [
        (b"backend", [shardwire.PULSE]),
        (b"shard-7-1", [shardwire.PULSE]),  # no such shard
        (b"shard-0-1", []),
    ],
)
def test_unknown_senders_are_counted_as_stale(core, sender, msg):
    core.shard_message(sender, msg, now=1.0)
    assert core.counters["stale_messages"] == 1


def test_hello_of_an_incarnation_already_reported_dead_is_ignored():
    """The shard said hello and died at once; the supervisor's ShardDown reached the router
    before the hello was drained from the socket. The dead incarnation must stay down."""
    core = RouterCore(1)
    core.shard_starting(0, 1, 5)
    core.shard_down(0, 1, now=1.0)
    hello(core, 0, 1, channels=[4], now=1.5)
    assert core.slots[0].state is ShardState.DOWN
    assert core.index == {}
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 4, "data": 1})
    assert take_reply(core)["shards"] == 0
    assert core.take_outbox() == []


def test_result_from_an_old_epoch_is_ignored(core):
    command(core, {"id": 1, "cmd": "get_online_users"}, now=0.0)
    queries = take_queries(core)
    core.shard_starting(0, 2, 77)  # shard 0 restarts mid-gather: it will not answer
    hello(core, 0, 2)
    answer(core, 0, 1, queries[0][0], {"users": [1]})
    assert core.counters["stale_messages"] == 1
    answer(core, 1, 1, queries[1][0], {"users": [2]})
    answer(core, 2, 1, queries[2][0], {"users": [3]})
    assert take_reply(core) == {"id": 1, "ok": True, "users": [2, 3], "missing_shards": [0]}


# -- deltas and the channel index -------------------------------------------------------------


def test_deltas_maintain_the_channel_index(core):
    delta(core, 0, 1, gained=[5, 6])
    delta(core, 2, 1, gained=[5])
    assert core.index == {5: {0, 2}, 6: {0}}
    delta(core, 0, 1, lost=[5])
    assert core.index == {5: {2}, 6: {0}}
    delta(core, 2, 1, lost=[5, 77])  # unknown channels are harmless
    assert core.index == {6: {0}}
    assert core.slots[0].channels == {6}
    assert core.slots[2].channels == set()


# -- broadcasts -------------------------------------------------------------------------------


def test_channel_broadcast_goes_only_to_shards_holding_members(core):
    delta(core, 0, 1, gained=[5])
    delta(core, 2, 1, gained=[5, 6])
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 5, "data": {"t": "hi"}})
    assert take_reply(core) == {"id": 1, "ok": True, "shards": 2}
    frame = frames.channel_message(5, b'{"t":"hi"}')
    assert sorted(core.take_outbox()) == [
        (b"shard-0-1", [shardwire.CHANNEL, shardwire.pack_id(5), frame]),
        (b"shard-2-1", [shardwire.CHANNEL, shardwire.pack_id(5), frame]),
    ]


def test_channel_broadcast_to_an_empty_channel(core):
    command(core, {"id": 2, "cmd": "broadcast_to_channel", "channel": 42, "data": None})
    assert take_reply(core) == {"id": 2, "ok": True, "shards": 0}
    assert core.take_outbox() == []


def test_channel_broadcast_skips_a_shard_that_went_down(core):
    delta(core, 0, 1, gained=[5])
    delta(core, 1, 1, gained=[5])
    core.shard_down(0, 1, now=1.0)
    command(core, {"cmd": "broadcast_to_channel", "channel": 5, "data": 1})
    assert take_reply(core)["shards"] == 1
    assert [identity for identity, _msg in core.take_outbox()] == [b"shard-1-1"]


@pytest.mark.parametrize("shard", range(N))
def test_user_broadcast_goes_to_the_users_shard(core, shard):
    user = user_on(shard)
    command(core, {"id": 3, "cmd": "broadcast_to_user", "user": user, "data": [1, "é"]})
    assert take_reply(core) == {"id": 3, "ok": True, "shards": 1}
    frame = frames.direct_message('[1,"é"]'.encode())
    assert core.take_outbox() == [
        (shardwire.identity(shard, 1), [shardwire.USERS, shardwire.pack_ids([user]), frame])
    ]


def test_user_broadcast_to_a_down_shard_is_not_sent(core):
    user = user_on(1)
    core.shard_down(1, 1, now=0.0)
    command(core, {"id": 4, "cmd": "broadcast_to_user", "user": user, "data": 1})
    assert take_reply(core) == {"id": 4, "ok": True, "shards": 0}
    assert core.take_outbox() == []


def test_users_broadcast_is_grouped_by_shard(core):
    a0 = user_on(0)
    b0 = user_on(0, exclude=(a0,))
    a2 = user_on(2)
    command(core, {"cmd": "broadcast_to_users", "users": [a0, a2, b0, a0], "data": "x"})
    assert take_reply(core)["shards"] == 2
    outbox = core.take_outbox()
    sent = {
        shardwire.parse_identity(identity)[0]: shardwire.unpack_ids(msg[1])
        for identity, msg in outbox
    }
    assert sent == {0: [a0, b0], 2: [a2]}
    assert all(msg[0] == shardwire.USERS for _identity, msg in outbox)
    assert all(msg[2] == frames.direct_message(b'"x"') for _identity, msg in outbox)


def test_broadcast_to_users_counts_only_up_shards(core):
    core.shard_down(2, 1, now=0.0)
    command(core, {"cmd": "broadcast_to_users", "users": [user_on(0), user_on(2)], "data": 0})
    assert take_reply(core)["shards"] == 1
    assert [shardwire.parse_identity(i)[0] for i, _m in core.take_outbox()] == [0]


# -- scatter / gather -------------------------------------------------------------------------


def test_gather_completes_when_all_shards_answer(core):
    command(core, {"id": "q", "cmd": "get_online_users"}, now=10.0)
    queries = take_queries(core)
    assert set(queries) == {0, 1, 2}
    assert all(body == {"op": "online"} for _qid, body in queries.values())
    assert core.next_deadline() == 11.0
    answer(core, 0, 1, queries[0][0], {"users": [5, 1]})
    answer(core, 2, 1, queries[2][0], {"users": [9]})
    assert core.take_replies() == []
    answer(core, 1, 1, queries[1][0], {"users": []})
    assert take_reply(core) == {"id": "q", "ok": True, "users": [1, 5, 9], "missing_shards": []}
    assert core.pending == {}
    assert core.next_deadline() is None


def test_gather_deadline_gives_a_partial_result(core):
    command(core, {"id": 1, "cmd": "get_online_users"}, now=10.0)
    queries = take_queries(core)
    answer(core, 1, 1, queries[1][0], {"users": [4]})
    core.tick(10.5)
    assert core.take_replies() == []
    core.tick(11.0)
    assert take_reply(core) == {"id": 1, "ok": True, "users": [4], "missing_shards": [0, 2]}
    # a late answer is dropped: no second reply
    answer(core, 0, 1, queries[0][0], {"users": [1]})
    assert core.take_replies() == []
    assert core.pending == {}


def test_shard_going_down_mid_gather_is_missing(core):
    command(core, {"id": 1, "cmd": "get_online_users"}, now=0.0)
    queries = take_queries(core)
    answer(core, 0, 1, queries[0][0], {"users": [1]})
    answer(core, 2, 1, queries[2][0], {"users": [3]})
    core.shard_down(1, 1, now=0.2)
    assert take_reply(core) == {"id": 1, "ok": True, "users": [1, 3], "missing_shards": [1]}


def test_gather_with_every_shard_down_answers_at_once():
    core = RouterCore(2)
    command(core, {"id": 1, "cmd": "get_online_users"}, now=0.0)
    assert take_reply(core) == {"id": 1, "ok": True, "users": [], "missing_shards": [0, 1]}
    assert core.take_outbox() == []
    assert core.pending == {}


def test_online_users_in_channel_asks_only_member_shards(core):
    delta(core, 1, 1, gained=[5])
    delta(core, 2, 1, gained=[5])
    command(core, {"id": 1, "cmd": "get_online_users_in_channel", "channel": 5})
    queries = take_queries(core)
    assert set(queries) == {1, 2}
    assert queries[1][1] == {"op": "online_channel", "channel": 5}
    answer(core, 1, 1, queries[1][0], {"users": [7]})
    answer(core, 2, 1, queries[2][0], {"users": [3, 7]})
    assert take_reply(core) == {"id": 1, "ok": True, "users": [3, 7], "missing_shards": []}


def test_online_users_in_an_empty_channel(core):
    command(core, {"id": 1, "cmd": "get_online_users_in_channel", "channel": 5})
    assert core.take_outbox() == []
    assert take_reply(core) == {"id": 1, "ok": True, "users": [], "missing_shards": []}


def test_is_user_online(core):
    user = user_on(2)
    command(core, {"id": 1, "cmd": "is_user_online", "user": user})
    queries = take_queries(core)
    assert list(queries) == [2]
    qid, body = queries[2]
    assert body == {"op": "are_online", "users": [user]}
    answer(core, 2, 1, qid, {"online": [user]})
    assert take_reply(core) == {"id": 1, "ok": True, "online": True, "missing_shards": []}

    command(core, {"id": 2, "cmd": "is_user_online", "user": user})
    qid, _body = take_queries(core)[2]
    answer(core, 2, 1, qid, {"online": []})
    assert take_reply(core) == {"id": 2, "ok": True, "online": False, "missing_shards": []}


def test_user_of_a_down_shard_is_offline_not_an_error(core):
    user = user_on(1)
    core.shard_down(1, 1, now=0.0)
    command(core, {"id": 1, "cmd": "is_user_online", "user": user})
    assert core.take_outbox() == []
    assert take_reply(core) == {"id": 1, "ok": True, "online": False, "missing_shards": [1]}


def test_are_users_online(core):
    a, b, c = user_on(0), user_on(1), user_on(2)
    core.shard_down(2, 1, now=0.0)
    command(core, {"id": 1, "cmd": "are_users_online", "users": [a, b, c, a]})
    queries = take_queries(core)
    assert set(queries) == {0, 1}
    assert queries[0][1] == {"op": "are_online", "users": [a]}
    assert queries[1][1] == {"op": "are_online", "users": [b]}
    answer(core, 0, 1, queries[0][0], {"online": [a]})
    answer(core, 1, 1, queries[1][0], {"online": []})
    assert take_reply(core) == {
        "id": 1,
        "ok": True,
        "online": {str(a): True, str(b): False, str(c): False},
        "missing_shards": [2],
    }


@pytest.mark.parametrize("name", ["subscribe", "unsubscribe"])
def test_subscribe_goes_to_the_users_shard(core, name):
    user = user_on(1)
    command(core, {"id": 1, "cmd": name, "user": user, "channel": 8})
    queries = take_queries(core)
    assert list(queries) == [1]
    qid, body = queries[1]
    assert body == {"op": name, "user": user, "channel": 8}
    answer(core, 1, 1, qid, {"connections": 2})
    assert take_reply(core) == {"id": 1, "ok": True, "connections": 2, "missing_shards": []}


def test_disconnect_goes_to_the_users_shard(core):
    user = user_on(0)
    command(core, {"id": 1, "cmd": "disconnect", "user": user})
    qid, body = take_queries(core)[0]
    assert body == {"op": "disconnect", "user": user}
    answer(core, 0, 1, qid, {"connections": 3})
    assert take_reply(core)["connections"] == 3


def test_disconnect_with_a_ban_bans_the_user_here_and_says_so(core):
    user = user_on(0)
    command(core, {"id": 1, "cmd": "disconnect", "user": user, "ban": 2.5})
    assert core.take_events() == [UserBanned(user, 2.5)]  # for the supervisor's acceptor
    qid, body = take_queries(core)[0]
    assert body == {"op": "disconnect", "user": user}  # the shard closes as without a ban
    answer(core, 0, 1, qid, {"connections": 3})
    assert take_reply(core) == {
        "id": 1,
        "ok": True,
        "connections": 3,
        "banned": 2.5,
        "missing_shards": [],
    }


def test_a_bad_ban_bans_nobody(core):
    command(core, {"id": 1, "cmd": "disconnect", "user": user_on(0), "ban": -1})
    assert take_reply(core)["error"]["code"] == "bad_request"
    assert core.take_events() == []


def test_subscribe_for_a_down_shard(core):
    user = user_on(2)
    core.shard_down(2, 1, now=0.0)
    command(core, {"id": 1, "cmd": "subscribe", "user": user, "channel": 8})
    assert take_reply(core) == {"id": 1, "ok": True, "connections": 0, "missing_shards": [2]}


def test_concurrent_gathers_are_kept_apart(core):
    command(core, {"id": "a", "cmd": "is_user_online", "user": user_on(0)}, now=0.0)
    qa = take_queries(core)[0][0]
    command(core, {"id": "b", "cmd": "is_user_online", "user": user_on(0)}, now=0.5)
    qb = take_queries(core)[0][0]
    assert qa != qb
    answer(core, 0, 1, qb, {"online": []})
    assert take_reply(core)["id"] == "b"
    core.tick(1.0)
    assert take_reply(core) == {"id": "a", "ok": True, "online": False, "missing_shards": [0]}


def test_gather_reply_keeps_the_envelope(core):
    command(core, {"id": 1, "cmd": "get_online_users"}, envelope=[b"peer", b""])
    for qid, _body in take_queries(core).values():
        for index in range(N):
            answer(core, index, 1, qid, {"users": []})
    assert [envelope for envelope, _payload in core.take_replies()] == [[b"peer", b""]]


def test_close_all_answers_everything_in_flight(core):
    command(core, {"id": 1, "cmd": "get_online_users"})
    command(core, {"id": 2, "cmd": "is_user_online", "user": user_on(1)})
    core.close_all()
    replies = take_replies(core)
    assert [r["id"] for r in replies] == [1, 2]
    assert replies[0]["missing_shards"] == [0, 1, 2]
    assert replies[1]["missing_shards"] == [1]
    assert core.pending == {}


# -- status -----------------------------------------------------------------------------------


def test_status_rows():
    core = RouterCore(4)
    start(core, 0, epoch=2, channels=[5])
    start(core, 1, epoch=1)
    start(core, 3, epoch=1)
    core.shard_down(3, 1, now=0.0)
    command(core, {"id": "s", "cmd": "status"}, now=0.0)
    queries = take_queries(core)
    assert set(queries) == {0, 1}
    assert queries[0][1] == {"op": "status"}
    row0 = {"pid": 4242, "connections": 3, "users": 2, "channels": 1}
    answer(core, 0, 2, queries[0][0], row0)
    core.tick(1.0)  # shard 1 does not answer
    reply = take_reply(core)
    assert reply["ok"] is True
    assert reply["missing_shards"] == [1, 2, 3]
    assert reply["channels_indexed"] == 1
    empty = {"connections": 0, "users": 0, "channels": 0}
    assert reply["shards"] == [
        {"index": 0, "epoch": 2, "state": "up", **row0},
        {"index": 1, "pid": pid_of(1, 1), "epoch": 1, "state": "unresponsive", **empty},
        {"index": 2, "pid": 0, "epoch": -1, "state": "down", **empty},
        {"index": 3, "pid": pid_of(3, 1), "epoch": 1, "state": "down", **empty},
    ]


def test_status_of_a_starting_shard():
    core = RouterCore(1)
    core.shard_starting(0, 1, 99)
    command(core, {"id": 1, "cmd": "status"})
    row = take_reply(core)["shards"][0]
    assert (row["state"], row["pid"], row["epoch"]) == ("starting", 99, 1)


# -- liveness (hung shards) -------------------------------------------------------------------


def test_check_hung_declares_silent_shards_down(core):
    core.shard_starting(2, 2, 50)  # starting shards are not "silent": they are not up
    heartbeat(core, 1, 1, now=8.0)
    assert core.slots[1].last_seen == 8.0
    assert core.check_hung(now=10.0, timeout=10.0) == []
    assert core.take_events() == []
    hung = core.check_hung(now=10.5, timeout=10.0)
    assert [s.index for s in hung] == [0]
    assert core.slots[0].state is ShardState.DOWN
    assert core.take_events() == [ShardHung(0, 1, pid_of(0, 1))]
    assert [s.index for s in core.check_hung(now=18.5, timeout=10.0)] == [1]
    assert core.check_hung(now=100.0, timeout=10.0) == []  # already down: reported once
    assert core.take_events() == [ShardHung(1, 1, pid_of(1, 1))]


def test_the_next_tick_comes_when_something_is_due(core):
    # every shard last heard at 0.0: the check that finds the first one hung
    assert core.next_tick(0.0, hang_timeout=0.5) == 0.5 + HANG_MARGIN
    for index in range(N):
        heartbeat(core, index, 1, now=10.0)
    assert core.next_tick(10.0, hang_timeout=5.0) == 10.0 + HOUSEKEEPING  # nothing else due
    heartbeat(core, 1, 1, now=10.5)  # heard again: its deadline moves on, the others' do not
    assert core.next_tick(10.5, hang_timeout=0.25) == 10.25 + HANG_MARGIN
    core.shard_down(0, 1, now=10.5)
    core.shard_down(2, 1, now=10.5)  # a shard that is not up has no hang deadline
    assert core.next_tick(10.5, hang_timeout=0.25) == 10.75 + HANG_MARGIN
    command(core, {"id": 1, "cmd": "get_online_users"}, now=10.5)  # a gather's deadline
    assert core.next_tick(10.5, hang_timeout=5.0) == 11.5
    core.check_hung(now=20.0, timeout=5.0)  # none up: no hang deadline, and the gather is over
    assert core.next_tick(20.0, hang_timeout=5.0) == 20.0 + HOUSEKEEPING
    core.guarantees.undelivered(1, [shardwire.CRITICAL, b""])  # to retry: ticks come often
    assert core.next_tick(20.0, hang_timeout=5.0) == 20.0 + RETRY_TICK


def test_a_hung_shard_is_missing_from_gathers_in_flight(core):
    command(core, {"id": 1, "cmd": "get_online_users"}, now=5.0)
    queries = take_queries(core)
    answer(core, 0, 1, queries[0][0], {"users": [1]}, now=5.1)
    answer(core, 1, 1, queries[1][0], {"users": [2]}, now=5.1)
    core.check_hung(now=5.2, timeout=5.0)  # shard 2: silent since 0.0
    assert take_reply(core) == {"id": 1, "ok": True, "users": [1, 2], "missing_shards": [2]}


def test_any_message_counts_as_a_sign_of_life(core):
    delta(core, 0, 1, gained=[1], now=7.0)
    assert core.slots[0].last_seen == 7.0
    heartbeat(core, 0, 0, now=9.0)  # but not one from another incarnation
    assert core.slots[0].last_seen == 7.0


# -- errors -----------------------------------------------------------------------------------


def error_code(core: RouterCore) -> tuple[Any, str]:
    reply = take_reply(core)
    assert reply["ok"] is False
    assert isinstance(reply["error"]["message"], str)
    return reply["id"], reply["error"]["code"]


@pytest.mark.parametrize("data", [b"{nope", b"\xff\xfe", b"[1, 2]", b'"cmd"'])
def test_bad_json_reply(core, data):
    command(core, data)
    assert error_code(core) == (None, "bad_json")
    assert (core.counters["commands"], core.counters["errors"]) == (1, 1)


def test_unknown_command_reply_carries_the_id(core):
    command(core, {"id": 12, "cmd": "frobnicate"})
    assert error_code(core) == (12, "unknown_command")
    assert core.take_outbox() == []


@pytest.mark.parametrize(
    "body",
    [
        {"id": 5, "cmd": "broadcast_to_channel", "channel": "5", "data": 1},
        {"id": 5, "cmd": "broadcast_to_channel", "channel": 5},
        {"id": 5, "cmd": "is_user_online", "user": True},
        {"id": 5, "cmd": "are_users_online", "users": 3},
        {"id": 5, "cmd": "subscribe", "user": 1, "channel": 0},
        {"id": 5, "cmd": 7},
    ],
)
def test_wrong_types_reply_bad_request(core, body):
    command(core, body)
    assert error_code(core) == (5, "bad_request")
    assert core.take_outbox() == []
    assert core.pending == {}


def test_too_large_reply():
    core = RouterCore(1, max_command=64)
    start(core, 0)
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 1, "data": "x" * 100})
    assert error_code(core) == (None, "too_large")
    assert core.take_outbox() == []


def test_frame_over_the_limit_is_refused():
    # the command fits, but the frame the clients would receive does not
    # (1e9 is re-encoded as 1000000000.0: the frame is much larger than the command)
    core = RouterCore(1, max_command=200)
    start(core, 0, channels=[1])
    body = b'{"cmd":"broadcast_to_channel","channel":1,"data":[%b]}' % b",".join([b"1e9"] * 20)
    assert len(body) <= 200
    command(core, body)
    assert error_code(core)[1] == "too_large"
    assert core.take_outbox() == []


def test_commands_are_counted(core):
    command(core, {"cmd": "broadcast_to_channel", "channel": 1, "data": 1})
    command(core, {"cmd": "nope"})
    assert core.counters["commands"] == 2
    assert core.counters["errors"] == 1


def test_every_command_is_dispatched():
    core = RouterCore(N, history=HistoryStore(64, 300.0, 1 << 20))
    sample = {Field.ID: 1, Field.IDS: [1, 2], Field.DATA: None, Field.FLAG: True}
    for name, spec in COMMANDS.items():
        body = {"id": name, "cmd": name, **{key: sample[kind] for key, kind in spec.items()}}
        command(core, body)
    core.close_all()
    replies = take_replies(core)
    assert sorted(r["id"] for r in replies) == sorted(COMMANDS)
    assert all(r["ok"] for r in replies)


def test_router_stats_answers_at_once(core):
    core.shard_down(1, 1, now=0.0)
    delta(core, 0, 1, gained=[3, 4])
    command(core, {"id": 1, "cmd": "get_online_users"})
    core.take_outbox()
    command(core, {"id": 2, "cmd": "router_stats"})
    stats = take_reply(core)
    assert core.take_outbox() == []
    assert stats["ok"] is True
    assert stats["id"] == 2
    assert stats["commands"] == 2
    assert stats["pending_queries"] == 1
    assert stats["channels_indexed"] == 2
    assert stats["shards"] == {"0": "up", "1": "down", "2": "up"}


def test_a_busy_shard_is_not_hung_while_it_beats_and_a_silent_one_is(core):
    for now in (0.5, 1.0, 1.5, 2.0):
        heartbeat(core, 0, 1, now)  # shard 0 beats (however busy), shards 1 and 2 are silent
    assert [s.index for s in core.check_hung(now=2.0, timeout=1.5)] == [1, 2]
    assert core.slots[0].state is ShardState.UP


# -- flow control: credit windows to shards --------------------------------------------------


def credit(core, index, epoch, messages, size, now=0.0) -> None:
    msg = shardwire.pulse(messages, size)
    core.shard_message(shardwire.identity(index, epoch), msg, now)


def broadcast(core, channel=7, data="x", now=0.0, request=1) -> dict[str, Any]:
    command(
        core, {"id": request, "cmd": "broadcast_to_channel", "channel": channel, "data": data}, now
    )
    return take_reply(core)


def settle(core: RouterCore, now: float = 0.0) -> None:
    """Every shard reports it has consumed all it was sent (the INDEXED confirmations)."""
    for slot in core.up_shards():
        credit(core, slot.index, slot.epoch, slot.window.sent_messages, slot.window.sent_bytes, now)


def small_window(max_queries: int = 10_000, **window) -> RouterCore:
    core = RouterCore(N, window=WindowLimits(**window), max_queries=max_queries)
    for index in range(N):
        start(core, index)
    return core


def test_a_broadcast_that_does_not_fit_is_refused_whole_and_nothing_is_sent():
    core = small_window(messages=2)
    delta(core, 0, 1, gained=[7])
    delta(core, 1, 1, gained=[7])
    delta(core, 2, 1, gained=[8])
    settle(core)
    assert broadcast(core)["ok"] and broadcast(core)["ok"]
    core.take_outbox()
    refused = broadcast(core, request=3)
    assert refused["ok"] is False and refused["id"] == 3
    assert refused["error"]["code"] == "overloaded"
    assert "nothing was sent" in refused["error"]["message"]
    assert core.take_outbox() == []  # neither shard got it: all or nothing
    assert core.counters["commands_refused"] == 1
    assert broadcast(core, channel=8)["ok"]  # shard 2 has room: other channels are unaffected


def test_credit_from_the_shard_makes_room_again():
    core = small_window(messages=2)
    delta(core, 0, 1, gained=[7])
    settle(core)
    broadcast(core), broadcast(core)
    assert broadcast(core)["error"]["code"] == "overloaded"
    slot = core.slots[0]
    one = (slot.window.sent_bytes - slot.window.acked_bytes) // 2
    credit(
        core, 0, 1, slot.window.acked_messages + 1, slot.window.acked_bytes + one
    )  # room for one more
    assert broadcast(core)["ok"]
    assert broadcast(core)["error"]["code"] == "overloaded"
    assert core.slots[0].window.in_flight()[0] == 2


def test_the_byte_window_counts_the_message_size():
    core = small_window(size=1000)
    delta(core, 0, 1, gained=[7])
    settle(core)
    assert broadcast(core, data="a" * 600)["ok"]
    assert broadcast(core, data="a" * 600)["error"]["code"] == "overloaded"
    assert broadcast(core, data="a" * 100)["ok"]


def test_a_backlog_older_than_the_delay_limit_refuses_until_it_is_consumed():
    core = small_window(delay=0.25)
    delta(core, 0, 1, gained=[7])
    settle(core)
    for i in range(shardwire.CREDIT_MESSAGES + 1):
        assert broadcast(core, now=1.0 + i * 0.001)["ok"]
    # the shard reports every CREDIT_MESSAGES: the last of them (sent at ~1.064) is the one it
    # would have reported; still unreported 0.25 s later, the shard is behind
    assert broadcast(core, now=1.3)["ok"]
    refused = broadcast(core, now=1.4)
    assert refused["error"]["code"] == "overloaded"
    assert "behind" in refused["error"]["message"]
    slot = core.slots[0]
    credit(core, 0, 1, slot.window.sent_messages, slot.window.sent_bytes, now=1.41)
    assert broadcast(core, now=1.42)["ok"]


def test_a_few_messages_in_flight_never_look_behind():
    # at low rates credit comes with the heartbeat (every 0.25 s): that is no backlog
    core = small_window(delay=0.25)
    delta(core, 0, 1, gained=[7])
    settle(core)
    for i in range(10):
        assert broadcast(core, now=i * 0.1)["ok"]


def test_a_new_incarnation_starts_with_an_empty_window():
    core = small_window(messages=1)
    delta(core, 0, 1, gained=[7])
    settle(core)
    assert broadcast(core)["ok"]
    assert broadcast(core)["error"]["code"] == "overloaded"
    core.shard_down(0, 1, now=1.0)
    start(core, 0, epoch=2, channels=[7], now=1.1)
    assert broadcast(core, now=1.2)["ok"]


def test_stale_credit_cannot_open_the_window_beyond_what_was_sent():
    core = small_window(messages=1)
    delta(core, 0, 1, gained=[7])
    settle(core)
    credit(core, 0, 1, 1000, 10**9)  # nonsense from a confused shard
    assert core.slots[0].window.in_flight() == (0, 0)
    assert broadcast(core)["ok"]
    assert broadcast(core)["error"]["code"] == "overloaded"


def test_direct_messages_are_refused_when_the_users_shard_is_full():
    core = small_window(messages=1)
    user = next(u for u in range(1, 100) if stable_hash(u, N) == 0)
    other = next(u for u in range(1, 100) if stable_hash(u, N) == 1)
    body = {"cmd": "broadcast_to_users", "users": [user, other], "data": 1}
    command(core, {"id": 1, **body})
    assert take_reply(core)["ok"]
    core.take_outbox()
    command(core, {"id": 2, **body})
    assert take_reply(core)["error"]["code"] == "overloaded"
    assert core.take_outbox() == []
    command(core, {"id": 3, "cmd": "broadcast_to_user", "user": user + 0, "data": 1})
    assert take_reply(core)["error"]["code"] == "overloaded"


def test_users_go_to_their_documented_shard_however_many_the_router_has_seen():
    """The router remembers users' shards (stable_hash is slow in Python), in a bounded map
    that starts again when full: the answer never changes, and memory stays bounded."""
    core = RouterCore(3)
    users = [1, 2**63 - 1, *range(10**12, 10**12 + SHARD_CACHE + 10)]
    for _ in range(2):  # the second pass partly from the map, partly after it was emptied
        assert [core.shard_of(u) for u in users] == [stable_hash(u, 3) for u in users]
        assert 0 < len(core._shard_cache) <= SHARD_CACHE


def test_queries_are_not_refused_by_the_window_but_by_their_own_limit():
    core = small_window(messages=1, max_queries=2)
    delta(core, 0, 1, gained=[7])
    settle(core)
    broadcast(core)
    command(core, {"id": 1, "cmd": "get_online_users"})
    command(core, {"id": 2, "cmd": "get_online_users"})
    assert take_replies(core) == []  # both waiting for the shards
    command(core, {"id": 3, "cmd": "get_online_users"})
    refused = take_reply(core)
    assert refused["id"] == 3 and refused["error"]["code"] == "overloaded"


def test_a_bug_in_a_handler_is_logged_counted_and_answered(core, monkeypatch, caplog):
    def broken(*_args):
        raise ValueError("a bug")

    monkeypatch.setattr(frames, "channel_message", broken)
    command(core, {"id": 5, "cmd": "broadcast_to_channel", "channel": 1, "data": 1})
    reply = take_reply(core)
    assert reply["id"] == 5 and reply["error"]["code"] == "internal_error"
    assert core.counters["internal_errors"] == 1
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)


def test_a_membership_change_is_confirmed_to_its_shard(core):
    ident = shardwire.identity(1, 1)
    core.shard_message(ident, shardwire.delta([1], [], seq=4), now=1.0)
    core.shard_message(ident, shardwire.sync([1, 2], seq=5), now=1.1)
    assert core.take_outbox() == [(ident, shardwire.indexed(4)), (ident, shardwire.indexed(5))]
    assert core.index[2] == {1}  # indexed before it is confirmed


def test_a_sync_replaces_what_the_router_knows_of_a_shard(core):
    ident = shardwire.identity(0, 1)
    core.shard_message(ident, shardwire.delta([1, 2, 3], [], seq=1), now=1.0)
    core.shard_message(ident, shardwire.sync([2, 4], seq=2), now=1.1)  # a delta was lost
    assert core.slots[0].channels == {2, 4}
    assert 0 not in core.index.get(1, set()) and 0 not in core.index.get(3, set())
    assert 0 in core.index[2] and 0 in core.index[4]


def test_every_command_has_one_handler(core):
    assert set(core.handlers) == set(COMMANDS)


def test_outputs_are_taken_once(core):
    delta(core, 0, 1, gained=[5])
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 5, "data": 1})
    core.check_hung(now=10.0, timeout=1.0)
    assert len(core.take_outbox()) == 1
    assert len(core.take_replies()) == 1
    assert [type(e) for e in core.take_events()] == [ShardHung] * N
    assert (core.take_outbox(), core.take_replies(), core.take_events()) == ([], [], [])


def test_a_single_host_router_has_no_redis_half(core):
    assert core.hosts is None
    command(core, {"id": 1, "cmd": "get_online_users"})
    for qid, _body in take_queries(core).values():
        for index in range(N):
            answer(core, index, 1, qid, {"users": []})
    assert "cluster" not in take_reply(core)
    assert "redis" not in core.statistics()


def test_messages_a_shard_never_got_do_not_wedge_its_window_and_its_confirmation_is_resent():
    core = small_window(messages=100)
    delta(core, 0, 1, gained=[7])
    settle(core)
    for i in range(70):
        broadcast(core, now=0.001 * i)
    ident = shardwire.identity(0, 1)
    core.shard_message(ident, shardwire.delta([8], [], seq=2), now=0.1)
    lost = [msg for who, msg in core.take_outbox() if who == ident]
    core.unsent(ident, lost, now=0.2)  # the queue to the shard was full: none of it left
    assert core.counters["dropped_to_shards"] == len(lost)
    assert core.take_outbox() == [(ident, shardwire.indexed(2))]  # confirmed again
    slot = core.slots[0]
    credit(core, 0, 1, slot.window.sent_messages, slot.window.sent_bytes, now=5.0)
    assert broadcast(core, now=5.0)["ok"]  # not "behind" forever
