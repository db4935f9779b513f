"""The shard's pure helpers."""

import dataclasses
import inspect
import logging

from actors.cache_actor import CloseConnections, Deliver, Incident, Registered
from actors.ids import ConnId, UserId
from shards.config import ServeConfig
from shards.connection import CLOSE_TIMEOUT
from shards.handoff import ShardConfig
from shards.worker import Shard, _crash_requested, coalesce

CONFIG = ShardConfig.of(ServeConfig(secret="s"))


def conns(*ids: int) -> tuple[ConnId, ...]:
    return tuple(ConnId(i) for i in ids)


def test_coalesce_merges_runs_to_the_same_recipients_in_order():
    # the cache hands out one tuple per channel until the channel changes: runs share it
    channel_a, channel_b = conns(1, 2), conns(3)
    actions = [
        Deliver(b"a", channel_a),
        Deliver(b"b", channel_a),
        Deliver(b"c", channel_a),
        Deliver(b"d", channel_b),
        Registered(ConnId(5)),
        Deliver(b"e", channel_b),
        Deliver(b"f", conns(3)),  # equal, not the same: the cache changed in between
    ]
    merged = coalesce(actions)
    assert merged == [
        Deliver(b"abc", channel_a),
        Deliver(b"d", channel_b),
        Registered(ConnId(5)),
        Deliver(b"e", channel_b),
        Deliver(b"f", conns(3)),
    ]
    assert isinstance(merged[0], Deliver) and merged[0].conns is channel_a


def test_coalesce_leaves_single_actions_alone():
    actions = [Deliver(b"x", conns(1)), CloseConnections([ConnId(1)], 4001, "bye")]
    assert coalesce(actions) == actions


def test_crash_switch():
    assert _crash_requested(1, 1, "1")
    assert not _crash_requested(0, 1, "1")
    assert not _crash_requested(1, 1, "1:2")
    assert _crash_requested(1, 2, "1:2")
    assert not _crash_requested(1, 5, "")


def test_the_drain_waits_for_closing_handshakes_as_long_as_a_connection_does():
    # one source: the connection's own close deadline, not a second constant in the config
    assert inspect.signature(Shard.drain).parameters["grace"].default == CLOSE_TIMEOUT


def bare_shard(emit_events: bool = False) -> tuple[Shard, list[object]]:
    """A Shard with only what counting and reporting use (no loop, no actor): what it tells
    its actor is kept in the list."""
    shard = Shard.__new__(Shard)
    shard.index = 3
    shard.counters, shard._reported, shard._first = {}, {}, {}
    shard._last_report = 0.0
    shard.config = dataclasses.replace(CONFIG, emit_events=emit_events)
    told: list[object] = []
    shard._tell = told.append  # type: ignore[method-assign]
    return shard, told


class Conn:
    def __init__(self, conn_id: int, user: int) -> None:
        self.conn_id, self.user = ConnId(conn_id), UserId(user)


def test_a_storm_of_closes_for_cause_is_one_warning_line_per_cause(caplog):
    shard, told = bare_shard()
    for n in range(1000):
        shard.closed_for_cause(Conn(n, 7), "closed_slow_consumer", "write buffer full")  # type: ignore[arg-type]
    shard.closed_for_cause(Conn(5, 8), "connection_errors", "OSError: gone")  # type: ignore[arg-type]
    shard.closed_for_cause(Conn(6, 8), "closed_token_expired")  # type: ignore[arg-type]
    shard.count("refreshed")
    with caplog.at_level(logging.INFO, logger="ucc.shard"):
        shard._report(5.0)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "shard 3: closed_slow_consumer: 1000 in the last 5 s (first: connection 0 "
                    "of user 7: write buffer full)"),
        ("WARNING", "shard 3: connection_errors: 1 in the last 5 s (first: connection 5 of "
                    "user 8: OSError: gone)"),
        ("INFO", "shard 3: in the last 5 s: closed_token_expired=1, refreshed=1"),
    ]  # fmt: skip
    assert shard.counters["closed_slow_consumer"] == 1000
    assert told == []  # no event stream: nothing for the actor
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ucc.shard"):
        shard._report(10.0)  # a quiet interval: nothing
        shard.closed_for_cause(Conn(9, 9), "closed_slow_consumer", "behind for too long")  # type: ignore[arg-type]
        shard._report(15.0)
    assert [r.getMessage() for r in caplog.records] == [
        "shard 3: closed_slow_consumer: 1 in the last 5 s (first: connection 9 of user 9: "
        "behind for too long)"
    ]


def test_with_events_a_close_for_cause_that_is_an_event_is_told_to_the_actor():
    shard, told = bare_shard(emit_events=True)
    shard.closed_for_cause(Conn(1, 7), "connection_errors", "OSError: gone")  # type: ignore[arg-type]
    shard.closed_for_cause(Conn(2, 7), "closed_invalid_utf8")  # type: ignore[arg-type]
    assert told == [Incident(ConnId(1), UserId(7), "connection_errors", "OSError: gone")]
