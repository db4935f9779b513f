"""The Redis layout that links hosts: key and topic names, message codec, and Lua scripts.

Owns: every name this system uses in Redis (docs/cluster.md has the table) and the bytes of
the messages published between hosts. Must never do I/O. All names share one hash tag,
``{ucc:<cluster>}``, so that multi-key operations and scripts stay in one slot of a Redis Cluster,
and the topics too, so that a script may ``SPUBLISH`` to them. Every script takes ``KEYS[1]`` (the
hosts set), which is how a Redis Cluster client routes it to the node that owns the slot.

| name | type | content |
|---|---|---|
| ``{P}:hosts`` | sorted set | host id → expiry (ms since the epoch); a host is alive until then |
| ``{P}:h:<host>:users`` | set | users online on that host |
| ``{P}:h:<host>:chans`` | set | channels with members on that host |
| ``{P}:h:<host>:c:<channel>`` | set | that channel's members on that host |
| ``{P}:h:<host>:snap`` | string | the host's presence, sealed: what other hosts' queries read |
| ``{P}:c:<channel>`` | topic | broadcasts to the channel (hosts with members listen) |
| ``{P}:h:<host>`` | topic | the host's inbox: user broadcasts for its users, its own probes |

Every message and every presence snapshot is *sealed*: a 32-byte HMAC-SHA256 under the cluster
key, then the body. :func:`decode` and :func:`read_presence` check the seal first (in constant
time) and tell a forged message (:attr:`Rejected.FORGED`: no seal, or a wrong one) from a
malformed one (:attr:`Rejected.MALFORMED`: sealed, but not a valid body). Every message carries
its publisher's time under the seal, and is taken only within :data:`REPLAY_WINDOW_MS` of it
(:attr:`Rejected.REPLAYED` otherwise); presence snapshots carry their expiry, so a replayed one
is worth nothing past it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from actors.ids import parse_id
from actors.wire import frames

MAX_FRAME = 16 * 1024 * 1024
MAX_BAN = 1e9  # seconds, as commands.MAX_SECONDS
MAC_SIZE = 32  # HMAC-SHA256
# a sealed message is taken only within this long of the time its publisher stamped on it
# (either way: hosts' clocks must agree within it, as NTP keeps them); an older copy replayed
# onto Redis is dropped and counted ``replayed``. The same as the presence expiry.
REPLAY_WINDOW_MS = 5_000
MAC_LABEL = b"ucc cluster mac v1"  # derives the default cluster key from the token secret


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
    """Why :func:`decode` or :func:`read_presence` refused something (each counted apart)."""

    MALFORMED = "malformed"  # a valid seal on a bad body (a bug or a version mismatch)
    FORGED = "forged"  # no valid seal: not made by a host of this cluster
    REPLAYED = "replayed"  # a valid seal, but sent longer ago than REPLAY_WINDOW_MS


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
        return f"{self.prefix}:c:{channel}"

    def host_topic(self, host: str) -> str:
        return f"{self.prefix}:h:{host}"

    def host_keys(self, host: str) -> tuple[str, str]:
        """The host's users set and its channels set."""
        return f"{self.prefix}:h:{host}:users", f"{self.prefix}:h:{host}:chans"

    def snapshot_key(self, host: str) -> str:
        return f"{self.prefix}:h:{host}:snap"

    def member_key(self, host: str, channel: int | str) -> str:
        return f"{self.prefix}:h:{host}:c:{channel}"

    def channel_of_topic(self, topic: str) -> int | None:
        head = f"{self.prefix}:c:"
        if topic.startswith(head) and topic[len(head) :].isdigit():
            return int(topic[len(head) :])
        return None


@dataclass(frozen=True, slots=True)
class Message:
    """A broadcast between hosts: from ``origin``, to ``users`` (or to ``channel``, whose topic
    it must arrive on), this frame; or, with ``control``, a backend command for those users
    (subscribe, unsubscribe, disconnect, the latter with an optional ``ban``)."""

    origin: str
    users: list[int] | None
    frame: bytes
    probe: bool = False
    control: dict[str, Any] | None = None
    channel: int | None = None
    sent_ms: int = 0  # the publisher's clock (ms since the epoch) when it sealed it


CONTROL_OPS = ("subscribe", "unsubscribe", "disconnect")


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
    header = json.dumps(fields).encode()
    return key.seal(len(header).to_bytes(4, "big") + header + message.frame)


def _control(value: Any) -> dict[str, Any] | None:
    """A valid control command, or None (raises ValueError if present but malformed)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("op") not in CONTROL_OPS:
        raise ValueError("bad control")
    if value["op"] != "disconnect" and parse_id(value.get("channel")) is None:
        raise ValueError("bad control channel")
    if "ban" in value and not valid_seconds(value["ban"]):
        raise ValueError("bad ban")
    if "until" in value and (type(value["until"]) is not int or value["until"] < 0):
        raise ValueError("bad ban expiry")
    return value


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
    :attr:`Rejected.REPLAYED` (a copy someone kept and published again)."""
    body = key.open(raw)
    if body is None:
        return Rejected.FORGED
    try:
        size = int.from_bytes(body[:4], "big")
        header = json.loads(body[4 : 4 + size].decode("utf-8"))
        origin, users, probe = header["o"], header["u"], bool(header.get("p"))
        control = _control(header.get("c"))
        channel = header.get("ch")
        sent_ms = header["t"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return Rejected.MALFORMED
    if type(sent_ms) is not int:
        return Rejected.MALFORMED
    if abs(now_ms - sent_ms) > REPLAY_WINDOW_MS:
        return Rejected.REPLAYED
    if not isinstance(origin, str):
        return Rejected.MALFORMED
    if channel is not None and parse_id(channel) is None:
        return Rejected.MALFORMED
    if users is not None and (
        not isinstance(users, list) or not all(parse_id(u) is not None for u in users)
    ):
        return Rejected.MALFORMED
    frame = body[4 + size :]
    if not probe and control is None and not frames.is_text_frame(frame, max_frame):
        return Rejected.MALFORMED
    return Message(origin, users, frame, probe, control, channel, sent_ms)


def snapshot_json(snapshot: dict[str, Any]) -> str:
    """A presence snapshot for the SNAPSHOT script, ids as strings: Lua's numbers are doubles,
    which would round ids above 2**53."""
    return json.dumps(
        {
            "users": [str(u) for u in snapshot["users"]],
            "channels": {c: [str(u) for u in m] for c, m in snapshot["channels"].items()},
        }
    )


@dataclass(frozen=True, slots=True)
class Presence:
    """Another host's presence, as its sealed snapshot says."""

    users: frozenset[int]
    channels: dict[int, frozenset[int]]
    expires_ms: int = 0  # when it stops counting (ms since the epoch)


def seal_presence(key: ClusterKey, host: str, expires_ms: int, snapshot: dict[str, Any]) -> bytes:
    """This host's snapshot as the other hosts read it: sealed, naming the host and its expiry
    (so that it can be neither moved to another host nor replayed past its expiry)."""
    body = {
        "h": host,
        "x": expires_ms,
        "u": sorted(snapshot["users"]),
        "c": {str(c): sorted(m) for c, m in snapshot["channels"].items()},
    }
    return key.seal(json.dumps(body, separators=(",", ":")).encode())


def read_presence(
    key: ClusterKey, host: str, raw: bytes | None, now_ms: int
) -> Presence | Rejected | None:
    """Host ``host``'s sealed snapshot: :attr:`Rejected.FORGED` if it is missing or its seal is
    wrong or it names another host, None if it expired, else its presence."""
    body = None if raw is None else key.open(raw)
    if body is None:
        return Rejected.FORGED
    try:
        data = json.loads(body.decode("utf-8"))
        if data["h"] != host:
            return Rejected.FORGED  # another host's snapshot, copied
        if type(data["x"]) is not int:
            return Rejected.MALFORMED
        if data["x"] <= now_ms:
            return None
        users = frozenset(_ids(data["u"]))
        channels = {_id(c): frozenset(_ids(m)) for c, m in data["c"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return Rejected.MALFORMED
    return Presence(users, channels, data["x"])


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
"""

# ARGV[4]: the sealed message (naming all the users); ARGV[5..]: user ids. Publishes it to each
# other live host that has some of the users. Returns the number of hosts published to. For a
# single Redis. (The message is sealed by its publisher, so the script cannot tailor it per host:
# each host applies it to those of the users it has.)
PUBLISH_USERS = (
    _LIVE_OTHERS
    + """
local sent = 0
for _, h in ipairs(others) do
  local key = ARGV[1] .. ':h:' .. h .. ':users'
  for i = 5, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[i]) == 1 then
      redis.call('PUBLISH', ARGV[1] .. ':h:' .. h, ARGV[4])
      sent = sent + 1
      break
    end
  end
end
return sent
"""
)

# ARGV[4]: the sealed message. Publishes it to every other live host (a ban). Returns how many.
PUBLISH_HOSTS = (
    _LIVE_OTHERS
    + """
for _, h in ipairs(others) do redis.call('PUBLISH', ARGV[1] .. ':h:' .. h, ARGV[4]) end
return #others
"""
)

# The other live hosts and their sealed snapshots: {host, snapshot or false, ...}.
PRESENCE = (
    _LIVE_OTHERS
    + """
local out = {}
for _, h in ipairs(others) do
  out[#out + 1] = h
  out[#out + 1] = redis.call('GET', ARGV[1] .. ':h:' .. h .. ':snap')
end
return out
"""
)

# The same for a Redis Cluster: sharded pub/sub. The inbox topics carry the scripts' hash tag, so
# the script publishes within its own slot (KEYS[1]'s), as Redis Cluster requires of SPUBLISH.
SPUBLISH_USERS = PUBLISH_USERS.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
SPUBLISH_HOSTS = PUBLISH_HOSTS.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")

# Replace this host's presence. ARGV[4]: expiry (ms since the epoch); ARGV[5]: ttl (ms);
# ARGV[6]: JSON {"users": [...], "channels": {"<id>": [...]}}; ARGV[7]: the same, sealed (what the
# other hosts' queries read; the sets serve only to route user messages). Also forgets expired
# hosts.
SNAPSHOT = """
local prefix, host, expires, ttl = ARGV[1], ARGV[2], ARGV[4], ARGV[5]
local data = cjson.decode(ARGV[6])
local base = prefix .. ':h:' .. host
for _, c in ipairs(redis.call('SMEMBERS', base .. ':chans')) do
  if data.channels[c] == nil then redis.call('DEL', base .. ':c:' .. c) end
end
redis.call('DEL', base .. ':users', base .. ':chans')
local function fill(key, values)
  redis.call('DEL', key)
  for i = 1, #values, 1000 do
    redis.call('SADD', key, unpack(values, i, math.min(i + 999, #values)))
  end
  redis.call('PEXPIRE', key, ttl)
end
if #data.users > 0 then fill(base .. ':users', data.users) end
local chans = {}
for c, members in pairs(data.channels) do
  chans[#chans + 1] = c
  fill(base .. ':c:' .. c, members)
end
if #chans > 0 then fill(base .. ':chans', chans) end
redis.call('SET', base .. ':snap', ARGV[7], 'PX', ttl + 1000)
redis.call('ZADD', KEYS[1], expires, host)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
return #data.users
"""

# Remove this host at once (clean shutdown).
LEAVE = """
local base = ARGV[1] .. ':h:' .. ARGV[2]
for _, c in ipairs(redis.call('SMEMBERS', base .. ':chans')) do
  redis.call('DEL', base .. ':c:' .. c)
end
redis.call('DEL', base .. ':users', base .. ':chans', base .. ':snap')
return redis.call('ZREM', KEYS[1], ARGV[2])
"""
