"""The shard's pure helpers."""

from shards.worker import _crash_requested, coalesce


def test_coalesce_merges_runs_to_the_same_recipients_in_order():
    channel_a, channel_b = (1, 2), (3,)
    actions = [
        ("deliver", b"a", channel_a),
        ("deliver", b"b", channel_a),
        ("deliver", b"c", channel_a),
        ("deliver", b"d", channel_b),
        ("registered", 5),
        ("deliver", b"e", channel_b),
        ("deliver", b"f", tuple([3])),  # equal, not the same: the cache changed in between
    ]
    assert coalesce(actions) == [
        ("deliver", b"abc", channel_a),
        ("deliver", b"d", channel_b),
        ("registered", 5),
        ("deliver", b"e", channel_b),
        ("deliver", b"f", (3,)),
    ]


def test_coalesce_leaves_single_actions_alone():
    actions = [("deliver", b"x", (1,)), ("close", [1], 4001, "bye")]
    assert coalesce(actions) == actions


def test_crash_switch():
    assert _crash_requested(1, 1, "1")
    assert not _crash_requested(0, 1, "1")
    assert not _crash_requested(1, 1, "1:2")
    assert _crash_requested(1, 2, "1:2")
    assert not _crash_requested(1, 5, "")
