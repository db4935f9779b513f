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
| ``{P}:c:<channel>`` | topic | broadcasts to the channel (hosts with members listen) |
| ``{P}:h:<host>`` | topic | the host's inbox: user broadcasts for its users, its own probes |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from actors.ids import parse_id
from actors.wire import frames

MAX_FRAME = 16 * 1024 * 1024


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

    def member_key(self, host: str, channel: int | str) -> str:
        return f"{self.prefix}:h:{host}:c:{channel}"

    def channel_of_topic(self, topic: str) -> int | None:
        head = f"{self.prefix}:c:"
        if topic.startswith(head) and topic[len(head) :].isdigit():
            return int(topic[len(head) :])
        return None


@dataclass(frozen=True, slots=True)
class Message:
    """A broadcast between hosts: from ``origin``, to ``users`` (or a channel), this frame; or,
    with ``control``, a backend command for those users (subscribe, unsubscribe, disconnect)."""

    origin: str
    users: list[int] | None
    frame: bytes
    probe: bool = False
    control: dict[str, Any] | None = None


CONTROL_OPS = ("subscribe", "unsubscribe", "disconnect")


def encode(message: Message) -> bytes:
    fields: dict[str, Any] = {"o": message.origin, "u": message.users, "p": message.probe}
    if message.control is not None:
        fields["c"] = message.control
    header = json.dumps(fields).encode()
    return len(header).to_bytes(4, "big") + header + message.frame


def _control(value: Any) -> dict[str, Any] | None:
    """A valid control command, or None (raises ValueError if present but malformed)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("op") not in CONTROL_OPS:
        raise ValueError("bad control")
    if value["op"] != "disconnect" and parse_id(value.get("channel")) is None:
        raise ValueError("bad control channel")
    return value


def decode(raw: bytes, max_frame: int = MAX_FRAME) -> Message | None:
    """The message, or None if it is malformed (counted and dropped by the caller): anything
    on Redis may come from a buggy or hostile publisher, and its frame goes to our clients."""
    try:
        size = int.from_bytes(raw[:4], "big")
        header = json.loads(raw[4 : 4 + size].decode("utf-8"))
        origin, users, probe = header["o"], header["u"], bool(header.get("p"))
        control = _control(header.get("c"))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not isinstance(origin, str):
        return None
    if users is not None and (
        not isinstance(users, list) or not all(parse_id(u) is not None for u in users)
    ):
        return None
    frame = raw[4 + size :]
    if not probe and control is None and not frames.is_text_frame(frame, max_frame):
        return None
    return Message(origin, users, frame, probe, control)


def snapshot_json(snapshot: dict[str, Any]) -> str:
    """A presence snapshot for the SNAPSHOT script, ids as strings: Lua's numbers are doubles,
    which would round ids above 2**53."""
    return json.dumps(
        {
            "users": [str(u) for u in snapshot["users"]],
            "channels": {c: [str(u) for u in m] for c, m in snapshot["channels"].items()},
        }
    )


# Scripts: KEYS[1] is the hosts sorted set; ARGV[1] the prefix, ARGV[2] this host, ARGV[3] now
# (ms). Only hosts whose expiry is in the future count; this host's own entries never do (its
# part of every answer comes from its shards directly).
_LIVE_OTHERS = """
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '+inf')
local others = {}
for _, h in ipairs(live) do if h ~= ARGV[2] then others[#others + 1] = h end end
"""

ONLINE = (
    _LIVE_OTHERS
    + """
local keys = {}
for _, h in ipairs(others) do keys[#keys + 1] = ARGV[1] .. ':h:' .. h .. ':users' end
if #keys == 0 then return {} end
return redis.call('SUNION', unpack(keys))
"""
)

ONLINE_IN_CHANNEL = (
    _LIVE_OTHERS
    + """
local keys = {}
for _, h in ipairs(others) do keys[#keys + 1] = ARGV[1] .. ':h:' .. h .. ':c:' .. ARGV[4] end
if #keys == 0 then return {} end
return redis.call('SUNION', unpack(keys))
"""
)

# ARGV[4..]: user ids. Returns those online on another host.
ARE_ONLINE = (
    _LIVE_OTHERS
    + """
local found = {}
for _, h in ipairs(others) do
  local key = ARGV[1] .. ':h:' .. h .. ':users'
  for i = 4, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[i]) == 1 then found[#found + 1] = ARGV[i] end
  end
end
return found
"""
)

# ARGV[4]: the encoded frame; ARGV[5]: a control command as JSON, or ''; ARGV[6..]: user ids.
# Publishes to each other host that has some of the users, only their ids. Returns the number of
# hosts published to. For a single Redis.
PUBLISH_USERS = (
    _LIVE_OTHERS
    + """
local sent = 0
for _, h in ipairs(others) do
  local key = ARGV[1] .. ':h:' .. h .. ':users'
  local mine = {}
  for i = 6, #ARGV do
    if redis.call('SISMEMBER', key, ARGV[i]) == 1 then mine[#mine + 1] = ARGV[i] end
  end
  if #mine > 0 then
    -- ids stay strings of digits: Lua numbers are doubles, and cjson prints 14 digits
    local header = '{"o":' .. cjson.encode(ARGV[2]) .. ',"u":[' .. table.concat(mine, ',') .. ']'
    if ARGV[5] ~= '' then header = header .. ',"c":' .. ARGV[5] end
    header = header .. ',"p":false}'
    local size = string.char(
      math.floor(#header / 16777216) % 256, math.floor(#header / 65536) % 256,
      math.floor(#header / 256) % 256, #header % 256)
    redis.call('PUBLISH', ARGV[1] .. ':h:' .. h, size .. header .. ARGV[4])
    sent = sent + 1
  end
end
return sent
"""
)

# The same for a Redis Cluster: sharded pub/sub. The inbox topics carry the scripts' hash tag, so
# the script publishes within its own slot (KEYS[1]'s), as Redis Cluster requires of SPUBLISH.
SPUBLISH_USERS = PUBLISH_USERS.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")

# Replace this host's presence. ARGV[4]: expiry (ms since the epoch); ARGV[5]: ttl (ms);
# ARGV[6]: JSON {"users": [...], "channels": {"<id>": [...]}}. Also forgets expired hosts.
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
redis.call('DEL', base .. ':users', base .. ':chans')
return redis.call('ZREM', KEYS[1], ARGV[2])
"""
