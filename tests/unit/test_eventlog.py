"""actors.eventlog: sequencing, encoding, the dead shard's connections, snapshot patches."""

from __future__ import annotations

import json

from actors.eventlog import EventLog, apply_events
from actors.ids import ShardIndex

S0, S1 = ShardIndex(0), ShardIndex(1)


def log() -> EventLog:
    return EventLog("host-a", enabled=True, clock=lambda: 1000.5)


def taken(events: EventLog) -> list[dict]:
    return [json.loads(raw) for raw in events.take()]


def batch(*events: dict) -> bytes:
    return json.dumps(list(events)).encode()


def connect(conn: str, user: int, channels=(), ts: float = 1.0) -> dict:
    return {
        "type": "connect",
        "ts": ts,
        "user": user,
        "conn": conn,
        "shard": 0,
        "channels": list(channels),
        "remote": "127.0.0.1:1",
    }


def test_events_are_numbered_from_1_and_every_frame_starts_with_seq():
    events = log()
    events.emit("shard_up", {"shard": 0, "epoch": 1, "cause": "started"})
    events.from_shard(S0, batch(connect("0.1.1", 7), {"type": "online", "ts": 2.0, "user": 7}))
    raws = events.take()
    assert all(raw.startswith(b'{"seq":') for raw in raws)
    got = [json.loads(raw) for raw in raws]
    assert [e["seq"] for e in got] == [1, 2, 3]
    assert got[0] == {
        "seq": 1,
        "host": "host-a",
        "ts": 1000.5,
        "type": "shard_up",
        "shard": 0,
        "epoch": 1,
        "cause": "started",
    }
    assert got[1]["type"] == "connect" and got[1]["ts"] == 1.0 and got[1]["conn"] == "0.1.1"
    assert list(got[1])[:4] == ["seq", "host", "ts", "type"]


def test_nothing_is_published_with_events_off():
    events = EventLog("h", enabled=False)
    events.emit("shard_up", {"shard": 0, "epoch": 1, "cause": "started"})
    events.from_shard(S0, batch(connect("0.1.1", 7)))
    assert events.take() == [] and events.seq == 0


def test_a_malformed_batch_or_event_is_counted_and_skipped():
    events = log()
    events.from_shard(S0, b"not json")
    events.from_shard(S0, b'{"a": 1}')
    events.from_shard(S0, batch({"type": "nope", "ts": 1}, {"type": "online"}, connect("c", 1)))
    assert events.counters["events_malformed"] == 4
    assert [e["type"] for e in taken(events)] == ["connect"]


def test_a_dead_shard_is_said_to_have_lost_its_connections_and_users():
    events = log()
    events.from_shard(S0, batch(connect("0.1.1", 7), connect("0.1.2", 7), connect("0.1.3", 8)))
    events.from_shard(S0, batch({"type": "disconnect", "ts": 3.0, "user": 8, "conn": "0.1.3"}))
    events.from_shard(S1, batch(connect("1.1.1", 9)))
    taken(events)
    events.shard_died(S0, 1, "signal SIGKILL")
    got = taken(events)
    assert got[0]["type"] == "shard_down" and got[0]["cause"] == "signal SIGKILL"
    assert [(e["type"], e.get("conn"), e["user"]) for e in got[1:]] == [
        ("disconnect", "0.1.1", 7),
        ("disconnect", "0.1.2", 7),
        ("offline", None, 7),
    ]
    assert got[1]["code"] == 1006
    events.shard_died(S0, 1, "again")  # nothing left to say of it
    assert [e["type"] for e in taken(events)] == ["shard_down"]


def test_a_snapshot_is_patched_with_what_its_shards_sent_after_answering():
    events = log()
    events.watch(5)
    events.from_shard(S0, batch(connect("0.1.9", 1)))  # before shard 0 answered: in its answer
    answer0 = [
        {"conn": "0.1.9", "user": 1, "shard": 0, "channels": [3]},
        {"conn": "0.1.8", "user": 2, "shard": 0, "channels": []},
    ]
    events.answered(5, S0)
    events.from_shard(
        S0, batch({"type": "subscribe", "ts": 4.0, "user": 1, "conn": "0.1.9", "channel": 4})
    )
    events.from_shard(
        S0,
        batch(
            {
                "type": "disconnect",
                "ts": 4.0,
                "user": 2,
                "conn": "0.1.8",
                "code": 1000,
                "reason": "",
            }
        ),
    )
    events.from_shard(S1, batch(connect("1.1.1", 3, [5], ts=4.5)))  # shard 1 answers after this
    events.answered(5, S1)
    answer1 = [{"conn": "1.1.1", "user": 3, "shard": 1, "channels": [5]}]
    events.shard_died(S1, 1, "hung")  # after its answer: its connections go from the snapshot
    got = events.patch(5, {S0: answer0, S1: answer1})
    assert got == [{"conn": "0.1.9", "user": 1, "shard": 0, "channels": [3, 4]}]
    assert events.patch(5, {}) == []  # forgotten once replied


def test_apply_events_builds_the_state_a_follower_keeps():
    state = apply_events([], [connect("a", 1, [2], ts=7.0)])
    assert state == [
        {
            "conn": "a",
            "user": 1,
            "shard": 0,
            "channels": [2],
            "connected_at": 7.0,
            "last_activity": 7.0,
            "remote": "127.0.0.1:1",
        }
    ]
    state = apply_events(state, [{"type": "unsubscribe", "conn": "a", "channel": 2}])
    assert state[0]["channels"] == []
    assert apply_events(state, [{"type": "disconnect", "conn": "a"}]) == []
