"""The Redis layout's pure parts: names, the message codec, the script variants, the URL modes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.presence import PresenceNews
from actors.wire import cluster, frames
from actors.wire.cluster import MAC_SIZE, ClusterKey, Layout, Message, Rejected
from shards.redislink import cluster_seed

KEY = ClusterKey(b"unit cluster key")


def encode(message: Message, key: ClusterKey = KEY) -> bytes:
    return cluster.encode(message, key)


def decode(raw: bytes, key: ClusterKey = KEY, now_ms: int = 0) -> Message | Rejected:
    """Decoded at ``now_ms`` (the messages here are stamped 0 unless they say otherwise)."""
    return cluster.decode(raw, key, now_ms)


def test_the_hosts_names_share_one_hash_tag_and_each_channel_has_its_own():
    layout = Layout("blue")
    names = [
        layout.hosts,
        layout.host_topic("h1"),
        layout.users_key("h1"),
        layout.snapshot_key("h1"),
        layout.presence_topic,
        layout.marks,
        *layout.critical_keys(3),
    ]
    assert all(name.startswith("{ucc:blue}:") for name in names)
    topic = layout.channel_topic(7)
    assert topic == "{ucc:blue:c:7}"  # the whole name is its tag: a slot per channel
    assert all(key.startswith(topic + ":") for key in layout.history_keys(7))
    assert layout.channel_topic(8) != topic
    assert layout.channel_of_topic(topic) == 7
    assert layout.channel_of_topic(layout.channel_topic(2**63 - 1)) == 2**63 - 1
    for other in (
        layout.host_topic("h1"),
        layout.history_keys(7)[0],
        "{ucc:blue:c:}",
        "{ucc:blue:c:7x}",
        "{ucc:green:c:7}",
        "{ucc:blue}:c:7",  # the old layout's
    ):
        assert layout.channel_of_topic(other) is None, other


def test_a_message_survives_encoding_and_garbage_is_refused():
    message = Message("h1", [1, 2], frames.text_frame(b'{"type":"message"}'))
    assert decode(encode(message)) == message
    assert decode(encode(Message("h1", None, b"", probe=True))) == Message("h1", None, b"", True)
    control = Message("h1", [7], b"", control={"op": "subscribe", "channel": 3, "user": 7})
    assert decode(encode(control)) == control
    ban = Message("h1", [7], b"", control={"op": "disconnect", "user": 7, "ban": 2.5, "until": 9})
    assert decode(encode(ban)) == ban
    to_channel = Message("h1", None, message.frame, channel=5)
    assert decode(encode(to_channel)) == to_channel
    deep = b"[" * 5000
    for raw in (
        KEY.seal(b""),
        KEY.seal(b"\x00\x00\x00\x05{bad}"),
        KEY.seal(len(deep).to_bytes(4, "big") + deep),  # too deep for json: refused, no crash
        encode(Message("h1", [0], message.frame)),
        encode(Message("h1", [2**63], message.frame)),  # would not fit the shard wire
        encode(Message("h1", [1], b"raw bytes, not a frame")),
        encode(Message("h1", [1], message.frame + b"trailing")),
        encode(Message("h1", [1], b"\x81\xfe\x00")),  # truncated length
        encode(Message("h1", [1], b"\x82\x00")),  # binary
        encode(Message("h1", [1], b"", control={"op": "explode"})),
        encode(Message("h1", [1], b"", control={"op": "disconnect", "ban": -1})),
        encode(Message("h1", [1], b"", control={"op": "disconnect", "ban": True})),
        encode(Message("h1", [1], b"", control={"op": "disconnect", "ban": 1, "until": 1.5})),
        encode(Message("h1", None, message.frame, channel=0)),
    ):
        assert decode(raw) is Rejected.MALFORMED, raw[:40]


def test_a_message_without_a_valid_mac_is_forged_not_malformed():
    message = Message("h1", [1, 2], frames.text_frame(b'{"type":"message"}'))
    sealed = encode(message)
    body = sealed[MAC_SIZE:]
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])  # one bit of the frame
    retargeted = sealed.replace(b"[1, 2]", b"[1, 3]")  # the same MAC on other users
    for raw in (
        body,  # no MAC at all (what an old host, or a forger, publishes)
        b"",
        b"short",
        tampered,
        retargeted,
        encode(message, ClusterKey(b"another cluster's key")),
        bytes(MAC_SIZE) + body,
    ):
        assert decode(raw) is Rejected.FORGED, raw[:40]
    assert decode(sealed) == message


def test_the_default_key_is_derived_from_the_token_secret_with_a_fixed_label():
    secret = "s" * 32
    sealed = cluster.encode(Message("h1", None, b"", probe=True), ClusterKey.of(secret))
    assert isinstance(cluster.decode(sealed, ClusterKey.of(secret), 0), Message)
    assert cluster.decode(sealed, ClusterKey.of("t" * 32), 0) is Rejected.FORGED
    # the derived key is not the token secret itself (a token signature is no cluster MAC)
    assert cluster.decode(sealed, ClusterKey(secret.encode()), 0) is Rejected.FORGED
    explicit = ClusterKey.of(secret, "the cluster secret")
    assert cluster.decode(sealed, explicit, 0) is Rejected.FORGED
    assert explicit.mac(b"x") == ClusterKey(b"the cluster secret").mac(b"x")


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_from_decode(raw):
    assert decode(raw) is Rejected.FORGED  # no MAC guessed by chance
    assert isinstance(decode(KEY.seal(raw)), Message | Rejected)  # sealed garbage: no crash


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_from_the_presence_readers(raw):
    assert cluster.open_snapshot(KEY, "h1", raw) is Rejected.FORGED
    assert cluster.open_snapshot(KEY, "h1", KEY.seal(raw)) in (Rejected.MALFORMED, Rejected.FORGED)
    assert cluster.decode_presence(raw, KEY, 0) is Rejected.FORGED
    assert cluster.decode_presence(KEY.seal(raw), KEY, 0) is Rejected.MALFORMED


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=12,
    )
)
def test_sealed_json_of_any_shape_is_refused_not_raised(value):
    raw = KEY.seal(json.dumps(value).encode())
    assert cluster.open_snapshot(KEY, "h1", raw) in (Rejected.MALFORMED, Rejected.FORGED)
    assert cluster.decode_presence(raw, KEY, 0) is Rejected.MALFORMED


def test_a_presence_delta_round_trips_sealed_and_a_late_copy_is_replayed():
    changes = [(2**53 + 1, (5, 2**63 - 1)), (4, None), (6, ())]
    raw = cluster.encode_presence(KEY, "h1", "delta", "g1", 7, 1000, changes)
    assert cluster.decode_presence(raw, KEY, 1500) == PresenceNews(
        "h1", "delta", "g1", 7, tuple(changes)
    )
    late = 1000 + cluster.REPLAY_WINDOW_MS + 1
    assert cluster.decode_presence(raw, KEY, late) is Rejected.REPLAYED
    assert cluster.decode_presence(raw, ClusterKey(b"k"), 1000) is Rejected.FORGED
    for kind in ("snapshot", "leave"):
        sealed = cluster.encode_presence(KEY, "h1", kind, "g1", 7, 1000)
        assert cluster.decode_presence(sealed, KEY, 1000) == PresenceNews("h1", kind, "g1", 7)
    bad_ids = KEY.seal(b'{"h":"h1","g":"g","s":1,"t":0,"k":"d","c":[[0,null]]}')
    assert cluster.decode_presence(bad_ids, KEY, 0) is Rejected.MALFORMED
    bad_seq = KEY.seal(b'{"h":"h1","g":"g","s":-1,"t":0,"k":"d","c":[]}')
    assert cluster.decode_presence(bad_seq, KEY, 0) is Rejected.MALFORMED


def test_a_sealed_snapshot_names_its_host_and_groups_users_by_their_channels():
    users = {2**53 + 1: (5,), 4: (5,), 7: (), 8: (5, 9)}
    raw = cluster.seal_snapshot(KEY, "h1", "g1", 3, users)
    body = json.loads(raw[cluster.MAC_SIZE :])
    assert body["u"] == {"5": [2**53 + 1, 4], "": [7], "5,9": [8]}
    got = cluster.open_snapshot(KEY, "h1", raw)
    assert not isinstance(got, Rejected)
    assert (got.host, got.generation, got.seq) == ("h1", "g1", 3)
    assert got.state.users == users and got.state.channels == {5: {2**53 + 1, 4, 8}, 9: {8}}
    assert cluster.open_snapshot(KEY, "h2", raw) is Rejected.FORGED  # moved to another host
    assert cluster.open_snapshot(KEY, "h1", None) is Rejected.FORGED  # missing
    assert cluster.open_snapshot(ClusterKey(b"k"), "h1", raw) is Rejected.FORGED
    bad = KEY.seal(b'{"h": "h1", "g": "g", "s": 1, "u": {"": ["0"]}}')
    assert cluster.open_snapshot(KEY, "h1", bad) is Rejected.MALFORMED


def test_a_forwarded_ban_is_worth_what_is_left_of_it():
    assert cluster.ban_remaining({"ban": 10}, 0) == 10
    assert cluster.ban_remaining({"ban": 10, "until": 5000}, 1000) == 4
    assert cluster.ban_remaining({"ban": 10, "until": 99_000}, 1000) == 10  # a clock ahead
    assert cluster.ban_remaining({"ban": 10, "until": 5000}, 5000) is None  # passed
    assert cluster.ban_remaining({"ban": 0, "until": 0}, 5000) == 0  # a lift stays a lift


def test_is_text_frame_checks_lengths_exactly():
    for size in (0, 125, 126, 65535, 65536):
        frame = frames.text_frame(b"x" * size)
        assert frames.is_text_frame(frame, 1 << 20)
        assert not frames.is_text_frame(frame[:-1], 1 << 20)
    assert not frames.is_text_frame(frames.text_frame(b"x" * 100), 99)


def test_the_cluster_variant_publishes_to_shard_channels_and_nothing_else_differs():
    assert "redis.call('PUBLISH'," in cluster.PUBLISH_USERS
    assert "'PUBLISH'" not in cluster.SPUBLISH_USERS
    assert "redis.call('SPUBLISH'," in cluster.SPUBLISH_USERS
    assert cluster.SPUBLISH_USERS.replace("SPUBLISH", "PUBLISH") == cluster.PUBLISH_USERS
    assert "'PUBLISH'" not in cluster.SPUBLISH_HOSTS
    assert cluster.SPUBLISH_HOSTS.replace("SPUBLISH", "PUBLISH") == cluster.PUBLISH_HOSTS
    for plain, sharded in (
        (cluster.PRESENCE_DELTA, cluster.SPRESENCE_DELTA),
        (cluster.STORE_PRESENCE, cluster.SSTORE_PRESENCE),
        (cluster.LEAVE, cluster.SLEAVE),
    ):
        assert "'PUBLISH'" not in sharded and sharded.replace("SPUBLISH", "PUBLISH") == plain


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


def test_a_sealed_message_is_taken_only_within_the_replay_window():
    message = Message("h1", [7], b"", control={"op": "disconnect", "user": 7}, sent_ms=100_000)
    sealed = encode(message)
    window = cluster.REPLAY_WINDOW_MS
    assert decode(sealed, now_ms=100_000) == message
    assert decode(sealed, now_ms=100_000 + window) == message
    assert decode(sealed, now_ms=100_000 + window + 1) is Rejected.REPLAYED  # kept and replayed
    assert decode(sealed, now_ms=100_000 - window - 1) is Rejected.REPLAYED  # from the future


def test_a_message_without_a_proper_stamp_is_malformed():
    for stamp in (None, "1", 1.5, True):
        header = json.dumps({"o": "h1", "u": [1], "p": False, "t": stamp}).encode()
        raw = KEY.seal(len(header).to_bytes(4, "big") + header)
        assert decode(raw) is Rejected.MALFORMED, stamp
