"""actors.router_actor.BatchWindow: when the router holds its sockets to batch commands."""

from __future__ import annotations

import itertools
import random

import pytest

from actors.router_actor import BatchWindow

WINDOW = 0.002


def run(batch: BatchWindow, turns: list[tuple[float, int]]) -> list[float | None]:
    return [batch.turn(handled, now) for now, handled in turns]


def test_commands_far_apart_are_never_held():
    batch = BatchWindow(WINDOW)
    assert run(batch, [(t * 0.01, 1) for t in range(50)]) == [None] * 50  # 100/s


def test_a_sustained_rate_starts_holding_after_a_streak_and_goes_on_while_holds_pay():
    batch = BatchWindow(WINDOW)
    # 2,000/s, one command a turn: the first is not a streak (nothing before it)
    first = run(batch, [(1.0 + n * 0.0005, 1) for n in range(BatchWindow.MIN_STREAK + 1)])
    assert first[:-1] == [None] * BatchWindow.MIN_STREAK
    now = 1.0 + BatchWindow.MIN_STREAK * 0.0005
    assert first[-1] == now + WINDOW  # the streak: hold
    for _ in range(5):  # each held turn brings 4 (2 ms at 2,000/s): hold again
        now += WINDOW + 0.0001
        assert batch.turn(4, now) == now + WINDOW


def test_a_hold_that_brings_one_command_stops_holding_and_backs_off():
    """A backend that waits for each reply (round trip 0.2 ms) looks fast, but a hold brings it
    one command: each failed hold doubles the streak needed, so holds grow rarer."""
    batch = BatchWindow(WINDOW)
    now, holds, turns = 1.0, [], 0
    while turns < 3000:
        until = batch.turn(1, now)
        turns += 1
        if until is not None:
            holds.append(turns)
            now = until + 0.0002  # its next command comes after the held reply
        else:
            now += 0.0002
    gaps = [b - a for a, b in itertools.pairwise(holds)]
    assert len(holds) < 12  # 3, 6, 12, ... turns between holds
    assert gaps == sorted(gaps) and gaps[-1] > 500
    assert batch.streak == BatchWindow.MAX_STREAK or batch.streak > 500


def test_bursty_low_rate_is_almost_never_held():
    rng = random.Random(7)
    batch = BatchWindow(WINDOW)
    now, holds = 1.0, 0
    for _ in range(20_000):  # Poisson arrivals at 100/s, one command a turn
        now += rng.expovariate(100)
        if batch.turn(1, now) is not None:
            holds += 1
    assert holds < 20  # of 20,000 commands


def test_a_turn_without_commands_changes_nothing_and_a_zero_window_never_holds():
    batch = BatchWindow(WINDOW)
    assert run(batch, [(1.0, 1), (1.0005, 0), (1.001, 1)]) == [None] * 3
    assert batch.fast == 1  # the empty turn neither counted nor broke the streak
    off = BatchWindow(0.0)
    assert run(off, [(1.0 + t * 1e-5, 10) for t in range(20)]) == [None] * 20


def held(batch: BatchWindow, rate: float, turns: int, now: float) -> tuple[list[float], float]:
    """Turns at ``rate`` commands/s, each held turn bringing what arrived during its hold:
    the hold lengths chosen, and the time after them."""
    lengths: list[float] = []
    handled = max(1, round(rate * batch.current)) if batch.holding else 1
    for _ in range(turns):
        until = batch.turn(handled, now)
        if until is None:
            lengths.append(0.0)
            now += 1 / rate
            handled = 1
            continue
        lengths.append(round(until - now, 6))
        handled = max(1, round(rate * (until - now)))
        now = until
    return lengths, now


def test_under_sustained_load_the_hold_grows_until_it_gathers_the_target_up_to_the_budget():
    batch = BatchWindow(WINDOW, 0.01)
    lengths, now = held(batch, 1000, 60, 1.0)  # 1,000/s: 2 ms gathers 2, 4 ms 4, 8 ms 8
    assert list(dict.fromkeys(x for x in lengths if x)) == [0.002, 0.004, 0.008]
    assert lengths[-10:] == [0.008] * 10
    assert batch.stats() == {"window": WINDOW, "max": 0.01, "current": 0.008}
    lengths, now = held(batch, 400, 40, now)  # 400/s: 8 ms gathers 3: up to the budget
    assert lengths[-10:] == [0.01] * 10
    lengths, now = held(batch, 10_000, 40, now)  # 10,000/s: 10 ms gathers 100: halved to 2 ms
    assert list(dict.fromkeys(lengths))[-3:] == [0.005, 0.0025, 0.002]
    assert lengths[-10:] == [0.002] * 10


def closed_loop(batch: BatchWindow, backends: int, rtt: float, turns: int) -> tuple[float, float]:
    """``backends`` that each send a command, wait ``rtt`` after its reply, send the next: a
    held turn brings one from each, whatever the hold's length. The commands per second, and
    the share of holds longer than the window."""
    now, commands, longer = 1.0, 0, 0
    for _ in range(turns):
        until = batch.turn(backends, now)
        commands += backends
        if until is None:
            now += rtt
            continue
        longer += until - now > batch.window + 1e-9
        now = until + rtt
    return commands / (now - 1.0), longer / turns


@pytest.mark.parametrize("backends", [2, 3, 6])
def test_backends_waiting_for_their_replies_are_not_slowed_by_a_longer_hold(backends):
    """A longer hold does not gather more from them, only slows them: tried, judged by the
    rate, undone, tried again ever more rarely."""
    adaptive, longer = closed_loop(BatchWindow(WINDOW, 0.01), backends, 0.0003, 20_000)
    fixed, _ = closed_loop(BatchWindow(WINDOW), backends, 0.0003, 20_000)
    assert adaptive >= 0.95 * fixed
    assert longer < 0.05


def test_a_hold_that_stops_starts_again_at_the_window():
    batch = BatchWindow(WINDOW, 0.01)
    _, now = held(batch, 1000, 60, 1.0)
    assert batch.current == 0.008
    assert batch.turn(1, now + 0.008) is None  # the rate fell: one command in 8 ms
    assert batch.current == WINDOW and batch.stats()["current"] == 0.0
    lengths, _ = held(batch, 1000, 20, now + 1.0)
    assert next(x for x in lengths if x) == WINDOW


def test_a_budget_below_the_window_is_the_window():
    batch = BatchWindow(WINDOW, 0.001)
    lengths, _ = held(batch, 1000, 60, 1.0)
    assert set(lengths) == {0.0, WINDOW}
    assert batch.stats()["max"] == WINDOW
    assert BatchWindow(0.0, 0.01).stats() == {"window": 0.0, "max": 0.0, "current": 0.0}
