"""actors.critical: the per-user store of critical messages and the per-shard re-send tracker."""

from __future__ import annotations

import random

import pytest

from actors.critical import ENTRY_COST, Critical, CriticalLimit, CriticalStore, CriticalTracker

BIG = 1 << 30


def ids(found: list[Critical]) -> list[str]:
    return [critical.id for critical in found]


# -- CriticalStore -------------------------------------------------------------------------------


def test_ids_are_unique_and_carry_the_prefix():
    store = CriticalStore(10, BIG, prefix="p")
    assert [store.new_id(), store.new_id()] == ["p-1", "p-2"]
    assert store.add([1], b"1", 10.0, 0.0) == "p-3"
    first, second = CriticalStore(10, BIG), CriticalStore(10, BIG)
    assert first.prefix != second.prefix
    assert first.new_id() != second.new_id()


def test_pending_in_insertion_order_until_acked():
    store = CriticalStore(10, BIG, prefix="p")
    a = store.add([1, 2], b'"a"', 10.0, 0.0)
    b = store.add([1], b'"b"', 5.0, 0.0)
    c = store.add([1], b'"c"', 20.0, 0.0)
    assert ids(store.pending(1, 1.0)) == [a, b, c]
    assert store.pending(1, 1.0)[0] == Critical(a, 1, b'"a"', 10.0)
    assert ids(store.pending(2, 1.0)) == [a]
    assert store.ack(1, b)
    assert ids(store.pending(1, 1.0)) == [a, c]
    assert ids(store.pending(2, 1.0)) == [a]  # acked per user
    assert not store.ack(1, b)  # twice: unknown
    assert not store.ack(3, a)
    stats = store.stats()
    assert (stats["acked"], stats["unknown_acks"]) == (1, 2)
    assert stats["users"] == 2
    assert stats["messages"] == 3
    assert stats["bytes"] == 3 * (3 + ENTRY_COST)
    assert store.pending(9, 0.0) == []


def test_pending_skips_expired_and_expire_returns_them_once():
    store = CriticalStore(10, BIG, prefix="p")
    short = store.add([1], b"1", 5.0, 0.0)
    long = store.add([1, 2], b"2", 50.0, 0.0)
    assert ids(store.pending(1, 4.9)) == [short, long]
    assert ids(store.pending(1, 5.0)) == [long]  # expires at now >= expires
    assert store.expire(4.0) == []
    gone = store.expire(6.0)
    assert gone == [Critical(short, 1, b"1", 5.0)]
    assert store.expire(6.0) == []
    assert [(c.id, c.user) for c in store.expire(60.0)] == [(long, 1), (long, 2)]
    assert store.stats() == {
        "users": 0,
        "messages": 0,
        "bytes": 0,
        "acked": 0,
        "expired": 3,
        "unknown_acks": 0,
        "refused": 0,
    }


def test_the_per_user_bound_refuses_the_whole_command():
    store = CriticalStore(2, BIG, prefix="p")
    store.add([1], b"1", 10.0, 0.0)
    store.add([1, 2], b"2", 10.0, 0.0)
    with pytest.raises(CriticalLimit, match="user 1") as refused:
        store.add([2, 3, 1], b"3", 10.0, 0.0)
    assert refused.value.code == "limit"
    assert store.pending(2, 0.0)[-1].data == b"2"  # nothing stored for 2 or 3
    assert store.pending(3, 0.0) == []
    assert store.stats()["refused"] == 1
    assert store.stats()["messages"] == 3
    store.add([2, 3], b"4", 10.0, 0.0)  # users below the bound still can
    with pytest.raises(CriticalLimit):
        store.add([2], b"5", 10.0, 0.0)


def test_expired_messages_free_the_per_user_bound():
    store = CriticalStore(1, BIG, prefix="p")
    first = store.add([1], b"1", 5.0, 0.0)
    with pytest.raises(CriticalLimit):
        store.add([1], b"2", 5.0, 4.0)
    second = store.add([1], b"2", 5.0, 5.0)
    assert ids(store.pending(1, 5.0)) == [second]
    assert ids(store.expire(5.0)) == [first]  # dropped by add, reported by expire


def test_an_ack_frees_the_per_user_bound():
    store = CriticalStore(1, BIG, prefix="p")
    first = store.add([1], b"1", 5.0, 0.0)
    assert store.ack(1, first)
    store.add([1], b"2", 5.0, 0.0)


def test_the_memory_bound_refuses_the_whole_command():
    store = CriticalStore(10, 3 * (10 + ENTRY_COST), prefix="p")
    store.add([1, 2], b"x" * 10, 10.0, 0.0)
    with pytest.raises(CriticalLimit, match="bytes"):
        store.add([3, 4], b"x" * 10, 10.0, 0.0)
    assert store.pending(3, 0.0) == []
    assert store.stats()["refused"] == 1
    store.add([3], b"x" * 10, 10.0, 0.0)
    assert store.stats()["bytes"] == store.memory


def test_duplicate_users_count_once():
    store = CriticalStore(1, BIG, prefix="p")
    store.add([1, 1, 1], b"1", 10.0, 0.0)
    assert len(store.pending(1, 0.0)) == 1
    assert store.stats()["messages"] == 1


def test_a_given_id_is_used_and_adding_it_again_replaces_in_place():
    store = CriticalStore(2, BIG, prefix="p")
    assert store.add([1], b"1", 10.0, 0.0, id="host-7") == "host-7"
    store.add([1], b"2", 10.0, 0.0, id="other")
    store.add([1], b"one", 30.0, 1.0, id="host-7")  # at the bound, but a replacement
    assert [(c.id, c.data) for c in store.pending(1, 20.0)] == [("host-7", b"one")]
    assert store.stats()["messages"] == 2
    assert store.stats()["bytes"] == 3 + 1 + 2 * ENTRY_COST
    assert ids(store.expire(15.0)) == ["other"]  # the replaced expiry does not fire
    assert ids(store.expire(31.0)) == ["host-7"]


def test_a_ttl_must_be_positive():
    store = CriticalStore(2, BIG)
    with pytest.raises(ValueError):
        store.add([1], b"1", 0.0, 0.0)


def test_many_acks_keep_the_expiry_heap_bounded():
    store = CriticalStore(10, BIG, prefix="p")
    for n in range(10_000):
        assert store.ack(n % 7, store.add([n % 7], b"1", 86_400.0, float(n)))
    assert len(store._heap) <= 200
    kept = store.add([1], b"1", 1.0, 0.0)
    assert ids(store.expire(2.0)) == [kept]


def test_random_operations_match_a_model():
    rng = random.Random(11)
    store = CriticalStore(3, 40 * (1 + ENTRY_COST), prefix="p")
    model: dict[int, dict[str, float]] = {}
    now = 0.0
    for _ in range(3000):
        now += rng.choice([0.0, 0.5, 2.0])
        for held in model.values():
            for id in [id for id, expires in held.items() if expires <= now]:
                del held[id]
        op = rng.random()
        if op < 0.5:
            users = rng.sample(range(6), rng.randint(1, 3))
            ttl = rng.choice([1.0, 3.0, 10.0])
            full = any(len(model.get(u, {})) >= 3 for u in users)
            over = sum(map(len, model.values())) + len(users) > 40
            try:
                id = store.add(users, b"d", ttl, now)
            except CriticalLimit:
                assert full or over
            else:
                assert not (full or over)
                for user in users:
                    model.setdefault(user, {})[id] = now + ttl
        elif op < 0.8:
            user = rng.randrange(6)
            held = model.get(user, {})
            id = rng.choice([*held, "nope"])
            assert store.ack(user, id) == (id in held)
            held.pop(id, None)
        else:
            store.expire(now)
        for user in range(6):
            assert ids(store.pending(user, now)) == list(model.get(user, {}))


# -- CriticalTracker -----------------------------------------------------------------------------


def test_sent_once_per_connection():
    tracker = CriticalTracker(10.0, 3)
    assert tracker.sent(1, 7, "a", b"A", 0.0)
    assert not tracker.sent(1, 7, "a", b"A", 1.0)
    assert tracker.sent(2, 7, "a", b"A", 1.0)
    assert tracker.stats() == {"tracked": 2, "resent": 0, "gave_up": 0}


def test_resent_every_timeout_then_given_up():
    tracker = CriticalTracker(10.0, 2)
    tracker.sent(1, 7, "a", b"A", 0.0)
    assert tracker.due(9.9) == []
    assert tracker.due(10.0) == [(1, b"A")]
    assert tracker.due(15.0) == []
    assert tracker.due(20.0) == [(1, b"A")]
    assert tracker.due(29.0) == []
    assert tracker.acked(1, "a") == 7  # still tracked until a timeout after the last re-send
    tracker.sent(1, 7, "b", b"B", 30.0)
    assert tracker.due(40.0) == [(1, b"B")]
    assert tracker.due(50.0) == [(1, b"B")]
    assert tracker.due(60.0) == []  # given up
    assert tracker.acked(1, "b") is None
    assert tracker.stats() == {"tracked": 0, "resent": 4, "gave_up": 1}


def test_no_retries_means_no_resend():
    tracker = CriticalTracker(1.0, 0)
    tracker.sent(1, 7, "a", b"A", 0.0)
    assert tracker.due(5.0) == []
    assert tracker.stats() == {"tracked": 0, "resent": 0, "gave_up": 1}


def test_due_in_order_of_time_across_connections():
    tracker = CriticalTracker(10.0, 5)
    tracker.sent(1, 7, "a", b"A", 2.0)
    tracker.sent(2, 8, "b", b"B", 0.0)
    tracker.sent(3, 9, "c", b"C", 1.0)
    assert tracker.due(12.0) == [(2, b"B"), (3, b"C"), (1, b"A")]


def test_an_ack_forgets_the_id_on_all_the_users_connections():
    tracker = CriticalTracker(10.0, 5)
    for conn in (1, 2, 3):
        tracker.sent(conn, 7, "a", b"A", 0.0)
    tracker.sent(1, 7, "b", b"B", 0.0)
    tracker.sent(4, 8, "a", b"A8", 0.0)  # another user's message with the same id
    assert tracker.acked(2, "a") == 7
    assert tracker.acked(1, "a") is None
    assert tracker.stats()["tracked"] == 2
    assert sorted(tracker.due(10.0)) == [(1, b"B"), (4, b"A8")]
    assert tracker.acked(9, "a") is None


def test_forget_and_closed():
    tracker = CriticalTracker(10.0, 5)
    tracker.sent(1, 7, "a", b"A", 0.0)
    tracker.sent(2, 7, "a", b"A", 0.0)
    tracker.sent(2, 7, "b", b"B", 0.0)
    tracker.forget(7, "a")
    assert tracker.stats()["tracked"] == 1
    tracker.closed(2)
    tracker.closed(2)
    assert tracker.stats()["tracked"] == 0
    assert tracker.due(100.0) == []
    assert tracker.sent(2, 7, "a", b"A", 100.0)  # a new connection with a reused number
    assert tracker.due(110.0) == [(2, b"A")]


def test_thousands_of_entries_stay_cheap_and_bounded():
    tracker = CriticalTracker(10.0, 1)
    for conn in range(5000):
        tracker.sent(conn, conn, "a", b"A", 0.0)
    for conn in range(0, 5000, 2):
        assert tracker.acked(conn, "a") == conn
    assert len(tracker._heap) <= 2 * 2500 + 64
    assert len(tracker.due(10.0)) == 2500
    assert tracker.due(20.0) == []
    assert tracker.stats() == {"tracked": 0, "resent": 2500, "gave_up": 2500}
    assert tracker._heap == []


@pytest.mark.parametrize(("timeout", "retries"), [(0.0, 1), (1.0, -1)])
def test_bad_tracker_settings(timeout, retries):
    with pytest.raises(ValueError):
        CriticalTracker(timeout, retries)
