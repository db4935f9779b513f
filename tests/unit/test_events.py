"""actors.events: the shard's event dicts and join/leave changes (no threads, no sockets)."""

from __future__ import annotations

from actors.cache import UserConnectionCache
from actors.events import CAUSE_EVENTS, ShardEvents
from actors.ids import ChannelId, ConnId, UserId


def events(clock: float = 100.5) -> ShardEvents:
    return ShardEvents(2, 7, clock=lambda: clock)


def test_connect_after_online_with_the_exact_fields():
    ev = events()
    ev.connected(ConnId(5), UserId(9), (ChannelId(3), ChannelId(4)), "10.0.0.1:5555", first=True)
    ev.connected(ConnId(6), UserId(9), (), "10.0.0.1:5556", first=False)
    out = ev.take_events()
    assert out == [
        {"type": "online", "ts": 100.5, "user": 9},
        {
            "type": "connect",
            "ts": 100.5,
            "user": 9,
            "conn": "2.7.5",
            "shard": 2,
            "channels": [3, 4],
            "remote": "10.0.0.1:5555",
        },
        {
            "type": "connect",
            "ts": 100.5,
            "user": 9,
            "conn": "2.7.6",
            "shard": 2,
            "channels": [],
            "remote": "10.0.0.1:5556",
        },
    ]
    assert list(out[1]) == ["type", "ts", "user", "conn", "shard", "channels", "remote"]
    assert ev.take_events() == []  # taken: gone


def test_disconnect_before_offline():
    ev = events()
    ev.disconnected(ConnId(5), UserId(9), 4000, "slow consumer", last=False)
    ev.disconnected(ConnId(6), UserId(9), 1000, "", last=True)
    assert ev.take_events() == [
        {"type": "disconnect", "ts": 100.5, "user": 9, "conn": "2.7.5", "code": 4000,
         "reason": "slow consumer"},
        {"type": "disconnect", "ts": 100.5, "user": 9, "conn": "2.7.6", "code": 1000,
         "reason": ""},
        {"type": "offline", "ts": 100.5, "user": 9},
    ]  # fmt: skip


def test_closes_for_cause_and_limits():
    ev = events()
    ev.incident(ConnId(1), UserId(9), "closed_slow_consumer", "write buffer full")
    ev.incident(ConnId(1), UserId(9), "connection_errors", "OSError: broken")
    ev.incident(ConnId(1), UserId(9), "closed_rate_limit", "over its frame rate budget")
    ev.incident(ConnId(1), UserId(9), "refused_per_user", "")
    ev.incident(ConnId(1), UserId(9), "closed_invalid_utf8", "")  # its disconnect says it
    ev.limit(UserId(9), "channels_per_connection")
    assert ev.take_events() == [
        {"type": "slow_consumer", "ts": 100.5, "user": 9, "conn": "2.7.1"},
        {"type": "send_failed", "ts": 100.5, "user": 9, "conn": "2.7.1",
         "error": "OSError: broken"},
        {"type": "limit", "ts": 100.5, "user": 9, "what": "inbound_rate"},
        {"type": "limit", "ts": 100.5, "user": 9, "what": "connections_per_user"},
        {"type": "limit", "ts": 100.5, "user": 9, "what": "channels_per_connection"},
    ]  # fmt: skip
    assert {kind for kind, _what in CAUSE_EVENTS.values()} == {
        "slow_consumer",
        "send_failed",
        "limit",
    }


def test_membership_events_for_announced_connections_and_join_leave_for_marked_channels():
    cache = UserConnectionCache()
    cache.journal = []
    ev = events()
    cache.connect(ConnId(1), UserId(9), [ChannelId(3)], 0.0)  # not announced yet
    cache.connect(ConnId(2), UserId(9), [], 0.0)
    cache.connect(ConnId(3), UserId(8), [ChannelId(4)], 0.0)  # 4 is not marked
    ev.membership(cache.take_journal(), {ConnId(1), ConnId(2), ConnId(3)}, {3}, announce=True)
    assert ev.take_events() == []  # in their connect's channels
    assert ev.take_changes() == [(3, 9, True)]
    cache.subscribe(ConnId(2), ChannelId(3))  # the user's second connection in 3: no join
    cache.unsubscribe(ConnId(1), ChannelId(3))  # nor a leave: 2 is still in
    cache.unsubscribe(ConnId(2), ChannelId(3))  # the last: a leave
    ev.membership(cache.take_journal(), {ConnId(1)}, {3}, announce=True)
    assert [(e["type"], e["conn"], e["channel"]) for e in ev.take_events()] == [
        ("subscribe", "2.7.2", 3),
        ("unsubscribe", "2.7.2", 3),
    ]
    assert ev.take_changes() == [(3, 9, False)]
    # a disconnect's changes: leaves, never unsubscribe events
    cache.subscribe(ConnId(2), ChannelId(3))
    cache.disconnect(ConnId(2))
    ev.membership(cache.take_journal(), set(), {3}, announce=False)
    assert ev.take_events() == []
    assert ev.take_changes() == [(3, 9, True), (3, 9, False)]
