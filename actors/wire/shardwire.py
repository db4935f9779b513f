"""The internal router ↔ shard protocol (multipart messages over a Unix stream socket: framed by
:mod:`actors.wire.stream`, carried by :mod:`actors.shardlink`).

Owns: encoding and decoding of every message between the RouterActor and a shard's CacheActor.
Not a public contract. Must never do I/O. Router → shard (to the shard incarnation's socket):

| frames | meaning |
|---|---|
| ``C``, channel (8 bytes) [, offset], frame | write ``frame`` to the channel's connections |
| ``U``, users (8 bytes each), frame | write ``frame`` to every connection of these users |
| ``V``, conn, channel, latest; epoch, frames | a ``B``'s answer: the replay, ``resumed`` |
| ``K``, users, criticals | critical messages for every connection of these users |
| ``L``, connection, criticals | the user's pending critical messages, for its new connection |
| ``X``, user, message id | the user acknowledged this critical message (on another host) |
| ``J``, channels, empty | the channels whose members are told joins and leaves (all of them) |
| ``Q``, query id (8 bytes), JSON | a query; the shard answers with ``R`` |
| ``I``, sequence number, empty | the router's index has the shard's ``D``/``S`` of that number |
| ``M``, packed messages | several of the above in one frame (``pack_messages``) |

Shard → router (after its greeting: one message of one frame, its identity
``shard-<index>-<epoch>``):

| frames | meaning |
|---|---|
| ``H``, JSON ``{index, epoch, pid, channels}`` | hello: the shard is ready, with its channels |
| ``D``, gained ids, lost ids, seq | channels gained / lost (8 bytes per id); numbered |
| ``S``, ids, seq | every channel the shard has members of (after a ``D`` was dropped) |
| ``R``, query id, JSON | the answer to query ``Q`` |
| ``P``, two counters (8 bytes each) | pulse: alive, and messages and bytes consumed so far |
| ``B``, conn, channel, offset, quiet, before; epoch | a client's resume: replay what it missed |
| ``A``, user; message id | a client acknowledged a critical message |
| ``N``, connection, user | a new connection: send it the user's pending critical messages |
| ``E``, JSON list of events | connection lifecycle events, for the event stream (``--events``) |
| ``W``, JSON ``[[channel, user, 1 or 0], ...]`` | users joining (1), leaving (0) channels |

Flow control is by credit. The router counts what it queues to each shard incarnation (one per
delivery or query, and the bytes of its argument and payload); the shard counts the same as it
reads them, and reports both totals in every ``P``: on its pulse timer (every 0.25 s), and as
soon as it has consumed ``CREDIT_MESSAGES`` messages or ``CREDIT_BYTES`` bytes since its last
report. What is
in flight to a shard is the difference; the router refuses a broadcast that would take it past
its limits instead of queueing it (see ``RouterCore``).

A client's ``hello`` and ``subscribed`` frames mean "from now on you receive the channel's
broadcasts", so the shard holds them until the router confirms (``I``) that its index has the
membership change (``D`` or ``S``) they depend on: a broadcast sent by a backend as soon as the
client sees ``hello`` cannot reach the router ahead of the membership.
"""

from __future__ import annotations

import json
import re
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CHANNEL = b"C"
USERS = b"U"
QUERY = b"Q"
HELLO = b"H"
DELTA = b"D"
RESULT = b"R"
PULSE = b"P"  # liveness and credit
SYNC = b"S"
INDEXED = b"I"
PACKED = b"M"
RESUMED = b"V"  # router -> shard: a resume's replay
CRITICAL = b"K"  # router -> shard: critical messages to users
PENDING = b"L"  # router -> shard: pending critical messages for one new connection
ACKED = b"X"  # router -> shard: acknowledged on another host
RESUME = b"B"  # shard -> router
ACK = b"A"  # shard -> router
NEW_CONNECTION = b"N"  # shard -> router
MARKS = b"J"  # router -> shard: the channels with join/leave
EVENTS = b"E"  # shard -> router
JOIN_LEAVE = b"W"  # shard -> router

_CRITICAL = struct.Struct("<HI")  # length of the id, length of the frame

CREDIT_MESSAGES = 64  # report consumption at least this often under load...
CREDIT_BYTES = 256 * 1024  # ...or after this many bytes

_PART = struct.Struct("<cII")  # kind, length of the argument, length of the payload

_IDENTITY = re.compile(rb"shard-(\d+)-(\d+)")


def identity(index: int, epoch: int) -> bytes:
    return b"shard-%d-%d" % (index, epoch)


def parse_identity(raw: bytes) -> tuple[int, int] | None:
    match = _IDENTITY.fullmatch(raw)
    if match is None:
        return None
    return int(match[1]), int(match[2])


def pack_ids(ids: Iterable[int]) -> bytes:
    """Native byte order: these messages never leave the host."""
    return array("q", ids).tobytes()


def unpack_ids(raw: bytes) -> list[int]:
    ids = array("q")
    ids.frombytes(raw)
    return ids.tolist()


def pack_id(value: int) -> bytes:
    return value.to_bytes(8, "little", signed=True)


def unpack_id(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def channel_delivery(channel: int, frame: bytes, offset: int = 0) -> list[bytes]:
    """``offset``: the message's position in the channel's history (0: history is off)."""
    argument = pack_ids((channel, offset)) if offset else pack_id(channel)
    return [CHANNEL, argument, frame]


def channel_target(argument: bytes) -> tuple[int, int]:
    """The channel and offset (0 if none) of a ``C`` message's argument."""
    if len(argument) == 16:
        channel, offset = unpack_ids(argument)
        return channel, offset
    return unpack_id(argument), 0


def resumed(conn: int, channel: int, latest: int, epoch: str, frames: bytes) -> list[bytes]:
    """The answer to a client's resume: ``frames`` (the replayed messages, then ``resumed``)
    and the channel's position: messages up to ``latest`` (in ``epoch``) are in them or gone,
    later ones follow."""
    raw = epoch.encode()[:255]
    return [RESUMED, pack_ids((conn, channel, latest)), bytes((len(raw),)) + raw + frames]


def parse_resumed(payload: bytes) -> tuple[str, bytes]:
    """The epoch and the frames of a ``V`` message's payload."""
    size = payload[0]
    return payload[1 : 1 + size].decode(errors="replace"), payload[1 + size :]


def pack_criticals(messages: Sequence[tuple[str, bytes]]) -> bytes:
    """Critical messages, each (id, its complete frame), in one payload."""
    parts: list[bytes] = []
    for message_id, frame in messages:
        raw = message_id.encode()
        parts += (_CRITICAL.pack(len(raw), len(frame)), raw, frame)
    return b"".join(parts)


def unpack_criticals(raw: bytes) -> list[tuple[str, bytes]]:
    out, offset = [], 0
    while offset < len(raw):
        size_id, size_frame = _CRITICAL.unpack_from(raw, offset)
        offset += _CRITICAL.size
        message_id = raw[offset : offset + size_id].decode()
        offset += size_id
        out.append((message_id, raw[offset : offset + size_frame]))
        offset += size_frame
    return out


def criticals(users: Sequence[int], messages: Sequence[tuple[str, bytes]]) -> list[bytes]:
    return [CRITICAL, pack_ids(users), pack_criticals(messages)]


def pending(conn: int, messages: Sequence[tuple[str, bytes]]) -> list[bytes]:
    return [PENDING, pack_id(conn), pack_criticals(messages)]


def acked(user: int, message_id: str) -> list[bytes]:
    return [ACKED, pack_id(user), message_id.encode()]


def resume(
    conn: int, channel: int, offset: int, epoch: str, quiet: bool = False, before: int = 0
) -> list[bytes]:
    """A resume from ``offset`` in ``epoch``; ``quiet``: the shard's own, to fill a gap it saw
    (no ``resumed`` frame for the client unless the gap cannot be filled); ``before``: replay
    nothing from this offset on (the connection has those live already; 0: no such bound)."""
    return [RESUME, pack_ids((conn, channel, offset, int(quiet), before)), epoch.encode()]


def ack(user: int, message_id: str) -> list[bytes]:
    return [ACK, pack_id(user), message_id.encode()]


def new_connection(conn: int, user: int) -> list[bytes]:
    return [NEW_CONNECTION, pack_ids((conn, user))]


def users_delivery(users: Sequence[int], frame: bytes) -> list[bytes]:
    return [USERS, pack_ids(users), frame]


# -- queries: what the router asks a shard (``Q``), typed; JSON ``{"op": ...}`` on the wire --


@dataclass(frozen=True, slots=True)
class QueryOnline:
    """Every user with a connection on the shard: ``{"users": [...]}``."""


@dataclass(frozen=True, slots=True)
class QueryOnlineIn:
    """The users in ``channel``: ``{"users": [...]}``."""

    channel: int


@dataclass(frozen=True, slots=True)
class QueryAreOnline:
    """Which of ``users`` are online: ``{"online": [...]}``."""

    users: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UserSubscription:
    """(Un)subscribe every connection of ``user`` to ``channel``: ``{"connections": n}``."""

    user: int
    channel: int
    subscribe: bool


@dataclass(frozen=True, slots=True)
class UserDisconnect:
    """Close every connection of ``user`` (4001): ``{"connections": n}``."""

    user: int


@dataclass(frozen=True, slots=True)
class QueryPresence:
    """The shard's presence, for the other hosts: the users whose presence changed since the
    last such query (``full``: every user; the shard tracks changes from then on), each with
    its channels or null (offline): ``{"users": [[user, [channels] or null], ...]}``."""

    full: bool


MAX_TOP = 100  # largest channels a status query may ask for


@dataclass(frozen=True, slots=True)
class QueryStatus:
    """The shard's pid, sizes and counters; with ``top`` > 0, its ``top`` largest channels
    too (``"largest": [[channel, users], ...]``, for the admin page)."""

    top: int = 0


@dataclass(frozen=True, slots=True)
class QueryConnections:
    """Every connection on the shard, for the ``snapshot`` command: ``{"connections": [{"conn",
    "user", "shard", "channels", "connected_at", "last_activity", "remote"}, ...]}``."""


@dataclass(frozen=True, slots=True)
class QueryUserConnections:
    """``user``'s connections on the shard (records as :class:`QueryConnections`')."""

    user: int


Query = (
    QueryOnline
    | QueryOnlineIn
    | QueryAreOnline
    | UserSubscription
    | UserDisconnect
    | QueryPresence
    | QueryStatus
    | QueryConnections
    | QueryUserConnections
)


def query(qid: int, body: Query) -> list[bytes]:
    return [QUERY, pack_id(qid), json.dumps(encode_query(body)).encode()]


def encode_query(body: Query) -> dict[str, Any]:
    if isinstance(body, QueryOnline):
        return {"op": "online"}
    if isinstance(body, QueryOnlineIn):
        return {"op": "online_channel", "channel": body.channel}
    if isinstance(body, QueryAreOnline):
        return {"op": "are_online", "users": list(body.users)}
    if isinstance(body, UserSubscription):
        op = "subscribe" if body.subscribe else "unsubscribe"
        return {"op": op, "user": body.user, "channel": body.channel}
    if isinstance(body, UserDisconnect):
        return {"op": "disconnect", "user": body.user}
    if isinstance(body, QueryPresence):
        return {"op": "presence", "full": body.full}
    if isinstance(body, QueryStatus):
        return {"op": "status", "top": body.top} if body.top else {"op": "status"}
    if isinstance(body, QueryConnections):
        return {"op": "connections"}
    if isinstance(body, QueryUserConnections):
        return {"op": "user_connections", "user": body.user}
    raise TypeError(f"not a query: {body!r}")


def user_control(op: str, user: int, channel: int | None) -> Query:
    """A backend's subscribe/unsubscribe/disconnect of ``user`` (``op`` as in the commands)."""
    if op == "disconnect":
        return UserDisconnect(user)
    if op in ("subscribe", "unsubscribe") and channel is not None:
        return UserSubscription(user, channel, op == "subscribe")
    raise ValueError(f"not a user control: {op!r}")


def decode_query(payload: bytes) -> Query:
    """The query in a ``Q`` message. Only the router sends them: anything else is a bug
    (ValueError, KeyError), and the shard lets it crash."""
    body = json.loads(payload)
    op = body["op"]
    if op == "online":
        return QueryOnline()
    if op == "online_channel":
        return QueryOnlineIn(int(body["channel"]))
    if op == "are_online":
        return QueryAreOnline(tuple(int(u) for u in body["users"]))
    if op in ("subscribe", "unsubscribe", "disconnect"):
        return user_control(op, int(body["user"]), body.get("channel"))
    if op == "presence":
        return QueryPresence(bool(body["full"]))
    if op == "status":
        return QueryStatus(min(max(int(body.get("top", 0)), 0), MAX_TOP))
    if op == "connections":
        return QueryConnections()
    if op == "user_connections":
        return QueryUserConnections(int(body["user"]))
    raise ValueError(f"unknown query {op!r}")


def result(qid: int, body: Any) -> list[bytes]:
    return [RESULT, pack_id(qid), json.dumps(body).encode()]


def pack_messages(messages: Sequence[Sequence[bytes]]) -> bytes:
    """Router → shard messages (each: kind, argument, payload) in one frame."""
    parts: list[bytes] = []
    for kind, argument, payload in messages:
        parts += (_PART.pack(kind, len(argument), len(payload)), argument, payload)
    return b"".join(parts)


def unpack_messages(raw: bytes) -> list[tuple[bytes, bytes, bytes]]:
    view, offset, out = memoryview(raw), 0, []
    while offset < len(raw):
        kind, size_a, size_b = _PART.unpack_from(raw, offset)
        offset += _PART.size
        argument = bytes(view[offset : offset + size_a])
        offset += size_a
        out.append((kind, argument, bytes(view[offset : offset + size_b])))
        offset += size_b
    return out


def hello(index: int, epoch: int, pid: int, channels: Sequence[int]) -> list[bytes]:
    body = {"index": index, "epoch": epoch, "pid": pid, "channels": list(channels)}
    return [HELLO, json.dumps(body).encode()]


def pulse(consumed_messages: int, consumed_bytes: int) -> list[bytes]:
    return [PULSE, pack_ids((consumed_messages, consumed_bytes))]


def size(argument: bytes, payload: bytes) -> int:
    """What one router → shard message costs in the credit window's bytes."""
    return len(argument) + len(payload)


def sync(channels: Sequence[int], seq: int) -> list[bytes]:
    return [SYNC, pack_ids(channels), pack_id(seq)]


def delta(gained: Sequence[int], lost: Sequence[int], seq: int) -> list[bytes]:
    return [DELTA, pack_ids(gained), pack_ids(lost), pack_id(seq)]


def indexed(seq: int) -> list[bytes]:
    return [INDEXED, pack_id(seq), b""]


def events(batch: Sequence[dict[str, Any]]) -> list[bytes]:
    """Shard -> router: lifecycle events (each with ``type`` and ``ts``), oldest first."""
    return [EVENTS, json.dumps(batch, separators=(",", ":")).encode()]


def join_leave(changes: Sequence[tuple[int, int, bool]]) -> list[bytes]:
    """Shard -> router: (channel, user, joined) for marked channels, oldest first."""
    body = [[channel, user, int(joined)] for channel, user, joined in changes]
    return [JOIN_LEAVE, json.dumps(body, separators=(",", ":")).encode()]


def marks(channels: Iterable[int]) -> list[bytes]:
    """Router -> shard: every channel whose members are told joins and leaves."""
    return [MARKS, pack_ids(channels), b""]


def conn_id(index: int, epoch: int, conn: int) -> str:
    """A connection's id in events and replies, unique per host: shard, incarnation, number."""
    return f"{index}.{epoch}.{conn}"
