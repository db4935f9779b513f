"""shards.bench.publisher.schedule: when the bench's commands are due."""

from __future__ import annotations

import itertools
import statistics

from shards.bench.publisher import schedule


def test_even_arrivals_are_evenly_spaced_from_the_start():
    assert list(schedule(4, 2.0)) == [0.0, 0.5, 1.0, 1.5]
    assert list(schedule(0, 2.0)) == list(schedule(0, 2.0, "poisson")) == []


def test_poisson_arrivals_are_independent_at_the_rate_and_the_same_each_run():
    times = list(schedule(20_000, 1000.0, "poisson"))
    assert len(times) == 20_000 and times[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0
    assert abs(statistics.fmean(gaps) - 0.001) < 0.00005  # the rate
    assert abs(statistics.stdev(gaps) - 0.001) < 0.00005  # exponential gaps: sd = mean
    assert list(schedule(20_000, 1000.0, "poisson")) == times  # seeded
    assert list(schedule(20_000, 1000.0, "poisson", seed=2)) != times
