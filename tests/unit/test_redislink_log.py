"""shards.redislink's link state in the log (issue 13): ``redis link up`` is routine (INFO),
``redis link down`` is worth a WARNING. No Redis."""

from __future__ import annotations

import logging

from actors.hostlink import LinkState
from actors.wire import cluster
from shards.redislink import RedisLink


def test_link_up_is_info_and_down_is_a_warning(caplog):
    events: list[object] = []
    link = RedisLink("redis://127.0.0.1:1", "unit", events.append, cluster.ClusterKey(b"k" * 16))
    caplog.set_level(logging.DEBUG, logger="ucc.redis")
    link._set_state(True)
    link._set_state(True)  # no change: nothing logged
    link._set_state(False)
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ucc.redis"]
    assert records == [(logging.INFO, "redis link up"), (logging.WARNING, "redis link down")]
    assert [e for e in events if isinstance(e, LinkState)] == [LinkState(True), LinkState(False)]
