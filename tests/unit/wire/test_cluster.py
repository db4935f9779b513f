"""The Redis layout's pure parts: names, the message codec, the script variants, the URL modes."""

from __future__ import annotations

import json

import pytest

from actors.wire import cluster, frames
from actors.wire.cluster import Layout, Message, decode, encode
from shards.redislink import cluster_seed


def test_every_name_shares_the_hash_tag():
    layout = Layout("blue")
    names = [
        layout.hosts,
        layout.channel_topic(7),
        layout.host_topic("h1"),
        *layout.host_keys("h1"),
        layout.member_key("h1", 7),
    ]
    assert all(name.startswith("{ucc:blue}:") for name in names)
    assert layout.channel_of_topic(layout.channel_topic(7)) == 7
    assert layout.channel_of_topic(layout.host_topic("h1")) is None


def test_a_message_survives_encoding_and_garbage_is_refused():
    message = Message("h1", [1, 2], frames.text_frame(b'{"type":"message"}'))
    assert decode(encode(message)) == message
    assert decode(encode(Message("h1", None, b"", probe=True))) == Message("h1", None, b"", True)
    control = Message("h1", [7], b"", control={"op": "subscribe", "channel": 3, "user": 7})
    assert decode(encode(control)) == control
    deep = b"[" * 5000
    for raw in (
        b"",
        b"\x00\x00\x00\x05{bad}",
        len(deep).to_bytes(4, "big") + deep,  # too deep for json: refused, not a crash
        encode(Message("h1", [0], message.frame)),
        encode(Message("h1", [2**63], message.frame)),  # would not fit the shard wire
        encode(Message("h1", [1], b"raw bytes, not a frame")),
        encode(Message("h1", [1], message.frame + b"trailing")),
        encode(Message("h1", [1], b"\x81\xfe\x00")),  # truncated length
        encode(Message("h1", [1], b"\x82\x00")),  # binary
        encode(Message("h1", [1], b"", control={"op": "explode"})),
    ):
        assert decode(raw) is None, raw[:40]


def test_is_text_frame_checks_lengths_exactly():
    for size in (0, 125, 126, 65535, 65536):
        frame = frames.text_frame(b"x" * size)
        assert frames.is_text_frame(frame, 1 << 20)
        assert not frames.is_text_frame(frame[:-1], 1 << 20)
    assert not frames.is_text_frame(frames.text_frame(b"x" * 100), 99)


def test_snapshot_ids_travel_as_strings():
    text = cluster.snapshot_json({"users": [2**53 + 1], "channels": {"5": [2**53 + 1]}})
    assert json.loads(text) == {
        "users": [str(2**53 + 1)],
        "channels": {"5": [str(2**53 + 1)]},
    }


def test_the_cluster_variant_publishes_to_shard_channels_and_nothing_else_differs():
    assert "redis.call('PUBLISH'," in cluster.PUBLISH_USERS
    assert "'PUBLISH'" not in cluster.SPUBLISH_USERS
    assert "redis.call('SPUBLISH'," in cluster.SPUBLISH_USERS
    assert cluster.SPUBLISH_USERS.replace("SPUBLISH", "PUBLISH") == cluster.PUBLISH_USERS


@pytest.mark.parametrize(
    ("url", "seed"),
    [
        ("redis+cluster://10.0.0.1:7000", "redis://10.0.0.1:7000"),
        ("rediss+cluster://user:pw@node:7000/0", "rediss://user:pw@node:7000/0"),
        ("REDIS+CLUSTER://node:7000", "redis://node:7000"),
        ("redis://localhost:6379/0", None),
        ("rediss://localhost:6379", None),
        ("unix:///run/redis.sock", None),
        ("redis+cluster:node:7000", None),
    ],
)
def test_a_cluster_url_names_a_seed_node(url, seed):
    assert cluster_seed(url) == seed
