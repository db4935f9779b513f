"""actors.hosts: the router's Redis half (OtherHosts), driven message by message like RouterCore.

No Redis and no link here: the tests play the link, taking the operations the core queued
(``hosts.take_ops()``) and telling it events (:mod:`actors.hostlink`).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.credit import WindowLimits
from actors.gather import REDIS
from actors.history import HistoryStore
from actors.hostlink import (
    AskPresence,
    Deliveries,
    Delivery,
    FetchPresence,
    LinkState,
    OpResult,
    PresenceDrift,
    PresenceHeard,
    PresenceLoaded,
    PublishChannel,
    PublishHosts,
    PublishPresence,
    PublishUsers,
    ReadHistory,
    Results,
    StorePresence,
    Subscribe,
    Unsubscribe,
)
from actors.hosts import MAX_DELTA_CHANGES, SYNCING, UNREACHED, OtherHosts
from actors.ids import ChannelId, stable_hash
from actors.presence import HostState, LoadedSnapshot, PresenceNews
from actors.router import RouterCore, UserBanned
from actors.wire import frames, shardwire

N = 3
ENV = [b"backend"]


def user_on(shard: int, exclude=()) -> int:
    return next(u for u in range(1, 10_000) if stable_hash(u, N) == shard and u not in exclude)


def identity(index: int) -> bytes:
    return shardwire.identity(index, 1)


def delta(core: RouterCore, index: int, gained=(), lost=()) -> None:
    core.shard_message(identity(index), shardwire.delta(list(gained), list(lost), 1), 0.0)
    core.take_outbox()  # the INDEXED confirmation


def command(core: RouterCore, body: dict[str, Any], now: float = 0.0) -> None:
    core.command(ENV, json.dumps(body).encode(), now)


def replies(core: RouterCore) -> list[dict[str, Any]]:
    return [json.loads(payload) for _envelope, payload in core.take_replies()]


def reply(core: RouterCore) -> dict[str, Any]:
    (only,) = replies(core)
    return only


def queries(core: RouterCore) -> dict[int, tuple[int, dict[str, Any]]]:
    """Queries to shards in the outbox: shard index -> (query id, body)."""
    found = {}
    for who, msg in core.take_outbox():
        assert msg[0] == shardwire.QUERY
        found[shardwire.parse_identity(who)[0]] = (shardwire.unpack_id(msg[1]), json.loads(msg[2]))
    return found


def answer(core: RouterCore, index: int, qid: int, body: Any) -> None:
    core.shard_message(identity(index), shardwire.result(qid, body), 0.0)


def make(
    up: bool = True, max_queries: int = 10_000, history: int = 0, **window: Any
) -> tuple[RouterCore, OtherHosts]:
    core = RouterCore(
        N,
        gather_timeout=1.0,
        redis=True,
        window=WindowLimits(**window),
        max_queries=max_queries,
        history=HistoryStore(history, 300.0, 1 << 20),
    )
    for index in range(N):
        core.shard_starting(index, 1, 100 + index)
        core.shard_message(identity(index), shardwire.hello(index, 1, 100 + index, []), 0.0)
    core.take_events()
    assert core.hosts is not None
    hosts = core.hosts
    if up:  # long enough ago for the replicas to have settled (see Replicas.in_sync)
        hosts.link_event(LinkState(True), -10.0)
    return core, hosts


def other_host(hosts: OtherHosts, name: str, users: dict[int, tuple[int, ...]]) -> None:
    """Another host heard of, and synced from its snapshot (as the link reports them)."""
    hosts.link_event(PresenceHeard([PresenceNews(name, "delta", "g1", 3)]), 0.0)
    assert hosts.take_ops() == [FetchPresence(name)]
    loaded = LoadedSnapshot(name, "g1", 3, HostState.of(users))
    hosts.link_event(PresenceLoaded(name, loaded), 0.0)
    assert hosts.take_ops() == []


@pytest.fixture
def linked() -> tuple[RouterCore, OtherHosts]:
    return make()


# -- topics -----------------------------------------------------------------------------------


def test_the_host_listens_to_a_channel_while_it_has_members(linked):
    core, hosts = linked
    delta(core, 0, gained=[5])
    assert hosts.take_ops() == [Subscribe(ChannelId(5))]
    delta(core, 1, gained=[5])  # not the host's first member
    delta(core, 0, lost=[5])
    assert hosts.take_ops() == []
    delta(core, 1, lost=[5])  # the last one
    assert hosts.take_ops() == [Unsubscribe(ChannelId(5))]


def test_a_dead_shard_s_channels_are_unsubscribed(linked):
    core, hosts = linked
    delta(core, 2, gained=[7, 8])
    hosts.take_ops()
    core.shard_down(2, 1, now=1.0)
    assert sorted(op.channel for op in hosts.take_ops() if isinstance(op, Unsubscribe)) == [7, 8]


# -- gathers with the other hosts -------------------------------------------------------------


def test_a_presence_query_merges_the_other_hosts_part_from_their_replicas(linked):
    core, hosts = linked
    other_host(hosts, "h2", {99: (3,), 10: ()})
    other_host(hosts, "h3", {98: (4,)})
    command(core, {"id": 1, "cmd": "get_online_users"})
    asked = queries(core)
    assert hosts.take_ops() == []  # nothing asked of Redis: the replicas answer
    for index, (qid, body) in asked.items():
        assert body == {"op": "online"}
        answer(core, index, qid, {"users": [index + 10]})
    assert reply(core) == {
        "id": 1,
        "ok": True,
        "users": [10, 11, 12, 98, 99],
        "missing_shards": [],
        "cluster": True,
    }
    command(core, {"id": 2, "cmd": "get_online_users_in_channel", "channel": 3})
    assert queries(core) == {}  # no shard here has the channel
    assert reply(core)["users"] == [99]


def test_while_the_link_is_down_replies_say_the_other_hosts_were_not_reached():
    core, hosts = make(up=False)
    command(core, {"id": 1, "cmd": "get_online_users_in_channel", "channel": 3})
    assert hosts.take_ops() == []
    assert reply(core) == {
        "id": 1,
        "ok": True,
        "users": [],
        "missing_shards": [],  # the Redis participant is never a shard
        "cluster": False,
        "cluster_error": UNREACHED,
    }


def test_the_link_going_down_ends_the_wait_for_it(linked):
    core, hosts = linked
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 3, "data": 1})
    (op,) = hosts.take_ops()
    assert isinstance(op, PublishChannel)
    hosts.link_event(LinkState(False), 0.0)
    result = reply(core)
    assert (result["cluster"], result["cluster_error"]) == (False, UNREACHED)
    assert core.pending == {}
    hosts.link_event(Results([OpResult(op.qid, True, {"value": 1})]), 0.0)  # too late
    assert replies(core) == []


def test_an_operation_redis_failed_counts_the_other_hosts_missing(linked):
    core, hosts = linked
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 4, "data": "x"})
    (op,) = hosts.take_ops()
    assert op == PublishChannel(op.qid, ChannelId(4), frames.channel_message(4, b'"x"'))
    hosts.link_event(Results([OpResult(op.qid, False, None)]), 0.0)
    assert reply(core)["cluster"] is False


def test_the_deadline_counts_a_silent_link_missing(linked):
    core, hosts = linked
    command(core, {"id": 1, "cmd": "broadcast_to_user", "user": 5, "data": 1}, now=2.0)
    hosts.take_ops()
    core.tick(2.9)
    assert replies(core) == []
    core.tick(3.0)
    assert reply(core)["cluster"] is False


def test_a_result_nobody_waits_for_is_ignored(linked):
    core, hosts = linked
    hosts.result(12345, True, {"users": []})
    hosts.result(0, False, None)
    assert replies(core) == [] and core.pending == {}


def test_a_broadcast_is_acknowledged_once_redis_has_taken_it(linked):
    core, hosts = linked
    delta(core, 1, gained=[4])
    hosts.take_ops()
    command(core, {"id": 7, "cmd": "broadcast_to_channel", "channel": 4, "data": 1})
    assert [who for who, _msg in core.take_outbox()] == [identity(1)]  # local: at once
    (op,) = hosts.take_ops()
    assert replies(core) == []
    hosts.result(op.qid, True, {"value": 0})
    assert reply(core) == {"id": 7, "ok": True, "shards": 1, "missing_shards": [], "cluster": True}


def test_a_users_broadcast_is_published_to_the_other_hosts(linked):
    core, hosts = linked
    users = [user_on(0), user_on(2)]
    command(core, {"id": 1, "cmd": "broadcast_to_users", "users": users, "data": "hi"})
    (op,) = hosts.take_ops()
    assert op == PublishUsers(op.qid, users, frames.direct_message(b'"hi"'))
    assert op.control is None


@pytest.mark.parametrize("name", ["subscribe", "unsubscribe", "disconnect"])
def test_a_user_command_is_forwarded_to_the_hosts_that_have_the_user(linked, name):
    core, hosts = linked
    user = user_on(1)
    args = {"user": user} if name == "disconnect" else {"user": user, "channel": 8}
    command(core, {"id": 1, "cmd": name, **args})
    (op,) = hosts.take_ops()
    assert op == PublishUsers(op.qid, [user], b"", {"op": name, **args})
    ((qid, body),) = queries(core).values()
    assert body == {"op": name, **args}  # the same body as the local shard's
    answer(core, 1, qid, {"connections": 2})
    hosts.result(op.qid, True, {"value": 3})
    assert reply(core) == {
        "id": 1,
        "ok": True,
        "connections": 2,
        "hosts": 3,
        "missing_shards": [],
        "cluster": True,
    }


def test_a_ban_goes_to_every_other_host_not_only_those_with_the_user(linked):
    core, hosts = linked
    user = user_on(1)
    command(core, {"id": 1, "cmd": "disconnect", "user": user, "ban": 3})
    assert core.take_events() == [UserBanned(user, 3)]
    (op,) = hosts.take_ops()
    assert op == PublishHosts(op.qid, [user], {"op": "disconnect", "user": user, "ban": 3})
    ((qid, _body),) = queries(core).values()
    answer(core, 1, qid, {"connections": 1})
    hosts.result(op.qid, True, {"value": 4})
    assert reply(core) == {
        "id": 1,
        "ok": True,
        "connections": 1,
        "hosts": 4,
        "banned": 3,
        "missing_shards": [],
        "cluster": True,
    }


def test_a_ban_while_the_link_is_down_still_bans_here_and_says_the_cluster_missed_it():
    core, hosts = make(up=False)
    user = user_on(1)
    command(core, {"id": 1, "cmd": "disconnect", "user": user, "ban": 3})
    assert core.take_events() == [UserBanned(user, 3)]
    assert hosts.take_ops() == []
    ((qid, _body),) = queries(core).values()
    answer(core, 1, qid, {"connections": 0})
    got = reply(core)
    assert got["banned"] == 3 and got["cluster"] is False


def test_a_ban_from_another_host_bans_here_and_disconnects(linked):
    core, hosts = linked
    a, b = user_on(1), user_on(2)
    control = {"op": "disconnect", "user": a, "ban": 1.5}
    hosts.link_event(Deliveries([Delivery(None, [a, b], b"", control)]), 0.0)
    assert core.take_events() == [UserBanned(a, 1.5), UserBanned(b, 1.5)]
    sent = sorted((who, json.loads(m[2])["user"]) for who, m in core.take_outbox())
    assert sent == sorted([(identity(1), a), (identity(2), b)])
    plain = {"op": "disconnect", "user": a}  # a ban that had passed on arrival
    hosts.link_event(Deliveries([Delivery(None, [a], b"", plain)]), 0.0)
    assert core.take_events() == []


def test_are_users_online_answers_from_this_host_and_the_replicas(linked):
    core, hosts = linked
    a, b = user_on(0), user_on(1)
    other_host(hosts, "h2", {b: ()})
    command(core, {"id": 1, "cmd": "are_users_online", "users": [a, b]})
    assert hosts.take_ops() == []
    for index, (qid, _body) in queries(core).items():
        answer(core, index, qid, {"online": []})
    assert reply(core)["online"] == {str(a): False, str(b): True}


def test_status_and_router_stats_do_not_involve_the_other_hosts(linked):
    core, hosts = linked
    command(core, {"id": 1, "cmd": "router_stats"})
    command(core, {"id": 2, "cmd": "status"})
    core.close_all()
    assert hosts.take_ops() == []
    assert all("cluster" not in r for r in replies(core))


# -- deliveries from other hosts --------------------------------------------------------------


def test_a_channel_broadcast_from_another_host_reaches_the_local_members(linked):
    core, hosts = linked
    delta(core, 0, gained=[6])
    delta(core, 2, gained=[6])
    frame = frames.channel_message(6, b"1")
    hosts.link_event(Deliveries([Delivery(ChannelId(6), [], frame)]), 0.0)
    message = shardwire.channel_delivery(6, frame)
    assert sorted(core.take_outbox()) == [(identity(0), message), (identity(2), message)]
    assert replies(core) == []  # its publisher had its answer on its own host


def test_a_users_broadcast_from_another_host_goes_to_the_up_shards_of_the_users(linked):
    core, hosts = linked
    a0, b0, c1, d2 = user_on(0), user_on(0, exclude=[user_on(0)]), user_on(1), user_on(2)
    core.shard_down(2, 1, now=0.0)
    frame = frames.direct_message(b"2")
    hosts.deliver(Delivery(None, [a0, c1, b0, d2], frame), 0.0)
    sent = {shardwire.parse_identity(who)[0]: msg for who, msg in core.take_outbox()}
    assert sent == {
        0: shardwire.users_delivery([a0, b0], frame),
        1: shardwire.users_delivery([c1], frame),
    }


def test_deliveries_from_other_hosts_that_find_no_room_are_dropped_and_counted():
    core, hosts = make(messages=1)
    delta(core, 0, gained=[7])
    slot = core.slots[0]
    credit = shardwire.pulse(slot.window.sent_messages, slot.window.sent_bytes)
    core.shard_message(identity(0), credit, 0.0)  # the INDEXED consumed
    hosts.deliver(Delivery(ChannelId(7), [], frames.channel_message(7, b"1")), 0.0)
    hosts.deliver(Delivery(ChannelId(7), [], frames.channel_message(7, b"2")), 0.0)
    assert len(core.take_outbox()) == 1
    assert core.counters["remote_dropped"] == 1


def topic(channel: int, offset: int) -> Delivery:
    """Message ``offset`` of ``channel`` (epoch E) as its topic brings it."""
    frame = frames.channel_message(channel, b"%d" % offset, offset, "E")
    return Delivery(ChannelId(channel), [], frame, offset=offset, epoch="E")


def delivered(core: RouterCore) -> list[tuple[int, int]]:
    """(shard, offset) of the channel messages in the outbox, in order (not the queries)."""
    found = []
    for who, msg in core.take_outbox():
        if msg[0] != shardwire.CHANNEL:
            continue
        offset = json.loads(frames_payload(msg[2]))["offset"]
        found.append((shardwire.parse_identity(who)[0], offset))
    return found


def frames_payload(frame: bytes) -> bytes:
    return frame[2:] if frame[1] < 126 else frame[4:]


def test_a_gap_in_a_channel_s_topic_is_read_from_redis_and_delivered_first():
    core, hosts = make(history=64)
    hosts.link_event(LinkState(True), -10.0)
    delta(core, 1, gained=[6])
    hosts.take_ops()
    hosts.link_event(Deliveries([topic(6, 1), topic(6, 2)]), 0.0)
    assert delivered(core) == [(1, 1), (1, 2)]
    # the listener subscribed again: 3 and 4 were published meanwhile
    hosts.link_event(Deliveries([topic(6, 5), topic(6, 6)]), 0.1)
    assert delivered(core) == []
    (read,) = hosts.take_ops()
    assert read == ReadHistory(read.qid, ChannelId(6), 2, 2, 300_000)  # 2 after 2
    body = {"epoch": "E", "offset": 6, "first": 1, "messages": [[3, "3"], [4, "4"]]}
    hosts.link_event(Results([OpResult(read.qid, True, body)]), 0.2)
    assert delivered(core) == [(1, 3), (1, 4), (1, 5), (1, 6)]
    assert replies(core) == []  # nobody waited for the read
    gaps = core.statistics()["topic_gaps"]
    assert (gaps["gaps"], gaps["gaps_filled"], gaps["gap_messages"]) == (1, 1, 2)


def test_a_gap_heard_before_the_link_says_it_is_up_is_read_once_it_does():
    # the listener, subscribed again, delivers before the worker reports the link up
    core, hosts = make(history=64)
    delta(core, 1, gained=[6])
    hosts.link_event(Deliveries([topic(6, 1)]), 0.0)
    hosts.link_event(LinkState(False), 0.1)
    hosts.take_ops()
    delivered(core)
    hosts.link_event(Deliveries([topic(6, 4), topic(6, 5)]), 0.2)
    assert delivered(core) == [] and hosts.take_ops() == []
    assert core.next_tick(0.2, 10.0) <= 0.2 + 0.1  # its deadline is watched
    hosts.link_event(LinkState(True), 0.3)
    (read,) = [op for op in hosts.take_ops() if isinstance(op, ReadHistory)]
    assert (read.since, read.limit) == (1, 2)
    body = {"epoch": "E", "offset": 5, "first": 1, "messages": [[2, "2"], [3, "3"]]}
    hosts.link_event(Results([OpResult(read.qid, True, body)]), 0.4)
    assert delivered(core) == [(1, 2), (1, 3), (1, 4), (1, 5)]


def test_a_gap_whose_link_does_not_come_back_in_time_lets_the_held_messages_go_on():
    core, hosts = make(history=64)
    delta(core, 1, gained=[6])
    hosts.link_event(Deliveries([topic(6, 1)]), 0.0)
    hosts.link_event(LinkState(False), 0.1)
    delivered(core)
    hosts.link_event(Deliveries([topic(6, 4), topic(6, 5)]), 0.2)
    core.tick(1.1)  # within gather_timeout (1 s): still waiting
    assert delivered(core) == []
    core.tick(1.2)
    assert delivered(core) == [(1, 4), (1, 5)]
    assert core.statistics()["topic_gaps"]["gaps_unfilled"] == 1
    hosts.link_event(LinkState(True), 1.3)
    assert not [op for op in hosts.take_ops() if isinstance(op, ReadHistory)]


@pytest.mark.parametrize("how", ["link lost", "time up", "redis failed", "refused"])
def test_a_gap_that_cannot_be_read_lets_the_held_messages_go_on(how):
    core, hosts = make(history=64, max_queries=1 if how == "refused" else 10_000)
    delta(core, 1, gained=[6])
    hosts.take_ops()
    hosts.link_event(Deliveries([topic(6, 1)]), 0.0)
    delivered(core)
    if how == "refused":  # max_queries in flight: the read is not even started
        command(core, {"cmd": "get_online_users"})
    hosts.link_event(Deliveries([topic(6, 3), topic(6, 4)]), 0.1)
    ops = [op for op in hosts.take_ops() if isinstance(op, ReadHistory)]
    assert len(ops) == (how != "refused")
    if how == "link lost":  # during the read
        hosts.link_event(LinkState(False), 0.2)
    elif how == "time up":
        core.tick(1.2)
    elif how == "redis failed":
        hosts.link_event(Results([OpResult(ops[0].qid, False, None)]), 0.2)
    assert delivered(core) == [(1, 3), (1, 4)]
    assert core.statistics()["topic_gaps"]["gaps_unfilled"] == 1


def test_a_channel_without_members_here_is_not_followed():
    core, hosts = make(history=64)
    hosts.link_event(Deliveries([topic(6, 1), topic(6, 5)]), 0.0)  # (arriving after a leave)
    assert hosts.take_ops() == [] and core.statistics()["topic_gaps"]["channels"] == 0


def test_a_user_command_from_another_host_is_applied_and_answered_to_nobody(linked):
    core, hosts = linked
    a, b = user_on(1), user_on(1, exclude=[user_on(1)])
    control = {"op": "subscribe", "channel": 9}
    hosts.link_event(Deliveries([Delivery(None, [a, b], b"", control)]), 0.0)
    sent = [(who, shardwire.unpack_id(m[1]), json.loads(m[2])) for who, m in core.take_outbox()]
    assert sent == [
        (identity(1), 0, {"op": "subscribe", "channel": 9, "user": a}),  # qid 0: no gather
        (identity(1), 0, {"op": "subscribe", "channel": 9, "user": b}),
    ]
    assert core.pending == {} and replies(core) == []


# -- this host's presence ----------------------------------------------------------------------


def pull(core: RouterCore, hosts: OtherHosts, now: float, answers: dict[int, list[Any]]):
    """One presence tick: the shards asked (index -> full?), those in ``answers`` answering."""
    hosts.presence_tick(now)
    asked = queries(core)
    for index, users in answers.items():
        answer(core, index, asked[index][0], {"users": users})
    core.tick(now + 1.0)  # the silent ones: missing
    return {index: body["full"] for index, (_qid, body) in asked.items()}


def test_presence_is_pulled_from_the_up_shards_and_published_as_deltas(linked):
    core, hosts = linked
    gen = hosts.local.generation
    core.shard_down(1, 1, now=0.0)
    assert pull(core, hosts, 5.0, {0: [[1, [4]]], 2: [[2, [4, 5]]]}) == {0: True, 2: True}
    changes = ((1, (4,)), (2, (4, 5)))
    assert hosts.take_ops() == [
        StorePresence(gen, 1, {1: (4,), 2: (4, 5)}),  # the first: others sync from it
        PublishPresence(gen, 1, changes, 2),
    ]
    assert pull(core, hosts, 7.0, {0: [[1, None]], 2: []}) == {0: False, 2: False}
    assert hosts.take_ops() == [PublishPresence(gen, 2, ((1, None),), 1)]
    pull(core, hosts, 9.0, {0: [], 2: []})
    assert hosts.take_ops() == [PublishPresence(gen, 2, (), 1)]  # a heartbeat
    assert replies(core) == []  # nobody asked: no reply


def test_a_shard_that_did_not_answer_is_asked_everything_next_time(linked):
    core, hosts = linked
    pull(core, hosts, 5.0, {0: [[1, []]], 1: [], 2: []})
    hosts.take_ops()
    assert pull(core, hosts, 7.0, {1: [], 2: []}) == {0: False, 1: False, 2: False}
    assert hosts.take_ops() == [PublishPresence(hosts.local.generation, 1, (), 1)]
    assert pull(core, hosts, 9.0, {0: [[2, []]], 1: [], 2: []})[0] is True
    (op,) = hosts.take_ops()  # user 1 left meanwhile: the full answer tells
    assert isinstance(op, PublishPresence) and sorted(op.changes) == [(1, None), (2, ())]


def test_a_dead_shard_s_users_go_offline_in_the_next_delta(linked):
    core, hosts = linked
    pull(core, hosts, 5.0, {0: [[1, []]], 1: [[2, [7]]], 2: []})
    hosts.take_ops()
    core.shard_down(1, 1, now=6.0)
    pull(core, hosts, 7.0, {0: [], 2: []})
    assert hosts.take_ops() == [PublishPresence(hosts.local.generation, 2, ((2, None),), 1)]


def test_another_host_s_request_and_the_link_coming_back_store_a_snapshot(linked):
    core, hosts = linked
    pull(core, hosts, 5.0, {0: [[1, []]], 1: [], 2: []})
    hosts.take_ops()
    hosts.link_event(Deliveries([Delivery(None, [], b"", {"op": "snapshot"})]), 6.0)
    pull(core, hosts, 7.0, {0: [], 1: [], 2: []})
    assert hosts.take_ops()[0] == StorePresence(hosts.local.generation, 1, {1: ()})
    hosts.link_event(LinkState(False), 8.0)
    hosts.link_event(LinkState(True), 8.5)
    pull(core, hosts, 9.0, {0: [], 1: [], 2: []})
    assert isinstance(hosts.take_ops()[0], StorePresence)
    hosts.link_event(PresenceDrift(), 10.0)  # the link found the user set short in Redis
    pull(core, hosts, 11.0, {0: [], 1: [], 2: []})
    assert isinstance(hosts.take_ops()[0], StorePresence)


def test_an_overloaded_router_still_heartbeats(linked):
    core, hosts = linked
    pull(core, hosts, 5.0, {0: [[1, []]], 1: [], 2: []})
    hosts.take_ops()
    core.max_queries = 0  # every gather refused: no pull
    hosts.presence_tick(6.0)
    assert queries(core) == {}
    assert hosts.take_ops() == [PublishPresence(hosts.local.generation, 1, (), 1)]


def test_a_delta_too_big_for_one_message_becomes_a_snapshot(linked):
    core, hosts = linked
    many = [[user, []] for user in range(1, MAX_DELTA_CHANGES + 2)]
    pull(core, hosts, 5.0, {0: many, 1: [], 2: []})
    store, publish = hosts.take_ops()
    assert isinstance(store, StorePresence) and len(store.users) == MAX_DELTA_CHANGES + 1
    assert publish == PublishPresence(hosts.local.generation, 1, (), MAX_DELTA_CHANGES + 1)


def test_presence_answers_say_when_the_replicas_may_be_incomplete():
    core, hosts = make(up=False)
    hosts.link_event(LinkState(True), 10.0)
    command(core, {"id": 1, "cmd": "get_online_users"}, now=10.0)
    for index, (qid, _body) in queries(core).items():
        answer(core, index, qid, {"users": []})
    got = reply(core)
    assert (got["cluster"], got["cluster_error"]) == (False, SYNCING)  # just linked
    hosts.presence_tick(12.5)  # settled, and no other host is syncing
    hosts.take_ops()
    queries(core)
    command(core, {"id": 2, "cmd": "get_online_users"}, now=12.5)
    for index, (qid, _body) in queries(core).items():
        answer(core, index, qid, {"users": []})
    assert reply(core)["cluster"] is True


def test_a_gap_in_another_host_s_deltas_asks_the_link_to_read_its_snapshot(linked):
    _core, hosts = linked
    other_host(hosts, "h2", {1: ()})
    hosts.link_event(PresenceHeard([PresenceNews("h2", "delta", "g1", 5, ((2, ()),))]), 1.0)
    assert hosts.take_ops() == [FetchPresence("h2")]
    hosts.link_event(PresenceLoaded("h2", None), 1.1)  # none there: ask the host for one
    assert hosts.take_ops() == [AskPresence("h2")]
    assert hosts.statistics()["presence"]["presence_syncing"] == 1


def test_a_presence_pull_waits_for_room_among_the_queries_in_flight():
    core, hosts = make(max_queries=1)
    command(core, {"id": 1, "cmd": "status"})
    core.take_outbox()
    hosts.presence_tick(0.0)
    assert core.take_outbox() == [] and len(core.pending) == 1


def test_a_presence_pull_never_involves_the_link_as_a_participant(linked):
    core, hosts = linked
    hosts.presence_tick(0.0)
    (gather,) = core.pending.values()
    assert REDIS not in gather.waiting and not gather.redis


# -- statistics -------------------------------------------------------------------------------


def test_router_stats_show_a_copy_of_the_link_s_counters(linked):
    core, hosts = linked
    assert "redis" not in core.statistics()  # no link has given a source yet
    counters = {"published": 1, "received": 2, "malformed": 0, "reconnects": 0}
    hosts.link_stats = lambda: counters
    stats = core.statistics()
    assert stats["redis"] == counters
    assert stats["redis"] is not counters
