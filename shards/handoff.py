"""What the supervisor and a shard process say to each other, typed.

Owns: the shard's configuration (:class:`ShardConfig`, passed as JSON on the shard's command
line), and the supervisor ↔ shard control socket (``SOCK_SEQPACKET``, so every message arrives
whole): its messages (:class:`Handoff`, with at most one file descriptor: an accepted TCP
connection passed with SCM_RIGHTS; :class:`Shutdown`; and the shard's :class:`Ack`), their JSON
encoding, and decoding them defensively (:class:`ControlError`). Must never read from the TCP
socket: its bytes (the HTTP upgrade request) stay in the kernel for the shard to read.
"""

from __future__ import annotations

import json
import math
import socket
from dataclasses import asdict, dataclass, fields
from typing import Any

from actors.ids import ChannelId, UserId
from shards.config import ServeConfig

MAX_HEADER = 64 * 1024


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """What a shard process needs of ``ucc serve``'s configuration.

    Built from :class:`ServeConfig` (its fields, same names and defaults: one source), and
    passed as JSON on the shard's command line (:meth:`to_json`, :meth:`from_json`)."""

    heartbeat: float  # ping a client silent for this long
    heartbeat_timeout: float  # close (4002) a client silent for this long
    handshake_timeout: float
    max_frame: int
    write_buffer_limit: int
    slow_consumer_timeout: float
    send_buffer: int
    client_frame_rate: float
    client_frame_burst: int
    client_byte_rate: float
    client_byte_burst: int
    # the perimeter (issue 10): connections per user here, channels per connection, and what a
    # token sent to refresh a live connection must carry (the secret is not here: it reaches
    # the shard through its environment, never its command line)
    max_connections_per_user: int
    max_channels_per_connection: int
    token_audience: str | None
    token_issuer: str | None
    token_leeway: float
    # critical messages (issue 11): a shard re-sends one unacknowledged on a live connection
    # every ack_timeout seconds, at most ack_retries times
    ack_timeout: float
    ack_retries: int
    history_size: int  # 0: no history (no offsets): nothing to resume, nothing to note
    # issue 12: the host publishes an event stream (--events): the shard reports its events
    emit_events: bool
    log_level: str

    @classmethod
    def of(cls, config: ServeConfig) -> ShardConfig:
        """The part of ``config`` that the shards need."""
        values = {f.name: getattr(config, f.name) for f in fields(cls) if f.name != "emit_events"}
        return cls(**values, emit_events=config.events is not None)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> ShardConfig:
        """The configuration :meth:`to_json` wrote; ValueError if a field is missing, unknown or
        of the wrong type (the supervisor and the shard run the same code: a bug)."""
        values = json.loads(raw)
        if not isinstance(values, dict):
            raise ValueError("the shard configuration must be a JSON object")
        known = {f.name: _CAST[str(f.type)] for f in fields(cls)}
        if values.keys() != known.keys():
            missing, unknown = known.keys() - values.keys(), values.keys() - known.keys()
            raise ValueError(f"shard configuration: missing {missing}, unknown {unknown}")
        try:
            return cls(**{name: cast(values[name]) for name, cast in known.items()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"shard configuration: {exc}") from None


def _optional_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"not a string or null: {value!r}")


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"not a boolean: {value!r}")


_CAST: dict[str, Any] = {
    "float": float,
    "int": int,
    "str": str,
    "str | None": _optional_str,
    "bool": _bool,
}


# -- the control socket ---------------------------------------------------------------------------


class ControlError(ValueError):
    """A control message that does not decode (a bug, or a truncated message)."""


@dataclass(frozen=True, slots=True)
class Handoff:
    """Supervisor → shard: the connection passed along (its upgrade request unread) and what its
    token says. ``id`` numbers hand-offs, for the shard's :class:`Ack`."""

    id: int
    user: UserId
    channels: tuple[ChannelId, ...]
    exp: float  # the token's expiry, seconds since the epoch (math.inf: none)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Supervisor → shard: close every client, spread over ``drain_window`` seconds, and exit."""

    drain_window: float


@dataclass(frozen=True, slots=True)
class Ack:
    """Shard → supervisor: the shard has these hand-offs' connections (the supervisor may close
    its copies)."""

    ids: tuple[int, ...]


ToShard = Handoff | Shutdown


def encode(message: Handoff | Shutdown | Ack) -> bytes:
    if isinstance(message, Handoff):
        body: dict[str, Any] = {
            "id": message.id,
            "user": message.user,
            "channels": list(message.channels),
            "exp": message.exp,
        }
    elif isinstance(message, Shutdown):
        body = {"op": "shutdown", "drain_window": message.drain_window}
    else:
        body = {"op": "ack", "ids": list(message.ids)}
    return json.dumps(body).encode()


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, truncated, absurdly nested
        raise ControlError(f"not JSON: {data[:100]!r}") from None
    if not isinstance(body, dict):
        raise ControlError(f"not a JSON object: {data[:100]!r}")
    return body


def _integer(value: object) -> int:
    if type(value) is not int:  # neither a bool nor a float
        raise ControlError(f"not an integer: {value!r}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(f"not a number: {value!r}")
    return float(value)


def decode_ack(data: bytes) -> Ack:
    """The shard's ack; ControlError if it is anything else, or malformed in any way."""
    body = _json_object(data)
    ids = body.get("ids")
    if body.get("op") != "ack" or not isinstance(ids, list):
        raise ControlError(f"not an ack: {data[:100]!r}")
    return Ack(tuple(_integer(i) for i in ids))


def decode_to_shard(data: bytes) -> ToShard:
    """A message from the supervisor; ControlError if malformed."""
    body = _json_object(data)
    if body.get("op") == "shutdown":
        return Shutdown(_number(body.get("drain_window", 0.0)))
    if "op" in body:
        raise ControlError(f"unknown message: {data[:100]!r}")
    channels = body.get("channels")
    if not isinstance(channels, list):
        raise ControlError(f"a hand-off without channels: {data[:100]!r}")
    return Handoff(
        _integer(body.get("id")),
        UserId(_integer(body.get("user"))),
        tuple(ChannelId(_integer(c)) for c in channels),
        _number(body.get("exp", math.inf)),
    )


def control_pair() -> tuple[socket.socket, socket.socket]:
    """The (supervisor end, shard end) of a new control channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_connection(sock: socket.socket, handoff: Handoff, conn: socket.socket) -> None:
    """Send ``handoff`` and the descriptor of ``conn``; raises BlockingIOError when full."""
    socket.send_fds(sock, [encode(handoff)], [conn.fileno()])


def send_message(sock: socket.socket, message: Shutdown | Ack) -> None:
    sock.send(encode(message))


def recv_connection(sock: socket.socket) -> tuple[ToShard, socket.socket | None] | None:
    """The next message from the supervisor and the connection it carried, if any; None when
    the other end has closed. ControlError if the message is malformed (its connection, if
    any, is closed: nobody could say whose it is)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_HEADER, 1)
    if not data and not fds:
        return None
    conn = socket.socket(fileno=fds[0]) if fds else None
    try:
        return decode_to_shard(data), conn
    except ControlError:
        if conn is not None:
            conn.close()
        raise
