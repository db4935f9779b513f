"""Cluster presence by deltas: this host's presence as it tells the other hosts, and its
replicas of theirs.

Owns: :class:`LocalPresence` (a mirror of what each shard last reported, the changes not yet
published, the host's *generation* and sequence number) and :class:`Replicas` (every other
host's presence as its deltas and snapshots say, and whether each is in sync). Must never do
I/O, read a clock (``now`` is a parameter) or block: the router's Redis half
(:class:`actors.hosts.OtherHosts`) feeds them and queues what they ask for.

The protocol (docs/cluster.md, "Presence"):

- Once a second, the router asks each shard what changed since it last asked (a shard keeps
  the users whose presence changed; after a restart, or an answer that went missing, it is
  asked for everything). A change is a user's whole state on this host: the channels it is in
  (a sorted tuple; empty: online in no channel) or None (offline here). Applying one twice is
  harmless, so the order between users does not matter.
- The changes of a second form a *delta*: sequence number ``seq`` + 1, published sealed on the
  cluster's presence topic together with the host's expiry refresh. A second with no change
  publishes a *heartbeat*: the current ``seq``, no changes. Both refresh the host's expiry.
- A receiver applies a delta whose ``seq`` follows the one it has. A gap (a delta or heartbeat
  ahead of it: a lost message, its own outage), an unknown host or a new *generation* (the host
  restarted) makes the replica *sync*: it reads the host's sealed snapshot (kept in Redis at
  some ``seq`` S), applies the deltas it buffered meanwhile above S, and is in sync if that
  reaches the latest ``seq`` seen. Else it asks the host for a fresh snapshot (the host stores
  one at its next tick and announces it) and reads that.
- A host stores its snapshot when it starts or its link comes back, when another host asks
  (at most once per tick), and every :data:`RESNAPSHOT` seconds (it also rewrites the plain
  user set that routes user messages in Redis, should anything have drifted).
- A replica that hears nothing for :data:`PRESENCE_TTL` is dropped (the host died); a host
  that leaves cleanly says so, and is dropped at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from actors.ids import ShardIndex

PRESENCE_TTL = 5.0  # a host not heard of for this long is dropped from presence
RESYNC_RETRY = 2.0  # a replica still syncing after this long asks (and reads) again
RESNAPSHOT = 300.0  # a host stores its full snapshot at least this often
# after the link comes up, the replicas are taken as whole only this much later: every other
# host heartbeats once a second, and a replica it makes is read in one round trip
SETTLE = 2.0
MAX_BUFFERED = 1_000  # deltas a syncing replica keeps (beyond: it asks for a fresh snapshot)

Channels = tuple[int, ...]  # a user's channels on a host, sorted
Change = tuple[int, Channels | None]  # a user's new state on a host (None: offline there)
NO_CHANNELS: Channels = ()


def channels_of(raw: Iterable[int] | None) -> Channels | None:
    """A user's state as a change carries it (a sorted tuple; None: offline)."""
    return None if raw is None else tuple(sorted(set(raw)))


# -- this host ------------------------------------------------------------------------------


class LocalPresence:
    """This host's presence: a mirror of each shard's users (as of its incarnation's last
    answer), the changes not yet published, and the sequence number of the last delta."""

    def __init__(self, generation: str) -> None:
        self.generation = generation
        self.seq = 0
        self._mirror: dict[ShardIndex, dict[int, Channels]] = {}
        self._epochs: dict[ShardIndex, int] = {}  # the incarnation each mirror is of
        self._full: set[ShardIndex] = set()  # shards to ask for everything next time
        self._changes: dict[int, Channels | None] = {}
        self.snapshot_wanted = True  # the first one, as soon as the link takes it
        self.last_snapshot = float("-inf")

    def wants_full(self, index: ShardIndex, epoch: int) -> bool:
        """Whether shard ``index`` (incarnation ``epoch``) must be asked for all its users
        rather than what changed: new to the mirror, restarted, or its last answer was lost."""
        return index in self._full or self._epochs.get(index) != epoch

    def shard_answer(
        self, index: ShardIndex, epoch: int, full: bool, entries: Iterable[Change]
    ) -> None:
        """What shard ``index`` (incarnation ``epoch``) answered: everything (``full``), or
        the users whose presence changed since its last answer."""
        if self._epochs.get(index) != epoch:
            self.shard_gone(index)
            if not full:  # changes of an incarnation we never had everything of: useless
                self._full.add(index)
                return
        mirror = self._mirror.setdefault(index, {})
        self._epochs[index] = epoch
        self._full.discard(index)
        if full:
            fresh = dict(entries)
            for user in mirror.keys() - fresh.keys():
                self._changes[user] = None
            entries = fresh.items()
            mirror_after: dict[int, Channels] = {}
            for user, state in entries:
                if state is None:  # not in a full answer; if it were: offline
                    if user in mirror:
                        self._changes[user] = None
                    continue
                if mirror.get(user) != state:
                    self._changes[user] = state
                mirror_after[user] = state
            self._mirror[index] = mirror_after
            return
        for user, state in entries:
            if state is None:
                if mirror.pop(user, None) is not None:
                    self._changes[user] = None
            elif mirror.get(user) != state:
                mirror[user] = state
                self._changes[user] = state

    def shard_missing(self, index: ShardIndex) -> None:
        """Shard ``index`` was asked and did not answer: what it had changed may be lost with
        its answer, so it is asked for everything next time."""
        self._full.add(index)

    def shard_gone(self, index: ShardIndex) -> None:
        """Shard ``index``'s incarnation ended: its users are offline here (its next one
        reports its own, from nothing)."""
        for user in self._mirror.pop(index, {}):
            self._changes[user] = None
        self._epochs.pop(index, None)

    def known_shards(self) -> list[ShardIndex]:
        return list(self._epochs)

    def take_delta(self) -> tuple[int, list[Change]]:
        """The changes since the last call with their sequence number (a new one if there
        are any: a delta), or the current number and no changes (a heartbeat)."""
        if not self._changes:
            return self.seq, []
        self.seq += 1
        changes, self._changes = list(self._changes.items()), {}
        return self.seq, changes

    def snapshot(self) -> dict[int, Channels]:
        """Every user online here and their channels: the state at ``seq`` provided no change
        is pending (take the delta first)."""
        users: dict[int, Channels] = {}
        for mirror in self._mirror.values():
            users.update(mirror)
        return users

    def due_snapshot(self, now: float) -> bool:
        """Whether to store a snapshot now (asked for, or :data:`RESNAPSHOT` since the last);
        at most one per call (a tick). Resets the request."""
        if self.snapshot_wanted or now - self.last_snapshot >= RESNAPSHOT:
            self.snapshot_wanted = False
            self.last_snapshot = now
            return True
        return False

    def users(self) -> int:
        return sum(len(m) for m in self._mirror.values())


# -- the other hosts --------------------------------------------------------------------------


class HostState:
    """One host's presence: user → channels, and channel → users (for the queries)."""

    __slots__ = ("channels", "users")

    def __init__(self) -> None:
        self.users: dict[int, Channels] = {}
        self.channels: dict[int, set[int]] = {}

    @classmethod
    def of(cls, users: Mapping[int, Channels]) -> HostState:
        """Built from a snapshot (by the link's worker thread, off the router's)."""
        state = cls()
        state.users = dict(users)
        index = state.channels
        for user, channels in users.items():
            for channel in channels:
                members = index.get(channel)
                if members is None:
                    index[channel] = {user}
                else:
                    members.add(user)
        return state

    def apply(self, changes: Iterable[Change]) -> None:
        users, index = self.users, self.channels
        for user, state in changes:
            before = users.pop(user, NO_CHANNELS)
            if state is not None:
                users[user] = state
            after = NO_CHANNELS if state is None else state
            for channel in before:
                if channel not in after:
                    members = index.get(channel)
                    if members is not None:
                        members.discard(user)
                        if not members:
                            del index[channel]
            for channel in after:
                if channel not in before:
                    index.setdefault(channel, set()).add(user)


@dataclass(frozen=True, slots=True)
class PresenceNews:
    """A presence message from another host (its presence topic), opened and checked by the
    link: ``kind`` ``"delta"`` (``changes`` empty: a heartbeat), ``"snapshot"`` (the host
    stored its snapshot at ``seq``), or ``"leave"`` (the host left cleanly)."""

    host: str
    kind: str
    generation: str
    seq: int
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """A host's stored snapshot, read and checked by the link (None where there was none, or
    it did not verify)."""

    host: str
    generation: str
    seq: int
    state: HostState


@dataclass(frozen=True, slots=True)
class Fetch:
    """Read host ``host``'s stored snapshot (the link answers with a :class:`LoadedSnapshot`,
    or a failure)."""

    host: str


@dataclass(frozen=True, slots=True)
class AskSnapshot:
    """Ask host ``host`` to store a fresh snapshot (it announces it on the presence topic)."""

    host: str


Action = Fetch | AskSnapshot


@dataclass(slots=True)
class Replica:
    """Another host's presence as this host knows it."""

    generation: str
    expires: float
    seq: int = 0
    state: HostState | None = None  # None until a snapshot was installed
    syncing: bool = True
    latest: int = 0  # the highest ``seq`` heard of (deltas and heartbeats)
    buffered: deque[PresenceNews] = field(default_factory=lambda: deque(maxlen=MAX_BUFFERED))
    fetching: bool = False  # a Fetch is in flight
    asked: float = float("-inf")  # when it last asked the host for a fresh snapshot
    since: float = 0.0  # when the sync started, or last moved on


class Replicas:
    """Every other host's presence, fed by what the link hears; queries are answered from
    here (no Redis read). Counters for ``router_stats``: ``presence_deltas`` applied,
    ``presence_gaps`` found, ``presence_syncs`` completed, ``presence_fetches`` and
    ``presence_asks`` made, ``presence_expired`` hosts dropped for silence."""

    def __init__(self, ttl: float = PRESENCE_TTL) -> None:
        self.ttl = ttl
        self.hosts: dict[str, Replica] = {}
        self.settled = SETTLE  # see link_up
        self.counters = dict.fromkeys(
            (
                "presence_deltas",
                "presence_gaps",
                "presence_syncs",
                "presence_fetches",
                "presence_asks",
                "presence_expired",
            ),
            0,
        )

    # -- what the link heard ----------------------------------------------------------------

    def news(self, news: PresenceNews, now: float) -> list[Action]:
        if news.kind == "leave":
            self.hosts.pop(news.host, None)
            return []
        replica = self.hosts.get(news.host)
        start = replica is None or replica.generation != news.generation
        if replica is None or start:
            replica = self.hosts[news.host] = Replica(news.generation, now + self.ttl, since=now)
        replica.expires = now + self.ttl
        replica.latest = max(replica.latest, news.seq)
        if news.kind == "snapshot":
            if not replica.syncing and news.seq > replica.seq:  # we missed deltas: a gap
                self.counters["presence_gaps"] += 1
                replica.syncing, replica.since = True, now
            return self._fetch(replica, news.host) if replica.syncing else []
        if not replica.syncing:
            if news.seq <= replica.seq:
                return []  # a heartbeat, or an old copy
            if news.changes and news.seq == replica.seq + 1:
                assert replica.state is not None
                replica.state.apply(news.changes)
                replica.seq = news.seq
                self.counters["presence_deltas"] += 1
                return []
            self.counters["presence_gaps"] += 1
            replica.syncing, replica.since, start = True, now, True
        if news.changes and news.seq > replica.seq:
            replica.buffered.append(news)
        # a sync starts with a read of the stored snapshot; then only the host's announcement
        # of a fresh one (asked for by loaded() or tick()) makes it read again
        return self._fetch(replica, news.host) if start else []

    def loaded(self, host: str, snapshot: LoadedSnapshot | None, now: float) -> list[Action]:
        """The link read ``host``'s stored snapshot (None: there was none that verified)."""
        replica = self.hosts.get(host)
        if replica is None:
            return []
        replica.fetching = False
        if not replica.syncing:
            return []
        if snapshot is None or snapshot.generation != replica.generation:
            return self._ask(replica, host, now)
        if replica.state is None or snapshot.seq > replica.seq:
            replica.state, replica.seq = snapshot.state, snapshot.seq
        pending = sorted(replica.buffered, key=lambda n: n.seq)
        replica.buffered.clear()
        for news in pending:
            if news.seq == replica.seq + 1:
                assert replica.state is not None
                replica.state.apply(news.changes)
                replica.seq = news.seq
            elif news.seq > replica.seq + 1:
                replica.buffered.append(news)
        if replica.seq >= replica.latest:
            replica.syncing = False
            replica.buffered.clear()
            self.counters["presence_syncs"] += 1
            return []
        replica.since = now
        return self._ask(replica, host, now)

    def tick(self, now: float) -> list[Action]:
        """Drop the hosts not heard of for ``ttl``; a replica syncing for RESYNC_RETRY asks
        again."""
        actions: list[Action] = []
        for host, replica in list(self.hosts.items()):
            if now >= replica.expires:
                del self.hosts[host]
                self.counters["presence_expired"] += 1
            elif replica.syncing and now - replica.since >= RESYNC_RETRY:
                replica.since = now
                replica.fetching = False
                actions += self._ask(replica, host, now)
        return actions

    def link_up(self, now: float) -> None:
        """The link (re)connected: until every host has been heard of again (a heartbeat a
        second, and a read), what the replicas say may be incomplete."""
        self.settled = now + SETTLE

    def in_sync(self, now: float) -> bool:
        """Whether the replicas may be taken as whole: past the settling time after the
        link came up, and no replica syncing (one that is may be behind, or empty)."""
        return now >= self.settled and not any(r.syncing for r in self.hosts.values())

    def _fetch(self, replica: Replica, host: str) -> list[Action]:
        if replica.fetching:
            return []
        replica.fetching = True
        self.counters["presence_fetches"] += 1
        return [Fetch(host)]

    def _ask(self, replica: Replica, host: str, now: float) -> list[Action]:
        """Ask the host for a fresh snapshot (at most once per RESYNC_RETRY): its
        announcement makes this replica read it."""
        if now - replica.asked < RESYNC_RETRY:
            return []
        replica.asked = now
        self.counters["presence_asks"] += 1
        return [AskSnapshot(host)]

    # -- queries -----------------------------------------------------------------------------

    def _states(self) -> list[HostState]:
        return [r.state for r in self.hosts.values() if r.state is not None]

    def online_users(self) -> list[int]:
        users: set[int] = set()
        for state in self._states():
            users.update(state.users)
        return sorted(users)

    def online_in(self, channel: int) -> list[int]:
        users: set[int] = set()
        for state in self._states():
            users.update(state.channels.get(channel, ()))
        return sorted(users)

    def are_online(self, users: Iterable[int]) -> list[int]:
        states = self._states()
        return sorted({u for u in users if any(u in s.users for s in states)})

    def statistics(self) -> dict[str, int]:
        syncing = sum(r.syncing for r in self.hosts.values())
        users = sum(len(s.users) for s in self._states())
        return {
            **self.counters,
            "presence_hosts": len(self.hosts),
            "presence_syncing": syncing,
            "presence_users": users,
        }
