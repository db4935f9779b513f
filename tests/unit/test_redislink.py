"""shards.redislink without a Redis server: the reconnection backoff, and the link's side of
its contract with the router (typed operations in, typed events out, counters as a copy).
The link's threads are never started here; against real servers see tests/system."""

from __future__ import annotations

import queue
from typing import Any

import pytest

from actors.hostlink import (
    AreOnline,
    Delivery,
    LinkEvent,
    OnlineInChannel,
    OnlineUsers,
    OpResult,
    PublishChannel,
    PublishPresence,
    PublishUsers,
    Results,
    Subscribe,
    Unsubscribe,
)
from actors.ids import ChannelId
from actors.wire import cluster, frames
from shards.redislink import BACKOFF, Backoff, Probe, RedisLink, _answer


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
    return RedisLink("redis://127.0.0.1:1", "unit", events.append), events


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
    ops = [OnlineUsers(1), PublishChannel(2, ChannelId(3), b"f"), PublishPresence({})]
    for op in ops:
        link.submit(op)
    assert link._drain(0.0) == ops


def test_a_full_queue_fails_the_operation_at_once_to_whoever_waits(link):
    link, events = link
    link.ops = queue.Queue(1)
    link.submit(OnlineUsers(1))
    link.submit(AreOnline(2, [5]))  # no room: failed, reported
    link.submit(PublishPresence({}))  # no room, nobody waits: nothing reported
    assert events == [Results([OpResult(2, False, None)])]


def test_answers_have_the_shape_of_the_shards_answers():
    assert _answer(OnlineUsers(1), [b"3", b"4"]) == {"users": [3, 4]}
    assert _answer(OnlineInChannel(1, ChannelId(2)), [b"5"]) == {"users": [5]}
    assert _answer(AreOnline(1, [5, 6]), [b"6"]) == {"online": [6]}
    assert _answer(PublishUsers(1, [5], b"f"), 2) == {"value": 2}
    assert Probe().qid == PublishPresence({}).qid == 0  # nobody waits for these


def test_a_channel_message_from_another_host_becomes_a_delivery(link):
    link, _events = link
    frame = frames.channel_message(6, b"1")
    payload = cluster.encode(cluster.Message("other-host", None, frame))
    got = link._decode(pubsub_message(link.layout.channel_topic(6), payload))
    assert got == Delivery(ChannelId(6), [], frame, None)


def test_a_users_command_from_another_host_becomes_a_delivery_with_its_control(link):
    link, _events = link
    control = {"op": "disconnect"}
    payload = cluster.encode(cluster.Message("other-host", [1, 2], b"", control=control))
    got = link._decode(pubsub_message(link.layout.host_topic(link.host), payload))
    assert got == Delivery(None, [1, 2], b"", control)


def test_our_own_messages_and_probes_are_not_delivered(link):
    link, _events = link
    own = cluster.encode(cluster.Message(link.host, None, b"frame"))
    assert link._decode(pubsub_message(link.layout.channel_topic(6), own)) is None
    probe = cluster.encode(cluster.Message(link.host, None, b"", probe=True))
    assert link._decode(pubsub_message(link.layout.host_topic(link.host), probe)) is None


def test_malformed_messages_are_counted_and_the_router_gets_a_copy_of_the_counters(link):
    link, _events = link
    assert link._decode(pubsub_message(link.layout.channel_topic(6), b"\x00garbage")) is None
    no_target = cluster.encode(cluster.Message("other-host", None, frames.direct_message(b"1")))
    assert link._decode(pubsub_message("not-a-topic", no_target)) is None
    stats = link.stats()
    assert stats == {"published": 0, "received": 2, "malformed": 2, "reconnects": 0}
    stats["received"] = 100  # a copy: the link's own counters are untouched
    assert link.stats()["received"] == 2
