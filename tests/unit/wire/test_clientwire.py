"""actors.wire.clientwire: decoding the frames a WebSocket client sends."""

from __future__ import annotations

import json

import pytest

from actors.ids import MAX_ID
from actors.wire.clientwire import (
    KINDS,
    MAX_TOKEN,
    ClientFrameError,
    Ping,
    Refresh,
    Subscribe,
    Unsubscribe,
    parse_client_frame,
)


def frame(body: object) -> bytes:
    return json.dumps(body).encode()


def error_code(payload: bytes) -> str:
    with pytest.raises(ClientFrameError) as info:
        parse_client_frame(payload)
    assert info.value.message
    return info.value.code


def test_kinds_are_the_documented_ones():
    assert set(KINDS) == {"subscribe", "unsubscribe", "ping", "refresh"}


def test_ping():
    assert parse_client_frame(b'{"type":"ping"}') == Ping()


def test_ping_ignores_other_fields():
    assert parse_client_frame(frame({"type": "ping", "channel": "x", "n": 1})) == Ping()


@pytest.mark.parametrize(
    ("kind", "event"), [("subscribe", Subscribe), ("unsubscribe", Unsubscribe)]
)
@pytest.mark.parametrize("channel", [1, 7, MAX_ID])
def test_subscribe_and_unsubscribe(kind, event, channel):
    assert parse_client_frame(frame({"type": kind, "channel": channel})) == event(channel)


def test_utf8_payload_is_accepted():
    assert parse_client_frame('{"type":"subscribe","channel":3,"note":"é"}'.encode()) == Subscribe(
        3
    )


@pytest.mark.parametrize("payload", [b"", b"{", b"ping", b"{'type': 'ping'}"])
def test_bad_json(payload):
    assert error_code(payload) == "bad_json"


@pytest.mark.parametrize("payload", [b"\xff\xfe", b'{"type":"\xc3("}', b"\xed\xa0\x80"])
def test_invalid_utf8_is_its_own_error(payload):
    # the connection fails with close code 1007 for it (RFC 6455 §8.1), not an error frame
    assert error_code(payload) == "invalid_utf8"


@pytest.mark.parametrize("body", [[], ["ping"], "ping", 1, None, True])
def test_not_an_object_is_bad_frame(body):
    assert error_code(frame(body)) == "bad_frame"


@pytest.mark.parametrize("body", [{}, {"type": 1}, {"type": None}, {"type": ["ping"]}])
def test_type_must_be_a_string(body):
    assert error_code(frame(body)) == "bad_frame"


@pytest.mark.parametrize("kind", ["pong", "PING", "message", "hello", ""])
def test_unknown_type(kind):
    assert error_code(frame({"type": kind})) == "unknown_type"


def test_unknown_type_message_is_bounded():
    with pytest.raises(ClientFrameError) as info:
        parse_client_frame(frame({"type": "x" * 5000}))
    assert info.value.code == "unknown_type"
    assert len(info.value.message) < 100


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize(
    "channel", [None, "7", True, False, 0, -1, 1.0, 7.5, MAX_ID + 1, [7], {"id": 7}]
)
def test_bad_channel(kind, channel):
    assert error_code(frame({"type": kind, "channel": channel})) == "bad_frame"


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_missing_channel(kind):
    assert error_code(frame({"type": kind})) == "bad_frame"


def test_error_str_carries_the_code():
    exc = ClientFrameError("forbidden", "no")
    assert (exc.code, exc.message) == ("forbidden", "no")
    assert str(exc) == "forbidden: no"


def test_refresh_carries_its_token_unchecked():
    assert parse_client_frame(frame({"type": "refresh", "token": "a.b.c"})) == Refresh("a.b.c")
    # the token is checked by the connection (signature, sub, exp), not by the codec
    assert parse_client_frame(frame({"type": "refresh", "token": "x", "channel": 3})) == Refresh(
        "x"
    )


@pytest.mark.parametrize(
    "token", [None, "", 7, 1.5, True, ["a.b.c"], {"t": "a.b.c"}, "x" * (MAX_TOKEN + 1)]
)
def test_refresh_with_a_bad_token_field_is_bad_frame(token):
    assert error_code(frame({"type": "refresh", "token": token})) == "bad_frame"


def test_refresh_without_a_token_is_bad_frame():
    assert error_code(frame({"type": "refresh"})) == "bad_frame"


@pytest.mark.parametrize(
    "payload", [b'{"type":"refresh","token":', b'{"type":"refresh" "token":"a"}', b"refresh"]
)
def test_refresh_garbage_is_bad_json(payload):
    assert error_code(payload) == "bad_json"


def test_refresh_with_invalid_utf8_is_its_own_error():
    assert error_code(b'{"type":"refresh","token":"\xff\xfe"}') == "invalid_utf8"
