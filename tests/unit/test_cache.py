"""actors.cache: UserConnectionCache indexes and the Delta of every mutation."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from actors.cache import Delta, UserConnectionCache

CONNS = st.integers(min_value=1, max_value=8)
USERS = st.integers(min_value=1, max_value=3)
CHANNELS = st.integers(min_value=1, max_value=4)
ALL_CHANNELS = range(1, 5)
ALL_USERS = range(1, 4)
LIMIT = 2  # channels per connection in the state machine (fewer than CHANNELS: it is reached)


def _check_delta(delta: Delta, before: set[int], after: set[int]) -> None:
    """The delta is exactly the channels that went 0 → ≥1 (gained) and ≥1 → 0 (lost) members."""
    assert len(delta.gained) == len(set(delta.gained)), delta
    assert len(delta.lost) == len(set(delta.lost)), delta
    assert set(delta.gained) == after - before
    assert set(delta.lost) == before - after
    assert bool(delta) == (before != after)


class CacheMachine(RuleBasedStateMachine):
    """Random connect / disconnect / (un)subscribe(_user) against a model conn -> (user, chans)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = UserConnectionCache(max_channels=LIMIT)
        self.model: dict[int, tuple[int, set[int]]] = {}
        # what the CacheActor does: merge every delta until the next flush to the router
        self.pending = Delta()
        self.flushed: set[int] = set()
        # the journal, replayed: (conn, channel) memberships and (channel, user) ones
        self.cache.journal = []
        self.replayed_conns: set[tuple[int, int]] = set()
        self.replayed_users: set[tuple[int, int]] = set()

    # -- the model ------------------------------------------------------------------------

    def active(self) -> set[int]:
        return {c for _user, chans in self.model.values() for c in chans}

    def conns_of(self, user: int) -> set[int]:
        return {conn for conn, (u, _chans) in self.model.items() if u == user}

    def may_join(self, conn: int, channel: int) -> bool:
        chans = self.model[conn][1]
        return channel in chans or len(chans) < LIMIT

    def apply(self, delta: Delta, before: set[int]) -> None:
        _check_delta(delta, before, self.active())
        self.pending.merge(delta)

    # -- rules ----------------------------------------------------------------------------

    @rule(conn=CONNS, user=USERS, channels=st.lists(CHANNELS, max_size=5))
    def connect(self, conn, user, channels):
        before = self.active()
        if conn in self.model:
            with pytest.raises(ValueError):
                self.cache.connect(conn, user, channels, now=0.0)
            return
        delta = self.cache.connect(conn, user, channels, now=0.0)
        self.model[conn] = (user, set(channels))
        self.apply(delta, before)

    @rule(conn=CONNS)
    def disconnect(self, conn):
        before = self.active()
        delta = self.cache.disconnect(conn)
        self.model.pop(conn, None)
        self.apply(delta, before)

    @rule(conn=CONNS, channel=CHANNELS)
    def subscribe(self, conn, channel):
        before = self.active()
        allowed = conn in self.model and self.may_join(conn, channel)
        assert self.cache.can_join(conn, channel) == allowed
        delta = self.cache.subscribe(conn, channel)
        if allowed:
            self.model[conn][1].add(channel)
        self.apply(delta, before)

    @rule(conn=CONNS, channel=CHANNELS)
    def unsubscribe(self, conn, channel):
        before = self.active()
        delta = self.cache.unsubscribe(conn, channel)
        if conn in self.model:
            self.model[conn][1].discard(channel)
        self.apply(delta, before)

    @rule(user=USERS, channel=CHANNELS)
    def subscribe_user(self, user, channel):
        before = self.active()
        delta, count, limited = self.cache.subscribe_user(user, channel)
        conns = {conn for conn in self.conns_of(user) if self.may_join(conn, channel)}
        assert (count, limited) == (len(conns), len(self.conns_of(user)) - len(conns))
        for conn in conns:
            self.model[conn][1].add(channel)
        self.apply(delta, before)

    @rule(user=USERS, channel=CHANNELS)
    def unsubscribe_user(self, user, channel):
        before = self.active()
        delta, count = self.cache.unsubscribe_user(user, channel)
        conns = self.conns_of(user)
        assert count == len(conns)
        for conn in conns:
            self.model[conn][1].discard(channel)
        self.apply(delta, before)

    @rule()
    def flush(self):
        """The merged delta since the last flush is the net change of the shard's channels."""
        now = self.active()
        _check_delta(self.pending, self.flushed, now)
        self.pending = Delta()
        self.flushed = now

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def merged_delta_is_net_change(self):
        _check_delta(self.pending, self.flushed, self.active())

    @invariant()
    def journal_replays_to_the_model(self):
        """Every change is journaled once, in order, with the user's first in and last out."""
        for conn, channel, user, subscribed, user_changed in self.cache.take_journal():
            assert self.model.get(conn, (user,))[0] == user
            key = (conn, channel)
            assert (key in self.replayed_conns) != subscribed  # a real change, each time
            self.replayed_conns.add(key) if subscribed else self.replayed_conns.discard(key)
            others = any(c != conn and (c, channel) in self.replayed_conns
                         for c in self.conns_of(user) | {conn})  # fmt: skip
            assert user_changed == (not others)
            if user_changed:
                self.replayed_users.add(
                    (channel, user)
                ) if subscribed else self.replayed_users.remove((channel, user))
        assert self.replayed_conns == {
            (conn, c) for conn, (_u, chans) in self.model.items() for c in chans
        }
        assert self.replayed_users == {
            (c, u) for _conn, (u, chans) in self.model.items() for c in chans
        }

    @invariant()
    def users_match_model(self):
        users = {user for user, _chans in self.model.values()}
        assert self.cache.online_users() == sorted(users)
        for user in ALL_USERS:
            assert self.cache.connections_of(user) == frozenset(self.conns_of(user))
            assert sorted(self.cache.recipients_of_users([user])) == sorted(self.conns_of(user))
            assert self.cache.is_online(user) == (user in users)

    @invariant()
    def channels_match_model(self):
        assert self.cache.channels() == sorted(self.active())
        for channel in ALL_CHANNELS:
            subscribed = {conn for conn, (_u, chans) in self.model.items() if channel in chans}
            members = {self.model[conn][0] for conn in subscribed}
            recipients = self.cache.recipients(channel)
            assert len(recipients) == len(set(recipients))
            assert set(recipients) == subscribed
            assert self.cache.online_users_in_channel(channel) == sorted(members)

    @invariant()
    def meta_matches_model(self):
        for conn in range(1, 9):
            meta = self.cache.meta(conn)
            if conn in self.model:
                assert meta is not None
                assert meta.user == self.model[conn][0]
                assert set(meta.channels) == self.model[conn][1]
                assert len(meta.channels) == len(set(meta.channels))  # no duplicates
            else:
                assert meta is None

    @invariant()
    def stats_match_model(self):
        assert self.cache.stats() == {
            "connections": len(self.model),
            "users": len({user for user, _chans in self.model.values()}),
            "channels": len(self.active()),
        }


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# -- examples ---------------------------------------------------------------------------------


def test_connect_reports_gained_channels_once():
    cache = UserConnectionCache()
    delta = cache.connect(1, 10, [5, 6, 5], now=0.0)
    assert sorted(delta.gained) == [5, 6]
    assert delta.lost == []
    # a second member of the same channels changes nothing for the shard
    assert not cache.connect(2, 11, [5, 6], now=0.0)
    assert cache.online_users_in_channel(5) == [10, 11]


def test_channel_kept_while_any_connection_of_any_user_is_subscribed():
    cache = UserConnectionCache()
    cache.connect(1, 10, [5], now=0.0)
    cache.connect(2, 10, [5], now=0.0)
    assert not cache.unsubscribe(1, 5)
    assert cache.online_users_in_channel(5) == [10]
    assert cache.recipients(5) == (2,)
    delta = cache.disconnect(2)
    assert delta.lost == [5]
    assert cache.channels() == []
    assert cache.recipients(5) == ()
    assert cache.online_users_in_channel(5) == []


def test_duplicate_connect_raises_and_changes_nothing():
    cache = UserConnectionCache()
    cache.connect(1, 10, [5], now=0.0)
    with pytest.raises(ValueError):
        cache.connect(1, 11, [6], now=1.0)
    assert cache.online_users() == [10]
    assert cache.channels() == [5]
    assert cache.meta(1).user == 10


def test_operations_on_unknown_connections_and_users_are_no_ops():
    cache = UserConnectionCache()
    assert not cache.disconnect(99)
    assert not cache.subscribe(99, 1)
    assert not cache.unsubscribe(99, 1)
    delta, count, limited = cache.subscribe_user(7, 1)
    assert (bool(delta), count, limited) == (False, 0, 0)
    delta, count = cache.unsubscribe_user(7, 1)
    assert (bool(delta), count) == (False, 0)
    cache.touch(99, now=5.0)
    assert cache.stats() == {"connections": 0, "users": 0, "channels": 0}
    assert cache.meta(99) is None


def test_subscribe_user_applies_to_every_connection_of_the_user():
    cache = UserConnectionCache()
    cache.connect(1, 10, [], now=0.0)
    cache.connect(2, 10, [3], now=0.0)
    cache.connect(3, 11, [], now=0.0)
    delta, count, limited = cache.subscribe_user(10, 3)
    assert (count, limited) == (2, 0)
    assert not delta  # the shard already had a member of 3
    assert sorted(cache.recipients(3)) == [1, 2]
    delta, count = cache.unsubscribe_user(10, 3)
    assert count == 2
    assert delta.lost == [3]


def test_a_connection_holds_at_most_max_channels():
    cache = UserConnectionCache(max_channels=2)
    cache.connect(1, 10, [1], now=0.0)
    assert cache.can_join(1, 2)
    assert cache.subscribe(1, 2).gained == [2]
    assert not cache.can_join(1, 3)
    assert not cache.subscribe(1, 3)  # refused: nothing changes
    assert cache.meta(1).channels == (1, 2)
    assert cache.recipients(3) == ()
    assert cache.can_join(1, 2)  # one it holds already: a no-op, never refused
    cache.unsubscribe(1, 1)
    assert cache.can_join(1, 3)  # room again
    assert not cache.can_join(99, 3)  # unknown connection


def test_subscribe_user_skips_the_connections_at_the_limit_and_counts_them():
    cache = UserConnectionCache(max_channels=1)
    cache.connect(1, 10, [5], now=0.0)  # full
    cache.connect(2, 10, [], now=0.0)
    cache.connect(3, 10, [7], now=0.0)  # full, but holds 7 already
    delta, count, limited = cache.subscribe_user(10, 7)
    assert (count, limited) == (2, 1)
    assert sorted(cache.recipients(7)) == [2, 3]
    assert not delta  # 7 had a member already
    delta, count, limited = cache.subscribe_user(10, 9)
    assert (count, limited, delta.gained) == (0, 3, [])
    assert cache.recipients(9) == ()


def test_without_a_limit_a_connection_takes_any_number_of_channels():
    cache = UserConnectionCache()
    cache.connect(1, 10, [], now=0.0)
    for channel in range(1, 2001):
        cache.subscribe(1, channel)
    assert len(cache.meta(1).channels) == 2000


def test_recipients_cache_is_invalidated_by_changes():
    cache = UserConnectionCache()
    cache.connect(1, 10, [5], now=0.0)
    assert cache.recipients(5) == (1,)
    cache.connect(2, 11, [5], now=0.0)
    assert sorted(cache.recipients(5)) == [1, 2]
    cache.unsubscribe(1, 5)
    assert cache.recipients(5) == (2,)
    cache.subscribe(1, 5)
    assert sorted(cache.recipients(5)) == [1, 2]
    cache.disconnect(2)
    assert cache.recipients(5) == (1,)


def test_stale_lists_connections_silent_for_more_than_timeout():
    cache = UserConnectionCache()
    cache.connect(1, 10, [], now=0.0)
    cache.connect(2, 11, [], now=15.0)
    cache.connect(3, 12, [], now=10.0)
    assert cache.stale(now=20.0, timeout=10.0) == [1]  # 3 is silent for exactly the timeout
    assert sorted(cache.stale(now=25.5, timeout=10.0)) == [1, 2, 3]
    assert cache.stale(now=9.0, timeout=10.0) == []


def test_touch_refreshes_activity_and_never_goes_back():
    cache = UserConnectionCache()
    cache.connect(1, 10, [], now=0.0)
    cache.touch(1, now=12.0)
    meta = cache.meta(1)
    assert meta.last_activity == 12.0
    assert meta.connected_at == 0.0
    cache.touch(1, now=3.0)  # a late, older report
    assert cache.meta(1).last_activity == 12.0
    assert cache.stale(now=20.0, timeout=10.0) == []
    assert cache.stale(now=22.5, timeout=10.0) == [1]


def test_stale_connections_are_forgotten_after_disconnect():
    cache = UserConnectionCache()
    cache.connect(1, 10, [4], now=0.0)
    cache.connect(2, 10, [], now=50.0)
    stale = cache.stale(now=55.0, timeout=30.0)
    assert stale == [1]
    delta = cache.disconnect(stale[0])
    assert delta.lost == [4]
    assert cache.stale(now=55.0, timeout=30.0) == []
    assert cache.is_online(10)


def test_stats():
    cache = UserConnectionCache()
    assert cache.stats() == {"connections": 0, "users": 0, "channels": 0}
    cache.connect(1, 10, [1, 2], now=0.0)
    cache.connect(2, 10, [2, 3], now=0.0)
    cache.connect(3, 11, [], now=0.0)
    assert cache.stats() == {"connections": 3, "users": 2, "channels": 3}
    cache.disconnect(1)
    assert cache.stats() == {"connections": 2, "users": 2, "channels": 2}
    cache.disconnect(3)
    assert cache.stats() == {"connections": 1, "users": 1, "channels": 2}


# -- Delta.merge ------------------------------------------------------------------------------


def test_delta_bool():
    assert not Delta()
    assert Delta(gained=[1])
    assert Delta(lost=[1])


def test_delta_merge_accumulates_disjoint_changes():
    delta = Delta(gained=[1], lost=[2])
    delta.merge(Delta(gained=[3], lost=[4]))
    assert (delta.gained, delta.lost) == ([1, 3], [2, 4])


def test_delta_merge_gain_then_loss_cancels():
    delta = Delta(gained=[1])
    delta.merge(Delta(lost=[1]))
    assert (delta.gained, delta.lost) == ([], [])
    assert not delta


def test_delta_merge_loss_then_gain_cancels():
    delta = Delta(lost=[1])
    delta.merge(Delta(gained=[1]))
    assert not delta


def test_delta_merge_gain_loss_gain_is_a_gain():
    delta = Delta()
    for step in (Delta(gained=[7]), Delta(lost=[7]), Delta(gained=[7])):
        delta.merge(step)
    assert (delta.gained, delta.lost) == ([7], [])


def test_delta_merge_leaves_other_unchanged():
    other = Delta(gained=[1], lost=[2])
    Delta(gained=[2], lost=[1]).merge(other)
    assert (other.gained, other.lost) == ([1], [2])


def test_the_journal_is_off_by_default_and_says_who_joined_and_left():
    cache = UserConnectionCache()
    cache.connect(1, 10, [5], now=0.0)
    assert cache.journal is None and cache.take_journal() == []
    cache.journal = []
    cache.connect(2, 10, [5, 6], now=0.0)
    cache.unsubscribe(1, 5)
    cache.disconnect(2)
    assert cache.take_journal() == [
        (2, 5, 10, True, False),  # 10 was in 5 already (connection 1)
        (2, 6, 10, True, True),
        (1, 5, 10, False, False),  # 2 is still in 5
        (2, 5, 10, False, True),
        (2, 6, 10, False, True),
    ]
    assert cache.take_journal() == []
    assert [conn for conn, _meta in cache.connections()] == [1]
