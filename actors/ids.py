"""Identifier types and the sharding function.

Owns: the ``NewType`` ids used everywhere and ``stable_hash``, the documented, deterministic map
from a user id to a shard index. Must never depend on process state (no ``hash()``, no random
seed): the same user must land on the same shard after a restart and on every host.
"""

from __future__ import annotations

from typing import NewType

UserId = NewType("UserId", int)
ChannelId = NewType("ChannelId", int)
ShardIndex = NewType("ShardIndex", int)
ConnId = NewType("ConnId", int)

MAX_ID = 2**63 - 1
_MASK64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """Mix a 64-bit integer: one whole step of Steele, Lea and Flood's SplitMix64, i.e. the
    increment ``0x9E3779B97F4A7C15`` added first, then the finaliser (docs/protocol.md,
    "Sharding function", has test vectors)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping and Veach, 2014): a bucket in ``range(buckets)``.

    When ``buckets`` grows from n to n+1, only about 1/(n+1) of the keys move.
    """
    if buckets <= 0:
        raise ValueError("buckets must be positive")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def stable_hash(user: int, shards: int) -> ShardIndex:
    """The shard that serves ``user`` among ``shards``: ``jump_hash(splitmix64(user), shards)``."""
    return ShardIndex(jump_hash(splitmix64(user), shards))


def parse_id(value: object) -> int | None:
    """A positive 63-bit integer id from a JSON value, or None (booleans are not ids)."""
    if type(value) is int and 0 < value <= MAX_ID:
        return value
    return None
