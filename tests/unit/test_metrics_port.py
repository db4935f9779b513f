"""shards.metrics and the router's numbers behind it: request parsing, the collector from a
snapshot, readiness, the totals kept across shard restarts, and command timing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_router import answer, command, start, take_queries, take_reply

from actors.router import CommandTimes, RouterCore, is_total
from shards.metrics import (
    MAX_HEAD,
    BadRequest,
    MetricsServer,
    Request,
    exposition,
    parse_request,
    readiness,
    split_address,
)

# -- requests --------------------------------------------------------------------------------


def test_a_get_is_parsed_with_its_path_and_query_string_apart():
    request = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept:  */*\r\n\r\n")
    assert request == Request("GET", "/metrics", {"host": "a", "accept": "*/*"}, "x=1")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET /  HTTP/1.1\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests_are_refused_with_their_status(head, status):
    with pytest.raises(BadRequest) as info:
        parse_request(head)
    assert info.value.status == status


def test_addresses():
    assert split_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert split_address("[::1]:0") == ("::1", 0)
    assert split_address(":9100") == ("127.0.0.1", 9100)
    for bad in ("9100", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_routes():
    async def source() -> dict[str, Any] | None:
        return snapshot()

    server = MetricsServer(source)

    def status(path: str) -> int:
        data = asyncio.run(server.route(Request("GET", path, {})))
        return int(data.split(b" ", 2)[1])

    assert status("/healthz") == 200
    assert status("/readyz") == 200
    assert status("/metrics") == 200
    assert status("/") == 404


# -- the collector ---------------------------------------------------------------------------


def snapshot(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "shards": [
            {"index": 0, "state": "up", "connections": 3, "users": 2, "channels": 1},
            {"index": 1, "state": "up", "connections": 1, "users": 1, "channels": 1},
        ],
        "channels": 1,
        "totals": {
            "frames_delivered": 40,
            "bytes_sent": 1200,
            "close_1000": 2,
            "close_4000": 1,
            "refused_per_user": 3,
        },
        "restarts": 1,
        "commands": {
            "buckets": [0.001, 0.01],
            "counts": [3, 1, 1],
            "sum": 0.5,
            "results": [["broadcast_to_channel", "ok", 4], ["status", "partial", 1]],
        },
        "redis": {"up": True, "published": 5, "reconnects": 1},
        "presence": {
            "seq": 9,
            "users": 3,
            "presence_hosts": 2,
            "presence_syncing": 1,
            "presence_users": 70,
            "presence_deltas": 12,
            "presence_gaps": 1,
            "presence_syncs": 3,
            "presence_fetches": 4,
            "presence_asks": 1,
            "presence_expired": 0,
        },
        "acceptor": {"routed": 4, "unauthorized": 2, "accepted": 9},
        "accepting": True,
    }
    return {**base, **changes}


def samples(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_the_collector_names_every_number():
    found = samples(exposition(snapshot()))
    assert found["ucc_connections"] == {(("shard", "0"),): 3, (("shard", "1"),): 1}
    assert found["ucc_users"] == {(): 3}
    assert found["ucc_channels"] == {(): 1}
    assert found["ucc_frames_delivered_total"] == {(): 40}
    assert found["ucc_bytes_sent_total"] == {(): 1200}
    assert found["ucc_closes_total"] == {(("code", "1000"),): 2, (("code", "4000"),): 1}
    assert found["ucc_shard_restarts_total"] == {(): 1}
    assert found["ucc_commands_total"] == {
        (("cmd", "broadcast_to_channel"), ("result", "ok")): 4,
        (("cmd", "status"), ("result", "partial")): 1,
    }
    assert found["ucc_command_seconds_bucket"] == {
        (("le", "0.001"),): 3,
        (("le", "0.01"),): 4,
        (("le", "+Inf"),): 5,
    }
    assert found["ucc_command_seconds_count"] == {(): 5}
    assert found["ucc_command_seconds_sum"] == {(): 0.5}
    assert found["ucc_handshakes_total"][(("status", "routed"),)] == 4
    assert found["ucc_handshakes_total"][(("status", "unauthorized"),)] == 2
    assert found["ucc_handshakes_total"][(("status", "refused_per_user"),)] == 3  # by shards
    assert found["ucc_redis_up"] == {(): 1}
    assert found["ucc_redis_published_total"] == {(): 5}
    assert found["ucc_redis_reconnects_total"] == {(): 1}
    assert found["ucc_presence_hosts"] == {(): 2}
    assert found["ucc_presence_syncing"] == {(): 1}
    assert found["ucc_presence_remote_users"] == {(): 70}
    assert found["ucc_presence_deltas_total"] == {(): 12}
    assert found["ucc_presence_gaps_total"] == {(): 1}
    assert found["ucc_presence_syncs_total"] == {(): 3}


def test_without_redis_or_commands_the_families_are_still_there():
    found = samples(exposition(snapshot(redis=None, presence=None, commands=None, totals={})))
    assert found["ucc_redis_up"] == {(): 0}
    assert "ucc_presence_hosts" not in found  # a host alone has no replicas
    assert found["ucc_frames_delivered_total"] == {(): 0}
    assert found["ucc_command_seconds_count"] == {(): 0}


def test_readiness():
    assert readiness(snapshot()) == []
    assert readiness(None) == ["the router did not answer"]
    rows = [{"index": 0, "state": "unresponsive"}, {"index": 1, "state": "starting"}]
    down = snapshot(shards=rows, redis={"up": False}, accepting=False)
    assert readiness(down) == [
        "shard 0 is unresponsive",
        "shard 1 is starting",
        "the Redis link is down",
        "not accepting connections yet",
    ]


# -- the router's numbers --------------------------------------------------------------------


def metrics_of(core: RouterCore, now: float, bodies: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Ask the core for its numbers; the shards in ``bodies`` answer (the others do not: the
    gather ends at its deadline)."""
    got: list[dict[str, Any]] = []
    core.metrics(now, got.append)
    queries = take_queries(core)
    for index, body in bodies.items():
        qid = queries[index][0]
        epoch = core.slots[index].epoch
        answer(core, index, epoch, qid, {"connections": 0, "users": 0, "channels": 0, **body})
    if not got:
        core.tick(now + core.gather_timeout)
    assert len(got) == 1
    return got[0]


def test_totals_survive_a_restart_and_a_silent_shard():
    core = RouterCore(2)
    start(core, 0)
    start(core, 1)
    first = metrics_of(
        core,
        0.0,
        {
            0: {"frames_delivered": 10, "bytes_sent": 100, "close_1000": 1},
            1: {"frames_delivered": 5, "bytes_sent": 50},
        },
    )
    assert first["totals"] == {"frames_delivered": 15, "bytes_sent": 150, "close_1000": 1}
    assert first["restarts"] == 0
    # shard 0 dies and comes back: its new incarnation counts from 0
    core.shard_down(0, 1, 1.0)
    start(core, 0, epoch=2, now=1.0)
    second = metrics_of(core, 2.0, {0: {"frames_delivered": 2, "bytes_sent": 20}, 1: {}})
    assert second["restarts"] == 1
    # shard 1 answered without totals (an old shard): its last ones still count
    assert second["totals"] == {"frames_delivered": 17, "bytes_sent": 170, "close_1000": 1}
    # shard 1 goes silent: its last totals still count, and it shows unresponsive
    third = metrics_of(core, 3.0, {0: {"frames_delivered": 3, "bytes_sent": 30}})
    assert third["totals"]["frames_delivered"] == 18
    assert [row["state"] for row in third["shards"]] == ["up", "unresponsive"]


def test_only_totals_are_kept():
    assert is_total("frames_delivered") and is_total("bytes_sent") and is_total("close_4001")
    assert is_total("refused_per_user")
    assert not is_total("connections") and not is_total("closed_slow_consumer")


def test_commands_are_counted_and_timed_from_arrival_to_reply():
    core = RouterCore(2)
    start(core, 0)
    start(core, 1)
    command(core, {"id": 1, "cmd": "broadcast_to_channel", "channel": 1, "data": {}}, now=10.0)
    core.take_outbox()
    command(core, {"id": 2, "cmd": "nonsense"}, now=10.0)
    assert len(core.take_replies()) == 2  # the broadcast's and the error
    core.command_times.replied(10.002)
    command(core, {"id": 3, "cmd": "status"}, now=11.0)
    queries = take_queries(core)
    answer(core, 0, 1, queries[0][0], {"connections": 0, "users": 0, "channels": 0}, now=11.3)
    core.tick(12.0)  # shard 1 never answers: the reply is partial, at the deadline
    take_reply(core)
    core.command_times.replied(12.0)
    stats = core.command_times.statistics()
    results = {(c, r): n for c, r, n in stats["results"]}
    assert results[("broadcast_to_channel", "ok")] == 1
    assert results[("status", "partial")] == 1
    assert results[("invalid", "unknown_command")] == 1
    assert sum(stats["counts"]) == 3
    assert stats["sum"] == pytest.approx(0.002 * 2 + 1.0)


def test_command_times_buckets():
    times = CommandTimes((0.1, 1.0))
    for arrival in (0.0, 0.95, 0.5):
        times.answered("x", "ok", arrival)
    times.replied(1.0)  # 1.0, 0.05, 0.5 seconds
    assert times.counts == [1, 2, 0]
    times.answered("x", "ok", 0.0)
    times.replied(9.0)
    assert times.counts == [1, 2, 1]
