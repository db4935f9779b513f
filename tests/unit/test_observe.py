"""actors.observe through RouterCore (no threads): snapshot, get_user_connections, set_channel,
join/leave frames, and the events of a shard's life."""

from __future__ import annotations

import json
from typing import Any

from actors.eventlog import EventLog
from actors.hostlink import (
    AnswerUserConnections,
    ChannelMarks,
    Deliveries,
    Delivery,
    LinkState,
    OpResult,
    PublishChannel,
    Results,
    SetChannel,
    UserConnections,
)
from actors.ids import ChannelId, stable_hash
from actors.observe import JOIN_LEAVE_TICK, MAX_CHANGES_PER_TICK
from actors.router import RouterCore
from actors.wire import frames, shardwire

ENV = [b"backend"]
SHARDS = 2


def make(redis: bool = False) -> RouterCore:
    core = RouterCore(SHARDS, redis=redis, events=EventLog("h1", enabled=True, clock=lambda: 9.0))
    for index in range(SHARDS):
        core.shard_starting(index, 1, 100 + index)
        core.shard_message(shardwire.identity(index, 1), shardwire.hello(index, 1, 100, []), 0.0)
    if core.hosts is not None:
        core.hosts.link_event(LinkState(True), 0.0)
    core.take_outbox()
    return core


def command(core: RouterCore, body: dict[str, Any], now: float = 0.0) -> None:
    core.command(ENV, json.dumps(body).encode(), now)


def reply(core: RouterCore) -> dict[str, Any]:
    (one,) = core.take_replies()
    return json.loads(one[1])


def queries(core: RouterCore) -> dict[int, tuple[int, dict[str, Any]]]:
    out = {}
    for identity, msg in core.take_outbox():
        assert msg[0] == shardwire.QUERY
        parsed = shardwire.parse_identity(identity)
        assert parsed is not None
        out[parsed[0]] = (shardwire.unpack_id(msg[1]), json.loads(msg[2]))
    return out


def answer(core: RouterCore, index: int, qid: int, body: Any) -> None:
    core.shard_message(shardwire.identity(index, 1), shardwire.result(qid, body), 0.0)


def events_from(core: RouterCore, index: int, *events: dict[str, Any]) -> None:
    core.shard_message(shardwire.identity(index, 1), shardwire.events(list(events)), 0.0)


def published(core: RouterCore) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in core.observers.events.take()]


def record(conn: str, user: int, shard: int, channels: list[int]) -> dict[str, Any]:
    return {
        "conn": conn,
        "user": user,
        "shard": shard,
        "channels": channels,
        "connected_at": 1.0,
        "last_activity": 2.0,
        "remote": "127.0.0.1:9",
    }


def test_shards_coming_up_are_events():
    core = make()
    got = published(core)
    assert [(e["type"], e["shard"], e["cause"]) for e in got] == [
        ("shard_up", 0, "started"),
        ("shard_up", 1, "started"),
    ]
    core.shard_down(1, 1, 0.0, "signal SIGKILL")
    assert published(core)[0] == {
        "seq": 3,
        "host": "h1",
        "ts": 9.0,
        "type": "shard_down",
        "shard": 1,
        "epoch": 1,
        "cause": "signal SIGKILL",
    }


def test_a_snapshot_is_consistent_with_the_stream():
    core = make()
    published(core)
    command(core, {"cmd": "snapshot", "id": 1})
    asked = queries(core)
    assert {index: body for index, (_qid, body) in asked.items()} == {
        0: {"op": "connections"},
        1: {"op": "connections"},
    }
    answer(core, 0, asked[0][0], {"connections": [record("0.1.1", 2, 0, [])]})
    # after shard 0 answered: a new connection there (not in its answer), then shard 1 answers
    connect = {"type": "connect", "ts": 5.0, "user": 4, "conn": "0.1.2", "shard": 0,
               "channels": [7], "remote": "r"}  # fmt: skip
    events_from(core, 0, connect)
    answer(core, 1, asked[1][0], {"connections": [record("1.1.1", 3, 1, [7])]})
    body = reply(core)
    assert body["seq"] == core.observers.events.seq == 3 and body["host"] == "h1"
    assert sorted(c["conn"] for c in body["connections"]) == ["0.1.1", "0.1.2", "1.1.1"]
    assert [e["seq"] for e in published(core)] == [3]  # the connect: seq 3 <= the snapshot's


def test_get_user_connections_adds_the_host_and_asks_the_users_shard():
    core = make()
    command(core, {"cmd": "get_user_connections", "user": 5, "id": 2})
    ((index, (qid, body)),) = queries(core).items()
    assert index == stable_hash(5, SHARDS) and body == {"op": "user_connections", "user": 5}
    answer(core, index, qid, {"connections": [record("x", 5, index, [1])]})
    got = reply(core)
    assert got["connections"] == [{**record("x", 5, index, [1]), "host": "h1"}]
    assert got["missing_shards"] == []


def test_in_a_cluster_the_other_hosts_answer_too_and_we_answer_theirs():
    core = make(redis=True)
    assert core.hosts is not None
    core.hosts.take_ops()
    command(core, {"cmd": "get_user_connections", "user": 5, "id": 2})
    ((index, (qid, _body)),) = queries(core).items()
    (op,) = core.hosts.take_ops()
    assert isinstance(op, UserConnections) and op.user == 5
    answer(core, index, qid, {"connections": []})
    remote = {"connections": [{**record("y", 5, 0, []), "host": "h2"}], "missing_hosts": []}
    core.hosts.link_event(Results([OpResult(op.qid, True, remote)]), 0.0)
    got = reply(core)
    assert [c["host"] for c in got["connections"]] == ["h2"] and got["cluster"] is True
    # another host asks: the user's shard is asked, the answer goes back through the link
    control = {"op": "who", "user": 5, "qid": 77, "reply_to": "h2"}
    core.hosts.link_event(Deliveries([Delivery(None, [5], b"", control)]), 0.0)
    ((index, (qid, _body)),) = queries(core).items()
    answer(core, index, qid, {"connections": [record("z", 5, index, [])]})
    (op,) = core.hosts.take_ops()
    assert isinstance(op, AnswerUserConnections)
    assert (op.to_host, op.request, [c["conn"] for c in op.connections]) == ("h2", 77, ["z"])


def marks_sent(core: RouterCore) -> dict[int, list[int]]:
    out = {}
    for identity, msg in core.take_outbox():
        if msg[0] == shardwire.MARKS:
            parsed = shardwire.parse_identity(identity)
            assert parsed is not None
            out[parsed[0]] = shardwire.unpack_ids(msg[1])
    return out


def test_set_channel_tells_every_shard_and_joins_go_out_per_tick_in_order():
    core = make()
    command(core, {"cmd": "set_channel", "channel": 3, "join_leave": True, "id": 1})
    assert reply(core) == {"id": 1, "ok": True, "channel": 3, "join_leave": True}
    assert marks_sent(core) == {0: [3], 1: [3]}
    core.shard_message(shardwire.identity(1, 1), shardwire.delta([3], [], 1), 0.0)
    core.take_outbox()
    changes = [(3, 8, True), (4, 8, True), (3, 9, True), (3, 8, False)]  # 4 is not marked
    core.shard_message(shardwire.identity(0, 1), shardwire.join_leave(changes), 1.0)
    core.tick(1.0)
    assert core.take_outbox() == []  # not before the tick
    core.tick(1.0 + JOIN_LEAVE_TICK)
    ((identity, msg),) = core.take_outbox()
    assert shardwire.parse_identity(identity) == (1, 1)  # the shard with members of 3
    # 8 joined and left within the tick: members are told neither
    assert msg == shardwire.channel_delivery(3, frames.join_leave(True, 3, 9))
    assert core.observers.counters["join_leave_cancelled"] == 2
    # a restarted shard learns the marks with its hello
    core.shard_starting(0, 2, 300)
    core.shard_message(shardwire.identity(0, 2), shardwire.hello(0, 2, 300, []), 2.0)
    assert marks_sent(core) == {0: [3]}


def test_in_a_cluster_marks_are_the_clusters_and_joins_go_to_the_other_hosts():
    core = make(redis=True)
    assert core.hosts is not None
    core.hosts.take_ops()
    command(core, {"cmd": "set_channel", "channel": 3, "join_leave": True, "id": 1})
    (op,) = core.hosts.take_ops()
    assert isinstance(op, SetChannel) and (op.channel, op.join_leave) == (3, True)
    core.hosts.link_event(Results([OpResult(op.qid, True, {"value": 2})]), 0.0)
    assert reply(core)["hosts"] == 2
    core.take_outbox()
    core.shard_message(shardwire.identity(0, 1), shardwire.join_leave([(3, 8, True)]), 0.0)
    core.tick(JOIN_LEAVE_TICK)
    ops = core.hosts.take_ops()
    assert ops == [PublishChannel(0, ChannelId(3), frames.join_leave(True, 3, 8))]
    # another host unmarks it; then the link reads the whole set after a reconnect
    control = {"op": "set_channel", "channel": 3, "join_leave": False}
    core.hosts.link_event(Deliveries([Delivery(None, [], b"", control)]), 0.0)
    assert core.observers.marks == set()
    core.hosts.link_event(ChannelMarks([ChannelId(5), ChannelId(6)]), 0.0)
    assert core.observers.marks == {5, 6}
    assert marks_sent(core) == {0: [5, 6], 1: [5, 6]}


def test_a_shard_that_dies_leaves_its_users_marked_channels():
    core = make()
    command(core, {"cmd": "set_channel", "channel": 3, "join_leave": True, "id": 1})
    reply(core)
    core.shard_message(shardwire.identity(1, 1), shardwire.delta([3], [], 1), 0.0)
    core.take_outbox()
    core.shard_message(shardwire.identity(0, 1), shardwire.join_leave([(3, 8, True)]), 0.0)
    core.tick(JOIN_LEAVE_TICK)
    core.take_outbox()
    core.shard_down(0, 1, 1.0, "signal SIGKILL")  # nobody else can say 8 left
    core.tick(1.0 + JOIN_LEAVE_TICK)
    ((_identity, msg),) = core.take_outbox()
    assert msg == shardwire.channel_delivery(3, frames.join_leave(False, 3, 8))


def test_a_shard_down_during_a_snapshot_is_patched_with_what_it_announces_after():
    core = make()
    core.shard_down(0, 1, 0.0, "signal SIGKILL")
    published(core)
    command(core, {"cmd": "snapshot", "id": 1})
    ((index, (qid, _body)),) = queries(core).items()
    assert index == 1  # shard 0 is not asked
    core.shard_starting(0, 2, 300)
    core.shard_message(shardwire.identity(0, 2), shardwire.hello(0, 2, 300, []), 0.0)
    connect = {"type": "connect", "ts": 5.0, "user": 4, "conn": "0.2.1", "shard": 0,
               "channels": [], "remote": "r"}  # fmt: skip
    core.shard_message(shardwire.identity(0, 2), shardwire.events([connect]), 0.0)
    answer(core, 1, qid, {"connections": []})
    body = reply(core)
    assert [c["conn"] for c in body["connections"]] == ["0.2.1"]
    assert body["missing_shards"] == [0]
    assert max(e["seq"] for e in published(core)) == body["seq"]


def test_too_many_questions_from_other_hosts_never_stop_the_router():
    core = RouterCore(SHARDS, redis=True, max_queries=1, events=EventLog("h1", enabled=False))
    for index in range(SHARDS):
        core.shard_starting(index, 1, 100 + index)
        core.shard_message(shardwire.identity(index, 1), shardwire.hello(index, 1, 100, []), 0.0)
    assert core.hosts is not None
    core.hosts.link_event(LinkState(True), 0.0)
    command(core, {"cmd": "status", "id": 1})  # the one query allowed
    control = {"op": "who", "user": 5, "qid": 77, "reply_to": "h2"}
    core.hosts.link_event(Deliveries([Delivery(None, [5], b"", control)]), 0.0)
    assert core.counters["internal_refused"] == 1
    ops = [op for op in core.hosts.take_ops() if isinstance(op, AnswerUserConnections)]
    assert ops == [AnswerUserConnections("h2", 77, [])]  # answered, empty, not left waiting


def test_a_mass_reconnect_is_one_presence_changed_frame_per_tick():
    core = make()
    command(core, {"cmd": "set_channel", "channel": 3, "join_leave": True, "id": 1})
    reply(core)
    core.shard_message(shardwire.identity(1, 1), shardwire.delta([3], [], 1), 0.0)
    core.take_outbox()
    burst = [(3, user, True) for user in range(1, MAX_CHANGES_PER_TICK + 2)]
    core.shard_message(shardwire.identity(0, 1), shardwire.join_leave(burst), 0.0)
    core.tick(JOIN_LEAVE_TICK)
    ((_identity, msg),) = core.take_outbox()
    joins = MAX_CHANGES_PER_TICK + 1
    assert msg == shardwire.channel_delivery(3, frames.presence_changed(3, joins, 0))
