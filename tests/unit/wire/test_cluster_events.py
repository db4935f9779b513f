"""The issue 12 parts of the Redis layout: the marks key, the ``set_channel`` / ``who`` /
``answer`` controls between hosts (their validation and bounds), and the scripts' variants."""

from __future__ import annotations

from typing import Any

import pytest

from actors.wire import cluster
from actors.wire.cluster import ClusterKey, Layout, Message, Rejected

KEY = ClusterKey(b"unit cluster key")


def roundtrip(control: dict[str, Any], users: list[int] | None = None) -> Message | Rejected:
    raw = cluster.encode(Message("h1", users, b"", control=control), KEY)
    return cluster.decode(raw, KEY, 0)


def test_the_marks_set_shares_the_hash_tag():
    assert Layout("blue").marks == "{ucc:blue}:marks"


@pytest.mark.parametrize(
    "control",
    [
        {"op": "set_channel", "channel": 5, "join_leave": True},
        {"op": "set_channel", "channel": 2**63 - 1, "join_leave": False},
        {"op": "who", "user": 7, "qid": 3},
        {"op": "answer", "to": "h2", "qid": 3, "connections": []},
        {"op": "answer", "to": "h2", "qid": 2**63 - 1, "connections": [{"conn": "0.1.2"}]},
    ],
)
def test_host_controls_survive_encoding(control):
    decoded = roundtrip(control, [7] if control["op"] == "who" else None)
    assert isinstance(decoded, Message) and decoded.control == control


@pytest.mark.parametrize(
    "control",
    [
        {"op": "set_channel", "channel": 0, "join_leave": True},
        {"op": "set_channel", "channel": "5", "join_leave": True},
        {"op": "set_channel", "channel": 5, "join_leave": 1},
        {"op": "set_channel", "channel": 5},
        {"op": "who", "user": 7},
        {"op": "who", "user": 7, "qid": 0},
        {"op": "who", "user": 7, "qid": True},
        {"op": "who", "user": 7, "qid": 2**63},
        {"op": "who", "user": -1, "qid": 1},
        {"op": "answer", "to": "h2", "qid": 1},
        {"op": "answer", "to": 3, "qid": 1, "connections": []},
        {"op": "answer", "to": "h2", "qid": 1, "connections": {}},
        {"op": "answer", "to": "h2", "qid": 1, "connections": [["not", "a", "record"]]},
        {"op": "answer", "to": "h2", "qid": 1, "connections": [{"1": 1}, 5]},
        {"op": "whatever", "qid": 1},
    ],
)
def test_bad_host_controls_are_malformed(control):
    assert roundtrip(control) is Rejected.MALFORMED


def test_an_answer_beyond_the_record_bound_is_oversized():
    records = [{"conn": str(n)} for n in range(cluster.MAX_ANSWER_RECORDS + 1)]
    control = {"op": "answer", "to": "h2", "qid": 1, "connections": records}
    assert roundtrip(control) is Rejected.OVERSIZED
    control["connections"] = records[:-1]
    assert isinstance(roundtrip(control), Message)


def test_an_answer_beyond_the_byte_bound_is_oversized():
    record = {"conn": "x" * (cluster.MAX_ANSWER_BYTES // 10)}
    control = {"op": "answer", "to": "h2", "qid": 1, "connections": [record] * 11}
    assert roundtrip(control) is Rejected.OVERSIZED


def test_an_answer_control_keeps_at_most_the_bound_and_says_so():
    records = [{"conn": str(n)} for n in range(cluster.MAX_ANSWER_RECORDS + 3)]
    control = cluster.answer_control("h2", 9, records)
    assert control["op"] == "answer" and control["to"] == "h2" and control["qid"] == 9
    assert control["connections"] == records[: cluster.MAX_ANSWER_RECORDS]
    assert control["truncated"] is True
    assert cluster.answer_control("h2", 9, records[:3])["truncated"] is False


def test_a_forged_answer_is_forged_not_oversized():
    records = [{"conn": str(n)} for n in range(cluster.MAX_ANSWER_RECORDS + 1)]
    control = {"op": "answer", "to": "h2", "qid": 1, "connections": records}
    raw = cluster.encode(Message("h1", None, b"", control=control), ClusterKey(b"another key"))
    assert cluster.decode(raw, KEY, 0) is Rejected.FORGED


def test_the_cluster_variants_of_the_new_scripts_publish_to_shard_channels():
    for plain, sharded in (
        (cluster.WHO, cluster.SWHO),
        (cluster.SET_CHANNEL, cluster.SSET_CHANNEL),
    ):
        assert "redis.call('PUBLISH'," in plain and "SPUBLISH" not in plain
        assert sharded == plain.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
