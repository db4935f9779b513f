"""shards.redislink.Backoff: the delays between reconnection attempts, reset by a success."""

from __future__ import annotations

from shards.redislink import BACKOFF, Backoff


def delays(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]


def test_delays_grow_then_stay_at_the_largest():
    backoff = Backoff((0.05, 0.1, 0.2))
    assert delays(backoff, 5) == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert backoff.failures == 5


def test_a_success_starts_the_next_failures_from_the_smallest_delay():
    backoff = Backoff((0.05, 0.1, 0.2))
    delays(backoff, 4)
    backoff.reset()
    assert backoff.failures == 0
    assert delays(backoff, 3) == [0.05, 0.1, 0.2]


def test_the_link_default_starts_small_and_is_capped_at_one_second():
    backoff = Backoff()
    assert backoff.delays == BACKOFF
    first, *_, last = delays(backoff, 20)
    assert first == min(BACKOFF)
    assert last == max(BACKOFF) == 1.0
