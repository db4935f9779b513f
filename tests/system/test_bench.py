"""Smoke runs of every ``ucc bench`` scenario through the CLI: counts and keys, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from shards.testing import TIME_FACTOR

FIGURES = ("server_cpu_us_per_frame", "delivered_per_s", "delivery_ratio", "latency_ms")


def bench(*args: str) -> dict[str, Any]:
    """Run ``ucc bench ARGS --json`` and return its one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-m", "shards.cli", "bench", *args, "--json", "--quiet"],
        capture_output=True,
        timeout=60 * TIME_FACTOR,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1, lines  # exactly one JSON object on stdout
    result: dict[str, Any] = json.loads(lines[0])
    return result


def assert_delivered_everything(result: dict[str, Any], connections: int) -> None:
    assert result["connections"] == connections
    assert result["connect_failures"] == 0
    assert result["errors"] == []
    # every command is answered: acknowledged, or refused as overloaded (never lost)
    assert result["commands_acked"] + result["commands_refused"] == result["commands_sent"]
    assert result["commands_acked"] > 0
    assert result["server_restarts"] in (0, None)  # None: not a ucc server
    assert result["delivered_frames"] == result["expected_frames"] > 0
    assert result["delivery_ratio"] == 1.0
    for key in FIGURES:
        assert result[key] is not None, key
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert result["client_cpu_percent"] is not None


def test_fanout_at_a_low_rate_delivers_every_frame_to_ucc_and_the_reference():
    result = bench("fanout", "--members", "100", "--rate", "100", "--messages", "60", "--reference")
    assert_delivered_everything(result, 100)
    assert result["expected_frames"] == 60 * 100
    assert result["cache_bytes_per_conn"] > 0
    assert result["server_rss_bytes_per_conn"] is not None
    reference = result["reference"]
    assert reference["server"] == "reference"
    assert_delivered_everything(reference, 100)
    assert set(FIGURES) <= set(reference)
    assert result["cpu_ratio_vs_reference"] > 0
    assert "throughput_ratio_vs_reference" not in result  # only with --rate max


def test_fanout_at_max_rate_reports_the_throughput_ratio():
    result = bench("fanout", "--members", "50", "--rate", "max", "--duration", "1", "--reference")
    assert_delivered_everything(result, 50)
    assert_delivered_everything(result["reference"], 50)
    assert result["rate"] == "max"
    assert result["throughput_ratio_vs_reference"] > 0


def test_rooms_delivers_each_broadcast_to_its_room():
    result = bench("rooms", "--connections", "50", "--members", "10", "--messages", "100")
    assert_delivered_everything(result, 50)
    assert result["expected_frames"] == 100 * 10


def test_direct_delivers_one_frame_per_command():
    result = bench("direct", "--connections", "50", "--messages", "500")
    assert_delivered_everything(result, 50)
    assert result["expected_frames"] == result["commands_sent"] == 500
    assert set(result["command_rtt_ms"]) == {"p50", "p90", "p99", "max"}


def test_direct_at_a_paced_rate_sends_and_accounts_for_every_command():
    # from 2,000/s the publisher sends what is due once per millisecond (publisher.PACED_RATE)
    result = bench("direct", "--connections", "50", "--rate", "5000", "--messages", "2000")
    assert_delivered_everything(result, 50)
    assert result["commands_sent"] == result["expected_frames"] == 2000


@pytest.mark.parametrize(
    ("extra", "key", "value", "sent"),
    [
        (
            ("--rate", "2000", "--messages", "400", "--arrivals", "poisson"),
            "arrivals",
            "poisson",
            400,
        ),
        # backends that each wait for their reply: every command counted once
        (("--rate", "max", "--messages", "403", "--backends", "4"), "backends", 4, 403),
    ],
)
def test_rooms_delivers_each_broadcast_to_its_room_however_it_is_published(extra, key, value, sent):
    result = bench("rooms", "--connections", "50", "--members", "10", *extra)
    assert_delivered_everything(result, 50)
    assert result[key] == value
    assert result["commands_sent"] == sent and result["expected_frames"] == sent * 10


def test_direct_from_backends_that_wait_for_their_replies_at_its_default_rate():
    result = bench("direct", "--connections", "50", "--messages", "200", "--backends", "3")
    assert_delivered_everything(result, 50)  # direct publishes flat out by default
    assert result["backends"] == 3 and result["commands_sent"] == 200


def test_backends_are_refused_where_they_mean_nothing():
    for args in (("fanout", "--rate", "max"), ("rooms", "--rate", "100")):
        proc = subprocess.run(
            [sys.executable, "-m", "shards.cli", "bench", *args, "--backends", "2", "--quiet"],
            capture_output=True,
            timeout=60 * TIME_FACTOR,
            check=False,
        )
        assert proc.returncode == 2
        assert b"--backends is for rooms and direct at --rate max" in proc.stderr


def test_idle_reports_memory_per_connection():
    result = bench("idle", "--connections", "50", "--duration", "0.5")
    assert result["connections"] == result["open_after_hold"] == 50
    assert result["server_rss_bytes_per_conn"] is not None
    assert result["cache_bytes_per_conn"] > 0


@pytest.mark.parametrize("extra", [(), ("--reference",)])
def test_connect_opens_every_connection(extra):
    result = bench("connect", "--connections", "50", *extra)
    assert result["connections"] == 50
    assert result["connect_failures"] == 0
    assert result["connects_per_s"] > 0
    assert set(result["handshake_ms"]) == {"p50", "p90", "p99", "max"}
    if extra:
        assert result["reference"]["connections"] == 50


def test_sweep_reports_every_point_and_a_line():
    result = bench("fanout", "--sweep", "100,300", "--messages", "40", "--rate", "100")
    assert [p["members"] for p in result["points"]] == [100, 300]
    for point in result["points"]:
        assert point["delivery_ratio"] == 1.0
    assert set(result["fit"]) == {"per_recipient_us", "per_broadcast_us"}


def test_a_running_server_can_be_the_target(ucc_host):
    host = ucc_host(shards=2)
    result = bench(
        "fanout", "--members", "20", "--messages", "5", "--rate", "50",
        "--target", host.url, "--command", host.command, "--secret", host.secret,
    )  # fmt: skip
    assert_delivered_everything(result, 20)
    assert result["server_cpu_us_per_frame"] is not None  # found the server's processes
