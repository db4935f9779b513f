"""actors.wire.commands: decoding and validating backend commands, and encoding replies."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ids import MAX_ID
from actors.wire.commands import (
    COMMANDS,
    CRITICAL_TTL,
    DEFAULTS,
    MAX_HISTORY_LIMIT,
    MAX_IDS_PER_COMMAND,
    OPTIONAL,
    CommandError,
    Field,
    decode,
    error_reply,
    has_long_number,
    reply,
    request_id,
)

LIMIT = 1 << 20
DATA = {"text": "héllo", "n": [1, 2.5, None, True]}
SAMPLE = {Field.ID: 7, Field.IDS: [3, 1, 3, 2], Field.DATA: DATA, Field.FLAG: True}


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
        "history",
        "snapshot",
        "get_user_connections",
        "set_channel",
    }


def test_optional_fields_and_defaults_name_known_commands():
    assert set(OPTIONAL) <= set(COMMANDS)
    assert set(DEFAULTS) <= set(OPTIONAL)
    for name, defaults in DEFAULTS.items():
        assert set(defaults) <= set(OPTIONAL[name])
        assert not set(OPTIONAL[name]) & set(COMMANDS[name])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_decodes_with_valid_fields(name):
    cmd = decode(raw(valid_body(name)), LIMIT)
    assert cmd.name == name
    assert cmd.id == 99
    spec = COMMANDS[name]
    required = {key for key, kind in spec.items() if kind is not Field.DATA}
    assert set(cmd.args) == required | set(DEFAULTS.get(name, {}))
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


@pytest.mark.parametrize(
    "number",
    [
        "18446744073709551615",  # 2**64 - 1: 20 digits, read by the exact path
        "123456789012345678901234567890",
        "-9223372036854775809",
        "9223372036854775807",  # 19 digits: orjson's path, exact too
    ],
)
def test_integers_in_data_are_relayed_exactly_however_long(number):
    body = b'{"cmd":"broadcast_to_user","user":1,"id":7,"data":{"n":%b,"f":1.5}}' % number.encode()
    cmd = decode(body, LIMIT)
    assert cmd.data_json == b'{"n":%b,"f":1.5}' % number.encode()
    assert json.loads(cmd.data_json)["n"] == int(number)


# what has_long_number stands for: its first version, a regular expression (~100 times slower)
LONG_NUMBER = re.compile(rb"-[0-9]{19}|[0-9]{20}")


@given(
    st.lists(
        st.sampled_from([b"0", b"9", b"5", b"-", b" ", b",", b"a", b"\xff", b"-1", b"12345"]),
        max_size=80,
    ).map(b"".join)
)
def test_a_long_number_is_found_exactly_where_the_expression_finds_one(raw):
    assert has_long_number(raw) == (LONG_NUMBER.search(raw) is not None)


@pytest.mark.parametrize(
    ("raw", "long"),
    [
        (b"1" * 20, True),
        (b"1" * 19, False),
        (b"-" + b"9" * 19, True),
        (b"-" + b"9" * 18, False),
        (b"--" + b"0" * 18 + b"a", False),
        (b'{"n":-12345678901234567890}', True),
        (b'{"n":"x1234567890123456789y"}', False),
    ],
)
def test_long_numbers(raw, long):
    assert has_long_number(raw) is long


@pytest.mark.parametrize("pad", [b"", b',"pad":"00000000000000000000"'])  # either path
def test_a_lone_surrogate_in_data_is_bad_json(pad):
    body = b'{"cmd":"broadcast_to_user","user":1,"data":"a\\ud800b"%b}' % pad
    assert error_of(body).code == "bad_json"


def test_a_reply_keeps_integer_keys_as_strings_and_long_ids_exactly():
    assert json.loads(reply(1, {"online": {42: True}})) == {
        "id": 1,
        "ok": True,
        "online": {"42": True},
    }
    long_id = 10**30
    assert json.loads(reply(long_id, {})) == {"id": long_id, "ok": True}
    assert json.loads(error_reply(long_id, "bad_request", "m"))["id"] == long_id


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


# -- history (issue 11) -----------------------------------------------------------------------


def test_history_defaults_since_0_and_limit_100():
    command = decode(raw({"cmd": "history", "channel": 5}), LIMIT)
    assert command.args == {"channel": 5, "since": 0, "limit": 100}


@pytest.mark.parametrize(("since", "limit"), [(0, 1), (41, 100), (MAX_ID, MAX_HISTORY_LIMIT)])
def test_history_takes_since_and_limit(since, limit):
    command = decode(raw({"cmd": "history", "channel": 5, "since": since, "limit": limit}), LIMIT)
    assert command.args == {"channel": 5, "since": since, "limit": limit}


@pytest.mark.parametrize("value", [-1, MAX_ID + 1, 1.0, 2.5, True, False, None, "3", [3]])
def test_a_bad_since_is_a_bad_request(value):
    error = error_of(raw({"cmd": "history", "channel": 5, "since": value}))
    assert (error.code, error.message) == (
        "bad_request",
        f"field 'since' must be an integer from 0 to {MAX_ID}",
    )


@pytest.mark.parametrize("value", [0, -1, MAX_HISTORY_LIMIT + 1, 10.0, True, None, "100"])
def test_a_bad_limit_is_a_bad_request(value):
    error = error_of(raw({"cmd": "history", "channel": 5, "limit": value}))
    assert error.code == "bad_request"
    assert "'limit'" in error.message and "1 to 1000" in error.message


def test_history_needs_a_channel():
    assert error_of(raw({"cmd": "history", "since": 3})).code == "bad_request"
    assert error_of(raw({"cmd": "history", "channel": 0})).code == "bad_request"


# -- critical broadcasts (issue 11) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target"), [("broadcast_to_user", {"user": 7}), ("broadcast_to_users", {"users": [7]})]
)
def test_a_critical_broadcast_has_a_ttl_by_default(name, target):
    body = {"cmd": name, **target, "data": 1, "critical": True}
    assert decode(raw(body), LIMIT).args == {**target, "critical": True, "ttl": CRITICAL_TTL}
    body["ttl"] = 2.5
    assert decode(raw(body), LIMIT).args == {**target, "critical": True, "ttl": 2.5}
    body["ttl"] = 1e9
    assert decode(raw(body), LIMIT).args["ttl"] == 1e9


@pytest.mark.parametrize("name", ["broadcast_to_user", "broadcast_to_users"])
def test_a_broadcast_that_is_not_critical_has_neither_field(name):
    target = {"user": 7} if name == "broadcast_to_user" else {"users": [7]}
    plain = decode(raw({"cmd": name, **target, "data": 1}), LIMIT)
    assert plain.args == target
    for extra in ({"critical": False}, {"critical": False, "ttl": 5}, {"ttl": 5}):
        assert decode(raw({"cmd": name, **target, "data": 1, **extra}), LIMIT).args == target


@pytest.mark.parametrize("value", [1, 0, None, "true", [True], {}])
def test_critical_must_be_a_boolean(value):
    error = error_of(raw({"cmd": "broadcast_to_user", "user": 7, "data": 1, "critical": value}))
    assert (error.code, error.message) == ("bad_request", "field 'critical' must be true or false")


@pytest.mark.parametrize("value", [0, -1, 0.0, 1e9 + 1, 10**400, True, None, "5", [5]])
def test_a_bad_ttl_is_a_bad_request_even_when_not_critical(value):
    for critical in (True, False):
        body = {"cmd": "broadcast_to_users", "users": [7], "data": 1, "critical": critical}
        error = error_of(raw({**body, "ttl": value}))
        assert error.code == "bad_request"
        assert "'ttl'" in error.message and "above 0" in error.message


def test_a_ttl_that_is_not_a_finite_number_is_refused():
    error = error_of(b'{"cmd":"broadcast_to_user","user":7,"data":1,"critical":true,"ttl":NaN}')
    assert error.code in ("bad_json", "bad_request")


def test_only_broadcasts_to_users_are_critical():
    command = decode(
        raw({"cmd": "broadcast_to_channel", "channel": 1, "data": 1, "critical": True}), LIMIT
    )
    assert command.args == {"channel": 1}


# -- issue 12: the event stream's snapshot, connection metadata, join/leave marks -------------


def test_snapshot_takes_no_field():
    cmd = decode(raw({"id": 1, "cmd": "snapshot"}), LIMIT)
    assert (cmd.name, cmd.args) == ("snapshot", {})


def test_get_user_connections_takes_a_user():
    cmd = decode(raw({"cmd": "get_user_connections", "user": 42}), LIMIT)
    assert cmd.args == {"user": 42}
    assert error_of(raw({"cmd": "get_user_connections"})).code == "bad_request"


@pytest.mark.parametrize("value", [0, -1, "42", 4.5, True, None, [42]])
def test_get_user_connections_refuses_a_bad_user(value):
    exc = error_of(raw({"cmd": "get_user_connections", "user": value}))
    assert exc.code == "bad_request"
    assert exc.message == "field 'user' must be a positive integer"


@pytest.mark.parametrize("flag", [True, False])
def test_set_channel_takes_a_channel_and_a_flag(flag):
    cmd = decode(raw({"cmd": "set_channel", "channel": 9, "join_leave": flag}), LIMIT)
    assert cmd.args == {"channel": 9, "join_leave": flag}
    assert cmd.args["join_leave"] is flag


def test_set_channel_needs_join_leave():
    exc = error_of(raw({"cmd": "set_channel", "channel": 9}))
    assert exc.code == "bad_request"
    assert exc.message == "missing field 'join_leave'"


@pytest.mark.parametrize("value", [0, 1, "true", "on", None, [], {}])
def test_join_leave_must_be_a_boolean(value):
    exc = error_of(raw({"cmd": "set_channel", "channel": 9, "join_leave": value}))
    assert exc.code == "bad_request"
    assert exc.message == "field 'join_leave' must be true or false"


@pytest.mark.parametrize("value", [0, "9", True, None])
def test_set_channel_refuses_a_bad_channel(value):
    exc = error_of(raw({"cmd": "set_channel", "channel": value, "join_leave": True}))
    assert exc.code == "bad_request"
    assert "'channel'" in exc.message


@pytest.mark.parametrize("depth", [253, 254, 255, 300, 900])
def test_deeply_nested_data_is_relayed_as_it_came(depth):
    data = "[" * depth + "1" + "]" * depth
    body = f'{{"cmd":"broadcast_to_user","user":1,"data":{data}}}'.encode()
    assert decode(body, LIMIT).data_json == data.encode()
