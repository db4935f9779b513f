"""The token bucket behind each client's inbound budget."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ratelimit import TokenBucket


def test_a_burst_up_to_the_capacity_passes_then_the_rate_refills():
    bucket = TokenBucket(rate=10, capacity=5, now=0.0)
    assert all(bucket.take(1, 0.0) for _ in range(5))
    assert not bucket.take(1, 0.0)
    assert not bucket.take(1, 0.05)  # half a token so far
    assert bucket.take(1, 0.1)
    assert not bucket.take(1, 0.1)


def test_refill_stops_at_the_capacity():
    bucket = TokenBucket(rate=100, capacity=3, now=0.0)
    assert bucket.take(3, 1000.0)
    assert not bucket.take(1, 1000.0)


def test_more_than_the_capacity_is_always_refused_and_costs_nothing():
    bucket = TokenBucket(rate=1, capacity=10, now=0.0)
    assert not bucket.take(11, 100.0)
    assert bucket.take(10, 100.0)


def test_time_going_backwards_refills_nothing():
    bucket = TokenBucket(rate=1, capacity=2, now=10.0)
    assert bucket.take(2, 10.0)
    assert not bucket.take(1, 5.0)
    assert not bucket.take(1, 10.5)
    assert bucket.take(1, 11.0)


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (1, 0), (-1, 5)])
def test_a_bucket_needs_a_positive_rate_and_capacity(rate, capacity):
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity, 0.0)


@given(
    rate=st.floats(0.1, 1000),
    capacity=st.integers(1, 1000),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 50)), max_size=100),
)
def test_what_passes_never_exceeds_the_burst_plus_the_rate(rate, capacity, steps):
    bucket = TokenBucket(rate, capacity, 0.0)
    now = taken = 0.0
    for delay, amount in steps:
        now += delay
        if bucket.take(amount, now):
            taken += amount
        assert taken <= capacity + rate * now + 1e-6
