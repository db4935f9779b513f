"""The shard's pure helpers."""

import inspect

from actors.cache_actor import CloseConnections, Deliver, Registered
from actors.ids import ConnId
from shards.connection import CLOSE_TIMEOUT
from shards.worker import Shard, _crash_requested, coalesce


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
