"""actors.policy: restart intensity (OTP style) and backoff."""

from __future__ import annotations

import itertools

import pytest

from actors.policy import Decision, RestartPolicy


def exits(policy: RestartPolicy, times, index: int = 0) -> list[Decision]:
    return [policy.on_exit(index, now) for now in times]


def test_five_restarts_in_30_seconds_then_refuse():
    policy = RestartPolicy()
    decisions = exits(policy, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert [d.restart for d in decisions] == [True] * 5
    assert [d.restarts_in_period for d in decisions] == [1, 2, 3, 4, 5]
    refused = policy.on_exit(0, 5.0)
    assert refused == Decision(False, 0.0, 5)
    assert policy.on_exit(0, 29.0).restart is False  # still within 30 s of the first


def test_a_refusal_is_not_counted_as_a_restart():
    policy = RestartPolicy(max_restarts=2, period=10.0)
    exits(policy, [0.0, 1.0])
    assert policy.on_exit(0, 2.0).restarts_in_period == 2
    assert policy.on_exit(0, 3.0).restarts_in_period == 2


def test_window_slides():
    policy = RestartPolicy()
    exits(policy, [0.0, 10.0, 20.0, 21.0, 22.0])
    assert policy.on_exit(0, 25.0).restart is False
    # at 30.5 the exit at 0.0 is older than the period: one slot is free again
    again = policy.on_exit(0, 30.5)
    assert again.restart is True
    assert again.restarts_in_period == 5
    assert policy.on_exit(0, 31.0).restart is False
    # at 40.5 the exit at 10.0 has left the window too
    assert policy.on_exit(0, 40.5).restart is True


def test_quiet_period_forgets_the_history():
    policy = RestartPolicy()
    exits(policy, [0.0, 1.0, 2.0, 3.0, 4.0])
    later = policy.on_exit(0, 100.0)
    assert later == Decision(True, 0.0, 1)


def test_backoff_grows_and_is_capped():
    policy = RestartPolicy(max_restarts=10, period=1000.0, backoff=0.05, max_backoff=2.0)
    delays = [d.delay for d in exits(policy, [float(t) for t in range(10)])]
    assert delays[0] == 0.0  # the first restart is immediate
    assert delays[1:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert delays[6:] == [2.0, 2.0, 2.0, 2.0]
    assert all(a <= b for a, b in itertools.pairwise(delays))


def test_backoff_shrinks_when_the_window_slides():
    policy = RestartPolicy(period=30.0, backoff=0.05)
    assert [d.delay for d in exits(policy, [0.0, 1.0, 2.0])] == pytest.approx([0.0, 0.1, 0.2])
    # at 31.5 only the exit at 2.0 is still in the window
    assert policy.on_exit(0, 31.5).delay == pytest.approx(0.1)


def test_shards_are_counted_separately():
    policy = RestartPolicy(max_restarts=2)
    exits(policy, [0.0, 1.0], index=0)
    assert policy.on_exit(0, 2.0).restart is False
    other = policy.on_exit(1, 2.0)
    assert other == Decision(True, 0.0, 1)


def test_zero_restarts_allowed_refuses_at_once():
    assert RestartPolicy(max_restarts=0).on_exit(0, 0.0).restart is False
