"""The supervisor's bookkeeping, as plain objects: which news about a shard to believe."""

from __future__ import annotations

from shards.supervisor import ShardProcess


def spawned(shard: ShardProcess) -> ShardProcess:
    """What ``Supervisor._spawn`` records of a new incarnation."""
    shard.epoch += 1
    shard.running = True
    return shard


def test_news_about_the_live_incarnation_is_current():
    shard = spawned(ShardProcess(0))
    assert shard.current(1)
    assert not shard.current(0)  # an older incarnation's
    assert not ShardProcess(1).current(0)  # never spawned


def test_an_up_handled_after_the_process_exited_is_not_current():
    # the router's UP (from the shard's hello) and the pidfd's exit race to the supervisor's loop
    shard = spawned(ShardProcess(0))
    shard.running = False  # what Supervisor._exited records first
    assert not shard.current(1)
    spawned(shard)
    assert shard.current(2)
    assert not shard.current(1)
