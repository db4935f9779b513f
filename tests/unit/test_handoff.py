"""The supervisor ↔ shard contract: ShardConfig on the command line, the control messages and
their bytes, passing a connection over a real SOCK_SEQPACKET pair."""

from __future__ import annotations

import dataclasses
import json
import math
import socket

import pytest

from actors.ids import ChannelId, UserId
from shards import handoff
from shards.config import ServeConfig
from shards.handoff import (
    Ack,
    ControlError,
    Handoff,
    ShardConfig,
    Shutdown,
    control_pair,
    decode_ack,
    decode_to_shard,
    encode,
    recv_connection,
    send_connection,
    send_message,
)

SERVE = ServeConfig(secret="s", heartbeat=7.5, max_frame=1234, log_level="DEBUG")


def test_shard_config_takes_serve_config_fields_and_survives_the_command_line():
    config = ShardConfig.of(SERVE)
    for field in dataclasses.fields(ShardConfig):  # same names, same values: one source
        if field.name != "emit_events":  # derived: whether --events names an endpoint
            assert getattr(config, field.name) == getattr(SERVE, field.name)
    assert config.emit_events is False
    assert ShardConfig.of(dataclasses.replace(SERVE, events="tcp://127.0.0.1:1")).emit_events
    assert ShardConfig.from_json(config.to_json()) == config
    assert (config.heartbeat, config.max_frame, config.log_level) == (7.5, 1234, "DEBUG")


def test_shard_config_from_json_coerces_numbers_and_refuses_what_it_does_not_know():
    raw = json.loads(ShardConfig.of(SERVE).to_json())
    config = ShardConfig.from_json(json.dumps({**raw, "heartbeat": 25}))  # an int: a float
    assert config.heartbeat == 25.0 and isinstance(config.heartbeat, float)
    with pytest.raises(ValueError, match="unknown"):
        ShardConfig.from_json(json.dumps({**raw, "close_grace": 2.0}))  # CLOSE_TIMEOUT now
    with pytest.raises(ValueError, match="missing"):
        ShardConfig.from_json(json.dumps({k: v for k, v in raw.items() if k != "max_frame"}))
    with pytest.raises(ValueError, match="shard configuration"):
        ShardConfig.from_json(json.dumps({**raw, "max_frame": "big"}))
    with pytest.raises(ValueError, match="JSON object"):
        ShardConfig.from_json("[]")


def test_shard_config_carries_the_perimeter_but_never_the_secret():
    serve = dataclasses.replace(
        SERVE,
        secret="a-secret-of-32-bytes-or-more-0123456789",
        max_connections_per_user=3,
        token_audience="app",
        token_leeway=1.5,
    )
    config = ShardConfig.of(serve)
    assert (config.max_connections_per_user, config.max_channels_per_connection) == (3, 1024)
    assert (config.token_audience, config.token_issuer, config.token_leeway) == ("app", None, 1.5)
    assert ShardConfig.from_json(config.to_json()) == config
    assert serve.secret not in config.to_json()  # the command line is world-readable
    raw = json.loads(config.to_json())
    with pytest.raises(ValueError, match="shard configuration"):
        ShardConfig.from_json(json.dumps({**raw, "token_issuer": 7}))


def test_shard_config_carries_the_critical_message_retries():
    serve = dataclasses.replace(SERVE, ack_timeout=2.5, ack_retries=0)
    config = ShardConfig.of(serve)
    assert (config.ack_timeout, config.ack_retries) == (2.5, 0)
    assert ShardConfig.from_json(config.to_json()) == config
    assert (ShardConfig.of(ServeConfig(secret="s")).ack_timeout, SERVE.ack_retries) == (10.0, 5)


HANDOFF = Handoff(3, UserId(42), (ChannelId(1), ChannelId(2)), 1.7e9)


def test_control_messages_keep_their_bytes():
    # the shapes the two processes have always exchanged
    assert json.loads(encode(HANDOFF)) == {"id": 3, "user": 42, "channels": [1, 2], "exp": 1.7e9}
    assert json.loads(encode(Shutdown(1.5))) == {"op": "shutdown", "drain_window": 1.5}
    assert json.loads(encode(Ack((1, 2)))) == {"op": "ack", "ids": [1, 2]}


@pytest.mark.parametrize(
    "message", [HANDOFF, Handoff(1, UserId(1), (), math.inf), Shutdown(0.0), Shutdown(2.5)]
)
def test_messages_to_the_shard_round_trip(message):
    assert decode_to_shard(encode(message)) == message


def test_a_handoff_without_exp_never_expires_and_a_shutdown_without_window_drains_at_once():
    assert decode_to_shard(b'{"id": 1, "user": 2, "channels": []}').exp == math.inf
    assert decode_to_shard(b'{"op": "shutdown"}') == Shutdown(0.0)


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"[1]",
        b'{"op": "reboot"}',
        b'{"op": "ack", "ids": [1]}',  # the shard's message, not the supervisor's
        b'{"op": "shutdown", "drain_window": "1"}',
        b'{"id": 1, "user": 2}',
        b'{"id": "1", "user": 2, "channels": []}',
        b'{"id": 1, "user": true, "channels": []}',
        b'{"id": 1, "user": 2, "channels": [1.5]}',
        b'{"id": 1, "user": 2, "channels": [], "exp": "soon"}',
        b"[" * 100_000,
    ],
)
def test_a_malformed_message_to_the_shard_is_a_control_error(data):
    with pytest.raises(ControlError):
        decode_to_shard(data)


def test_acks_round_trip():
    assert decode_ack(encode(Ack((1, 7)))) == Ack((1, 7))
    assert decode_ack(encode(Ack(()))) == Ack(())


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b'{"op": "ack", "ids": [1',  # truncated
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"null",
        b'{"ids": [1]}',
        b'{"op": "shutdown", "drain_window": 1}',
        b'{"op": "ack", "ids": "1"}',
        b'{"op": "ack", "ids": [true]}',
        b'{"op": "ack", "ids": [[1]]}',
        b'{"op": "ack", "ids": [1.0]}',
        b"[" * 100_000,
    ],
)
def test_a_malformed_ack_is_a_control_error(data):
    with pytest.raises(ControlError):
        decode_ack(data)


@pytest.fixture
def control():
    ours, theirs = control_pair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_connection_travels_with_its_handoff_and_its_bytes_stay_unread(control):
    ours, theirs = control
    client, accepted = socket.socketpair()
    with client, accepted:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        send_connection(ours, HANDOFF, accepted)
        received = recv_connection(theirs)
        assert received is not None
        message, sock = received
        assert message == HANDOFF
        assert sock is not None
        with sock:
            assert sock.recv(100) == b"GET / HTTP/1.1\r\n\r\n"  # the shard reads the request
        send_message(theirs, Ack((HANDOFF.id,)))
        assert decode_ack(ours.recv(handoff.MAX_HEADER)) == Ack((3,))


def test_a_shutdown_carries_no_connection_and_a_closed_end_reads_as_none(control):
    ours, theirs = control
    send_message(ours, Shutdown(1.0))
    assert recv_connection(theirs) == (Shutdown(1.0), None)
    ours.close()
    assert recv_connection(theirs) is None


def test_a_malformed_message_with_a_connection_closes_that_connection(control):
    ours, theirs = control
    client, accepted = socket.socketpair()
    with client, accepted:
        socket.send_fds(ours, [b'{"op": "nonsense"}'], [accepted.fileno()])
        accepted.close()  # ours; the shard's copy is the only one left
        with pytest.raises(ControlError):
            recv_connection(theirs)
        client.settimeout(5)
        assert client.recv(1) == b""  # nobody holds the connection any more
