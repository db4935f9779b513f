"""shards.redislink without a Redis server: the reconnection backoff, and the link's side of
its contract with the router (typed operations in, typed events out, counters as a copy).
The link's threads are never started here; against real servers see tests/system."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest

from actors.hostlink import (
    AnswerUserConnections,
    Delivery,
    FetchPresence,
    LinkEvent,
    OpResult,
    PresenceLoaded,
    PublishChannel,
    PublishPresence,
    PublishUsers,
    ReadHistory,
    Results,
    Subscribe,
    Unsubscribe,
    UserConnections,
)
from actors.ids import ChannelId
from actors.presence import PresenceNews
from actors.wire import cluster, frames
from shards.redislink import BACKOFF, COUNTERS, Ask, Backoff, Probe, RedisLink

KEY = cluster.ClusterKey(b"unit cluster key")
NOW_MS = 1_000_000


def delays(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]


def test_delays_grow_then_stay_at_the_largest():
    backoff = Backoff((0.05, 0.1, 0.2))
    assert delays(backoff, 5) == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert backoff.failures == 5


def test_a_success_starts_the_next_failures_from_the_smallest_delay():
    backoff = Backoff((0.05, 0.1, 0.2))
    delays(backoff, 4)
    backoff.reset()
    assert backoff.failures == 0
    assert delays(backoff, 3) == [0.05, 0.1, 0.2]


def test_the_link_default_starts_small_and_is_capped_at_one_second():
    backoff = Backoff()
    assert backoff.delays == BACKOFF
    first, *_, last = delays(backoff, 20)
    assert first == min(BACKOFF)
    assert last == max(BACKOFF) == 1.0


# -- the link's contract with the router ----------------------------------------------------


@pytest.fixture
def link() -> tuple[RedisLink, list[LinkEvent]]:
    events: list[LinkEvent] = []
    return RedisLink("redis://127.0.0.1:1", "unit", events.append, KEY), events


def message(*args: Any, **kwargs: Any) -> cluster.Message:
    """A cluster message stamped now (an older stamp is a replay)."""
    return cluster.Message(*args, sent_ms=int(time.time() * 1000), **kwargs)


def pubsub_message(topic: str, payload: bytes) -> dict[str, Any]:
    return {"channel": topic.encode(), "data": payload}


def test_topic_changes_go_to_the_listener_not_the_worker(link):
    link, _events = link
    link.submit(Subscribe(ChannelId(4)))
    link.submit(Unsubscribe(ChannelId(5)))
    assert link.ops.empty()
    topic = link.layout.channel_topic
    assert link._apply_topic_changes() == [(True, topic(4)), (False, topic(5))]
    assert topic(4) in link.topics


def test_operations_queue_for_the_worker_in_order(link):
    link, _events = link
    ops = [
        FetchPresence("h2"),
        PublishChannel(2, ChannelId(3), b"f"),
        PublishPresence("g", 1, (), 0),
    ]
    for op in ops:
        link.submit(op)
    assert link._drain(0.0) == ops


def test_a_full_queue_fails_the_operation_at_once_to_whoever_waits(link):
    link, events = link
    link.ops = queue.Queue(1)
    link.submit(PublishPresence("g", 1, (), 0))
    link.submit(ReadHistory(2, ChannelId(5), 0, 10, 1000))  # no room: failed, reported
    link.submit(PublishPresence("g", 2, (), 0))  # no room, nobody waits: nothing reported
    link.submit(FetchPresence("h2"))  # no room: the router hears there is no snapshot
    assert events == [Results([OpResult(2, False, None)]), PresenceLoaded("h2", None)]


def test_answers_have_the_shape_of_the_shards_answers(link):
    link, _events = link
    assert link._answer(PublishUsers(1, [5], b"f"), 2, NOW_MS) == {"value": 2}
    assert Probe().qid == PublishPresence("g", 1, (), 0).qid == FetchPresence("h").qid == 0
    assert link.stats()["forged"] == 0


def test_a_stored_snapshot_is_opened_and_checked_by_the_worker(link):
    link, _events = link
    raw = cluster.seal_snapshot(KEY, "h1", "g1", 4, {3: (2,), 5: ()})
    loaded = link._snapshot("h1", raw)
    assert loaded is not None and loaded.seq == 4 and loaded.state.users == {3: (2,), 5: ()}
    assert link._snapshot("h1", None) is None  # none there: not counted
    fake = cluster.seal_snapshot(cluster.ClusterKey(b"not the key"), "h1", "g1", 4, {9: ()})
    assert link._snapshot("h1", fake) is None
    assert link._snapshot("thief", raw) is None  # h1's snapshot under another host's name
    assert link.stats()["forged"] == 2 and link.stats()["presence_loaded"] == 1


def test_presence_messages_are_checked_and_our_own_are_dropped(link):
    link, _events = link
    now = int(time.time() * 1000)
    theirs = cluster.encode_presence(KEY, "h2", "delta", "g", 3, now, [(7, (1,))])
    assert link._presence_news(theirs) == PresenceNews("h2", "delta", "g", 3, ((7, (1,)),))
    ours = cluster.encode_presence(KEY, link.host, "delta", "g", 3, now)
    assert link._presence_news(ours) is None
    forged = cluster.encode_presence(cluster.ClusterKey(b"k"), "h2", "delta", "g", 3, now)
    assert link._presence_news(forged) is None
    old = cluster.encode_presence(KEY, "h2", "delta", "g", 3, _stale_ms())
    assert link._presence_news(old) is None
    stats = link.stats()
    assert (stats["received"], stats["forged"], stats["replayed"]) == (4, 1, 1)


def test_a_channel_message_from_another_host_becomes_a_delivery(link):
    link, _events = link
    frame = frames.channel_message(6, b"1")
    payload = cluster.encode(message("other-host", None, frame, channel=6), KEY)
    got = link._decode(pubsub_message(link.layout.channel_topic(6), payload))
    assert got == Delivery(ChannelId(6), [], frame, None)


def test_forged_or_replayed_onto_another_topic_messages_are_counted_and_dropped(link):
    link, _events = link
    frame = frames.channel_message(6, b"1")
    topic = link.layout.channel_topic(6)
    unsealed = cluster.encode(message("other-host", None, frame, channel=6), KEY)[32:]
    wrong_key = cluster.encode(
        message("other-host", None, frame, channel=6), cluster.ClusterKey(b"guess")
    )
    for_channel_7 = cluster.encode(message("other-host", None, frame, channel=7), KEY)
    for_users = cluster.encode(message("other-host", [1], frame), KEY)
    for payload in (unsealed, wrong_key, for_channel_7, for_users):
        assert link._decode(pubsub_message(topic, payload)) is None
    assert link.stats()["forged"] == 4
    assert link.stats()["malformed"] == 0


def test_a_forwarded_ban_arrives_with_what_is_left_of_it(link):
    link, _events = link
    now = int(time.time() * 1000)
    inbox = link.layout.host_topic(link.host)

    def delivered(control: dict[str, Any]) -> dict[str, Any] | None:
        payload = cluster.encode(message("other-host", [1], b"", control=control), KEY)
        got = link._decode(pubsub_message(inbox, payload))
        return None if got is None else got.control

    ban = {"op": "disconnect", "user": 1, "ban": 60, "until": now + 30_000}
    got = delivered(ban)
    assert got is not None and 25 < got["ban"] <= 30 and "until" not in got
    assert delivered({**ban, "until": now - 1}) is None  # it has passed: nothing to do
    lift = delivered({**ban, "ban": 0, "until": now - 1})
    assert lift == {"op": "disconnect", "user": 1, "ban": 0.0}


def test_a_users_command_from_another_host_becomes_a_delivery_with_its_control(link):
    link, _events = link
    control = {"op": "disconnect"}
    payload = cluster.encode(message("other-host", [1, 2], b"", control=control), KEY)
    got = link._decode(pubsub_message(link.layout.host_topic(link.host), payload))
    assert got == Delivery(None, [1, 2], b"", control)


def test_our_own_messages_and_probes_are_not_delivered(link):
    link, _events = link
    own = cluster.encode(message(link.host, None, b"frame", channel=6), KEY)
    assert link._decode(pubsub_message(link.layout.channel_topic(6), own)) is None
    probe = cluster.encode(message(link.host, None, b"", probe=True), KEY)
    assert link._decode(pubsub_message(link.layout.host_topic(link.host), probe)) is None


def test_a_reads_probe_back_on_its_channels_topic_is_delivered_to_the_router(link):
    link, _events = link
    topic = link.layout.channel_topic(6)

    def decoded(origin: str, qid: bytes, channel: int | None = 6) -> Delivery | None:
        probe = cluster.encode(message(origin, None, qid, probe=True, channel=channel), KEY)
        return link._decode(pubsub_message(topic, probe))

    back = Delivery(ChannelId(6), [], b"", {"op": "probe_back", "qid": 41})
    assert decoded(link.host, b"41") == back
    assert decoded("other-host", b"41") is None  # another host's read: not ours
    assert decoded(link.host, b"") is None  # a node's probe (cluster mode)
    assert decoded(link.host, b"41", channel=7) is None  # sealed for another channel: counted
    assert decoded(link.host, b"x1") is None  # not a read's id: counted
    assert (link.stats()["forged"], link.stats()["malformed"]) == (1, 1)


def test_malformed_messages_are_counted_and_the_router_gets_a_copy_of_the_counters(link):
    link, _events = link
    garbage = KEY.seal(b"\x00garbage")  # sealed, so not forged: malformed
    assert link._decode(pubsub_message(link.layout.channel_topic(6), garbage)) is None
    untargeted = message("other-host", None, frames.direct_message(b"1"))
    no_target = cluster.encode(untargeted, KEY)
    assert link._decode(pubsub_message("not-a-topic", no_target)) is None
    stats = link.stats()
    assert stats == {**dict.fromkeys(COUNTERS, 0), "received": 2, "malformed": 2}
    assert COUNTERS == (
        "published",
        "received",
        "malformed",
        "forged",
        "replayed",
        "reconnects",
        "resubscribed",
        "history_appended",
        "history_read",
        "critical_stored",
        "critical_refused",
        "acks",
        "oversized",
        "marks_set",
        "who_asked",
        "who_answers",
        "who_replied",
        "who_answers_dropped",
        "who_partial",
        "presence_loaded",
        "presence_drift",
    )
    stats["received"] = 100  # a copy: the link's own counters are untouched
    assert link.stats()["received"] == 2


def test_a_sealed_message_kept_and_published_again_later_is_counted_replayed(link):
    link, _events = link
    control = {"op": "disconnect", "user": 1, "ban": 0}  # e.g. a copy of a "lift the ban"
    old = cluster.Message("other-host", [1], b"", control=control, sent_ms=_stale_ms())
    payload = cluster.encode(old, KEY)
    assert link._decode(pubsub_message(link.layout.host_topic(link.host), payload)) is None
    assert link.stats()["replayed"] == 1
    assert link.stats()["forged"] == 0


def _stale_ms() -> int:
    return int(time.time() * 1000) - cluster.REPLAY_WINDOW_MS - 1000


# -- issue 12: host controls and the who RPC (no threads: the link's parts called directly) -----


def inbox_delivery(link: RedisLink, origin: str, control: dict[str, Any], users=None):
    payload = cluster.encode(message(origin, users, b"", control=control), KEY)
    return link._decode(pubsub_message(link.layout.host_topic(link.host), payload))


def test_a_mark_and_a_who_from_another_host_become_deliveries_for_the_router(link):
    link, _events = link
    mark = {"op": "set_channel", "channel": 5, "join_leave": True}
    assert inbox_delivery(link, "h2", mark, []) == Delivery(None, [], b"", control=mark)
    got = inbox_delivery(link, "h2", {"op": "who", "user": 7, "qid": 3}, [7])
    who = {"op": "who", "user": 7, "qid": 3, "reply_to": "h2"}  # the sealed origin
    assert got == Delivery(None, [7], b"", control=who)


def test_a_host_control_on_a_channel_topic_is_forged(link):
    link, _events = link
    mark = {"op": "set_channel", "channel": 5, "join_leave": True}
    payload = cluster.encode(message("h2", [], b"", control=mark, channel=6), KEY)
    assert link._decode(pubsub_message(link.layout.channel_topic(6), payload)) is None
    assert link.stats()["forged"] == 1


def asking(link: RedisLink, qid: int, hosts: list[str] | None) -> OpResult | None:
    """As the worker does: register the ask, then (if ``hosts``) read the script's reply."""
    link._asks[qid] = Ask(time.monotonic() + 60)
    if hosts is None:
        return None
    return link._asked(UserConnections(qid, 7), [h.encode() for h in hosts])


def answer(link: RedisLink, origin: str, qid: int, records: list[dict[str, Any]], to=None):
    control = cluster.answer_control(to or link.host, qid, records)
    assert inbox_delivery(link, origin, control) is None  # never a delivery


def test_the_result_comes_when_every_host_asked_has_answered_each_record_with_its_host(link):
    link, events = link
    assert asking(link, 4, ["h2", "h3"]) is None
    answer(link, "h2", 4, [{"conn": "0.1.1"}, {"conn": "0.1.2", "host": "lies"}])
    assert events == []
    answer(link, "h2", 4, [{"conn": "again"}])  # a second answer from h2: dropped
    answer(link, "h3", 4, [])
    records = [{"conn": "0.1.1", "host": "h2"}, {"conn": "0.1.2", "host": "h2"}]
    body = {"connections": records, "missing_hosts": []}
    assert events == [Results([OpResult(4, True, body)])]
    assert link._asks == {}
    stats = link.stats()
    assert stats["who_asked"] == 1 and stats["who_answers"] == 2
    assert stats["who_answers_dropped"] == 1


def test_nobody_to_ask_answers_at_once(link):
    link, events = link
    assert asking(link, 4, []) == OpResult(4, True, {"connections": [], "missing_hosts": []})
    assert link._asks == {} and events == []


def test_answers_before_the_scripts_reply_count_only_from_the_hosts_it_told(link):
    link, events = link
    asking(link, 4, None)
    answer(link, "h2", 4, [{"conn": "a"}])
    answer(link, "stranger", 4, [{"conn": "b"}])
    assert events == []
    done = link._asked(UserConnections(4, 7), [b"h2"])
    assert done == OpResult(
        4, True, {"connections": [{"conn": "a", "host": "h2"}], "missing_hosts": []}
    )
    assert link.stats()["who_answers_dropped"] == 1


def test_at_the_deadline_what_came_is_reported_with_the_missing_hosts(link):
    link, events = link
    asking(link, 4, ["h2", "h3"])
    asking(link, 5, None)  # its script's reply not read: the worker's to report
    answer(link, "h3", 4, [{"conn": "x"}], to=None)
    link._expire_asks()
    assert events == []  # not due yet
    for ask in link._asks.values():
        ask.deadline = 0.0
    link._expire_asks()
    body = {"connections": [{"conn": "x", "host": "h3"}], "missing_hosts": ["h2"]}
    assert events == [Results([OpResult(4, True, body)])]
    assert list(link._asks) == [5] and link.stats()["who_partial"] == 1
    answer(link, "h2", 4, [{"conn": "late"}])
    assert link.stats()["who_answers_dropped"] == 1 and len(events) == 1


def test_an_answer_for_another_host_is_forged_and_a_failed_ask_is_forgotten(link):
    link, events = link
    asking(link, 4, ["h2"])
    answer(link, "h2", 4, [{"conn": "x"}], to="someone-else")
    assert link.stats()["forged"] == 1 and events == []
    link._fail([UserConnections(4, 7)])
    assert link._asks == {} and events == [Results([OpResult(4, False, None)])]


def test_a_truncated_answer_says_so_and_one_too_big_is_halved_until_it_fits(link, monkeypatch):
    link, events = link
    monkeypatch.setattr(cluster, "MAX_ANSWER_BYTES", 2_000)
    records = [{"conn": f"0.1.{n}", "pad": "x" * 50} for n in range(100)]
    payload = link._sealed_answer(AnswerUserConnections("h1", 4, records), _now())
    assert len(payload) <= 2_000
    decoded = cluster.decode(payload, KEY, _now())
    assert isinstance(decoded, cluster.Message) and decoded.control is not None
    kept = decoded.control["connections"]
    assert 0 < len(kept) < 100 and kept == records[: len(kept)]
    assert decoded.control["truncated"] is True
    asking(link, 4, ["h2"])
    link._take_answer("h2", decoded.control)
    (result,) = events[0].results
    assert result.body is not None and result.body["truncated"] is True


def _now() -> int:
    return int(time.time() * 1000)
