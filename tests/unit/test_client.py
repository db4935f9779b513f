"""The pure half of the backend client: :class:`shards.client.Wire` (request ids, encoding,
reply matching) and the result parsers of :class:`shards.client.Calls`. No socket."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from shards.client import (
    AsyncClient,
    Calls,
    Client,
    CommandTimeout,
    Overloaded,
    UccError,
    Wire,
    curve_keys,
)
from shards.curve import write_keypair


def frame(reply: object) -> list[bytes]:
    return [json.dumps(reply).encode()]


# -- encoding ---------------------------------------------------------------------------------


def test_each_request_gets_the_next_id_and_one_compact_json_frame():
    wire = Wire()
    first_id, first = wire.encode("broadcast_to_channel", {"channel": 5, "data": {"a": [1]}})
    second_id, _ = wire.encode("status", {})
    assert (first_id, second_id) == (1, 2)
    assert first == b'{"id":1,"cmd":"broadcast_to_channel","channel":5,"data":{"a":[1]}}'


def test_text_is_sent_as_utf8_not_escaped():
    _, encoded = Wire().encode("broadcast_to_user", {"user": 1, "data": "héllo ✓"})
    assert "héllo ✓".encode() in encoded
    assert json.loads(encoded)["data"] == "héllo ✓"


@pytest.mark.parametrize(
    "data",
    [math.nan, math.inf, -math.inf, {1, 2}, b"bytes", object()],
    ids=["nan", "inf", "-inf", "set", "bytes", "object"],
)
def test_what_is_not_strict_json_is_refused_before_sending(data):
    wire = Wire()
    with pytest.raises(UccError) as refused:
        wire.encode("broadcast_to_channel", {"channel": 1, "data": data})
    assert refused.value.code == "bad_request"
    assert "'broadcast_to_channel'" in refused.value.message


def test_too_deep_data_is_refused_not_a_crash():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UccError) as refused:
        Wire().encode("broadcast_to_channel", {"channel": 1, "data": deep})
    assert refused.value.code == "bad_request"


@pytest.mark.parametrize("key", ["cmd", "id"])
def test_cmd_and_id_are_the_clients_own_fields(key):
    with pytest.raises(ValueError, match="set by the client"):
        Wire().encode("status", {key: 1})


def test_a_refused_request_does_not_use_up_an_id():
    wire = Wire()
    with pytest.raises(UccError):
        wire.encode("broadcast_to_channel", {"channel": 1, "data": math.nan})
    assert wire.encode("status", {})[0] == 2  # the id was taken before encoding failed


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), lambda inner: (
    st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
), max_leaves=20))  # fmt: skip
def test_any_json_value_round_trips(data):
    request_id, encoded = Wire().encode("broadcast_to_user", {"user": 7, "data": data})
    assert json.loads(encoded) == {"id": request_id, "cmd": "broadcast_to_user", "user": 7,
                                   "data": data}  # fmt: skip


# -- matching replies -------------------------------------------------------------------------


def test_the_reply_with_our_id_is_ours():
    reply = {"id": 3, "ok": True, "shards": 2}
    assert Wire.match(frame(reply), 3) == reply


def test_the_last_frame_is_the_reply():
    # a DEALER may see envelope frames before the reply
    assert Wire.match([b"", json.dumps({"id": 1, "ok": True}).encode()], 1) == {
        "id": 1,
        "ok": True,
    }


@pytest.mark.parametrize("stale_id", [2, 0, "3", 3.0, True, None])
def test_a_reply_to_another_request_is_stale(stale_id):
    assert Wire.match(frame({"id": stale_id, "ok": True}), 3) is None


def test_an_error_reply_without_an_id_answers_the_pending_request():
    reply = {"ok": False, "error": {"code": "too_large", "message": "over 1 MiB"}}
    with pytest.raises(UccError) as failed:
        Wire.match(frame(reply), 9)
    assert (failed.value.code, failed.value.message) == ("too_large", "over 1 MiB")


def test_an_error_reply_to_another_request_is_stale_not_raised():
    reply = {"id": 2, "ok": False, "error": {"code": "bad_request", "message": "no"}}
    assert Wire.match(frame(reply), 3) is None


def test_overloaded_is_its_own_error():
    reply = {"id": 1, "ok": False, "error": {"code": "overloaded", "message": "shard 0 behind"}}
    with pytest.raises(Overloaded) as refused:
        Wire.match(frame(reply), 1)
    assert refused.value.code == "overloaded"
    assert refused.value.message == "shard 0 behind"


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (None, "error", "the server gave no message"),
        ("text", "error", "the server gave no message"),
        ({"code": 5, "message": 6}, "error", "the server gave no message"),
        ({"code": "unknown_command"}, "unknown_command", "the server gave no message"),
    ],
)
def test_a_malformed_error_is_still_an_error(error, code, message):
    with pytest.raises(UccError) as failed:
        Wire.match(frame({"id": 1, "ok": False, "error": error}), 1)
    assert (failed.value.code, failed.value.message) == (code, message)
    assert not isinstance(failed.value, Overloaded)


@pytest.mark.parametrize(
    "frames",
    [[b"not json"], [b"\xff"], [], [b"[1, 2]"], [b'{"id": 1}'], [b'{"id": 1, "ok": "yes"}']],
    ids=["text", "bytes", "no frame", "a list", "no ok", "ok not a bool"],
)
def test_what_is_not_a_reply_is_a_bad_reply(frames):
    with pytest.raises(UccError) as failed:
        Wire.match(frames, 1)
    assert failed.value.code == "bad_reply"


def test_errors_survive_pickling_with_their_code():
    import pickle  # noqa: PLC0415

    for error in (UccError("bad_request", "x"), Overloaded("y"), CommandTimeout("z")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error)
        assert (again.code, again.message) == (error.code, error.message)


# -- reading results --------------------------------------------------------------------------


def test_user_lists_are_sorted_and_checked():
    call = Calls.get_online_users()
    assert (call.cmd, call.fields) == ("get_online_users", {})
    assert call.result({"ok": True, "users": [3, 1, 2]}) == [1, 2, 3]
    for bad in ([1, "2"], [True], "1,2", None):
        with pytest.raises(UccError) as failed:
            call.result({"ok": True, "users": bad})
        assert failed.value.code == "bad_reply"


def test_online_maps_have_integer_keys():
    call = Calls.are_users_online([1, 2])
    assert call.fields == {"users": [1, 2]}
    assert call.result({"ok": True, "online": {"1": True, "2": False}}) == {1: True, 2: False}
    for bad in ({"x": True}, {"1": 1}, [True]):
        with pytest.raises(UccError):
            call.result({"ok": True, "online": bad})


def test_is_user_online_wants_a_boolean():
    call = Calls.is_user_online(4)
    assert call.result({"ok": True, "online": False}) is False
    with pytest.raises(UccError):
        call.result({"ok": True, "online": 0})


def test_status_wants_a_list_of_shards():
    call = Calls.status()
    reply = {"ok": True, "shards": [], "missing_shards": []}
    assert call.result(reply) is reply
    with pytest.raises(UccError):
        call.result({"ok": True, "shards": {}})


def test_a_plain_broadcast_to_users_is_sent_as_before():
    assert Calls.broadcast_to_user(4, {"a": 1}).fields == {"user": 4, "data": {"a": 1}}
    assert Calls.broadcast_to_users([4, 5], 1, ttl=9).fields == {"users": [4, 5], "data": 1}
    _, encoded = Wire().encode("broadcast_to_user", Calls.broadcast_to_user(4, "x").fields)
    assert encoded == b'{"id":1,"cmd":"broadcast_to_user","user":4,"data":"x"}'


def test_a_critical_broadcast_carries_critical_and_its_ttl():
    call = Calls.broadcast_to_user(4, "x", critical=True)
    assert (call.cmd, call.fields) == (
        "broadcast_to_user",
        {"user": 4, "data": "x", "critical": True},
    )
    reply = {"ok": True, "message_id": "h1-1", "shards": 1}
    assert call.result(reply) is reply
    call = Calls.broadcast_to_users((4, 5), "x", critical=True, ttl=60)
    assert call.fields == {"users": [4, 5], "data": "x", "critical": True, "ttl": 60}


def test_history_sends_since_and_limit_and_checks_the_reply():
    call = Calls.history(7)
    assert (call.cmd, call.fields) == ("history", {"channel": 7, "since": 0, "limit": 100})
    assert Calls.history(7, since=40, limit=5).fields == {"channel": 7, "since": 40, "limit": 5}
    reply = {
        "ok": True,
        "epoch": "0a1b2c3d4e5f",
        "offset": 42,
        "messages": [{"offset": 41, "data": {"a": 1}}, {"offset": 42, "data": None}],
    }
    assert call.result(reply) is reply
    assert call.result({"ok": True, "epoch": "e", "offset": 0, "messages": []})["messages"] == []
    for bad in (
        {"epoch": 1, "offset": 0, "messages": []},
        {"epoch": "e", "offset": "0", "messages": []},
        {"epoch": "e", "offset": True, "messages": []},
        {"epoch": "e", "offset": 0, "messages": {}},
        {"epoch": "e", "offset": 0, "messages": [{"offset": 1}]},
        {"epoch": "e", "offset": 0, "messages": [{"offset": "1", "data": 1}]},
        {"epoch": "e", "offset": 0, "messages": [[1, 2]]},
    ):
        with pytest.raises(UccError) as failed:
            call.result({"ok": True, **bad})
        assert failed.value.code == "bad_reply"


def test_snapshot_checks_seq_and_connections():
    call = Calls.snapshot()
    assert (call.cmd, call.fields) == ("snapshot", {})
    reply = {
        "ok": True,
        "seq": 12,
        "host": "h1",
        "connections": [{"conn": "0.1.5", "user": 4, "shard": 0, "channels": [1]}],
        "missing_shards": [],
    }
    assert call.result(reply) is reply
    assert call.result({"ok": True, "seq": 0, "connections": []})["seq"] == 0
    for bad in (
        {"seq": "1", "connections": []},
        {"seq": True, "connections": []},
        {"seq": -1, "connections": []},
        {"connections": []},
        {"seq": 1},
        {"seq": 1, "connections": {}},
        {"seq": 1, "connections": [["0.1.5", 4]]},
    ):
        with pytest.raises(UccError) as failed:
            call.result({"ok": True, **bad})
        assert failed.value.code == "bad_reply"


def test_get_user_connections_returns_the_list():
    call = Calls.get_user_connections(4)
    assert (call.cmd, call.fields) == ("get_user_connections", {"user": 4})
    connections = [{"conn": "0.1.5", "host": "h1", "shard": 0, "channels": []}]
    reply = {"ok": True, "connections": connections, "missing_shards": []}
    assert call.result(reply) == connections
    for bad in (None, {}, [1], ["0.1.5"]):
        with pytest.raises(UccError) as failed:
            call.result({"ok": True, "connections": bad})
        assert failed.value.code == "bad_reply"


def test_set_channel_sends_the_flag():
    assert Calls.set_channel(9).fields == {"channel": 9, "join_leave": True}
    call = Calls.set_channel(9, join_leave=False)
    assert (call.cmd, call.fields) == ("set_channel", {"channel": 9, "join_leave": False})
    _, encoded = Wire().encode(call.cmd, call.fields)
    assert encoded == b'{"id":1,"cmd":"set_channel","channel":9,"join_leave":false}'
    reply = {"ok": True, "channel": 9, "join_leave": False}
    assert call.result(reply) is reply


@pytest.mark.parametrize(
    "name",
    [
        "history",
        "broadcast_to_user",
        "broadcast_to_users",
        "snapshot",
        "get_user_connections",
        "set_channel",
    ],
)
def test_both_clients_take_the_same_arguments(name):
    blocking = inspect.signature(getattr(Client, name))
    asynchronous = inspect.signature(getattr(AsyncClient, name))
    assert blocking.parameters == asynchronous.parameters
    assert list(blocking.parameters)[1:] == list(inspect.signature(getattr(Calls, name)).parameters)


# -- CURVE keys: arguments, environment defaults, z85 text or a .pub file -----------------------


@pytest.fixture
def curve_files(tmp_path, monkeypatch):
    """A server keypair and a client keypair on disk; no CURVE variables in the environment."""
    monkeypatch.delenv("UCC_COMMAND_SERVER_KEY", raising=False)
    monkeypatch.delenv("UCC_COMMAND_CLIENT_KEY", raising=False)
    server = write_keypair(tmp_path / "server")
    client = write_keypair(tmp_path / "client")
    return tmp_path, server, client


def test_no_keys_is_a_plain_client(curve_files):
    assert curve_keys(None, None) is None
    with Client("tcp://127.0.0.1:1", timeout=1) as client:
        assert client.curve is False


def test_server_key_as_z85_text_or_pub_file(curve_files):
    path, server, client = curve_files
    by_text = curve_keys(server.decode(), str(path / "client"))
    by_file = curve_keys(str(path / "server.pub"), str(path / "client"))
    assert by_text == by_file
    assert by_text is not None
    assert (by_text.server, by_text.public) == (server, client)
    assert by_text.secret == (path / "client").read_bytes().strip()


def test_environment_gives_the_defaults_and_an_empty_server_key_means_plain(
    curve_files, monkeypatch
):
    path, server, _client = curve_files
    monkeypatch.setenv("UCC_COMMAND_SERVER_KEY", str(path / "server.pub"))
    monkeypatch.setenv("UCC_COMMAND_CLIENT_KEY", str(path / "client"))
    keys = curve_keys(None, None)
    assert keys is not None
    assert keys.server == server
    assert curve_keys("", None) is None
    with Client("tcp://127.0.0.1:1", timeout=1) as client:
        assert client.curve
        assert "curve=True" in repr(client)
    with Client("tcp://127.0.0.1:1", timeout=1, server_key="") as plain:
        assert not plain.curve


def test_one_key_without_the_other_or_a_bad_key_is_a_value_error(curve_files):
    path, server, _client = curve_files
    with pytest.raises(ValueError, match="client key file"):
        curve_keys(server.decode(), None)
    with pytest.raises(ValueError, match="server"):
        curve_keys(None, str(path / "client"))
    with pytest.raises(ValueError, match="cannot read"):
        curve_keys(server.decode(), str(path / "missing"))
    with pytest.raises(ValueError, match="cannot read"):
        Client(
            "tcp://127.0.0.1:1",
            timeout=1,
            server_key=str(path / "nope.pub"),
            client_key_file=str(path / "client"),
        )


def test_async_client_takes_the_same_keys(curve_files):
    path, server, _client = curve_files
    client = AsyncClient(
        "tcp://127.0.0.1:1",
        timeout=1,
        server_key=server.decode(),
        client_key_file=str(path / "client"),
    )
    assert client.curve
    client.close()


# -- the new commands of issue 12 over a real socket (a stand-in ROUTER answers) -------------


@pytest.fixture
def answering():
    """A ROUTER socket on a random port and a function that answers the next request with
    ``result`` (returning the request it read)."""
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")

    def answer(result: dict) -> dict:
        assert router.poll(5000)
        envelope, body = router.recv_multipart()
        request = json.loads(body)
        router.send_multipart([envelope, json.dumps({"id": request["id"], **result}).encode()])
        return request

    yield router.getsockopt_string(zmq.LAST_ENDPOINT), answer
    router.close(linger=0)


def test_client_methods_send_the_commands_and_read_the_replies(answering):
    endpoint, answer = answering
    connections = [{"conn": "0.1.1", "user": 4, "shard": 0, "channels": [2]}]
    with Client(endpoint, timeout=5, server_key="") as client, ThreadPoolExecutor(1) as pool:
        answered = pool.submit(answer, {"ok": True, "seq": 3, "connections": connections})
        assert client.snapshot()["seq"] == 3
        assert answered.result()["cmd"] == "snapshot"
        answered = pool.submit(answer, {"ok": True, "connections": connections})
        assert client.get_user_connections(4) == connections
        assert answered.result()["user"] == 4
        answered = pool.submit(answer, {"ok": True, "channel": 2, "join_leave": False})
        assert client.set_channel(2, join_leave=False)["join_leave"] is False
        assert answered.result()["join_leave"] is False


def test_async_client_methods_send_the_commands_and_read_the_replies(answering):
    endpoint, answer = answering

    async def run() -> None:
        client = AsyncClient(endpoint, timeout=5, server_key="")
        try:
            loop = asyncio.get_running_loop()
            answered = loop.run_in_executor(None, answer, {"ok": True, "connections": []})
            assert await client.get_user_connections(7) == []
            assert (await answered)["cmd"] == "get_user_connections"
            answered = loop.run_in_executor(None, answer, {"ok": True, "seq": 0, "connections": []})
            assert (await client.snapshot())["seq"] == 0
            await answered
            answered = loop.run_in_executor(None, answer, {"ok": True, "channel": 1})
            assert (await client.set_channel(1))["channel"] == 1
            assert (await answered)["join_leave"] is True
        finally:
            await client.aclose()

    asyncio.run(run())


# -- the default endpoint: $UCC_COMMAND, as for the CLI (issue 13) ----------------------------


def test_without_an_endpoint_the_clients_use_ucc_command(monkeypatch):
    monkeypatch.delenv("UCC_COMMAND_SERVER_KEY", raising=False)
    monkeypatch.delenv("UCC_COMMAND_CLIENT_KEY", raising=False)
    monkeypatch.setenv("UCC_COMMAND", "tcp://127.0.0.1:6001")
    with Client(timeout=1) as client:
        assert client.endpoint == "tcp://127.0.0.1:6001"
    async_client = AsyncClient(timeout=1)
    assert async_client.endpoint == "tcp://127.0.0.1:6001"
    async_client.close()
    # an explicit endpoint wins over the environment
    with Client("tcp://127.0.0.1:6002", timeout=1) as client:
        assert client.endpoint == "tcp://127.0.0.1:6002"


@pytest.mark.parametrize("value", [None, ""])
def test_without_an_endpoint_or_ucc_command_the_clients_use_the_default(value, monkeypatch):
    monkeypatch.delenv("UCC_COMMAND_SERVER_KEY", raising=False)
    monkeypatch.delenv("UCC_COMMAND_CLIENT_KEY", raising=False)
    if value is None:
        monkeypatch.delenv("UCC_COMMAND", raising=False)
    else:
        monkeypatch.setenv("UCC_COMMAND", value)
    with Client(timeout=1) as client:
        assert client.endpoint == "tcp://127.0.0.1:5555"
    async_client = AsyncClient(timeout=1)
    assert async_client.endpoint == "tcp://127.0.0.1:5555"
    async_client.close()
