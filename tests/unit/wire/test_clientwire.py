"""actors.wire.clientwire: decoding the frames a WebSocket client sends."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ids import MAX_ID
from actors.wire.clientwire import (
    KINDS,
    MAX_ACK_ID,
    MAX_EPOCH,
    MAX_TOKEN,
    Ack,
    ClientFrameError,
    Ping,
    Refresh,
    Resume,
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
    assert set(KINDS) == {"subscribe", "unsubscribe", "ping", "refresh", "resume", "ack"}


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


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "resume"])
@pytest.mark.parametrize(
    "channel", [None, "7", True, False, 0, -1, 1.0, 7.5, MAX_ID + 1, [7], {"id": 7}]
)
def test_bad_channel(kind, channel):
    body = {"type": kind, "channel": channel, "offset": 0, "epoch": ""}
    assert error_code(frame(body)) == "bad_frame"


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "resume"])
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


# -- resume and ack (issue 11) ------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 1000, MAX_ID])
@pytest.mark.parametrize("epoch", ["", "0a1b2c3d4e5f", "é" * MAX_EPOCH])
def test_resume(offset, epoch):
    body = {"type": "resume", "channel": 7, "offset": offset, "epoch": epoch}
    assert parse_client_frame(frame(body)) == Resume(7, offset, epoch)


def test_resume_without_an_epoch_has_the_empty_one():
    assert parse_client_frame(frame({"type": "resume", "channel": 7, "offset": 3})) == Resume(
        7, 3, ""
    )


@pytest.mark.parametrize(
    "offset", [None, -1, MAX_ID + 1, 1.0, 2.5, True, False, "3", [3], {"n": 3}]
)
def test_resume_with_a_bad_offset_is_bad_frame(offset):
    assert error_code(frame({"type": "resume", "channel": 7, "offset": offset})) == "bad_frame"


def test_resume_without_an_offset_is_bad_frame():
    assert error_code(frame({"type": "resume", "channel": 7, "epoch": "e"})) == "bad_frame"


@pytest.mark.parametrize("epoch", [None, 1, True, ["e"], {"e": 1}, "x" * (MAX_EPOCH + 1)])
def test_resume_with_a_bad_epoch_is_bad_frame(epoch):
    body = {"type": "resume", "channel": 7, "offset": 1, "epoch": epoch}
    assert error_code(frame(body)) == "bad_frame"


@pytest.mark.parametrize("id", ["a", "h1-42", "é" * MAX_ACK_ID])
def test_ack(id):
    assert parse_client_frame(frame({"type": "ack", "id": id})) == Ack(id)
    assert parse_client_frame(frame({"type": "ack", "id": id, "channel": "x"})) == Ack(id)


@pytest.mark.parametrize("id", [None, "", 7, 1.5, True, ["a"], {"a": 1}, "x" * (MAX_ACK_ID + 1)])
def test_ack_with_a_bad_id_is_bad_frame(id):
    assert error_code(frame({"type": "ack", "id": id})) == "bad_frame"


def test_ack_without_an_id_is_bad_frame():
    assert error_code(frame({"type": "ack"})) == "bad_frame"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@given(
    st.sampled_from(KINDS),
    st.dictionaries(st.sampled_from(["channel", "offset", "epoch", "id", "token"]), JSON),
)
def test_any_frame_of_a_known_kind_parses_or_is_a_client_frame_error(kind, fields):
    try:
        parsed = parse_client_frame(frame({**fields, "type": kind}))
    except ClientFrameError as exc:
        assert exc.code == "bad_frame"
    else:
        assert isinstance(parsed, Ping | Subscribe | Unsubscribe | Refresh | Resume | Ack)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_a_client_frame_error(payload):
    try:
        parse_client_frame(payload)
    except ClientFrameError as exc:
        assert exc.code in {"invalid_utf8", "bad_json", "bad_frame", "unknown_type"}
