"""The metrics port of a real host: /metrics moves under load and keeps its totals across a shard's
death, /readyz follows the shards, /healthz answers, and bad requests never hurt the server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from shards.testing import TIME_FACTOR, Host, connect_peer, wait_until
from shards.testing.redis import free_port

CHANNEL = 7


def start(
    ucc_host: Callable[..., Host], shards: int = 2, *args: str
) -> tuple[Host, tuple[str, int]]:
    port = free_port()
    host = ucc_host(shards=shards, args=("--metrics", f"127.0.0.1:{port}", *args))
    return host, ("127.0.0.1", port)


def exchange(address: tuple[str, int], request: bytes) -> tuple[int, bytes]:
    """Send raw ``request``, read the whole answer (the server closes): (status, body)."""
    with socket.create_connection(address, timeout=10 * TIME_FACTOR) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    return int(head.split(b" ", 2)[1]), body


def get_or_none(address: tuple[str, int]) -> int | None:
    """/healthz's status, or None if the server closed without an answer (it is busy)."""
    try:
        return get(address, "/healthz")[0]
    except (OSError, IndexError, ValueError, AssertionError):
        return None


def get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    return exchange(address, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def scrape(address: tuple[str, int]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics: {sample name: {sorted labels: value}}."""
    status, body = get(address, "/metrics")
    assert status == 200, body
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def total(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return sum(samples.get(name, {}).values())


def test_counters_move_under_load_and_survive_a_shard_kill(ucc_host):
    host, metrics = start(ucc_host)
    first = scrape(metrics)
    for name in (
        "ucc_connections",
        "ucc_users",
        "ucc_channels",
        "ucc_frames_delivered_total",
        "ucc_bytes_sent_total",
        "ucc_shard_restarts_total",
        "ucc_redis_up",
        "ucc_command_seconds_count",
        "ucc_handshakes_total",
    ):
        assert name in first, name
    assert total(first, "ucc_redis_up") == 0
    assert total(first, "ucc_shard_restarts_total") == 0

    async def load() -> None:
        peers = [await connect_peer(host, user, [CHANNEL]) for user in range(1, 11)]
        client = host.aio.client()
        for n in range(5):
            await client.broadcast_to_channel(CHANNEL, {"n": n})
        for peer in peers:
            await peer.wait_for(lambda frames: sum(f["type"] == "message" for f in frames) >= 5)
        assert await client.get_online_users() == list(range(1, 11))

        def moved() -> bool:
            samples = scrape(metrics)
            return total(samples, "ucc_frames_delivered_total") >= 50

        await asyncio.to_thread(wait_until, moved, 10.0, 0.05, "for frames delivered")
        samples = await asyncio.to_thread(scrape, metrics)
        assert total(samples, "ucc_connections") == 10
        assert total(samples, "ucc_users") == 10
        assert total(samples, "ucc_channels") == 1
        assert total(samples, "ucc_bytes_sent_total") > 0
        commands = samples["ucc_commands_total"]
        assert commands[(("cmd", "broadcast_to_channel"), ("result", "ok"))] == 5
        assert commands[(("cmd", "get_online_users"), ("result", "ok"))] == 1
        assert total(samples, "ucc_command_seconds_count") >= 6
        handshakes = samples["ucc_handshakes_total"]
        assert handshakes[(("status", "routed"),)] == 10
        client.close()
        for peer in peers:
            await peer.close()

        def closed() -> bool:
            return total(scrape(metrics), "ucc_closes_total") >= 10

        await asyncio.to_thread(wait_until, closed, 10.0, 0.05, "for the closes counted")

    asyncio.run(load())
    before = scrape(metrics)
    delivered = total(before, "ucc_frames_delivered_total")
    old = host.kill_shard(0)
    host.wait_shard_replaced(0, old)

    def restarted() -> bool:
        return total(scrape(metrics), "ucc_shard_restarts_total") == 1

    wait_until(restarted, 10.0, 0.05, "for the restart counted")
    after = scrape(metrics)
    assert total(after, "ucc_frames_delivered_total") >= delivered  # never backwards
    assert total(after, "ucc_closes_total") >= total(before, "ucc_closes_total")


def test_readyz_follows_the_shards_and_healthz_answers(ucc_host):
    host, metrics = start(ucc_host)
    assert get(metrics, "/healthz")[0] == 200
    wait_until(lambda: get(metrics, "/readyz")[0] == 200, 10.0, 0.05, "for /readyz 200")
    assert json.loads(get(metrics, "/readyz")[1]) == {"ready": True}
    pid = host.pause_shard(1)
    try:
        _status, body = wait_until(
            lambda: (answer := get(metrics, "/readyz"))[0] == 503 and answer,
            10.0,
            0.05,
            "for /readyz 503",
        )
        verdict = json.loads(body)
        assert verdict["ready"] is False
        assert any("shard 1" in reason for reason in verdict["reasons"])
        assert get(metrics, "/healthz")[0] == 200  # the supervisor lives
        host.wait_shard_replaced(1, pid)
    finally:
        host.resume(pid)
    wait_until(lambda: get(metrics, "/readyz")[0] == 200, 10.0, 0.05, "for /readyz 200 again")


def test_bad_requests_are_refused_and_never_crash(ucc_host):
    host, metrics = start(ucc_host, shards=1)
    assert get(metrics, "/nowhere")[0] == 404
    assert exchange(metrics, b"POST /metrics HTTP/1.1\r\n\r\n")[0] == 405
    assert exchange(metrics, b"garbage\r\n\r\n")[0] == 400
    assert exchange(metrics, b"GET /metrics HTTP/1.1\r\nbad header\r\n\r\n")[0] == 400
    assert exchange(metrics, b"GET / HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n")[0] == 431
    with socket.create_connection(metrics, timeout=10 * TIME_FACTOR) as sock:
        sock.sendall(b"GET /metr")  # and goes away half-way
    # clients that never finish their request hold no more than MAX_CLIENTS slots, and only
    # until READ_TIMEOUT: the others are closed at once, the server keeps answering
    idle = [socket.create_connection(metrics, timeout=10 * TIME_FACTOR) for _ in range(80)]
    try:
        for sock in idle:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        wait_until(lambda: get_or_none(metrics) == 200, 10.0, 0.05, "for an answer again")
    finally:
        for sock in idle:
            sock.close()
    assert get(metrics, "/metrics")[0] == 200
    assert get(metrics, "/healthz")[0] == 200
    assert host.status()["shards"][0]["state"] == "up"


def promtool_accepts(exposition: bytes) -> None:
    """With promtool on PATH (Debian's ``prometheus``): ``promtool check metrics`` finds
    nothing to say (names, units, help texts per Prometheus' conventions). Without it, the
    scrape above has already been read by prometheus_client's parser."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == b"" and checked.stderr.strip() == b""


def test_readyz_and_redis_up_follow_the_redis_link(ucc_host, redis_server):
    port = free_port()
    host = ucc_host(args=("--metrics", f"127.0.0.1:{port}", "--redis", redis_server.url))
    metrics = ("127.0.0.1", port)
    wait_until(lambda: get(metrics, "/readyz")[0] == 200, 10.0, 0.05, "for /readyz 200")
    samples = scrape(metrics)
    assert total(samples, "ucc_redis_up") == 1
    assert "ucc_redis_published_total" in samples
    assert "ucc_redis_reconnects_total" in samples
    assert total(samples, "ucc_presence_hosts") == 0  # no other host
    assert "ucc_presence_gaps_total" in samples
    assert total(samples, "ucc_topic_gaps_total") == 0  # no topic skipped a message
    assert "ucc_topic_gap_messages_total" in samples
    promtool_accepts(get(metrics, "/metrics")[1])
    with host.client() as client:
        client.broadcast_to_channel(CHANNEL, {"n": 1})
    wait_until(
        lambda: total(scrape(metrics), "ucc_redis_published_total") >= 1,
        10.0,
        0.05,
        "for the publication counted",
    )
    redis_server.stop()
    _status, body = wait_until(
        lambda: (answer := get(metrics, "/readyz"))[0] == 503 and answer,
        15.0,
        0.05,
        "for /readyz 503",
    )
    assert "the Redis link is down" in json.loads(body)["reasons"]
    assert total(scrape(metrics), "ucc_redis_up") == 0
    redis_server.start()
    wait_until(lambda: get(metrics, "/readyz")[0] == 200, 20.0, 0.05, "for /readyz 200 again")


def test_a_shard_refusal_429_is_a_handshake_outcome(ucc_host):
    host, metrics = start(ucc_host, 1, "--max-connections-per-user", "1")
    assert scrape(metrics)["ucc_handshakes_total"][(("status", "refused_per_user"),)] == 0
    url = f"{host.url}/?token={host.token(5)}"
    with connect(url, open_timeout=10 * TIME_FACTOR) as first:
        assert json.loads(first.recv(timeout=10 * TIME_FACTOR))["type"] == "hello"
        refused = 0
        for _ in range(3):
            try:
                with connect(url, open_timeout=10 * TIME_FACTOR) as extra:
                    extra.recv(timeout=10 * TIME_FACTOR)
            except InvalidStatus as exc:
                assert exc.response.status_code == 429
                refused += 1
        assert refused == 3
    wait_until(
        lambda: scrape(metrics)["ucc_handshakes_total"][(("status", "refused_per_user"),)] == 3,
        timeout=10,
        what="three shard refusals counted",
    )
