"""actors.wire.shardwire: the router ↔ shard multipart messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.wire import shardwire

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


# -- identities -------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "epoch"), [(0, 0), (3, 17), (255, 10**12)])
def test_identity_round_trip(index, epoch):
    raw = shardwire.identity(index, epoch)
    assert raw == f"shard-{index}-{epoch}".encode()
    assert shardwire.parse_identity(raw) == (index, epoch)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"shard-1",
        b"shard-1-",
        b"shard--1-2",
        b"shard-1--2",
        b"shard-a-2",
        b"xshard-1-2",
        b"shard-1-2x",
        b"shard-1-2\n",
        b"shard-1-2-3",
        b"\x00\x01\x02\x03\x04",  # a ZeroMQ auto-generated identity
    ],
)
def test_parse_identity_refuses_anything_else(raw):
    assert shardwire.parse_identity(raw) is None


# -- ids --------------------------------------------------------------------------------------


def test_pack_id_is_8_bytes_little_endian():
    assert shardwire.pack_id(1) == b"\x01" + b"\x00" * 7
    assert shardwire.pack_id(-1) == b"\xff" * 8
    assert len(shardwire.pack_id(2**63 - 1)) == 8


@given(INT64)
def test_pack_id_round_trip(value):
    assert shardwire.unpack_id(shardwire.pack_id(value)) == value


def test_pack_id_refuses_out_of_range():
    with pytest.raises(OverflowError):
        shardwire.pack_id(2**63)


@given(st.lists(INT64, max_size=50))
def test_pack_ids_round_trip(ids):
    raw = shardwire.pack_ids(ids)
    assert len(raw) == 8 * len(ids)
    assert shardwire.unpack_ids(raw) == ids


def test_pack_ids_of_nothing():
    assert shardwire.pack_ids([]) == b""
    assert shardwire.unpack_ids(b"") == []


def test_pack_ids_accepts_any_iterable():
    assert shardwire.unpack_ids(shardwire.pack_ids(x for x in (3, 1, 2))) == [3, 1, 2]


# -- messages ---------------------------------------------------------------------------------


def test_channel_delivery():
    msg = shardwire.channel_delivery(9, b"\x81\x02{}")
    assert msg == [shardwire.CHANNEL, shardwire.pack_id(9), b"\x81\x02{}"]
    assert shardwire.unpack_id(msg[1]) == 9


def test_users_delivery():
    msg = shardwire.users_delivery([4, 5, 6], b"frame")
    assert msg[0] == shardwire.USERS
    assert shardwire.unpack_ids(msg[1]) == [4, 5, 6]
    assert msg[2] == b"frame"


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (shardwire.QueryOnline(), {"op": "online"}),
        (shardwire.QueryOnlineIn(3), {"op": "online_channel", "channel": 3}),
        (shardwire.QueryAreOnline((1, 2)), {"op": "are_online", "users": [1, 2]}),
        (
            shardwire.UserSubscription(4, 5, True),
            {"op": "subscribe", "user": 4, "channel": 5},
        ),
        (
            shardwire.UserSubscription(4, 5, False),
            {"op": "unsubscribe", "user": 4, "channel": 5},
        ),
        (shardwire.UserDisconnect(6), {"op": "disconnect", "user": 6}),
        (shardwire.QueryPresence(True), {"op": "presence", "full": True}),
        (shardwire.QueryPresence(False), {"op": "presence", "full": False}),
        (shardwire.QueryStatus(), {"op": "status"}),
    ],
)
def test_every_query_has_its_json_and_comes_back_the_same(body, wire):
    msg = shardwire.query(7, body)
    assert json.loads(msg[2]) == wire
    assert shardwire.decode_query(msg[2]) == body


@pytest.mark.parametrize("payload", [b'{"op":"explode"}', b'{"op":"subscribe","user":1}', b"[]"])
def test_a_query_no_router_sends_is_a_bug(payload):
    with pytest.raises((ValueError, KeyError, TypeError)):
        shardwire.decode_query(payload)


def test_query_and_result_round_trip():
    query = shardwire.query(12, shardwire.QueryAreOnline((1, 2)))
    assert query[0] == shardwire.QUERY
    assert shardwire.unpack_id(query[1]) == 12
    assert json.loads(query[2]) == {"op": "are_online", "users": [1, 2]}
    result = shardwire.result(12, {"online": [2]})
    assert result[0] == shardwire.RESULT
    assert result[1] == query[1]
    assert json.loads(result[2]) == {"online": [2]}


def test_hello():
    msg = shardwire.hello(2, 5, 4321, (7, 8))
    assert msg[0] == shardwire.HELLO
    assert len(msg) == 2
    assert json.loads(msg[1]) == {"index": 2, "epoch": 5, "pid": 4321, "channels": [7, 8]}


def test_delta():
    msg = shardwire.delta([1, 2], [3], seq=9)
    assert msg[0] == shardwire.DELTA
    assert shardwire.unpack_ids(msg[1]) == [1, 2]
    assert shardwire.unpack_ids(msg[2]) == [3]
    assert shardwire.unpack_id(msg[3]) == 9
    empty = shardwire.delta([], [], seq=1)
    assert empty[:3] == [shardwire.DELTA, b"", b""]


def test_sync_and_indexed_carry_the_sequence_number():
    msg = shardwire.sync([4, 5], seq=3)
    assert msg[0] == shardwire.SYNC and shardwire.unpack_ids(msg[1]) == [4, 5]
    assert shardwire.unpack_id(msg[2]) == 3
    ack = shardwire.indexed(3)
    assert ack[0] == shardwire.INDEXED and shardwire.unpack_id(ack[1]) == 3


def test_message_kinds_are_distinct_single_bytes():
    kinds = [
        shardwire.CHANNEL,
        shardwire.USERS,
        shardwire.QUERY,
        shardwire.HELLO,
        shardwire.DELTA,
        shardwire.RESULT,
        shardwire.PULSE,
    ]
    assert all(len(kind) == 1 for kind in kinds)
    assert len(set(kinds)) == len(kinds)


def test_batches_round_trip_in_order():
    messages = [
        shardwire.channel_delivery(7, b"frame one"),
        shardwire.users_delivery([1, 2, 3], b""),
        shardwire.query(9, shardwire.QueryStatus()),
    ]
    unpacked = shardwire.unpack_messages(shardwire.pack_messages(messages))
    assert [list(m) for m in unpacked] == messages
    assert shardwire.unpack_messages(shardwire.pack_messages([])) == []
