"""actors.router_actor.BatchWindow: when the router holds its sockets to batch commands."""

from __future__ import annotations

from actors.router_actor import BatchWindow

WINDOW = 0.002


def test_commands_far_apart_are_never_held():
    batch = BatchWindow(WINDOW)
    assert [batch.turn(1, t * 0.01) for t in range(5)] == [None] * 5  # 100/s


def test_commands_closer_than_a_window_are_held_for_one_window():
    batch = BatchWindow(WINDOW)
    assert batch.turn(1, 1.0) is None  # the first after a quiet spell goes at once
    assert batch.turn(1, 1.0005) == 1.0005 + WINDOW  # 2,000/s: hold
    # after the hold, the turn took what came meanwhile: still busy, hold again
    assert batch.turn(4, 1.0026) == 1.0026 + WINDOW


def test_a_turn_with_several_commands_counts_their_average_spacing():
    batch = BatchWindow(WINDOW)
    batch.turn(1, 1.0)
    assert batch.turn(1, 1.003) is None  # 3 ms apart: slower than the window
    assert batch.turn(4, 1.009) == 1.009 + WINDOW  # 4 in 6 ms: 1.5 ms apart on average


def test_a_turn_without_commands_changes_nothing_and_a_zero_window_never_holds():
    batch = BatchWindow(WINDOW)
    batch.turn(1, 1.0)
    assert batch.turn(0, 1.0005) is None  # shard messages only
    assert batch.turn(1, 1.001) == 1.001 + WINDOW  # measured from the last turn with commands
    off = BatchWindow(0.0)
    assert [off.turn(10, 1.0 + t * 1e-4) for t in range(3)] == [None] * 3
