"""actors.wire.frames: server-to-client WebSocket frames, checked against websockets' own parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from actors.wire import frames


def client_receives(data: bytes, chunk: int | None = None) -> list[Frame]:
    """What a real client (websockets' Sans-I/O protocol, connection open) decodes from data."""
    client = ClientProtocol(parse_uri("ws://localhost/"), state=State.OPEN, max_size=None)
    step = chunk or max(len(data), 1)
    for start in range(0, len(data), step):
        client.receive_data(data[start : start + step])
    assert client.state is State.OPEN  # no protocol error: the client did not fail the connection
    return client.events_received()


def only_text(data: bytes) -> str:
    events = client_receives(data)
    assert len(events) == 1
    (event,) = events
    assert event.opcode is Opcode.TEXT
    assert event.fin
    return event.data.decode("utf-8")


# -- text_frame -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_header(length, header):
    payload = b"a" * length
    frame = frames.text_frame(payload)
    assert frame == header + payload
    assert frame[1] & 0x80 == 0  # a server never masks


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_websockets_decodes_our_frames(length):
    payload = ("é" * (length // 2) + "x" * (length % 2)).encode()
    assert len(payload) == length
    assert only_text(frames.text_frame(payload)) == payload.decode()


def test_websockets_decodes_frames_split_anywhere():
    data = frames.text_frame(b"[" + b"1," * 100 + b"2]") + frames.text_frame(b"x" * 70_000)
    events = client_receives(data, chunk=7)
    assert [len(e.data) for e in events] == [203, 70_000]


@given(st.text(max_size=300))
def test_any_text_round_trips(text):
    assert only_text(frames.text_frame(text.encode())) == text


def test_one_frame_is_valid_for_every_recipient():
    frame = frames.channel_message(1, b"1")
    assert only_text(frame) == only_text(frame)  # no per-connection state (no mask)


# -- the server's frames ----------------------------------------------------------------------


def test_channel_message():
    frame = frames.channel_message(5, b'{"text":"hi"}')
    assert json.loads(only_text(frame)) == {
        "type": "message",
        "channel": 5,
        "data": {"text": "hi"},
    }


def test_channel_message_without_offset_is_todays_bytes():
    today = frames.text_frame(b'{"type":"message","channel":5,"data":{"a":1}}')
    assert frames.channel_message(5, b'{"a":1}') == today
    assert frames.channel_message(5, b'{"a":1}', 0, "") == today


def test_channel_message_with_a_position():
    frame = frames.channel_message(5, b'{"text":"hi"}', 17, "0a1b2c3d4e5f")
    assert only_text(frame) == (
        '{"type":"message","channel":5,"offset":17,"epoch":"0a1b2c3d4e5f","data":{"text":"hi"}}'
    )


@given(st.integers(1, 2**63 - 1), st.text(max_size=64), st.integers(1, 2**63 - 1))
def test_channel_message_position_round_trips(offset, epoch, channel):
    body = json.loads(only_text(frames.channel_message(channel, b"[1]", offset, epoch)))
    assert body == {
        "type": "message",
        "channel": channel,
        "offset": offset,
        "epoch": epoch,
        "data": [1],
    }


@given(st.text(min_size=1, max_size=128))
def test_critical_message(id):
    body = json.loads(only_text(frames.critical_message(id, '{"t":"é"}'.encode())))
    assert body == {"type": "message", "id": id, "data": {"t": "é"}}


@pytest.mark.parametrize("recovered", [True, False])
def test_resumed(recovered):
    body = json.loads(only_text(frames.resumed(3, 1000, "ab12", recovered)))
    assert body == {
        "type": "resumed",
        "channel": 3,
        "offset": 1000,
        "epoch": "ab12",
        "recovered": recovered,
    }


def test_direct_message_has_no_channel():
    body = json.loads(only_text(frames.direct_message('["a","é"]'.encode())))
    assert body == {"type": "message", "data": ["a", "é"]}


def test_large_channel_message():
    data = json.dumps({"blob": "z" * 100_000}).encode()
    body = json.loads(only_text(frames.channel_message(2**62, data)))
    assert body["channel"] == 2**62
    assert body["data"]["blob"] == "z" * 100_000


def test_hello():
    body = json.loads(only_text(frames.hello(42, [1, 2], 25.0)))
    assert body == {"type": "hello", "user": 42, "channels": [1, 2], "heartbeat": 25.0}


@pytest.mark.parametrize(("exp", "shown"), [(1_900_000_000.0, 1_900_000_000), (12.5, 12.5)])
def test_refreshed(exp, shown):
    body = json.loads(only_text(frames.refreshed(exp)))
    assert body == {"type": "refreshed", "exp": shown}
    assert type(body["exp"]) is type(shown)


def test_error():
    body = json.loads(only_text(frames.error("forbidden", "channel 7 is not in your token")))
    assert body == {
        "type": "error",
        "code": "forbidden",
        "message": "channel 7 is not in your token",
    }


def test_pong():
    assert json.loads(only_text(frames.PONG)) == {"type": "pong"}


def test_ping():
    (event,) = client_receives(frames.PING)
    assert event.opcode is Opcode.PING
    assert event.data == b""


def test_dumps_is_compact_utf8():
    assert frames.dumps({"a": [1, 2], "t": "é"}) == '{"a":[1,2],"t":"é"}'.encode()


@pytest.mark.parametrize(
    ("channel", "data", "offset", "epoch"),
    [
        (1, b"1", 0, ""),
        (123456789, b'"x"' * 40, 0, ""),  # a 2-byte length
        (5, b'"y"' * 30000, 0, ""),  # an 8-byte length
        (7, b"[1]", 42, "0a1b2c3d4e5f"),
        (7, b'"z"' * 100, 2**63 - 1, "e" * 64),
    ],
)
def test_a_channel_frames_size_is_known_without_encoding_it(channel, data, offset, epoch):
    size = frames.channel_message_size(channel, len(data), offset, epoch)
    assert size == len(frames.channel_message(channel, data, offset, epoch))
