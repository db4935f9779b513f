"""The user connection cache of one shard (the seed's ``UserConnectionCache``), as a plain class.

Owns: user → connections, channel → users (and the connections subscribed), and per-connection
metadata (``connected_at``, ``last_activity``, channels). Every mutation returns what changed for
the shard as a whole (a :class:`Delta`: channels gained or lost), so that the owner can tell the
router. Must never do I/O, read a clock or use threads: time is a parameter, and the single owner
(``CacheActor``) serialises access.

Subscriptions are per connection (a token lists channels per connection); a user is a member of a
channel while at least one of their connections is subscribed to it. A connection holds at most
``max_channels`` channels (``--max-channels-per-connection``): a subscribe beyond it is refused
(:meth:`UserConnectionCache.can_join`; :meth:`UserConnectionCache.subscribe_user` skips such a
connection and says how many it skipped). The channels of a connection's token, at connect, are
taken as they are: the acceptor refuses a token that lists more.

Membership changes can be journaled (:attr:`UserConnectionCache.journal`, off by default: the
owner turns it on for the event stream and join/leave): every change of a connection's channels,
in order, as a :data:`Change`, saying also whether it was the user's first connection in the
channel (join) or its last (leave).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.ids import ChannelId, ConnId, UserId


@dataclass(slots=True)
class ConnectionMeta:
    """What the cache knows of one connection. ``channels`` is a tuple, replaced on change: a
    connection is in few channels, and an empty tuple costs nothing (an empty set, 216 bytes)."""

    user: UserId
    connected_at: float
    last_activity: float
    channels: tuple[ChannelId, ...] = ()


# A user's connections, in the indexes: one ConnId while there is one (the usual case), a set
# from the second on. Saves a set per user and per membership; only the helpers below know.
Members = ConnId | set[ConnId]


def _add(index: dict[Any, Members], key: Any, conn: ConnId) -> bool:
    """Add ``conn`` under ``key``; True if the key is new."""
    held = index.get(key)
    if held is None:
        index[key] = conn
        return True
    if isinstance(held, set):
        held.add(conn)
    elif held != conn:
        index[key] = {held, conn}
    return False


def _remove(index: dict[Any, Members], key: Any, conn: ConnId) -> bool:
    """Remove ``conn`` under ``key``, and the key once it holds nothing (then True)."""
    held = index.get(key)
    if isinstance(held, set):
        held.discard(conn)
        if len(held) == 1:
            index[key] = next(iter(held))
    elif held == conn:
        del index[key]
        return True
    return False


def _each(held: Members | None) -> tuple[ConnId, ...] | set[ConnId]:
    if held is None:
        return ()
    return held if isinstance(held, set) else (held,)


# A journaled membership change: (connection, channel, its user, subscribed (True) or not,
# whether the user's membership of the channel changed with it: first connection in, last out)
Change = tuple[ConnId, ChannelId, UserId, bool, bool]


@dataclass(slots=True)
class Delta:
    """Channels the shard gained its first member of, and channels it lost its last member of."""

    gained: list[ChannelId] = field(default_factory=list)
    lost: list[ChannelId] = field(default_factory=list)

    def merge(self, other: Delta) -> None:
        for channel in other.gained:
            if channel in self.lost:
                self.lost.remove(channel)
            else:
                self.gained.append(channel)
        for channel in other.lost:
            if channel in self.gained:
                self.gained.remove(channel)
            else:
                self.lost.append(channel)

    def __bool__(self) -> bool:
        return bool(self.gained or self.lost)


LARGEST_SCAN_MAX = 100_000  # channels of a shard beyond which largest_channels() is not answered


class UserConnectionCache:
    """Indexes of one shard's connections. All ids are validated by the caller."""

    def __init__(self, max_channels: int | None = None) -> None:
        """``max_channels``: channels per connection at most (None: no limit)."""
        self.max_channels = max_channels
        self._conns: dict[ConnId, ConnectionMeta] = {}
        self._users: dict[UserId, Members] = {}
        # channel -> user -> that user's connections subscribed to the channel
        self._channels: dict[ChannelId, dict[UserId, Members]] = {}
        # channel -> connection ids, rebuilt lazily after a change (the broadcast hot path)
        self._recipients: dict[ChannelId, tuple[ConnId, ...]] = {}
        # None: not journaled (the default; no cost); a list: every change, in order
        self.journal: list[Change] | None = None
        # the users whose presence (online, channels) changed since :meth:`presence` last
        # told: None until it is first asked (a host without Redis never is; no cost)
        self._presence_changed: set[UserId] | None = None

    def take_journal(self) -> list[Change]:
        """The changes journaled since the last call (none when not journaling)."""
        journal = self.journal
        if not journal:
            return []
        self.journal = []
        return journal

    # -- mutations ------------------------------------------------------------------------

    def connect(
        self,
        conn: ConnId,
        user: UserId,
        channels: Iterable[ChannelId],
        now: float,
    ) -> Delta:
        """Register a new connection of ``user`` subscribed to ``channels``."""
        if conn in self._conns:
            raise ValueError(f"connection {conn} is already registered")
        self._conns[conn] = ConnectionMeta(user, now, now, ())
        if _add(self._users, user, conn) and self._presence_changed is not None:
            self._presence_changed.add(user)
        delta = Delta()
        for channel in channels:
            self._join(conn, channel, delta)
        return delta

    def disconnect(self, conn: ConnId) -> Delta:
        """Forget a connection; unknown ids are ignored (it may have been removed already)."""
        meta = self._conns.get(conn)
        delta = Delta()
        if meta is None:
            return delta
        for channel in meta.channels:  # a tuple: _leave replaces it, this loop keeps the old
            self._leave(conn, channel, delta)
        del self._conns[conn]
        if _remove(self._users, meta.user, conn) and self._presence_changed is not None:
            self._presence_changed.add(meta.user)
        return delta

    def subscribe(self, conn: ConnId, channel: ChannelId) -> Delta:
        """Subscribe ``conn`` to ``channel`` unless that would take it over ``max_channels``
        (ask :meth:`can_join` first to tell the two apart)."""
        delta = Delta()
        if self.can_join(conn, channel):
            self._join(conn, channel, delta)
        return delta

    def can_join(self, conn: ConnId, channel: ChannelId) -> bool:
        """Whether ``conn`` is registered and may hold ``channel``: it has it already, or it
        holds fewer than ``max_channels`` channels."""
        meta = self._conns.get(conn)
        if meta is None:
            return False
        limit = self.max_channels
        return limit is None or len(meta.channels) < limit or channel in meta.channels

    def unsubscribe(self, conn: ConnId, channel: ChannelId) -> Delta:
        delta = Delta()
        if conn in self._conns:
            self._leave(conn, channel, delta)
        return delta

    def subscribe_user(self, user: UserId, channel: ChannelId) -> tuple[Delta, int, int]:
        """Subscribe every open connection of ``user`` that may hold one more channel; returns
        the delta, how many connections have the channel now, and how many were left out
        because they hold ``max_channels`` channels already."""
        delta = Delta()
        applied = limited = 0
        for conn in list(_each(self._users.get(user))):
            if self.can_join(conn, channel):
                self._join(conn, channel, delta)
                applied += 1
            else:
                limited += 1
        return delta, applied, limited

    def unsubscribe_user(self, user: UserId, channel: ChannelId) -> tuple[Delta, int]:
        delta = Delta()
        conns = list(_each(self._users.get(user)))
        for conn in conns:
            self._leave(conn, channel, delta)
        return delta, len(conns)

    def touch(self, conn: ConnId, now: float) -> None:
        """Record inbound activity on ``conn``."""
        meta = self._conns.get(conn)
        if meta is not None and now > meta.last_activity:
            meta.last_activity = now

    def stale(self, now: float, timeout: float) -> list[ConnId]:
        """Connections with no activity for more than ``timeout`` seconds (the stale sweep)."""
        limit = now - timeout
        return [conn for conn, meta in self._conns.items() if meta.last_activity < limit]

    def _join(self, conn: ConnId, channel: ChannelId, delta: Delta) -> None:
        meta = self._conns[conn]
        if channel in meta.channels:
            return
        meta.channels = (*meta.channels, channel)
        members = self._channels.get(channel)
        if members is None:
            members = self._channels[channel] = {}
            delta.gained.append(channel)
        joined = _add(members, meta.user, conn)
        if joined and self._presence_changed is not None:
            self._presence_changed.add(meta.user)
        self._recipients.pop(channel, None)
        if self.journal is not None:
            self.journal.append((conn, channel, meta.user, True, joined))

    def _leave(self, conn: ConnId, channel: ChannelId, delta: Delta) -> None:
        meta = self._conns[conn]
        if channel not in meta.channels:
            return
        meta.channels = tuple(c for c in meta.channels if c != channel)
        members = self._channels[channel]
        left = _remove(members, meta.user, conn)
        if left and self._presence_changed is not None:
            self._presence_changed.add(meta.user)
        if not members:
            del self._channels[channel]
            delta.lost.append(channel)
        self._recipients.pop(channel, None)
        if self.journal is not None:
            self.journal.append((conn, channel, meta.user, False, left))

    # -- queries --------------------------------------------------------------------------

    def recipients(self, channel: ChannelId) -> tuple[ConnId, ...]:
        """The connections subscribed to ``channel`` (cached until the channel changes)."""
        cached = self._recipients.get(channel)
        if cached is not None:
            return cached
        members = self._channels.get(channel)
        if members is None:
            return ()
        result = tuple(conn for held in members.values() for conn in _each(held))
        self._recipients[channel] = result
        return result

    def connections_of(self, user: UserId) -> frozenset[ConnId]:
        return frozenset(_each(self._users.get(user)))

    def recipients_of_users(self, users: Iterable[int]) -> list[ConnId]:
        """Every connection of these users (the direct-broadcast path: no set per user)."""
        found = self._users
        return [conn for user in users for conn in _each(found.get(UserId(user)))]

    def meta(self, conn: ConnId) -> ConnectionMeta | None:
        return self._conns.get(conn)

    def connections(self) -> Iterable[tuple[ConnId, ConnectionMeta]]:
        """Every connection and its metadata (a view: do not change the cache meanwhile)."""
        return self._conns.items()

    def is_online(self, user: UserId) -> bool:
        return user in self._users

    def online_users(self) -> list[UserId]:
        return sorted(self._users)

    def online_users_in_channel(self, channel: ChannelId) -> list[UserId]:
        return sorted(self._channels.get(channel, ()))

    def largest_channels(self, count: int) -> list[list[int]] | None:
        """The ``count`` channels with the most users here, largest first:
        ``[[channel, users], ...]`` (a pass over the channels, for the admin page's
        once-a-second look); None beyond ``LARGEST_SCAN_MAX`` channels (the pass would take
        the shard's loop too long: ~15 ms per 100,000 channels)."""
        if len(self._channels) > LARGEST_SCAN_MAX:
            return None
        largest = heapq.nlargest(count, self._channels.items(), key=lambda item: len(item[1]))
        return [[channel, len(members)] for channel, members in largest]

    def presence(self, full: bool) -> list[list[Any]]:
        """Cluster presence (JSON-ready): the users whose presence changed since the last call
        (``full``, or the first call: every user), each as ``[user, [channels]]``, or
        ``[user, None]`` once it has no connection here. Changes are tracked from the first
        call on."""
        changed, self._presence_changed = self._presence_changed, set()
        users = self._users
        if full or changed is None:
            return [[user, self._channels_of(user)] for user in users]
        return [[user, self._channels_of(user) if user in users else None] for user in changed]

    def _channels_of(self, user: UserId) -> list[ChannelId]:
        conns = self._conns
        held = _each(self._users.get(user))
        if len(held) == 1:
            return sorted(conns[next(iter(held))].channels)
        return sorted({c for conn in held for c in conns[conn].channels})

    def channels(self) -> list[ChannelId]:
        """Channels with at least one member on this shard."""
        return sorted(self._channels)

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._conns),
            "users": len(self._users),
            "channels": len(self._channels),
        }
