"""actors.wire.commands: decoding and validating backend commands, and encoding replies."""

from __future__ import annotations

import json

import pytest

from actors.ids import MAX_ID
from actors.wire.commands import (
    COMMANDS,
    MAX_IDS_PER_COMMAND,
    CommandError,
    Field,
    decode,
    error_reply,
    reply,
    request_id,
)

LIMIT = 1 << 20
DATA = {"text": "héllo", "n": [1, 2.5, None, True]}
SAMPLE = {Field.ID: 7, Field.IDS: [3, 1, 3, 2], Field.DATA: DATA}


def raw(body: object) -> bytes:
    return json.dumps(body).encode()


def valid_body(name: str) -> dict[str, object]:
    body: dict[str, object] = {"id": 99, "cmd": name}
    for key, kind in COMMANDS[name].items():
        body[key] = SAMPLE[kind]
    return body


def error_of(data: bytes, max_size: int = LIMIT) -> CommandError:
    with pytest.raises(CommandError) as info:
        decode(data, max_size)
    return info.value


# -- valid commands ---------------------------------------------------------------------------


def test_every_documented_command_is_in_the_table():
    assert set(COMMANDS) >= {
        "broadcast_to_channel",
        "broadcast_to_user",
        "broadcast_to_users",
        "get_online_users_in_channel",
        "get_online_users",
        "is_user_online",
        "are_users_online",
        "subscribe",
        "unsubscribe",
        "disconnect",
        "status",
    }


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_decodes_with_valid_fields(name):
    cmd = decode(raw(valid_body(name)), LIMIT)
    assert cmd.name == name
    assert cmd.id == 99
    spec = COMMANDS[name]
    assert set(cmd.args) == {key for key, kind in spec.items() if kind is not Field.DATA}
    for key, kind in spec.items():
        if kind is Field.ID:
            assert cmd.args[key] == 7
        elif kind is Field.IDS:
            assert cmd.args[key] == [3, 1, 2]  # deduplicated, order kept
    if "data" in spec:
        assert json.loads(cmd.data_json) == DATA
    else:
        assert cmd.data_json == b"null"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_refuses_a_missing_field(name):
    for key in COMMANDS[name]:
        body = valid_body(name)
        del body[key]
        exc = error_of(raw(body))
        assert exc.code == "bad_request"
        assert key in exc.message


def test_data_is_reencoded_compact_and_utf8():
    body = b'{"cmd": "broadcast_to_channel", "channel": 5, "data": {"a": [1, 2], "t": "\\u00e9"}}'
    cmd = decode(body, LIMIT)
    assert cmd.data_json == '{"a":[1,2],"t":"é"}'.encode()
    assert cmd.args == {"channel": 5}


@pytest.mark.parametrize("data", [None, 0, "x", [], {}, False])
def test_any_json_value_is_data(data):
    cmd = decode(raw({"cmd": "broadcast_to_user", "user": 1, "data": data}), LIMIT)
    assert json.loads(cmd.data_json) == data


def test_extra_fields_are_ignored():
    cmd = decode(raw({"cmd": "status", "verbose": True, "user": "x"}), LIMIT)
    assert cmd.name == "status"
    assert cmd.args == {}


@pytest.mark.parametrize("ident", ["abc", 0, 1.5, None, [1, "a"], {"k": "v"}])
def test_id_is_any_json_value(ident):
    assert decode(raw({"cmd": "status", "id": ident}), LIMIT).id == ident


def test_id_is_none_when_absent():
    assert decode(raw({"cmd": "status"}), LIMIT).id is None


def test_empty_id_list_is_valid():
    assert decode(raw({"cmd": "are_users_online", "users": []}), LIMIT).args == {"users": []}


def test_max_ids_are_accepted():
    users = list(range(1, MAX_IDS_PER_COMMAND + 1))
    cmd = decode(raw({"cmd": "are_users_online", "users": users}), 10 * LIMIT)
    assert len(cmd.args["users"]) == MAX_IDS_PER_COMMAND


def test_too_many_ids():
    # the limit applies to the list as sent
    users = [1] * (MAX_IDS_PER_COMMAND + 1)
    exc = error_of(raw({"cmd": "are_users_online", "users": users}), 10 * LIMIT)
    assert exc.code == "bad_request"


@pytest.mark.parametrize("value", [1, MAX_ID])
def test_id_range_bounds_accepted(value):
    assert decode(raw({"cmd": "disconnect", "user": value}), LIMIT).args == {"user": value}


# -- error codes ------------------------------------------------------------------------------


def test_too_large():
    body = raw({"cmd": "status"})
    assert decode(body, len(body)).name == "status"  # exactly the limit is fine
    exc = error_of(body, len(body) - 1)
    assert exc.code == "too_large"


@pytest.mark.parametrize(
    "data", [b"", b"{", b"not json", b"\xff\xfe{}", b'{"cmd": "status"', b"{'cmd': 'status'}"]
)
def test_bad_json(data):
    assert error_of(data).code == "bad_json"


@pytest.mark.parametrize("body", [[], ["status"], "status", 1, None, True])
def test_not_an_object_is_bad_json(body):
    assert error_of(raw(body)).code == "bad_json"


@pytest.mark.parametrize("body", [{}, {"cmd": 1}, {"cmd": None}, {"cmd": ["status"]}])
def test_cmd_must_be_a_string(body):
    exc = error_of(raw(body))
    assert exc.code == "bad_request"
    assert "cmd" in exc.message


def test_unknown_command():
    exc = error_of(raw({"id": 3, "cmd": "frobnicate"}))
    assert exc.code == "unknown_command"
    assert exc.message == "unknown command 'frobnicate'"


def test_unknown_command_name_is_truncated_in_the_message():
    exc = error_of(raw({"cmd": "x" * 10_000}))
    assert exc.code == "unknown_command"
    assert len(exc.message) < 100


@pytest.mark.parametrize(
    "value", [True, False, 0, -3, MAX_ID + 1, 1.0, 2.5, "5", None, [5], {"id": 5}]
)
@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("broadcast_to_channel", "channel"),
        ("broadcast_to_user", "user"),
        ("get_online_users_in_channel", "channel"),
        ("is_user_online", "user"),
        ("subscribe", "user"),
        ("subscribe", "channel"),
        ("unsubscribe", "channel"),
        ("disconnect", "user"),
    ],
)
def test_id_fields_refuse_non_ids(name, key, value):
    body = valid_body(name)
    body[key] = value
    exc = error_of(raw(body))
    assert exc.code == "bad_request"
    assert exc.message == f"field {key!r} must be a positive integer"


@pytest.mark.parametrize(
    "value", [5, "1,2", None, {"1": 1}, [True], [1, False], [1, "2"], [0], [1, -1], [1.0], [[1]]]
)
@pytest.mark.parametrize("name", ["broadcast_to_users", "are_users_online"])
def test_id_list_fields_refuse_non_id_lists(name, value):
    body = valid_body(name)
    body["users"] = value
    exc = error_of(raw(body))
    assert exc.code == "bad_request"
    assert "users" in exc.message


def test_booleans_are_not_ids():
    assert error_of(raw({"cmd": "is_user_online", "user": True})).code == "bad_request"
    assert error_of(raw({"cmd": "are_users_online", "users": [1, True]})).code == "bad_request"
    exc = error_of(raw({"cmd": "subscribe", "user": 1, "channel": True}))
    assert exc.code == "bad_request"


def test_error_carries_code_and_message():
    exc = CommandError("bad_request", "nope")
    assert (exc.code, exc.message) == ("bad_request", "nope")
    assert "bad_request" in str(exc)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_data_relayed_to_clients_is_strict_json(literal):
    """``data`` goes unchanged into every client's frame: it must be valid JSON (RFC 8259).

    Python's json accepts NaN/Infinity (and turns 1e400 into inf), and json.dumps writes them
    back as the bare words NaN/Infinity, which no browser's JSON.parse accepts.
    """

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    body = b'{"cmd":"broadcast_to_channel","channel":1,"data":[%b]}' % literal
    try:
        cmd = decode(body, LIMIT)
    except CommandError as exc:
        assert exc.code in ("bad_json", "bad_request")
    else:
        json.loads(cmd.data_json, parse_constant=refuse)


# -- request_id -------------------------------------------------------------------------------


def test_request_id_of_a_failed_request():
    assert request_id(raw({"id": 5, "cmd": "frobnicate"})) == 5
    assert request_id(raw({"id": "abc", "cmd": "is_user_online", "user": True})) == "abc"


@pytest.mark.parametrize("data", [b"{", b"\xff", raw([1, 2]), raw("x"), raw({"cmd": "status"})])
def test_request_id_is_none_when_unknown(data):
    assert request_id(data) is None


# -- replies ----------------------------------------------------------------------------------


def test_reply():
    body = json.loads(reply(7, {"shards": 2}))
    assert body == {"id": 7, "ok": True, "shards": 2}


def test_reply_is_compact():
    assert reply(None, {"a": 1}) == b'{"id":null,"ok":true,"a":1}'


def test_error_reply():
    body = json.loads(error_reply("x", "unknown_command", "unknown command 'f'"))
    assert body == {
        "id": "x",
        "ok": False,
        "error": {"code": "unknown_command", "message": "unknown command 'f'"},
    }


# -- disconnect's optional ban ----------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, 2, 2.5, 1e9])
def test_disconnect_takes_an_optional_ban_in_seconds(seconds):
    command = decode(raw({"cmd": "disconnect", "user": 7, "ban": seconds}), LIMIT)
    assert command.args == {"user": 7, "ban": seconds}
    assert decode(raw({"cmd": "disconnect", "user": 7}), LIMIT).args == {"user": 7}


@pytest.mark.parametrize("value", [-1, -0.5, 1e9 + 1, 10**400, True, False, None, "5", [5], {}])
def test_a_bad_ban_is_a_bad_request(value):
    error = error_of(raw({"cmd": "disconnect", "user": 7, "ban": value}))
    assert error.code == "bad_request"
    assert "'ban'" in error.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"1e400"])
def test_a_ban_that_is_not_a_finite_number_is_refused(literal):
    error = error_of(b'{"cmd": "disconnect", "user": 7, "ban": ' + literal + b"}")
    assert error.code in ("bad_json", "bad_request")


def test_only_disconnect_takes_a_ban():
    command = decode(raw({"cmd": "subscribe", "user": 7, "channel": 3, "ban": 5}), LIMIT)
    assert "ban" not in command.args  # an extra field, ignored as any other
