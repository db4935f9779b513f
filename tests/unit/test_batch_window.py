"""actors.router_actor.BatchWindow: when, and how long, the router holds its sockets to batch
commands. Driven with simulated time: a model of the router's turns (one turn per arrival when
nothing is held, one turn at the end of each hold), fed independent (Poisson or regular)
arrivals, or backends that each wait for their reply before the next command."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass

import pytest

from actors.router_actor import BatchWindow

WINDOW, BUDGET = 0.002, 0.01
TURN = 0.00005  # seconds: a turn's own work, in the model


@dataclass
class Run:
    per_turn: float  # commands per turn
    held: float  # share of turns followed by a hold
    hold: float  # mean hold, seconds
    p99: float  # seconds a command waited before its turn (99th percentile)
    longest: float  # the longest hold


def open_loop(
    batch: BatchWindow, arrivals: list[float], warmup: float = 0.1, backends: int = 20
) -> Run:
    """The router's turns for commands arriving at ``arrivals`` (sorted), whatever it does,
    each from one of ``backends`` at random; figures from the turns after ``warmup`` seconds
    (holding starts once the rate has been seen for BatchWindow.OBSERVE)."""
    rng = random.Random(5)
    i, now, turns, counted, waits, holds = 0, 0.0, 0, 0, [], []
    while i < len(arrivals):
        now = max(now, arrivals[i])
        j = i
        while j < len(arrivals) and arrivals[j] <= now:
            j += 1
        steady = now >= warmup
        if steady:
            waits += [now - arrivals[k] for k in range(i, j)]
            counted += j - i
            turns += 1
        handled, i = j - i, j
        now += TURN
        senders: dict[bytes, int] = {}
        for _ in range(handled):
            who = b"%d" % rng.randrange(backends)
            senders[who] = senders.get(who, 0) + 1
        until = batch.turn(handled, now, senders)
        if until is not None:
            if steady:
                holds.append(until - now)
            now = until
    waits.sort()
    return Run(
        per_turn=counted / turns,
        held=len(holds) / turns,
        hold=sum(holds) / max(1, len(holds)),
        p99=waits[int(len(waits) * 0.99)],
        longest=max(holds, default=0.0),
    )


def closed_loop(
    batch: BatchWindow, backends: int, rtt: float, seconds: float = 20.0, rate: float = 0.0
) -> float:
    """Commands per second from ``backends`` that each send their next command ``rtt`` after
    the reply to the last. As in the router, replies go at the end of the turn, before any
    hold: a backend's next command may arrive during the hold, and be gathered by it. With
    ``rate``, independent (Poisson) commands arrive too; only the backends' are counted."""
    rng = random.Random(3)
    ready = [(rtt * k / backends, k) for k in range(backends)]  # (when, backend; -1: users)
    if rate:
        ready.append((rng.expovariate(rate), -1))
    now, done = 0.0, 0
    while now < seconds:
        now = max(now, ready[0][0])
        handled, mine, senders = 0, [], {}
        while ready and ready[0][0] <= now:
            _, who = heapq.heappop(ready)
            handled += 1
            if who >= 0:
                mine.append(who)
                senders[b"%d" % who] = 1
            else:  # a user's, through one of 20 other backends
                other = b"u%d" % rng.randrange(20)
                senders[other] = senders.get(other, 0) + 1
                heapq.heappush(ready, (now + rng.expovariate(rate), -1))
        now += TURN
        done += len(mine)
        until = batch.turn(handled, now, senders)
        for who in mine:  # replied to at the end of the turn
            heapq.heappush(ready, (now + rtt, who))
        if until is not None:
            now = until
    return done / now


def poisson(rate: float, seconds: float = 5.0, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(int(seconds * rate))))


def regular(rate: float, seconds: float = 5.0) -> list[float]:
    return [n / rate for n in range(int(seconds * rate))]


@pytest.mark.parametrize("rate", [10, 100, 200])
def test_a_low_rate_is_never_held(rate):
    run = open_loop(BatchWindow(WINDOW, BUDGET), poisson(rate))
    assert run.held == 0 and run.per_turn == 1.0


@pytest.mark.parametrize(
    ("rate", "hold"),
    [(1000, 0.008), (2000, 0.004), (5000, WINDOW), (20_000, WINDOW)],
)
def test_independent_arrivals_are_held_to_gather_about_the_target(rate, hold):
    """Poisson arrivals (many users): from ~400/s, holds gather about TARGET commands; a
    command never waits longer than the longest hold, which never passes the budget."""
    run = open_loop(BatchWindow(WINDOW, BUDGET), poisson(rate, seconds=min(5.0, 40_000 / rate)))
    assert run.held > 0.9
    assert run.per_turn > 0.8 * min(BatchWindow.TARGET, rate * WINDOW)
    assert hold * 0.85 <= run.hold <= hold * 1.15
    assert run.longest <= BUDGET + 1e-9
    assert run.p99 <= run.longest + TURN


def test_regular_arrivals_are_held_the_same():
    run = open_loop(BatchWindow(WINDOW, BUDGET), regular(1000))
    assert 0.007 <= run.hold <= 0.0085 and run.per_turn > 6


def test_between_a_low_rate_and_a_sustained_one_holds_are_at_the_budget():
    run = open_loop(BatchWindow(WINDOW, BUDGET), poisson(500))
    assert run.held > 0.5 and run.hold == pytest.approx(BUDGET) and run.per_turn > 3


def test_a_budget_at_the_window_gives_fixed_holds():
    run = open_loop(BatchWindow(WINDOW, WINDOW), poisson(5000, seconds=2.0))
    assert run.hold == pytest.approx(WINDOW) and run.per_turn > 8
    assert BatchWindow(WINDOW, 0.001).budget == WINDOW  # below the window: the window


@pytest.mark.parametrize(
    ("backends", "rtt"),
    [
        *[(1, 0.0003), (2, 0.0003), (3, 0.0003), (6, 0.0003), (10, 0.0003), (1, 0.001)],
        (4, 0.001),
        # a round trip near the hold's length: held, they come in at more than PAID of their
        # unheld rate; who sent the commands tells
        *[(8, 0.001), (40, 0.001), (20, 0.005), (3, 0.003)],
    ],
)
def test_backends_waiting_for_their_replies_are_not_slowed_down(backends, rtt):
    """A hold gathers no more from them (each has one command out), it only delays them:
    judged by the rate and by who sent the commands, holding stops, and is tried again ever
    more rarely."""
    unheld = closed_loop(BatchWindow(0.0), backends, rtt)
    held = closed_loop(BatchWindow(WINDOW, BUDGET), backends, rtt)
    assert held >= 0.9 * unheld


@pytest.mark.parametrize(("backends", "rtt"), [(40, 0.01), (16, 0.02)])
def test_backends_waiting_for_replies_longer_than_a_hold_are_held_and_not_slowed(backends, rtt):
    """Their round trip is longer than the hold: a hold gathers one command from each, and
    they come in as fast as unheld (above WAITED): holding goes on, and pays."""
    batch, turns, held_turns = BatchWindow(WINDOW, BUDGET), [0], [0]
    turn = batch.turn

    def counted(handled: int, now: float, senders: dict[bytes, int] | None = None):
        until = turn(handled, now, senders)
        turns[0] += 1
        held_turns[0] += until is not None
        return until

    batch.turn = counted  # type: ignore[method-assign]
    held = closed_loop(batch, backends, rtt)
    assert held >= 0.95 * closed_loop(BatchWindow(0.0), backends, rtt)
    assert held_turns[0] > 0.9 * turns[0]


def test_judged_by_the_rate_alone_backends_with_a_round_trip_near_the_hold_lose_up_to_half():
    """Without the senders, the judgement sees only the rate: 8 backends with a 1 ms round
    trip came in at 0.60 of their unheld rate, above PAID: holding went on."""
    unheld = closed_loop(BatchWindow(0.0), 8, 0.001)
    batch = BatchWindow(WINDOW, BUDGET)
    batch._count_regulars = lambda senders: None  # type: ignore[method-assign]
    held = closed_loop(batch, 8, 0.001)
    assert BatchWindow.PAID * unheld <= held <= 0.7 * unheld


@pytest.mark.parametrize("rate", [1000, 4000])
def test_a_backend_waiting_for_its_replies_among_independent_traffic_waits_one_hold_at_most(
    rate,
):
    """Among many users' commands, holding pays and goes on: a backend that sends one command
    at a time then waits at most one hold per command (the price of batching), never more."""
    held = closed_loop(BatchWindow(WINDOW, BUDGET), 1, 0.0003, seconds=5.0, rate=rate)
    assert held >= 1 / (BUDGET + 0.0003 + 2 * TURN)


def start_holding(batch: BatchWindow, now: float, gap: float = 0.00025) -> tuple[float, float]:
    """One command a turn every ``gap`` seconds until a hold starts: (when, until when)."""
    for _ in range(1000):
        now += gap
        if (until := batch.turn(1, now)) is not None:
            return now, until
    raise AssertionError("never held")


def test_backends_with_one_command_in_most_held_turns_are_the_ones_waiting():
    batch = BatchWindow(WINDOW, BUDGET)
    now, until = start_holding(batch, 1.0)
    # 4,000/s held: from two backends that wait for their replies (one of which misses a
    # turn), one that sends on its own, and one that sends a command in half the turns
    for turn in range(BatchWindow.JUDGE - 1):
        now, n = until, round(4000 * batch.current)
        senders = {b"waits": 1, b"own": n - 3, b"half": turn % 2}
        senders[b"slow"] = 1 if turn != 3 else 0
        until = batch.turn(n, now, {who: k for who, k in senders.items() if k})
        assert until is not None
    assert batch.waiting() == 2 * (BatchWindow.JUDGE - 1) - 1
    now, n = until, round(4000 * batch.current)
    assert batch.turn(n, now, {b"waits": 1, b"own": n - 1}) is not None  # a few: holding pays
    assert batch.passed == 0  # judged at PAID (at WAITED, this would count a pass)
    assert batch.regulars == {} and batch.waiting() == 0  # judged: counted afresh


def test_holding_for_backends_waiting_for_replies_pauses_now_and_then_to_measure_afresh():
    """Their rate unheld may have been measured low (a start): holding pauses for
    MIN_BACKOFF, not doubled, after REPROBE judgements passed in a row at WAITED."""
    batch = BatchWindow(WINDOW, BUDGET)
    now, until = start_holding(batch, 1.0)  # 4,000/s unheld
    waiting = {b"w%d" % n: 1 for n in range(8)}  # one command each per hold: as fast held
    for _ in range((BatchWindow.REPROBE - 1) * BatchWindow.JUDGE):
        now = until
        until = batch.turn(8, now, waiting)
    assert until is not None and batch.passed == BatchWindow.REPROBE - 1
    now, until = start_holding(batch, now + 1.0)  # a silence: passes no longer in a row
    turns = 0
    while batch.holding:
        now = until
        until = batch.turn(8, now, waiting)
        turns += 1
    assert until is None and turns == BatchWindow.REPROBE * BatchWindow.JUDGE
    assert batch.resume == now + BatchWindow.MIN_BACKOFF
    assert batch.backoff == BatchWindow.MIN_BACKOFF and batch.passed == 0


def test_a_judgement_that_fails_backs_off_ever_longer_and_one_that_passes_resets_it():
    batch = BatchWindow(WINDOW, BUDGET)
    now, until = start_holding(batch, 1.0)  # 4,000/s unheld, one at a time
    backoffs = []
    for _ in range(3):
        # held, the commands come in at ~600/s (6 a turn, 10 ms apart): enough to go on
        # holding, but far below the rate seen unheld, so the judgement after JUDGE held
        # turns fails
        turns = 0
        while batch.holding:
            now = (until or now) + 0.008
            until = batch.turn(6, now)
            turns += 1
        assert until is None and turns == BatchWindow.JUDGE
        backoffs.append(batch.resume - now)
        while now + 0.00025 < batch.resume:  # backing off: the commands go on, none is held
            now += 0.00025
            assert batch.turn(1, now) is None
        now, until = start_holding(batch, now)
    assert backoffs == pytest.approx([0.05, 0.1, 0.2])
    for _ in range(BatchWindow.JUDGE):  # now the holds pay: 4,000/s held too
        now, held = until, batch.current
        until = batch.turn(round(4000 * held), now)
        assert until is not None
    assert batch.backoff == BatchWindow.MIN_BACKOFF


def test_two_holds_in_a_row_that_gather_one_of_many_expected_back_off():
    batch = BatchWindow(WINDOW, BUDGET)
    now, until = start_holding(batch, 1.0)
    assert batch.stats(now) == {"window": WINDOW, "max": BUDGET, "current": batch.current}
    assert batch.stats(now + batch.silence + 0.001)["current"] == 0.0  # traffic stopped
    until = batch.turn(1, until)  # one miss: holding goes on
    assert until is not None
    assert batch.turn(1, until) is None  # two: a backend waiting for its replies
    assert not batch.holding and batch.stats(until)["current"] == 0.0
    assert batch.resume > until and batch.turns == batch.misses == 0  # nothing carried over


def test_holding_stops_without_a_back_off_when_the_rate_falls():
    batch = BatchWindow(WINDOW, BUDGET)
    now, until = start_holding(batch, 1.0)
    for _ in range(20):  # 2 commands every 20 ms: 100/s
        now = (until or now) + 0.02
        until = batch.turn(2, now)
        if until is None:
            break
    assert not batch.holding and batch.resume == float("-inf")


def test_a_turn_without_commands_changes_nothing_and_a_zero_window_never_holds():
    batch = BatchWindow(WINDOW, BUDGET)
    assert batch.turn(0, 1.0) is None and batch.rate.rate == 0.0 and batch.last == float("-inf")
    off = BatchWindow(0.0, BUDGET)
    assert [off.turn(10, 1.0 + t * 1e-5) for t in range(20)] == [None] * 20
    assert off.stats(1.0) == {"window": 0.0, "max": 0.0, "current": 0.0}
