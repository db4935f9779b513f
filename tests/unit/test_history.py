"""actors.history: offsets, epochs, the size / ttl / memory bounds, recovery and reading."""

from __future__ import annotations

import itertools
import re

import pytest

from actors.history import (
    CHANNEL_COST,
    MESSAGE_COST,
    REPLAY_BYTES,
    HistoryStore,
    Position,
    Recovery,
    new_epoch,
    recovery,
)

BIG = 1 << 30  # a memory bound never reached


def epochs():
    counter = itertools.count(1)
    return lambda: f"e{next(counter)}"


def store(size: int = 4, ttl: float = 10.0, memory: int = BIG) -> HistoryStore:
    return HistoryStore(size, ttl, memory, new_epoch=epochs())


def data(n: int) -> bytes:
    return b'{"n":%d}' % n


def fill(history: HistoryStore, channel: int, count: int, now: float = 0.0) -> list[Position]:
    return [history.append(channel, data(n), now) for n in range(1, count + 1)]


# -- epochs and offsets ------------------------------------------------------------------------


def test_new_epoch_is_12_random_hex_digits():
    made = {new_epoch() for _ in range(100)}
    assert len(made) == 100
    assert all(re.fullmatch(r"[0-9a-f]{12}", epoch) for epoch in made)


def test_offsets_start_at_1_and_are_gapless_per_channel():
    history = store(size=3)
    a = fill(history, 1, 5)
    b = fill(history, 2, 2)
    assert [p.offset for p in a] == [1, 2, 3, 4, 5]
    assert [p.offset for p in b] == [1, 2]
    assert {p.epoch for p in a} == {"e1"}
    assert {p.epoch for p in b} == {"e2"}
    assert history.position(1, 0.0) == Position(5, "e1")


def test_size_bounds_the_messages_kept_and_offsets_keep_counting():
    history = store(size=3)
    fill(history, 1, 5)
    read = history.read(1, 0, 100, 0.0)
    assert read.messages == [(3, data(3)), (4, data(4)), (5, data(5))]
    assert read.offset == 5
    assert history.stats()["messages"] == 3
    expected = CHANNEL_COST + sum(len(data(n)) + MESSAGE_COST for n in (3, 4, 5))
    assert history.stats()["bytes"] == expected


def test_position_creates_a_state_with_a_stable_epoch():
    history = store()
    first = history.position(9, 0.0)
    assert first == Position(0, "e1")
    assert history.position(9, 5.0) == first
    assert history.stats()["channels"] == 1
    assert history.stats()["bytes"] == CHANNEL_COST
    assert history.append(9, data(1), 6.0) == Position(1, "e1")


def test_disabled_store_refuses_appends():
    history = HistoryStore(0, 10.0, BIG)
    assert not history.enabled
    assert store().enabled
    with pytest.raises(ValueError, match="off"):
        history.append(1, data(1), 0.0)


@pytest.mark.parametrize(("size", "ttl", "memory"), [(-1, 1.0, 1), (1, 0.0, 1), (1, 1.0, -1)])
def test_bad_bounds_are_refused(size, ttl, memory):
    with pytest.raises(ValueError):
        HistoryStore(size, ttl, memory)


# -- ttl -----------------------------------------------------------------------------------------


def test_ttl_counts_from_the_last_message_then_a_new_epoch_starts_at_1():
    history = store(ttl=10.0)
    history.append(1, data(1), 0.0)
    history.append(1, data(2), 8.0)
    assert history.append(1, data(3), 18.0) == Position(3, "e1")  # idle exactly ttl: alive
    assert history.append(1, data(4), 28.5) == Position(1, "e2")  # idle > ttl: lost
    stats = history.stats()
    assert stats["expired"] == 1
    assert stats["messages"] == 1
    assert history.read(1, 0, 10, 28.5).messages == [(1, data(4))]


def test_ttl_of_a_created_state_counts_from_its_creation_not_its_reads():
    history = store(ttl=10.0)
    assert history.position(1, 0.0).epoch == "e1"
    assert history.position(1, 9.0).epoch == "e1"
    assert history.position(1, 10.5) == Position(0, "e2")
    assert history.stats()["expired"] == 1


def test_lazy_expiry_on_recover_and_read():
    history = store(ttl=10.0)
    fill(history, 1, 3)
    fill(history, 2, 3)
    result = history.recover(1, 1, "e1", 20.0)
    assert result == Recovery(False, 0, "e3", [])
    result = history.read(2, 0, 10, 20.0)
    assert result == Recovery(True, 0, "e4", [])
    assert history.stats() == {
        "channels": 2,
        "messages": 0,
        "bytes": 2 * CHANNEL_COST,
        "evicted": 0,
        "expired": 2,
    }


def test_expire_drops_only_idle_states_oldest_first():
    history = store(ttl=10.0)
    fill(history, 1, 2, now=0.0)
    fill(history, 2, 2, now=5.0)
    fill(history, 3, 2, now=9.0)
    history.append(1, data(9), 9.5)  # channel 1 is the most recent again
    assert history.expire(15.0) == 0
    assert history.expire(15.5) == 1  # channel 2 (last at 5.0)
    assert history.stats()["channels"] == 2
    assert history.expire(100.0) == 2
    assert history.stats() == {
        "channels": 0,
        "messages": 0,
        "bytes": 0,
        "evicted": 0,
        "expired": 3,
    }
    assert history.position(2, 100.0).offset == 0


# -- memory --------------------------------------------------------------------------------------


def cost(*sizes: int) -> int:
    return CHANNEL_COST + sum(size + MESSAGE_COST for size in sizes)


def test_memory_evicts_the_least_recently_appended_channel_first():
    one = len(data(1))
    history = store(size=10, memory=3 * cost(one, one))
    for channel in (1, 2, 3):
        history.append(channel, data(1), 0.0)
        history.append(channel, data(1), 0.0)
    history.append(1, data(1), 1.0)  # 1 is now the most recent; 2 is the oldest
    stats = history.stats()
    assert stats["evicted"] == 1
    assert stats["channels"] == 2
    assert stats["bytes"] <= history.memory
    assert history.position(1, 1.0) == Position(3, "e1")
    assert history.position(3, 1.0) == Position(2, "e3")
    assert history.position(2, 1.0).epoch not in ("e1", "e2", "e3")  # its history is gone


def test_memory_never_evicts_the_channel_appended_to_but_trims_it():
    one = len(data(1))
    history = store(size=10, memory=cost(one, one, one))
    fill(history, 1, 9)
    stats = history.stats()
    assert stats["evicted"] == 0
    assert stats["channels"] == 1
    assert stats["bytes"] <= history.memory
    kept = history.read(1, 0, 100, 0.0).messages
    assert [offset for offset, _ in kept] == [7, 8, 9]


def test_a_message_bigger_than_the_bound_keeps_its_offset_but_nothing_is_kept():
    history = store(size=10, memory=cost(100))
    history.append(2, data(1), 0.0)  # another channel: not evicted for a message never kept
    fill(history, 1, 2)
    assert history.append(1, b"x" * 200, 0.0) == Position(3, "e2")
    read = history.read(1, 0, 10, 0.0)
    assert read.messages == []
    assert read.offset == 3
    assert not read.recovered  # offset 1 is gone
    assert history.recover(1, 2, "e2", 0.0) == Recovery(False, 3, "e2", [])
    assert history.append(1, data(4), 0.0) == Position(4, "e2")
    assert history.recover(1, 3, "e2", 0.0) == Recovery(True, 4, "e2", [(4, data(4))])
    assert history.stats()["bytes"] <= history.memory


def test_creating_a_state_over_the_bound_evicts_older_ones():
    history = store(memory=2 * CHANNEL_COST)
    history.position(1, 0.0)
    history.position(2, 0.0)
    history.position(3, 1.0)
    stats = history.stats()
    assert stats["channels"] == 2
    assert stats["evicted"] == 1
    assert history.position(2, 1.0) == Position(0, "e2")


def test_eviction_of_an_idle_state_counts_as_expired():
    one = len(data(1))
    history = store(size=10, ttl=10.0, memory=cost(one) + cost(one))
    history.append(1, data(1), 0.0)
    history.append(2, data(1), 5.0)
    history.append(3, data(1), 11.0)  # 1 is past its ttl: expired rather than evicted
    stats = history.stats()
    assert (stats["expired"], stats["evicted"]) == (1, 0)


# -- recover -------------------------------------------------------------------------------------


@pytest.fixture
def five() -> HistoryStore:
    """Channel 1 at offset 7 in epoch e1, keeping offsets 3..7."""
    history = store(size=5)
    fill(history, 1, 7)
    return history


def test_recover_same_epoch_and_kept(five):
    assert five.recover(1, 4, "e1", 0.0) == Recovery(
        True, 7, "e1", [(5, data(5)), (6, data(6)), (7, data(7))]
    )
    # N + 1 is the first kept offset: still nothing missing
    assert five.recover(1, 2, "e1", 0.0).recovered
    assert [o for o, _ in five.recover(1, 2, "e1", 0.0).messages] == [3, 4, 5, 6, 7]


def test_recover_at_the_latest_offset_replays_nothing(five):
    assert five.recover(1, 7, "e1", 0.0) == Recovery(True, 7, "e1", [])


def test_recover_with_another_epoch_is_not_recovered(five):
    assert five.recover(1, 4, "old", 0.0) == Recovery(False, 7, "e1", [])
    assert five.recover(1, 0, "", 0.0) == Recovery(False, 7, "e1", [])


def test_recover_too_old_is_not_recovered(five):
    assert five.recover(1, 1, "e1", 0.0) == Recovery(False, 7, "e1", [])
    assert five.recover(1, 0, "e1", 0.0) == Recovery(False, 7, "e1", [])


def test_recover_ahead_of_the_latest_is_not_recovered(five):
    assert five.recover(1, 8, "e1", 0.0) == Recovery(False, 7, "e1", [])


def test_recover_over_max_bytes_is_not_recovered(five):
    needed = sum(len(data(n)) for n in (5, 6, 7))
    assert five.recover(1, 4, "e1", 0.0, max_bytes=needed).recovered
    assert five.recover(1, 4, "e1", 0.0, max_bytes=needed - 1) == Recovery(False, 7, "e1", [])
    assert REPLAY_BYTES == 8 << 20


def test_recover_of_a_channel_with_no_state_creates_it():
    history = store()
    assert history.recover(5, 0, "", 0.0) == Recovery(False, 0, "e1", [])
    assert history.recover(5, 0, "e1", 0.0) == Recovery(True, 0, "e1", [])
    history.append(5, data(1), 1.0)
    assert history.recover(5, 0, "e1", 1.0) == Recovery(True, 1, "e1", [(1, data(1))])


def test_recovery_decision_checks_the_messages_cover_the_gap():
    at = Position(2, "e")
    full = [(3, b"a"), (4, b"b")]
    assert recovery(at, 1, full, 4, "e", 10) == Recovery(True, 4, "e", full)
    assert not recovery(at, 1, full[:1], 4, "e", 10).recovered  # the store returned fewer
    assert not recovery(at, 1, [(4, b"b")], 4, "e", 10).recovered  # a gap at the start
    assert not recovery(at, 4, full, 4, "e", 10).recovered  # 3 no longer kept
    assert recovery(Position(4, "e"), 5, [], 4, "e", 0) == Recovery(True, 4, "e", [])
    assert not recovery(Position(-1, "e"), 1, [], 4, "e", 10).recovered


# -- read ----------------------------------------------------------------------------------------


def test_read_pages_with_since_and_limit(five):
    page = five.read(1, 0, 2, 0.0)
    assert page == Recovery(False, 7, "e1", [(3, data(3)), (4, data(4))])  # 1..2 are gone
    page = five.read(1, 4, 2, 0.0)
    assert page == Recovery(True, 7, "e1", [(5, data(5)), (6, data(6))])
    page = five.read(1, 6, 2, 0.0)
    assert page == Recovery(True, 7, "e1", [(7, data(7))])
    assert five.read(1, 7, 2, 0.0) == Recovery(True, 7, "e1", [])
    assert five.read(1, 2, 100, 0.0).recovered
    assert len(five.read(1, 2, 100, 0.0).messages) == 5
    assert five.read(1, 9, 5, 0.0) == Recovery(False, 7, "e1", [])
    assert five.read(1, 0, 0, 0.0).messages == []


def test_read_of_an_empty_channel_returns_its_epoch():
    history = store()
    assert history.read(3, 0, 100, 0.0) == Recovery(True, 0, "e1", [])
    assert history.position(3, 0.0) == Position(0, "e1")
