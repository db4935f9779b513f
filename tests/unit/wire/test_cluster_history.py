"""The Redis layout's history and critical parts: key names, the position trailer the APPEND
script adds, kept messages opened without the replay window, the ``acked`` control, and the
script variants."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.wire import cluster
from actors.wire.cluster import ClusterKey, Layout, Message, Rejected

KEY = ClusterKey(b"unit cluster key")
NOW = 1_700_000_000_000


def history(channel: int = 5, data: bytes = b'{"a":1}', sent_ms: int = NOW) -> bytes:
    """A sealed channel message with history, as kept in the stream (no position yet)."""
    return cluster.encode(
        Message("h1", None, data, channel=channel, history=True, sent_ms=sent_ms), KEY
    )


def test_history_keys_share_their_channel_tag_and_critical_keys_the_hosts_tag():
    layout = Layout("blue")
    stream, meta = layout.history_keys(7)
    ids, data, expiries = layout.critical_keys(2**63 - 1)
    assert (stream, meta) == ("{ucc:blue:c:7}:hist", "{ucc:blue:c:7}:hist:meta")
    assert ids == f"{{ucc:blue}}:crit:{2**63 - 1}"
    assert (data, expiries) == (ids + ":d", ids + ":x")
    assert layout.channel_of_topic(stream) is None  # a key, never taken for a channel topic


def test_a_published_history_message_carries_its_position_outside_the_seal():
    kept = history()
    got = cluster.decode(kept + b"|42|0123456789ab", KEY, NOW)
    assert isinstance(got, Message)
    assert (got.history, got.channel, got.frame) == (True, 5, b'{"a":1}')
    assert (got.offset, got.epoch) == (42, "0123456789ab")
    assert cluster.decode(kept, KEY, NOW) is Rejected.FORGED  # a kept copy, published bare
    assert cluster.decode(kept + b"|0|e", KEY, NOW) is Rejected.FORGED  # offsets start at 1
    # beyond what the router carries (8 bytes, signed): refused here, never a crash there
    assert cluster.decode(kept + b"|9223372036854775808|e", KEY, NOW) is Rejected.FORGED
    top = cluster.decode(kept + b"|9223372036854775807|e", KEY, NOW)
    assert isinstance(top, Message) and top.offset == 2**63 - 1
    plain = cluster.encode(Message("h1", None, b"\x81\x02{}", channel=5, sent_ms=NOW), KEY)
    assert cluster.decode(plain + b"|1|e", KEY, NOW) is Rejected.FORGED  # a position added
    assert cluster.decode(history(sent_ms=0) + b"|1|e", KEY, NOW) is Rejected.REPLAYED


def test_a_kept_message_opens_whatever_its_age_but_only_with_its_seal():
    old = history(sent_ms=0)
    opened = cluster.open_stored(old, KEY)
    assert isinstance(opened, Message) and opened.history and opened.frame == b'{"a":1}'
    assert cluster.open_stored(old[1:], KEY) is Rejected.FORGED
    assert cluster.open_stored(old, ClusterKey(b"another key")) is Rejected.FORGED
    assert cluster.open_stored(KEY.seal(b"\x00\x00"), KEY) is Rejected.MALFORMED


def test_a_critical_message_names_its_id_users_and_expiry_under_the_seal():
    message = Message("h1", [1, 2**63 - 1], b'"x"', critical="p-1", expires_ms=NOW + 5, sent_ms=NOW)
    sealed = cluster.encode(message, KEY)
    assert cluster.decode(sealed, KEY, NOW) == message
    assert cluster.open_stored(sealed, KEY) == message
    for bad in (
        Message("h1", [], b'"x"', critical="p-1", sent_ms=NOW),  # nobody
        Message("h1", [1], b"", critical="p-1", sent_ms=NOW),  # no data
        Message("h1", [1], b'"x"', critical="", sent_ms=NOW),  # no id
        Message("h1", [1], b'"x"', critical="i" * 129, sent_ms=NOW),
        Message("h1", [1], b'"x"', channel=3, history=True, sent_ms=NOW),  # history to users
        Message("h1", None, b'"x"', history=True, sent_ms=NOW),  # history to no channel
    ):
        assert cluster.open_stored(cluster.encode(bad, KEY), KEY) is Rejected.MALFORMED, bad


def test_the_acked_control_names_an_id():
    acked = Message("h1", [7], b"", control={"op": "acked", "id": "p-1"}, sent_ms=NOW)
    assert cluster.decode(cluster.encode(acked, KEY), KEY, NOW) == acked
    for id in (None, "", 5, "i" * 129):
        bad = Message("h1", [7], b"", control={"op": "acked", "id": id}, sent_ms=NOW)
        assert cluster.decode(cluster.encode(bad, KEY), KEY, NOW) is Rejected.MALFORMED


@given(st.binary(max_size=200), st.binary(max_size=30))
def test_random_bytes_with_or_without_a_position_never_raise(raw, tail):
    assert isinstance(cluster.decode(raw + b"|" + tail, KEY, NOW), Message | Rejected)
    assert isinstance(cluster.open_stored(raw, KEY), Message | Rejected)


def test_the_cluster_variants_publish_to_shard_channels_and_nothing_else_differs():
    for single, sharded in (
        (cluster.APPEND, cluster.SAPPEND),
        (cluster.STORE_CRITICAL, cluster.SSTORE_CRITICAL),
        (cluster.ACK_CRITICAL, cluster.SACK_CRITICAL),
        (cluster.READ_HISTORY, cluster.SREAD_HISTORY),  # its probe
    ):
        assert "'PUBLISH'" not in sharded and "redis.call('SPUBLISH'," in sharded
        assert sharded.replace("SPUBLISH", "PUBLISH") == single
    assert "PUBLISH" not in cluster.FETCH_CRITICAL
