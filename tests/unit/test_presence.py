"""actors.presence: this host's presence (LocalPresence) and the replicas of the other hosts'
(Replicas), driven call by call, and a property: whatever is lost or repeated on the way, a
replica that has caught up shows exactly what the host has."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.ids import ShardIndex
from actors.presence import (
    PRESENCE_TTL,
    RESNAPSHOT,
    RESYNC_RETRY,
    SETTLE,
    AskSnapshot,
    Fetch,
    HostState,
    LoadedSnapshot,
    LocalPresence,
    PresenceNews,
    Replicas,
    channels_of,
)

S0, S1 = ShardIndex(0), ShardIndex(1)

# -- this host ----------------------------------------------------------------------------------


def test_a_shard_s_first_answer_is_everything_and_becomes_one_delta():
    local = LocalPresence("g")
    assert local.wants_full(S0, 1)
    local.shard_answer(S0, 1, True, [(1, (5,)), (2, ())])
    assert not local.wants_full(S0, 1)
    assert local.take_delta() == (1, [(1, (5,)), (2, ())])
    assert local.take_delta() == (1, [])  # nothing new: a heartbeat at the same seq
    assert local.snapshot() == {1: (5,), 2: ()}


def test_changes_are_only_what_differs_and_a_user_offline_is_none():
    local = LocalPresence("g")
    local.shard_answer(S0, 1, True, [(1, (5,)), (2, ())])
    local.take_delta()
    local.shard_answer(S0, 1, False, [(1, (5,)), (2, (7,)), (3, None)])  # 1 unchanged, 3 unknown
    assert local.take_delta() == (2, [(2, (7,))])
    local.shard_answer(S0, 1, False, [(1, None)])
    assert local.take_delta() == (3, [(1, None)])
    assert local.snapshot() == {2: (7,)}


def test_a_full_answer_after_changes_were_lost_sends_the_difference():
    local = LocalPresence("g")
    local.shard_answer(S0, 1, True, [(1, ()), (2, ())])
    local.take_delta()
    local.shard_missing(S0)  # its answer was lost, with what it had changed
    assert local.wants_full(S0, 1)
    local.shard_answer(S0, 1, True, [(2, (4,)), (3, ())])
    _seq, changes = local.take_delta()
    assert sorted(changes, key=lambda c: c[0]) == [(1, None), (2, (4,)), (3, ())]


def test_a_restarted_shard_s_users_go_offline_and_its_new_incarnation_is_asked_everything():
    local = LocalPresence("g")
    local.shard_answer(S0, 1, True, [(1, ())])
    local.shard_answer(S1, 1, True, [(2, ())])
    local.take_delta()
    local.shard_gone(S0)
    assert local.take_delta() == (2, [(1, None)])
    assert local.wants_full(S0, 2)
    local.shard_answer(S0, 2, False, [(9, ())])  # changes of an incarnation never seen whole
    assert local.take_delta() == (2, []) and local.wants_full(S0, 2)
    local.shard_answer(S0, 2, True, [(1, (3,))])
    assert local.take_delta() == (3, [(1, (3,))])
    assert local.snapshot() == {1: (3,), 2: ()}


def test_a_snapshot_is_due_when_asked_and_every_resnapshot_seconds_once_per_call():
    local = LocalPresence("g")
    assert local.due_snapshot(10.0)  # the first one
    assert not local.due_snapshot(11.0)
    local.snapshot_wanted = True
    assert local.due_snapshot(12.0) and not local.due_snapshot(12.5)
    assert local.due_snapshot(12.0 + RESNAPSHOT)


# -- replicas -----------------------------------------------------------------------------------


def news(seq: int, changes=(), kind="delta", host="h1", generation="g") -> PresenceNews:
    return PresenceNews(host, kind, generation, seq, tuple(changes))


def loaded(seq: int, users, host="h1", generation="g") -> LoadedSnapshot:
    return LoadedSnapshot(host, generation, seq, HostState.of(users))


def synced(replicas: Replicas, seq: int, users, now: float = 0.0) -> None:
    assert replicas.news(news(seq), now) == [Fetch("h1")]
    assert replicas.loaded("h1", loaded(seq, users), now) == []


def test_an_unknown_host_is_read_from_its_snapshot_then_follows_its_deltas():
    replicas = Replicas()
    synced(replicas, 4, {1: (7,), 2: ()})
    assert replicas.online_users() == [1, 2] and replicas.online_in(7) == [1]
    assert replicas.news(news(5, [(3, (7,)), (1, None)]), 0.5) == []
    assert replicas.online_users() == [2, 3] and replicas.online_in(7) == [3]
    assert replicas.are_online([1, 2, 9]) == [2]
    assert replicas.news(news(5), 1.0) == []  # a heartbeat: in sync
    assert replicas.statistics()["presence_deltas"] == 1


def test_a_lost_delta_is_a_gap_the_replica_fills_from_the_snapshot_and_what_it_buffered():
    replicas = Replicas()
    synced(replicas, 1, {1: ()})
    assert replicas.news(news(3, [(3, ())]), 1.0) == [Fetch("h1")]  # 2 was lost
    assert replicas.news(news(4, [(4, ())]), 1.1) == []  # buffered, no second read
    assert replicas.loaded("h1", loaded(2, {1: (), 2: ()}), 1.2) == []
    assert replicas.online_users() == [1, 2, 3, 4]
    assert replicas.statistics()["presence_gaps"] == 1


def test_a_heartbeat_ahead_of_the_replica_is_a_gap_too():
    replicas = Replicas()
    synced(replicas, 1, {1: ()})
    assert replicas.news(news(2), 1.0) == [Fetch("h1")]  # delta 2 never came
    assert replicas.loaded("h1", loaded(2, {}), 1.1) == []
    assert replicas.online_users() == []


def test_a_stale_snapshot_makes_the_replica_ask_the_host_for_a_fresh_one():
    replicas = Replicas()
    replicas.news(news(9), 0.0)
    assert replicas.loaded("h1", loaded(5, {1: ()}), 0.1) == [AskSnapshot("h1")]
    assert replicas.online_users() == [1]  # what it has meanwhile
    assert replicas.news(news(9, kind="snapshot"), 0.5) == [Fetch("h1")]
    assert replicas.loaded("h1", loaded(9, {2: ()}), 0.6) == []
    assert replicas.online_users() == [2]


def test_no_snapshot_or_another_generation_s_asks_for_a_fresh_one_at_most_every_retry():
    replicas = Replicas()
    replicas.news(news(1), 0.0)
    assert replicas.loaded("h1", None, 0.1) == [AskSnapshot("h1")]
    replicas.news(news(1, kind="snapshot"), 0.2)
    assert replicas.loaded("h1", loaded(1, {}, generation="old"), 0.3) == []  # asked just now
    assert replicas.tick(0.1 + RESYNC_RETRY) == [AskSnapshot("h1")]


def test_a_new_generation_starts_over_from_nothing():
    replicas = Replicas()
    synced(replicas, 7, {1: ()})
    assert replicas.news(news(1, [(2, ())], generation="g2"), 1.0) == [Fetch("h1")]
    assert replicas.online_users() == []  # the old generation's users are gone with it
    replicas.loaded("h1", loaded(0, {}, generation="g2"), 1.1)
    assert replicas.online_users() == [2]


def test_a_silent_host_fades_out_and_a_leaving_one_at_once():
    replicas = Replicas()
    synced(replicas, 1, {1: ()}, now=0.0)
    replicas.tick(PRESENCE_TTL - 0.1)
    assert replicas.online_users() == [1]
    replicas.tick(PRESENCE_TTL)
    assert replicas.online_users() == [] and replicas.statistics()["presence_expired"] == 1
    synced(replicas, 1, {1: ()}, now=10.0)
    replicas.news(news(0, kind="leave", generation=""), 10.5)
    assert replicas.hosts == {}


def test_a_failed_read_asks_the_host_and_the_next_retry_asks_again():
    replicas = Replicas()
    replicas.news(news(3), 0.0)
    assert replicas.loaded("h1", None, 0.1) == [AskSnapshot("h1")]  # Redis failed the read
    assert replicas.tick(1.0) == []
    assert replicas.tick(0.1 + RESYNC_RETRY) == [AskSnapshot("h1")]  # no announcement came


def test_an_announcement_ahead_of_an_in_sync_replica_is_a_gap():
    replicas = Replicas()
    synced(replicas, 3, {1: ()})
    assert replicas.news(news(3, kind="snapshot"), 1.0) == []  # the one it has
    assert replicas.news(news(5, kind="snapshot"), 1.1) == [Fetch("h1")]  # deltas 4, 5 lost
    assert replicas.statistics()["presence_gaps"] == 1


def test_the_replicas_are_whole_only_once_settled_after_the_link_came_up_and_none_syncs():
    replicas = Replicas()
    replicas.link_up(100.0)
    assert not replicas.in_sync(100.0)  # the other hosts have not been heard of yet
    replicas.news(news(1), 100.5)
    replicas.loaded("h1", loaded(1, {}), 100.6)
    assert not replicas.in_sync(101.9) and replicas.in_sync(100.0 + SETTLE)
    replicas.news(news(3), 103.0)  # a gap: syncing
    assert not replicas.in_sync(103.0)
    replicas.loaded("h1", loaded(3, {}), 103.1)
    assert replicas.in_sync(103.1)


def test_host_state_keeps_both_indexes_in_step():
    state = HostState.of({1: (5, 6), 2: (5,)})
    state.apply([(1, (6, 7)), (2, None), (3, ())])
    assert state.users == {1: (6, 7), 3: ()}
    assert state.channels == {6: {1}, 7: {1}}
    assert channels_of([3, 1, 3]) == (1, 3) and channels_of(None) is None


# -- the property -------------------------------------------------------------------------------

USERS = list(range(1, 13))
CHANNELS = [100, 101, 102]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 40))
def test_a_replica_converges_on_the_host_whatever_is_lost_or_repeated(seed: int, rounds: int):
    """A host with two shards changes its users at random every tick; its messages to one
    replica are lost, repeated or delayed at random, and so are the answers to its reads. Once
    the losses stop, within a few ticks the replica shows exactly the host's presence."""
    rng = random.Random(seed)
    truth: dict[int, dict[int, tuple[int, ...]]] = {0: {}, 1: {}}  # shard -> user -> channels
    epochs = {0: 1, 1: 1}
    local = LocalPresence("g")
    replicas = Replicas()
    snapshot: tuple[int, dict[int, tuple[int, ...]]] | None = None  # what Redis keeps
    late: list[PresenceNews] = []
    now = 0.0

    def shard_of(user: int) -> int:
        return user % 2

    def tick(lossy: bool) -> None:
        nonlocal snapshot, now
        now += 1.0
        for _ in range(rng.randrange(4) if lossy else 0):  # the world changes
            user = rng.choice(USERS)
            shard = truth[shard_of(user)]
            if rng.random() < 0.3:
                shard.pop(user, None)
            else:
                shard[user] = channels_of(rng.sample(CHANNELS, rng.randrange(3)))  # type: ignore[assignment]
        if lossy and rng.random() < 0.05:  # a shard restarts: its users are gone
            index = rng.randrange(2)
            epochs[index] += 1
            truth[index] = {}
        for index in (0, 1):  # the pull: a shard's answer may be lost (then: everything next)
            epoch = epochs[index]
            full = local.wants_full(ShardIndex(index), epoch)
            if lossy and rng.random() < 0.1:
                local.shard_missing(ShardIndex(index))
                continue
            entries = [(u, c) for u, c in truth[index].items()]
            if not full:  # a changes answer: some users, some unchanged, the offline as None
                entries = [(u, truth[index].get(u)) for u in USERS if shard_of(u) == index]
            local.shard_answer(ShardIndex(index), epoch, full, entries)
        seq, changes = local.take_delta()
        if local.due_snapshot(now):
            snapshot = (seq, local.snapshot())
            outgoing = [PresenceNews("h1", "delta", "g", seq, tuple(changes))]
            outgoing.append(PresenceNews("h1", "snapshot", "g", seq))
        else:
            outgoing = [PresenceNews("h1", "delta", "g", seq, tuple(changes))]
        if lossy:
            outgoing = [m for m in outgoing if rng.random() > 0.2]
            outgoing += [m for m in outgoing if rng.random() < 0.1]  # repeated
            if rng.random() < 0.2:
                late.extend(outgoing)
                outgoing = []
            elif late and rng.random() < 0.5:
                outgoing, late[:] = late + outgoing, []
        actions = []
        for message in outgoing:
            actions += replicas.news(message, now)
        actions += replicas.tick(now)
        while actions:
            action = actions.pop(0)
            if isinstance(action, AskSnapshot):
                if not lossy or rng.random() > 0.3:
                    local.snapshot_wanted = True
            elif lossy and rng.random() < 0.2:  # Redis failed the read
                actions += replicas.loaded("h1", None, now)
            else:
                stored = None
                if snapshot is not None:
                    stored = LoadedSnapshot("h1", "g", snapshot[0], HostState.of(snapshot[1]))
                actions += replicas.loaded("h1", stored, now)

    for _ in range(rounds):
        tick(lossy=True)
    for _ in range(8):
        tick(lossy=False)
    expected = {u: c for shard in truth.values() for u, c in shard.items()}
    replica = replicas.hosts["h1"]
    assert not replica.syncing
    assert replica.state is not None and replica.state.users == expected
    assert replicas.online_users() == sorted(expected)
    for channel in CHANNELS:
        members = sorted(u for u, c in expected.items() if channel in c)
        assert replicas.online_in(channel) == members
