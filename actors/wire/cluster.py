"""The Redis layout that links hosts: key and topic names, message codec, and Lua scripts.

Owns: every name this system uses in Redis (docs/cluster.md has the table) and the bytes of
the messages published between hosts. Must never do I/O. The hosts' names share one hash tag,
``{ucc:<cluster>}`` (``{P}`` below), so that the scripts that read every host's sets and publish
to their inboxes stay in one slot of a Redis Cluster. Each channel has a hash tag of its own,
``{ucc:<cluster>:c:<channel>}`` (``{C}`` below), for its topic and its history, so that channels
spread over the cluster's slots (and primaries) and the APPEND script, which writes a channel's
history and publishes on its topic, stays in the channel's slot. Every script takes ``KEYS[1]``
(the hosts set, or the channel's stream), which is how a Redis Cluster client routes it to the
node that owns the slot.

| name | type | content |
|---|---|---|
| ``{P}:hosts`` | sorted set | host id → expiry (ms since the epoch); a host is alive until then |
| ``{P}:h:<host>:users`` | set | users online on that host (routes user messages) |
| ``{P}:h:<host>:snap`` | string | the host's presence at a ``seq``, sealed (others sync from it) |
| ``{P}:presence`` | topic | presence deltas, heartbeats, snapshot announcements, leaves |
| ``{C}`` | topic | broadcasts to the channel (hosts with members listen) |
| ``{P}:h:<host>`` | topic | the host's inbox: user broadcasts for its users, its own probes |
| ``{C}:hist`` | stream | kept messages: entry ``<offset>-1``, field ``m``: sealed |
| ``{C}:hist:meta`` | hash | the channel's ``epoch`` and ``offset`` (last assigned) |
| ``{P}:crit:<user>`` | list | the user's critical message ids, in the order they were stored |
| ``{P}:crit:<user>:d`` | hash | ``<id>`` → the critical message, sealed |
| ``{P}:crit:<user>:x`` | sorted set | ``<id>`` → its expiry (ms since the epoch) |
| ``{P}:marks`` | set | channels marked for join/leave, cluster-wide |

The critical keys keep the hosts' tag: the scripts that store and acknowledge a critical message
read the hosts' user sets and publish to their inboxes in the same step. The inboxes, presence
sets and marks keep it for the same reason (one script answers "which live hosts have these
users" and publishes to exactly those).

Presence travels by deltas (:mod:`actors.presence` has the protocol): each host publishes its
sealed deltas and heartbeats on ``{P}:presence`` (every host listens), keeps a sealed snapshot
of its presence in ``{P}:h:<host>:snap`` for the others to sync from, and keeps its plain user
set up to date (the scripts that publish to the hosts that have some users read it). A presence
message is sealed ``{"h": host, "g": generation, "s": seq, "t": sent ms, "k": "d" (delta or
heartbeat), "n" (snapshot stored) or "l" (leave), "c": [[user, [channels] or null], ...]}``; a
snapshot is sealed ``{"h": host, "g": generation, "s": seq, "u": {"<c1>,<c2>": [users in exactly
those channels], "": [users in none]}}``.

Every message and every presence snapshot is *sealed*: a 32-byte HMAC-SHA256 under the cluster
key, then the body. :func:`decode`, :func:`decode_presence` and :func:`open_snapshot` check the
seal first (in constant time) and tell a forged message (:attr:`Rejected.FORGED`: no seal, or a
wrong one) from a malformed one (:attr:`Rejected.MALFORMED`: sealed, but not a valid body).
Every message (presence ones too) carries its publisher's time under the seal, and is taken only
within :data:`REPLAY_WINDOW_MS` of it (:attr:`Rejected.REPLAYED` otherwise). A presence snapshot
names its host, generation and ``seq``: a replayed old one can only make a replica sync again
(its ``seq`` is behind), never show what the host did not publish.

A channel message with history is sealed by its publisher *before* Redis assigns its position:
the APPEND script keeps the sealed message in the channel's stream and publishes it followed by
``|<offset>|<epoch>`` (:func:`decode` reads that trailer, outside the seal). The seal binds the
data to its channel, not to its offset: whoever can write to Redis could reorder or drop kept
messages (not forge or move them). A kept message (stream) or critical message (hash) is read
back with :func:`open_stored`: the seal is checked, not the replay window (they are old by
design; a critical message carries its expiry under the seal instead).

Issue 12 adds controls between hosts' inboxes: ``set_channel`` (a join/leave mark changed; the
SET_CHANNEL script stores it in ``{P}:marks`` and publishes it to every other live host), and
an RPC for a user's connections: ``who`` (``{"op": "who", "user": U, "qid": q}``, published by
the WHO script to every other live host that has the user; the script returns the hosts it
told) and ``answer`` (``{"op": "answer", "to": <asking host>, "qid": q, "connections":
[records]}``, published to the asking host's inbox). The asking host is the ``who``'s sealed
origin; an answer names its destination under the seal, so that it cannot be replayed onto
another host's inbox, and is bounded (:data:`MAX_ANSWER_RECORDS` records,
:data:`MAX_ANSWER_BYTES` bytes: beyond, :attr:`Rejected.OVERSIZED`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from actors.ids import parse_id
from actors.presence import Change, Channels, HostState, LoadedSnapshot, PresenceNews
from actors.wire import frames

MAX_FRAME = 16 * 1024 * 1024
MAX_BAN = 1e9  # seconds, as commands.MAX_SECONDS
MAC_SIZE = 32  # HMAC-SHA256
# a sealed message is taken only within this long of the time its publisher stamped on it
# (either way: hosts' clocks must agree within it, as NTP keeps them); an older copy replayed
# onto Redis is dropped and counted ``replayed``. The same as the presence expiry.
REPLAY_WINDOW_MS = 5_000
MAC_LABEL = b"ucc cluster mac v1"  # derives the default cluster key from the token secret
MAX_ID = 128  # characters of a critical message id
# what the APPEND script adds after a sealed channel message with history: its position
_POSITION = re.compile(rb"\|([0-9]{1,19})\|([0-9A-Za-z_-]{1,64})\Z")
_POSITION_TAIL = 90  # bytes: the longest position trailer fits
MAX_OFFSET = 2**63 - 1  # what the router and shards carry (8 bytes, signed); beyond: forged
MAX_QID = 2**63 - 1  # a query id from another host (``who``, ``answer``)
MAX_ANSWER_RECORDS = 1_000  # connection records in one host's answer to ``who``, at most
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a sealed answer, at most (the sender drops records to fit)


class ClusterKey:
    """The key that seals cluster messages: ``--cluster-secret``, or else derived from the token
    secret (HMAC-SHA256(token secret, :data:`MAC_LABEL`)), so that hosts sharing the token secret
    agree. Holds a keyed HMAC state, copied per message (cheaper than keying it each time)."""

    __slots__ = ("_state",)

    def __init__(self, key: bytes) -> None:
        self._state = hmac.new(key, digestmod=hashlib.sha256)

    @classmethod
    def of(cls, token_secret: str, cluster_secret: str | None = None) -> ClusterKey:
        if cluster_secret:
            return cls(cluster_secret.encode())
        return cls(hmac.new(token_secret.encode(), MAC_LABEL, hashlib.sha256).digest())

    def mac(self, body: bytes) -> bytes:
        state = self._state.copy()
        state.update(body)
        return state.digest()

    def seal(self, body: bytes) -> bytes:
        """``body`` with its MAC in front."""
        return self.mac(body) + body

    def open(self, raw: bytes) -> bytes | None:
        """The body of a sealed ``raw``; None if its MAC is missing or wrong (forged)."""
        if len(raw) < MAC_SIZE:
            return None
        body = raw[MAC_SIZE:]
        return body if hmac.compare_digest(raw[:MAC_SIZE], self.mac(body)) else None


class Rejected(Enum):
    """Why :func:`decode` (or the presence readers) refused something (each counted apart)."""

    MALFORMED = "malformed"  # a valid seal on a bad body (a bug or a version mismatch)
    FORGED = "forged"  # no valid seal: not made by a host of this cluster
    REPLAYED = "replayed"  # a valid seal, but sent longer ago than REPLAY_WINDOW_MS
    OVERSIZED = "oversized"  # a valid seal on an answer beyond MAX_ANSWER_RECORDS or _BYTES


@dataclass(frozen=True, slots=True)
class Layout:
    cluster: str

    @property
    def prefix(self) -> str:
        return "{ucc:" + self.cluster + "}"

    @property
    def hosts(self) -> str:
        return f"{self.prefix}:hosts"

    def channel_topic(self, channel: int) -> str:
        """The channel's topic: a hash tag of its own (``{ucc:<cluster>:c:<channel>}``), so that
        channels spread over a Redis Cluster's slots, and its history keys with it."""
        return "{ucc:" + self.cluster + ":c:" + str(channel) + "}"

    def host_topic(self, host: str) -> str:
        return f"{self.prefix}:h:{host}"

    def users_key(self, host: str) -> str:
        """The host's plain user set (routes user messages to the hosts that have them)."""
        return f"{self.prefix}:h:{host}:users"

    def snapshot_key(self, host: str) -> str:
        return f"{self.prefix}:h:{host}:snap"

    @property
    def presence_topic(self) -> str:
        """Where every host publishes its presence deltas (and every host listens)."""
        return f"{self.prefix}:presence"

    def history_keys(self, channel: int) -> tuple[str, str]:
        """The channel's stream of kept messages and its meta hash (epoch, offset): in its
        topic's slot (the APPEND script writes them and publishes on the topic)."""
        stream = f"{self.channel_topic(channel)}:hist"
        return stream, f"{stream}:meta"

    def critical_keys(self, user: int) -> tuple[str, str, str]:
        """The user's critical ids (a list, in order), their sealed messages (a hash) and their
        expiries (a sorted set)."""
        ids = f"{self.prefix}:crit:{user}"
        return ids, f"{ids}:d", f"{ids}:x"

    @property
    def marks(self) -> str:
        """The set of channels marked for join/leave."""
        return f"{self.prefix}:marks"

    def channel_of_topic(self, topic: str) -> int | None:
        head = "{ucc:" + self.cluster + ":c:"
        number = topic[len(head) : -1]
        if topic.startswith(head) and topic.endswith("}") and number.isdigit():
            return int(number)
        return None


@dataclass(frozen=True, slots=True)
class Message:
    """A broadcast between hosts: from ``origin``, to ``users`` (or to ``channel``, whose topic
    it must arrive on), this frame; or, with ``control``, a backend command for those users
    (subscribe, unsubscribe, disconnect, the latter with an optional ``ban``; ``acked``, with
    the ``id`` of a critical message acknowledged on the origin).

    With ``history``, a channel message whose ``frame`` is its data JSON (the receiver builds the
    client frame with the position); ``offset`` and ``epoch`` are not sealed (Redis assigns them
    after sealing) and are set only by :func:`decode` from the published trailer. With
    ``critical`` (its id), a critical message for ``users`` whose ``frame`` is its data JSON,
    kept until ``expires_ms``."""

    origin: str
    users: list[int] | None
    frame: bytes
    probe: bool = False
    control: dict[str, Any] | None = None
    channel: int | None = None
    sent_ms: int = 0  # the publisher's clock (ms since the epoch) when it sealed it
    history: bool = False
    critical: str | None = None
    expires_ms: int = 0
    offset: int = 0
    epoch: str = ""


CONTROL_OPS = (
    "subscribe",
    "unsubscribe",
    "disconnect",
    "acked",
    "set_channel",
    "who",
    "answer",
    "snapshot",  # to a host's inbox: store a fresh presence snapshot (another host syncs)
)


def encode(message: Message, key: ClusterKey) -> bytes:
    """The message, sealed under ``key``."""
    fields: dict[str, Any] = {
        "o": message.origin,
        "u": message.users,
        "p": message.probe,
        "t": message.sent_ms,
    }
    if message.control is not None:
        fields["c"] = message.control
    if message.channel is not None:
        fields["ch"] = message.channel
    if message.history:
        fields["k"] = "h"
    if message.critical is not None:
        fields["id"] = message.critical
        fields["x"] = message.expires_ms
    header = json.dumps(fields).encode()
    return key.seal(len(header).to_bytes(4, "big") + header + message.frame)


def _control(value: Any) -> dict[str, Any] | None:
    """A valid control command, or None (raises ValueError if present but malformed)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("op") not in CONTROL_OPS:
        raise ValueError("bad control")
    if value["op"] == "acked":
        if not valid_critical_id(value.get("id")):
            raise ValueError("bad acked id")
    elif value["op"] == "set_channel":
        if parse_id(value.get("channel")) is None or type(value.get("join_leave")) is not bool:
            raise ValueError("bad set_channel")
    elif value["op"] == "snapshot":
        if not isinstance(value.get("to"), str):
            raise ValueError("bad snapshot request")
    elif value["op"] in ("who", "answer"):
        if not valid_qid(value.get("qid")):
            raise ValueError("bad qid")
        if value["op"] == "who" and parse_id(value.get("user")) is None:
            raise ValueError("bad who user")
        if value["op"] == "answer" and not (
            isinstance(value.get("to"), str) and isinstance(value.get("connections"), list)
        ):
            raise ValueError("bad answer")
    elif value["op"] not in ("disconnect", "snapshot") and parse_id(value.get("channel")) is None:
        raise ValueError("bad control channel")
    if "ban" in value and not valid_seconds(value["ban"]):
        raise ValueError("bad ban")
    if "until" in value and (type(value["until"]) is not int or value["until"] < 0):
        raise ValueError("bad ban expiry")
    return value


def valid_qid(value: Any) -> bool:
    """A query id from another host: an int from 1 to :data:`MAX_QID` (not a bool)."""
    return type(value) is int and 0 < value <= MAX_QID


def valid_record(value: Any) -> bool:
    """A connection record in an answer: an object whose keys are strings (its values are
    passed on as they are: they come from a host of this cluster, under its seal)."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def answer_control(to: str, qid: int, connections: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``answer`` control for host ``to``'s ``who`` ``qid``: at most
    :data:`MAX_ANSWER_RECORDS` records (``truncated`` says if some were left out; the sender
    also drops records until the sealed message fits :data:`MAX_ANSWER_BYTES`)."""
    records = connections[:MAX_ANSWER_RECORDS]
    return {
        "op": "answer",
        "to": to,
        "qid": qid,
        "connections": records,
        "truncated": len(records) < len(connections),
    }


def valid_critical_id(value: Any) -> bool:
    """A critical message id: a string of 1 to :data:`MAX_ID` characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID


def valid_seconds(value: Any) -> bool:
    """A duration: a number (not a bool) from 0 to :data:`MAX_BAN` (NaN is not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_BAN


def ban_remaining(control: dict[str, Any], now_ms: int) -> float | None:
    """What is left of a forwarded ban (``ban`` seconds, ``until`` ms since the epoch set by the
    publisher): None once it has passed, and a clock ahead of ours adds nothing to its length. A
    ban of 0 (lift it) stays 0. A copy replayed later never reaches this: :func:`decode` drops
    whatever is older than the replay window, so an old "lift" cannot undo a newer ban."""
    seconds = float(control.get("ban", 0))
    until = control.get("until")
    if until is None or seconds == 0:
        return seconds
    left = min(seconds, (until - now_ms) / 1000)
    return left if left > 0 else None


def decode(
    raw: bytes, key: ClusterKey, now_ms: int, max_frame: int = MAX_FRAME
) -> Message | Rejected:
    """The message, or why it is refused (counted and dropped by the caller): anything on Redis
    may come from a buggy or hostile publisher, and its frame goes to our clients. The seal is
    checked first: without a valid one the message is :attr:`Rejected.FORGED`; with one, but
    stamped more than :data:`REPLAY_WINDOW_MS` away from ``now_ms``, it is
    :attr:`Rejected.REPLAYED` (a copy someone kept and published again).

    A channel message with history arrives followed by its position (``|<offset>|<epoch>``,
    added by the APPEND script): it is returned with ``offset`` and ``epoch`` set. A message
    sealed as one, arriving without a position, is :attr:`Rejected.FORGED` (a kept copy
    published again), and so is a plain message with a position appended."""
    offset, epoch = 0, ""
    position = _POSITION.search(raw, max(0, len(raw) - _POSITION_TAIL))
    if position is not None:
        offset, epoch = int(position[1]), position[2].decode()
        raw = raw[: position.start()]
    body = key.open(raw)
    if body is None:
        return Rejected.FORGED
    message = _parse(body, max_frame)
    if isinstance(message, Rejected):
        return message
    if abs(now_ms - message.sent_ms) > REPLAY_WINDOW_MS:
        return Rejected.REPLAYED
    if message.history != (position is not None) or (
        message.history and not 0 < offset <= MAX_OFFSET
    ):
        return Rejected.FORGED
    if message.history:
        return replace(message, offset=offset, epoch=epoch)
    return message


def open_stored(raw: bytes, key: ClusterKey, max_frame: int = MAX_FRAME) -> Message | Rejected:
    """A kept message (a channel's stream entry, a user's critical message): its seal checked,
    not its age (history is old by design). The caller checks that it is what it was looked up
    as (the channel, the user and id)."""
    body = key.open(raw)
    if body is None:
        return Rejected.FORGED
    return _parse(body, max_frame)


def _parse(body: bytes, max_frame: int) -> Message | Rejected:
    """A sealed message's body (its seal already checked)."""
    try:
        size = int.from_bytes(body[:4], "big")
        header = json.loads(body[4 : 4 + size].decode("utf-8"))
        origin, users, probe = header["o"], header["u"], bool(header.get("p"))
        control = _control(header.get("c"))
        channel = header.get("ch")
        sent_ms = header["t"]
        history = header.get("k") == "h"
        critical = header.get("id")
        expires_ms = header.get("x", 0)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return Rejected.MALFORMED
    if type(sent_ms) is not int or type(expires_ms) is not int:
        return Rejected.MALFORMED
    if not isinstance(origin, str):
        return Rejected.MALFORMED
    if channel is not None and parse_id(channel) is None:
        return Rejected.MALFORMED
    if users is not None and (
        not isinstance(users, list) or not all(parse_id(u) is not None for u in users)
    ):
        return Rejected.MALFORMED
    if control is not None and control["op"] == "answer":
        records = control["connections"]
        if len(body) > MAX_ANSWER_BYTES or len(records) > MAX_ANSWER_RECORDS:
            return Rejected.OVERSIZED
        if not all(valid_record(r) for r in records):
            return Rejected.MALFORMED
    frame = body[4 + size :]
    if history or critical is not None:
        # the frame is data JSON: the receiver builds the client frame around it
        if (
            probe
            or control is not None
            or not 0 < len(frame) <= max_frame
            or (history and (channel is None or users is not None or critical is not None))
            or (critical is not None and (not valid_critical_id(critical) or not users))
        ):
            return Rejected.MALFORMED
    elif not probe and control is None and not frames.is_text_frame(frame, max_frame):
        return Rejected.MALFORMED
    return Message(
        origin, users, frame, probe, control, channel, sent_ms, history, critical, expires_ms
    )


PRESENCE_KINDS = {"d": "delta", "n": "snapshot", "l": "leave"}
_KIND_CODES = {name: code for code, name in PRESENCE_KINDS.items()}


def encode_presence(
    key: ClusterKey,
    host: str,
    kind: str,
    generation: str,
    seq: int,
    sent_ms: int,
    changes: Iterable[Change] = (),
) -> bytes:
    """A presence message (``kind``: ``delta``, ``snapshot`` or ``leave``), sealed."""
    body = {
        "h": host,
        "g": generation,
        "s": seq,
        "t": sent_ms,
        "k": _KIND_CODES[kind],
        "c": [[user, None if state is None else list(state)] for user, state in changes],
    }
    return key.seal(json.dumps(body, separators=(",", ":")).encode())


def decode_presence(raw: bytes, key: ClusterKey, now_ms: int) -> PresenceNews | Rejected:
    """A presence message from the presence topic, or why it is refused (as :func:`decode`:
    forged without a valid seal, replayed when stamped more than REPLAY_WINDOW_MS away)."""
    body = key.open(raw)
    if body is None:
        return Rejected.FORGED
    try:
        data = json.loads(body.decode("utf-8"))
        host, generation, seq, sent_ms = data["h"], data["g"], data["s"], data["t"]
        kind = PRESENCE_KINDS[data["k"]]
        changes = tuple(_change(entry) for entry in data["c"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return Rejected.MALFORMED
    if not (isinstance(host, str) and isinstance(generation, str)):
        return Rejected.MALFORMED
    if type(seq) is not int or not 0 <= seq <= MAX_OFFSET or type(sent_ms) is not int:
        return Rejected.MALFORMED
    if abs(now_ms - sent_ms) > REPLAY_WINDOW_MS:
        return Rejected.REPLAYED
    return PresenceNews(host, kind, generation, seq, changes)


def _change(entry: Any) -> Change:
    user, state = entry
    return _id(user), None if state is None else tuple(sorted({_id(c) for c in state}))


def seal_snapshot(
    key: ClusterKey, host: str, generation: str, seq: int, users: Mapping[int, Channels]
) -> bytes:
    """This host's whole presence at ``seq``, sealed, naming the host (so that it cannot be
    moved to another): users grouped by the channels they are in."""
    groups: dict[str, list[int]] = {}
    for user, channels in users.items():
        groups.setdefault(",".join(map(str, channels)), []).append(user)
    body = {"h": host, "g": generation, "s": seq, "u": groups}
    return key.seal(json.dumps(body, separators=(",", ":")).encode())


def open_snapshot(key: ClusterKey, host: str, raw: bytes | None) -> LoadedSnapshot | Rejected:
    """Host ``host``'s stored snapshot: :attr:`Rejected.FORGED` if it is missing, its seal is
    wrong or it names another host; its presence built for the queries (the caller's thread
    does that work, not the router's)."""
    body = None if raw is None else key.open(raw)
    if body is None:
        return Rejected.FORGED
    try:
        data = json.loads(body.decode("utf-8"))
        if data["h"] != host:
            return Rejected.FORGED  # another host's snapshot, copied
        generation, seq = data["g"], data["s"]
        if not isinstance(generation, str) or type(seq) is not int or not 0 <= seq <= MAX_OFFSET:
            return Rejected.MALFORMED
        users: dict[int, Channels] = {}
        for group, members in data["u"].items():
            channels = tuple(sorted({_id(c) for c in group.split(",")})) if group else ()
            for user in _ids(members):
                users[user] = channels
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return Rejected.MALFORMED
    return LoadedSnapshot(host, generation, seq, HostState.of(users))


def _id(value: Any) -> int:
    parsed = parse_id(int(value) if isinstance(value, str) and value.isdigit() else value)
    if parsed is None:
        raise ValueError("bad id")
    return parsed


def _ids(values: Any) -> list[int]:
    if not isinstance(values, list):
        raise ValueError("not a list")
    return [_id(v) for v in values]


# Scripts: KEYS[1] is the hosts sorted set; ARGV[1] the prefix, ARGV[2] this host, ARGV[3] now
# (ms). Only hosts whose expiry is in the future count; this host's own entries never do (its
# part of every answer comes from its shards directly).
_LIVE_OTHERS = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '+inf')
local others = {}
for _, h in ipairs(live) do if h ~= ARGV[2] then others[#others + 1] = h end end
-- publish ARGV[4] to the inbox of each other live host that has any of the users
-- ARGV[first..last] (the host's user set, from its presence); returns the hosts told
local function to_hosts_with(first, last)
  local told = {}
  for _, h in ipairs(others) do
    local key = ARGV[1] .. ':h:' .. h .. ':users'
    for i = first, last do
      if redis.call('SISMEMBER', key, ARGV[i]) == 1 then
        redis.call('PUBLISH', ARGV[1] .. ':h:' .. h, ARGV[4])
        told[#told + 1] = h
        break
      end
    end
  end
  return told
end
-- publish ARGV[4] to the inbox of every other live host; returns how many
local function to_all_hosts()
  for _, h in ipairs(others) do redis.call('PUBLISH', ARGV[1] .. ':h:' .. h, ARGV[4]) end
  return #others
end
"""

# ARGV[4]: the sealed message (naming all the users); ARGV[5..]: user ids. Publishes it to each
# other live host that has some of the users. Returns the number of hosts published to. For a
# single Redis. (The message is sealed by its publisher, so the script cannot tailor it per host:
# each host applies it to those of the users it has.)
PUBLISH_USERS = (
    _LIVE_OTHERS
    + """
return #to_hosts_with(5, #ARGV)
"""
)

# ARGV[4]: the sealed message. Publishes it to every other live host (a ban). Returns how many.
PUBLISH_HOSTS = (
    _LIVE_OTHERS
    + """
return to_all_hosts()
"""
)

# -- issue 12 ------------------------------------------------------------------------------------

# ARGV[4]: the sealed "who" control; ARGV[5]: the user. Publishes it to each other live host that
# has the user. Returns those hosts (their answers are awaited).
WHO = (
    _LIVE_OTHERS
    + """
return to_hosts_with(5, 5)
"""
)

# ARGV[4]: the sealed "set_channel" control; ARGV[5]: the channel; ARGV[6]: '1' (mark) or '0'.
# Stores the mark in {P}:marks and publishes it to every other live host. Returns how many.
SET_CHANNEL = (
    _LIVE_OTHERS
    + """
if ARGV[6] == '1' then
  redis.call('SADD', ARGV[1] .. ':marks', ARGV[5])
else
  redis.call('SREM', ARGV[1] .. ':marks', ARGV[5])
end
return to_all_hosts()
"""
)

# The same for a Redis Cluster: sharded pub/sub. The inbox topics carry the scripts' hash tag, so
# the script publishes within its own slot (KEYS[1]'s), as Redis Cluster requires of SPUBLISH.
SPUBLISH_USERS = PUBLISH_USERS.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SPUBLISH_HOSTS = PUBLISH_HOSTS.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SWHO = WHO.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SSET_CHANNEL = SET_CHANNEL.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")

# This host's presence: the expiry refresh, and a delta or heartbeat. ARGV[4]: expiry (ms since
# the epoch); ARGV[5]: ttl (ms); ARGV[6]: the sealed presence message (published on the presence
# topic); ARGV[7]: how many users came online (ARGV[9 .. 8 + n]); ARGV[8]: how many users the
# host has in all; the rest of ARGV went offline. Keeps the user set, renews it and the
# snapshot, and forgets expired hosts. Returns 1, or 0 if the user set does not hold as many
# users as the host has (it expired or was evicted): the host then stores a snapshot, which
# rewrites it.
PRESENCE_DELTA = """
local prefix, host, ttl = ARGV[1], ARGV[2], tonumber(ARGV[5])
local base = prefix .. ':h:' .. host
local users = base .. ':users'
local online = 8 + tonumber(ARGV[7])
for i = 9, online, 1000 do
  redis.call('SADD', users, unpack(ARGV, i, math.min(i + 999, online)))
end
for i = online + 1, #ARGV, 1000 do
  redis.call('SREM', users, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('PEXPIRE', users, ttl + 1000)
redis.call('PEXPIRE', base .. ':snap', ttl + 1000)
redis.call('ZADD', KEYS[1], ARGV[4], host)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('PUBLISH', prefix .. ':presence', ARGV[6])
if redis.call('SCARD', users) ~= tonumber(ARGV[8]) then return 0 end
return 1
"""

# Store this host's snapshot. ARGV[4]: expiry; ARGV[5]: ttl (ms); ARGV[6]: the sealed snapshot;
# ARGV[7]: the sealed announcement; ARGV[8..]: every user online here (the user set is
# rewritten from them).
STORE_PRESENCE = """
local prefix, host, ttl = ARGV[1], ARGV[2], tonumber(ARGV[5])
local base = prefix .. ':h:' .. host
local users = base .. ':users'
redis.call('DEL', users)
for i = 8, #ARGV, 1000 do
  redis.call('SADD', users, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('PEXPIRE', users, ttl + 1000)
redis.call('SET', base .. ':snap', ARGV[6], 'PX', ttl + 1000)
redis.call('ZADD', KEYS[1], ARGV[4], host)
redis.call('PUBLISH', prefix .. ':presence', ARGV[7])
return 1
"""

# Remove this host at once (clean shutdown). ARGV[4]: the sealed leave message.
LEAVE = """
local base = ARGV[1] .. ':h:' .. ARGV[2]
redis.call('DEL', base .. ':users', base .. ':snap')
redis.call('PUBLISH', ARGV[1] .. ':presence', ARGV[4])
return redis.call('ZREM', KEYS[1], ARGV[2])
"""

SPRESENCE_DELTA = PRESENCE_DELTA.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SSTORE_PRESENCE = STORE_PRESENCE.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SLEAVE = LEAVE.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")

# -- history: KEYS[1] is the channel's stream (the script runs in the channel's slot, not the
# hosts'), ARGV[4] the channel id ------------------------------------------------------------

# Take the channel's state, creating it (epoch ARGV[5], offset 0) if it has none: a stream left
# over from an expired state belongs to an old epoch and goes.
_HISTORY_STATE = """
local stream = KEYS[1]
local meta = stream .. ':meta'
local epoch = redis.call('HGET', meta, 'epoch')
local created = false
if not epoch then
  epoch = ARGV[5]
  created = true
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
end
"""

# A channel message with history. ARGV[6]: at most this many kept (>= 1); ARGV[7]: ttl (ms);
# ARGV[8]: the sealed message; ARGV[9]: the channel's topic. Assigns the next offset, keeps the
# message as stream entry "<offset>-1", makes the state live ttl more, and publishes the
# message with its position on the channel's topic (every listening host, its publisher too,
# delivers that copy). Returns {offset, epoch}.
APPEND = (
    _HISTORY_STATE
    + """
redis.call('HINCRBY', meta, 'offset', 1)
local offset = redis.call('HGET', meta, 'offset')  -- a string: a Lua number would print 1e+14
redis.call('XADD', stream, 'MAXLEN', ARGV[6], offset .. '-1', 'm', ARGV[8])
redis.call('PEXPIRE', stream, ARGV[7])
redis.call('PEXPIRE', meta, ARGV[7])
redis.call('PUBLISH', ARGV[9], ARGV[8] .. '|' .. offset .. '|' .. epoch)
return {offset, epoch}
"""
)

# Read a channel's kept messages. ARGV[6]: since (a string: ids may exceed 2**53); ARGV[7]: at
# most this many; ARGV[8]: ttl (ms) of a state created here; ARGV[9] and ARGV[10], if given: a
# sealed probe to publish on the channel's topic ARGV[10] after the read (every message at or
# below the offset read was published there before it). Returns {epoch, offset (a string), the
# first kept entry's id or nil, {{id, {'m', sealed}}, ...} with offset > since}. Entries are
# "<offset>-1": starting at "<since>-2" leaves out since's own.
READ_HISTORY = (
    _HISTORY_STATE
    + """
if created then redis.call('PEXPIRE', meta, ARGV[8]) end
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
local first = false
if #head > 0 then first = head[1][1] end
local entries = redis.call('XRANGE', stream, ARGV[6] .. '-2', '+', 'COUNT', ARGV[7])
if ARGV[10] then redis.call('PUBLISH', ARGV[10], ARGV[9]) end
return {epoch, redis.call('HGET', meta, 'offset'), first, entries}
"""
)

# -- critical messages --------------------------------------------------------------------------

# Forget user `user`'s expired critical messages; `held` is how many are left.
_CRITICAL_KEYS = """
local function critical_keys(user)
  local ids = ARGV[1] .. ':crit:' .. user
  return ids, ids .. ':d', ids .. ':x'
end
local function drop_expired(user)
  local ids, data, expiries = critical_keys(user)
  local gone = redis.call('ZRANGEBYSCORE', expiries, '-inf', ARGV[3])
  for _, id in ipairs(gone) do
    redis.call('LREM', ids, 0, id)
    redis.call('HDEL', data, id)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', expiries, '-inf', ARGV[3]) end
  return redis.call('ZCARD', expiries)
end
"""

# ARGV[4]: the sealed message (naming its id, users and expiry); ARGV[5]: its id; ARGV[6]: its
# expiry (ms since the epoch); ARGV[7]: ttl (ms); ARGV[8]: at most this many per user;
# ARGV[9..]: the users (strings, distinct). All or nothing: {'limit', user} if a user already
# holds ARGV[8] unexpired ones; else stores it for every user (the keys live as long as their
# longest-lived message), publishes it to every other live host that has some of the users,
# and returns {'value', hosts told}.
STORE_CRITICAL = (
    _LIVE_OTHERS
    + _CRITICAL_KEYS
    + """
local bound = tonumber(ARGV[8])
for i = 9, #ARGV do
  if drop_expired(ARGV[i]) >= bound then return {'limit', ARGV[i]} end
end
local ttl = tonumber(ARGV[7])
for i = 9, #ARGV do
  local ids, data, expiries = critical_keys(ARGV[i])
  if redis.call('HSETNX', data, ARGV[5], ARGV[4]) == 1 then redis.call('RPUSH', ids, ARGV[5]) end
  redis.call('ZADD', expiries, ARGV[6], ARGV[5])
  for _, key in ipairs({ids, data, expiries}) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
end
return {'value', #to_hosts_with(9, #ARGV)}
"""
)

# ARGV[4]: the user. Their unexpired critical messages in order: {id, sealed or nil, ...}.
FETCH_CRITICAL = (
    _CRITICAL_KEYS
    + """
drop_expired(ARGV[4])
local ids, data = critical_keys(ARGV[4])
local out = {}
for _, id in ipairs(redis.call('LRANGE', ids, 0, -1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', data, id)
end
return out
"""
)

# ARGV[4]: the sealed "acked" control; ARGV[5]: the user; ARGV[6]: the id. Forgets it; if it
# was there, tells every other live host that has the user. Returns the hosts told (-1: it was
# not there: already acknowledged, expired, or never stored).
ACK_CRITICAL = (
    _LIVE_OTHERS
    + _CRITICAL_KEYS
    + """
local ids, data, expiries = critical_keys(ARGV[5])
redis.call('HDEL', data, ARGV[6])
redis.call('ZREM', expiries, ARGV[6])
if redis.call('LREM', ids, 0, ARGV[6]) == 0 then return -1 end
return #to_hosts_with(5, 5)
"""
)

# The same for a Redis Cluster: sharded pub/sub (the topics share the scripts' hash tag).
SAPPEND = APPEND.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SREAD_HISTORY = READ_HISTORY.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SSTORE_CRITICAL = STORE_CRITICAL.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SACK_CRITICAL = ACK_CRITICAL.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
