"""The router's delivery guarantees (actors.guarantees), driven through RouterCore without
threads: offsets on channel frames, resume answers, the history command, critical messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.critical import CriticalStore
from actors.guarantees import WAIT_FOR_PROBE, WAIT_FOR_TOPIC
from actors.history import HistoryStore
from actors.hostlink import (
    AckCritical,
    AppendChannel,
    Deliveries,
    Delivery,
    FetchCritical,
    LinkState,
    OpResult,
    ReadHistory,
    Results,
    StoreCritical,
    TopicsReady,
)
from actors.ids import ChannelId, ShardIndex, stable_hash
from actors.router import RouterCore
from actors.wire import frames, shardwire

ENV = [b"backend"]
SHARDS = 2


def make(redis: bool = False, size: int = 64, per_user: int = 3) -> RouterCore:
    core = RouterCore(
        SHARDS,
        redis=redis,
        history=HistoryStore(size, 300.0, 1 << 20),
        critical=CriticalStore(per_user, 1 << 20),
    )
    for index in range(SHARDS):
        core.shard_starting(index, 1, 100 + index)
        msg = shardwire.hello(index, 1, 100 + index, [])
        core.shard_message(shardwire.identity(index, 1), msg, 0.0)
    if redis:
        assert core.hosts is not None
        core.hosts.link_event(LinkState(True), 0.0)
    return core


def join(core: RouterCore, index: int, channel: int) -> None:
    msg = shardwire.delta([channel], [], 1)
    core.shard_message(shardwire.identity(index, 1), msg, 0.0)
    if core.hosts is not None:  # the link confirms the topic: the membership is confirmed
        core.hosts.link_event(TopicsReady([ChannelId(channel)]), 0.0)
    core.take_outbox()


def command(core: RouterCore, body: dict[str, Any], now: float = 0.0) -> None:
    core.command(ENV, json.dumps(body).encode(), now)


def reply(core: RouterCore) -> dict[str, Any]:
    replies = core.take_replies()
    assert len(replies) == 1, replies
    return json.loads(replies[0][1])


def from_shard(core: RouterCore, index: int, msg: list[bytes], now: float = 0.0) -> None:
    core.shard_message(shardwire.identity(index, 1), msg, now)


def outbox(core: RouterCore) -> list[tuple[int, list[bytes]]]:
    out = []
    for identity, msg in core.take_outbox():
        parsed = shardwire.parse_identity(identity)
        assert parsed is not None
        out.append((parsed[0], msg))
    return out


def payloads(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of concatenated server text frames."""
    out, i = [], 0
    while i < len(raw):
        n, header = raw[i + 1] & 0x7F, 2
        if n == 126:
            n, header = int.from_bytes(raw[i + 2 : i + 4], "big"), 4
        elif n == 127:
            n, header = int.from_bytes(raw[i + 2 : i + 10], "big"), 10
        out.append(json.loads(raw[i + header : i + header + n]))
        i += header + n
    return out


def broadcast(core: RouterCore, channel: int, data: Any) -> dict[str, Any]:
    command(core, {"cmd": "broadcast_to_channel", "channel": channel, "data": data})
    return reply(core)


# -- channel history on one host ------------------------------------------------------------


def test_channel_frames_carry_gapless_offsets_and_one_epoch():
    core = make()
    join(core, 0, 7)
    replies = [broadcast(core, 7, n) for n in range(3)]
    assert [r["offset"] for r in replies] == [1, 2, 3]
    assert len({r["epoch"] for r in replies}) == 1
    sent = outbox(core)
    assert [index for index, _ in sent] == [0, 0, 0]
    for n, (_index, msg) in enumerate(sent):
        assert msg[0] == shardwire.CHANNEL
        assert shardwire.channel_target(msg[1]) == (7, n + 1)
        (frame,) = payloads(msg[2])
        assert frame == {
            "type": "message",
            "channel": 7,
            "offset": n + 1,
            "epoch": replies[0]["epoch"],
            "data": n,
        }


def test_history_size_zero_keeps_todays_frames():
    core = make(size=0)
    join(core, 0, 7)
    assert broadcast(core, 7, "x") == {"id": None, "ok": True, "shards": 1}
    ((_index, msg),) = outbox(core)
    assert msg == shardwire.channel_delivery(7, frames.channel_message(7, b'"x"'))
    command(core, {"cmd": "history", "channel": 7})
    assert reply(core)["error"]["code"] == "history_disabled"


def test_a_refused_broadcast_takes_no_offset():
    core = RouterCore(1, history=HistoryStore(64, 300.0, 1 << 20))
    core.window = core.window.__class__(messages=1, size=1 << 20, delay=10.0)
    core.shard_starting(0, 1, 100)
    core.shard_message(shardwire.identity(0, 1), shardwire.hello(0, 1, 100, [7]), 0.0)
    assert broadcast(core, 7, 1)["offset"] == 1
    refused = broadcast(core, 7, 2)
    assert refused["error"]["code"] == "overloaded"
    core.shard_message(shardwire.identity(0, 1), shardwire.pulse(1, 1 << 20), 0.0)
    assert broadcast(core, 7, 3)["offset"] == 2  # no hole where the refused one was


def test_history_command_pages_forward():
    core = make()
    for n in range(5):
        broadcast(core, 9, {"n": n})
    command(core, {"cmd": "history", "channel": 9, "since": 1, "limit": 2})
    body = reply(core)
    assert body["offset"] == 5
    assert body["messages"] == [{"offset": 2, "data": {"n": 1}}, {"offset": 3, "data": {"n": 2}}]


def test_history_of_a_channel_with_none_is_empty_with_a_stable_epoch():
    core = make()
    command(core, {"cmd": "history", "channel": 5})
    first = reply(core)
    assert first["messages"] == [] and first["offset"] == 0
    assert broadcast(core, 5, 1)["epoch"] == first["epoch"]


# -- resume on one host ---------------------------------------------------------------------


def resume(core: RouterCore, index: int, conn: int, channel: int, offset: int, epoch: str):
    from_shard(core, index, shardwire.resume(conn, channel, offset, epoch))
    ((to, msg),) = outbox(core)
    assert to == index and msg[0] == shardwire.RESUMED
    conn_id, channel_id, latest = shardwire.unpack_ids(msg[1])
    assert (conn_id, channel_id) == (conn, channel)
    epoch_now, raw = shardwire.parse_resumed(msg[2])
    return latest, epoch_now, payloads(raw)


def test_resume_replays_what_was_missed_then_confirms():
    core = make()
    epoch = broadcast(core, 3, "a")["epoch"]
    for data in "bcd":
        broadcast(core, 3, data)
    latest, now_epoch, sent = resume(core, 1, 42, 3, 2, epoch)
    assert (latest, now_epoch) == (4, epoch)
    assert [(f.get("offset"), f.get("data")) for f in sent[:-1]] == [(3, "c"), (4, "d")]
    assert sent[-1] == {
        "type": "resumed",
        "channel": 3,
        "offset": 4,
        "epoch": epoch,
        "recovered": True,
    }


def test_resume_with_another_epoch_is_not_recovered():
    core = make()
    epoch = broadcast(core, 3, "a")["epoch"]
    latest, now_epoch, sent = resume(core, 0, 1, 3, 1, "somewhere-else")
    assert (latest, now_epoch) == (1, epoch)
    assert sent == [
        {"type": "resumed", "channel": 3, "offset": 1, "epoch": epoch, "recovered": False}
    ]


def test_resume_beyond_the_kept_messages_is_not_recovered():
    core = make(size=2)
    epoch = broadcast(core, 3, 1)["epoch"]
    for n in range(2, 6):
        broadcast(core, 3, n)
    _latest, _epoch, sent = resume(core, 0, 1, 3, 1, epoch)  # 2 is gone: only 4 and 5 kept
    assert sent[-1]["recovered"] is False and len(sent) == 1
    _latest, _epoch, sent = resume(core, 0, 1, 3, 3, epoch)
    assert [f.get("offset") for f in sent] == [4, 5, 5] and sent[-1]["recovered"] is True


def test_a_quiet_resume_has_no_resumed_frame():
    core = make()
    epoch = broadcast(core, 3, 1)["epoch"]
    broadcast(core, 3, 2)
    from_shard(core, 0, shardwire.resume(9, 3, 1, epoch, quiet=True))
    ((_to, msg),) = outbox(core)
    _epoch, raw = shardwire.parse_resumed(msg[2])
    assert [f["offset"] for f in payloads(raw)] == [2]


def test_a_resume_answer_never_reaches_a_new_incarnation():
    core = make(redis=True)
    assert core.hosts is not None
    core.hosts.ready.add(ChannelId(3))
    from_shard(core, 0, shardwire.resume(9, 3, 0, ""))
    (op,) = core.hosts.take_ops()
    assert isinstance(op, ReadHistory) and op.since == 0
    core.shard_starting(0, 2, 300)  # the shard died; its connection ids mean nothing now
    core.shard_message(shardwire.identity(0, 2), shardwire.hello(0, 2, 300, []), 0.0)
    core.take_outbox()
    body = {"epoch": "e", "offset": 0, "first": 1, "messages": []}
    core.hosts.link_event(Results([OpResult(op.qid, True, body)]), 0.0)
    core.hosts.link_event(Deliveries([probe_back(3, op.qid)]), 0.0)
    assert outbox(core) == []


# -- in a cluster: Redis assigns offsets ------------------------------------------------------


def test_in_a_cluster_redis_assigns_the_offset_and_delivery_comes_back_from_it():
    core = make(redis=True)
    assert core.hosts is not None
    join(core, 0, 7)
    core.hosts.take_ops()  # the topic's subscription
    command(core, {"cmd": "broadcast_to_channel", "channel": 7, "data": 1})
    assert outbox(core) == []  # not delivered here yet: Redis's order is everyone's
    (op,) = core.hosts.take_ops()
    assert isinstance(op, AppendChannel) and op.channel == 7 and op.data == b"1"
    core.hosts.link_event(Results([OpResult(op.qid, True, {"offset": 4, "epoch": "E"})]), 0.0)
    body = reply(core)
    assert (body["ok"], body["offset"], body["epoch"], body["cluster"]) == (True, 4, "E", True)
    frame = frames.channel_message(7, b"1", 4, "E")
    core.hosts.link_event(Deliveries([Delivery(ChannelId(7), [], frame, offset=4)]), 0.0)
    ((index, msg),) = outbox(core)
    assert index == 0 and shardwire.channel_target(msg[1]) == (7, 4) and msg[2] == frame


def test_in_a_cluster_an_append_cut_by_the_link_falls_back_to_this_hosts_history():
    core = make(redis=True)
    assert core.hosts is not None
    join(core, 1, 7)
    core.hosts.take_ops()
    command(core, {"cmd": "broadcast_to_channel", "channel": 7, "data": 1})
    core.hosts.take_ops()
    core.hosts.link_event(LinkState(False), 0.0)
    body = reply(core)
    assert (body["ok"], body["offset"], body["cluster"]) == (True, 1, False)
    ((index, msg),) = outbox(core)
    assert index == 1 and shardwire.channel_target(msg[1]) == (7, 1)


def test_with_the_link_down_the_local_history_takes_over():
    core = make(redis=True)
    assert core.hosts is not None
    core.hosts.link_event(LinkState(False), 0.0)
    join(core, 1, 7)
    body = broadcast(core, 7, 1)
    assert (body["offset"], body["cluster"]) == (1, False)
    assert [index for index, _ in outbox(core)] == [1]


# -- critical messages ----------------------------------------------------------------------


def critical(core: RouterCore, user: int, data: Any = "x", **extra: Any) -> dict[str, Any]:
    body = {"cmd": "broadcast_to_user", "user": user, "data": data, "critical": True, **extra}
    command(core, body)
    return reply(core)


def test_a_critical_message_goes_to_the_users_shard_with_its_id():
    core = make()
    body = critical(core, 5, {"k": 1})
    message_id = body["message_id"]
    ((index, msg),) = outbox(core)
    assert index == stable_hash(5, SHARDS) and msg[0] == shardwire.CRITICAL
    assert shardwire.unpack_ids(msg[1]) == [5]
    ((sent_id, frame),) = shardwire.unpack_criticals(msg[2])
    assert sent_id == message_id
    assert payloads(frame) == [{"type": "message", "id": message_id, "data": {"k": 1}}]


def test_a_new_connection_gets_the_pending_ones_in_order_until_acked():
    core = make()
    ids = [critical(core, 5, n)["message_id"] for n in range(3)]
    outbox(core)
    index = stable_hash(5, SHARDS)
    from_shard(core, index, shardwire.new_connection(11, 5))
    ((to, msg),) = outbox(core)
    assert to == index and msg[0] == shardwire.PENDING and shardwire.unpack_id(msg[1]) == 11
    assert [i for i, _ in shardwire.unpack_criticals(msg[2])] == ids
    from_shard(core, index, shardwire.ack(5, ids[0]))
    from_shard(core, index, shardwire.new_connection(12, 5))
    ((_to, msg),) = outbox(core)
    assert [i for i, _ in shardwire.unpack_criticals(msg[2])] == ids[1:]


def test_the_per_user_bound_refuses_the_whole_command():
    core = make(per_user=2)
    critical(core, 5)
    critical(core, 5)
    outbox(core)
    command(core, {"cmd": "broadcast_to_users", "users": [6, 5], "data": 1, "critical": True})
    assert reply(core)["error"]["code"] == "limit"
    assert outbox(core) == []
    from_shard(core, stable_hash(6, SHARDS), shardwire.new_connection(1, 6))
    assert outbox(core) == []  # nothing was kept for user 6 either


def test_a_critical_message_expires_after_its_ttl():
    core = make()
    critical(core, 5, ttl=10)
    outbox(core)
    core.tick(11.0)
    from_shard(core, stable_hash(5, SHARDS), shardwire.new_connection(1, 5), now=11.0)
    assert outbox(core) == []


def test_an_unknown_ack_is_counted_and_ignored():
    core = make()
    from_shard(core, 0, shardwire.ack(5, "nope"))
    assert core.statistics()["critical"]["unknown_acks"] == 1


def test_in_a_cluster_critical_messages_are_stored_in_redis_first():
    core = make(redis=True)
    assert core.hosts is not None
    command(core, {"cmd": "broadcast_to_user", "user": 5, "data": 1, "critical": True})
    assert outbox(core) == []  # not before Redis took it (it may refuse: its bound)
    (op,) = core.hosts.take_ops()
    assert isinstance(op, StoreCritical) and op.users == [5] and op.per_user == 3
    core.hosts.link_event(Results([OpResult(op.qid, True, {"value": 0})]), 0.0)
    body = reply(core)
    assert body["ok"] and body["message_id"] == op.id
    ((_index, msg),) = outbox(core)
    assert msg[0] == shardwire.CRITICAL
    # refused by Redis's bound: an error, and nothing delivered
    command(core, {"cmd": "broadcast_to_user", "user": 5, "data": 2, "critical": True})
    (op,) = core.hosts.take_ops()
    core.hosts.link_event(Results([OpResult(op.qid, True, {"limit": 5})]), 0.0)
    assert reply(core)["error"]["code"] == "limit"
    assert outbox(core) == []


def test_in_a_cluster_pending_ones_come_from_redis_and_acks_go_there():
    core = make(redis=True)
    assert core.hosts is not None
    index = stable_hash(5, SHARDS)
    from_shard(core, index, shardwire.new_connection(11, 5))
    (op,) = core.hosts.take_ops()
    assert isinstance(op, FetchCritical) and op.user == 5
    body = {"messages": [["a-1", '"x"'], ["a-2", '"y"']]}
    core.hosts.link_event(Results([OpResult(op.qid, True, body)]), 0.0)
    ((_to, msg),) = outbox(core)
    assert [i for i, _ in shardwire.unpack_criticals(msg[2])] == ["a-1", "a-2"]
    from_shard(core, index, shardwire.ack(5, "a-1"))
    assert core.hosts.take_ops() == [AckCritical(5, "a-1")]
    # another host got an ack: the user's shard here stops re-sending
    control = {"op": "acked", "id": "a-2"}
    core.hosts.link_event(Deliveries([Delivery(None, [5], b"", control)]), 0.0)
    ((to, msg),) = outbox(core)
    assert to == index and msg == shardwire.acked(5, "a-2")


@pytest.mark.parametrize("redis", [False, True])
def test_router_stats_show_history_and_critical_counters(redis):
    core = make(redis=redis)
    if core.hosts is not None:
        core.hosts.ready.add(ChannelId(3))
    from_shard(core, 0, shardwire.resume(1, 3, 0, ""))
    if core.hosts is not None:
        (op,) = core.hosts.take_ops()
        body = {"epoch": "e", "offset": 0, "first": 1, "messages": []}
        core.hosts.link_event(Results([OpResult(op.qid, True, body)]), 0.0)
        core.hosts.link_event(Deliveries([probe_back(3, op.qid)]), 0.0)
    stats = core.statistics()
    # epoch "": a client that knows nothing of the channel cannot have missed nothing
    assert stats["resumes"] == {"resumes": 1, "recovered": 0, "not_recovered": 1, "unprobed": 0}
    assert {"channels", "messages"} <= set(stats["history"])
    assert "unknown_acks" in stats["critical"]


def test_in_a_cluster_a_resume_is_answered_from_redis_once_the_topic_is_listened_to():
    core = make(redis=True)
    assert core.hosts is not None
    from_shard(core, 1, shardwire.resume(4, 3, 2, "E"))
    assert core.hosts.take_ops() == []  # a message published before that would be lost
    core.hosts.link_event(TopicsReady([ChannelId(3)]), 0.0)  # (3 is not indexed: no effect)
    assert core.hosts.take_ops() == []
    core.tick(WAIT_FOR_TOPIC + 0.1)  # not for ever: a stuck listener must not hang resumes
    (op,) = core.hosts.take_ops()
    assert isinstance(op, ReadHistory) and (op.channel, op.since, op.limit) == (3, 2, 64)
    assert not op.probe  # only a resume from nothing waits for one (see below)
    body = {"epoch": "E", "offset": 4, "first": 1, "messages": [[3, '"c"'], [4, '"d"']]}
    core.hosts.link_event(Results([OpResult(op.qid, True, body)]), 0.0)
    ((to, msg),) = outbox(core)
    assert to == 1 and shardwire.unpack_ids(msg[1]) == [4, 3, 4]
    _epoch, raw = shardwire.parse_resumed(msg[2])
    sent = payloads(raw)
    assert [(f.get("offset"), f.get("data")) for f in sent[:-1]] == [(3, "c"), (4, "d")]
    assert sent[-1]["recovered"] is True


def probe_back(channel: int, qid: int) -> Delivery:
    """What the link delivers when read ``qid``'s probe is back on the channel's topic."""
    return Delivery(ChannelId(channel), [], b"", {"op": "probe_back", "qid": qid})


def resume_from_nothing(core: RouterCore, channel: int) -> ReadHistory:
    """Shard 0's connection 9 joined ``channel`` and resumes it from nothing: the read."""
    assert core.hosts is not None
    join(core, 0, channel)
    core.hosts.take_ops()  # the topic's subscription
    from_shard(core, 0, shardwire.resume(9, channel, 0, ""))
    (op,) = core.hosts.take_ops()
    assert isinstance(op, ReadHistory) and op.since == 0 and op.probe
    return op


READ = {"epoch": "E", "offset": 5, "first": 1, "messages": []}


def kinds(core: RouterCore) -> list[bytes]:
    return [msg[0] for _to, msg in outbox(core)]


def test_in_a_cluster_a_resume_from_nothing_is_answered_after_what_came_before_its_read():
    # message 5, from another host, was published before the read (which says offset 5), but
    # the topic brings it after the read's answer: the connection is owed it (it came after
    # the join), and the shard would drop it as a repeat once the answer is there
    core = make(redis=True)
    assert core.hosts is not None
    op = resume_from_nothing(core, 3)
    core.hosts.link_event(Results([OpResult(op.qid, True, READ)]), 0.0)
    assert outbox(core) == []  # not yet: the probe the read published is not back
    live = Delivery(ChannelId(3), [], frames.channel_message(3, b"5", 5, "E"), offset=5)
    core.hosts.link_event(Deliveries([live, probe_back(3, op.qid)]), 0.0)
    assert kinds(core) == [shardwire.CHANNEL, shardwire.RESUMED]  # the message first
    core.hosts.link_event(Deliveries([probe_back(3, op.qid)]), 0.0)  # a repeat: nothing
    assert outbox(core) == [] and not core.guarantees.retrying()


def test_a_probe_back_before_its_reads_answer_is_kept_for_it():
    core = make(redis=True)
    assert core.hosts is not None
    op = resume_from_nothing(core, 3)
    core.hosts.link_event(Deliveries([probe_back(3, op.qid)]), 0.0)
    assert outbox(core) == []
    core.hosts.link_event(Results([OpResult(op.qid, True, READ)]), 0.0)
    assert kinds(core) == [shardwire.RESUMED]
    core.hosts.link_event(Deliveries([probe_back(3, 12345)]), 0.0)  # no such read: ignored
    assert outbox(core) == [] and not core.guarantees.retrying()


def test_a_resume_from_nothing_whose_probe_is_lost_is_answered_at_its_deadline():
    core = make(redis=True)
    assert core.hosts is not None
    op = resume_from_nothing(core, 3)
    core.hosts.link_event(Results([OpResult(op.qid, True, READ)]), 5.0)
    assert core.guarantees.retrying()  # the router ticks often meanwhile
    core.tick(5.1)  # the wait starts at the first tick after the answer (not at the read)
    core.tick(5.1 + WAIT_FOR_PROBE / 2)
    assert outbox(core) == []
    core.tick(5.1 + WAIT_FOR_PROBE)
    assert kinds(core) == [shardwire.RESUMED]
    assert core.guarantees.counters["unprobed"] == 1
    assert not core.guarantees.retrying()


def test_a_resume_from_nothing_read_before_its_topic_is_listened_to_needs_no_probe():
    core = make(redis=True)
    assert core.hosts is not None
    from_shard(core, 0, shardwire.resume(9, 3, 0, ""))  # 3: no topic confirmed
    core.tick(WAIT_FOR_TOPIC + 0.1)  # read anyway: a probe could not come back
    (op,) = core.hosts.take_ops()
    assert isinstance(op, ReadHistory) and not op.probe
    core.hosts.link_event(Results([OpResult(op.qid, True, READ)]), 0.0)
    assert kinds(core) == [shardwire.RESUMED]


def test_a_resume_from_nothing_waiting_for_its_probe_is_answered_when_the_link_drops():
    core = make(redis=True)
    assert core.hosts is not None
    op = resume_from_nothing(core, 3)
    core.hosts.link_event(Results([OpResult(op.qid, True, READ)]), 0.0)
    core.hosts.link_event(LinkState(False), 0.0)
    assert kinds(core) == [shardwire.RESUMED]
    assert core.guarantees.counters["unprobed"] == 1


def test_a_resume_from_nothing_whose_read_failed_is_answered_here_at_once():
    core = make(redis=True)
    assert core.hosts is not None
    op = resume_from_nothing(core, 3)
    core.hosts.link_event(Results([OpResult(op.qid, False, None)]), 0.0)
    assert kinds(core) == [shardwire.RESUMED]  # this host's store: no probe to wait for
    core.hosts.link_event(Deliveries([probe_back(3, op.qid)]), 0.0)  # late: nothing kept
    assert outbox(core) == [] and not core.guarantees.retrying()


def test_a_back_fill_replays_only_what_came_before_the_first_live_message():
    core = make()
    epoch = broadcast(core, 3, 1)["epoch"]
    for n in range(2, 6):
        broadcast(core, 3, n)
    outbox(core)
    from_shard(core, 0, shardwire.resume(9, 3, 1, epoch, before=4))
    ((_to, msg),) = outbox(core)
    _epoch, raw = shardwire.parse_resumed(msg[2])
    sent = payloads(raw)
    assert [f.get("offset") for f in sent[:-1]] == [2, 3]
    assert sent[-1] == {
        "type": "resumed",
        "channel": 3,
        "offset": 5,
        "epoch": epoch,
        "recovered": True,
    }


def test_in_a_cluster_a_new_membership_is_confirmed_once_its_topic_is():
    core = make(redis=True)
    assert core.hosts is not None
    core.shard_message(shardwire.identity(0, 1), shardwire.delta([7], [], 1), 0.0)
    core.shard_message(shardwire.identity(0, 1), shardwire.delta([], [], 2), 0.0)
    assert outbox(core) == []  # both wait: the second would confirm the first
    core.hosts.link_event(TopicsReady([ChannelId(7)]), 0.1)
    assert [msg for _index, msg in outbox(core)] == [shardwire.indexed(1), shardwire.indexed(2)]
    # a channel whose topic is ready already: confirmed at once
    core.shard_message(shardwire.identity(1, 1), shardwire.delta([7], [], 1), 0.2)
    assert [msg for _index, msg in outbox(core)] == [shardwire.indexed(1)]


def test_a_held_confirmation_goes_at_its_deadline_or_when_the_link_drops():
    core = make(redis=True)
    assert core.hosts is not None
    core.shard_message(shardwire.identity(0, 1), shardwire.delta([7], [], 1), 0.0)
    core.tick(1.0)
    assert outbox(core) == []
    core.tick(2.5)  # never confirmed (a stuck listener): hello must not wait for ever
    assert [msg for _index, msg in outbox(core)] == [shardwire.indexed(1)]
    core.shard_message(shardwire.identity(1, 1), shardwire.delta([8], [], 1), 3.0)
    core.hosts.link_event(LinkState(False), 3.1)
    assert [msg for _index, msg in outbox(core)] == [shardwire.indexed(1)]


def test_in_a_cluster_an_append_redis_did_not_answer_in_time_is_an_error():
    core = make(redis=True)
    assert core.hosts is not None
    join(core, 1, 7)
    core.hosts.take_ops()
    command(core, {"cmd": "broadcast_to_channel", "channel": 7, "data": 1})
    core.hosts.take_ops()
    core.tick(5.0)  # past the gather's deadline, the link still up: Redis may run it yet
    assert reply(core)["error"]["code"] == "unavailable"
    assert outbox(core) == []  # no second copy from this host's store


def test_acks_made_while_the_link_is_down_reach_redis_when_it_is_back():
    core = make(redis=True)
    assert core.hosts is not None
    core.hosts.link_event(LinkState(False), 0.0)
    from_shard(core, 0, shardwire.ack(5, "r-1"))
    assert core.hosts.take_ops() == []
    core.hosts.link_event(LinkState(True), 1.0)
    assert core.hosts.take_ops() == [AckCritical(5, "r-1")]


def test_a_critical_message_a_shard_had_no_room_for_is_queued_again():
    core = RouterCore(1, critical=CriticalStore(3, 1 << 20))
    core.window = core.window.__class__(messages=1, size=1 << 20, delay=10.0)
    core.shard_starting(0, 1, 100)
    core.shard_message(shardwire.identity(0, 1), shardwire.hello(0, 1, 100, []), 0.0)
    command(core, {"cmd": "broadcast_to_user", "user": 5, "data": 1})  # fills the window
    reply(core)
    outbox(core)
    core.unsent(shardwire.identity(0, 1), [], 0.0)
    core.guarantees.undelivered(ShardIndex(0), shardwire.criticals([5], [("i-1", b"f")]))
    core.tick(1.0)
    assert outbox(core) == []  # still no room
    core.shard_message(shardwire.identity(0, 1), shardwire.pulse(1, 1 << 20), 1.0)
    core.tick(2.0)
    ((_index, msg),) = outbox(core)
    assert msg[0] == shardwire.CRITICAL


def test_a_back_fill_before_the_very_first_offset_replays_nothing():
    core = make()
    epoch = broadcast(core, 3, 1)["epoch"]
    broadcast(core, 3, 2)
    outbox(core)
    from_shard(core, 0, shardwire.resume(9, 3, 0, epoch, before=1))  # 1 came live
    ((_to, msg),) = outbox(core)
    _epoch, raw = shardwire.parse_resumed(msg[2])
    assert [f["type"] for f in payloads(raw)] == ["resumed"]
