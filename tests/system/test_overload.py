"""Overload and isolation: a client, a publisher or a burst can only ever hurt itself.

Every test here runs real ``ucc serve`` processes and real sockets, and checks what a user
would see: no shard is restarted (each shard's incarnation number is unchanged), bystanders keep
receiving, offenders are closed with the documented code or refused with ``overloaded``, and an
``ok`` reply is always delivered. Latency figures are printed (``-s`` shows them) and asserted
only loosely: tight figures belong to ``ucc bench``. The 5,000-idle-sockets attack is in
``test_handshake_limits.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as connect_sync

from shards.client import AsyncClient, Client, Overloaded
from shards.testing import TIME_FACTOR, Cluster, connect_peer, wait_until

CHANNEL = 1


def epochs(cluster: Cluster) -> list[int]:
    """Each shard's incarnation: unchanged means no shard was restarted."""
    return [row["epoch"] for row in cluster.status()["shards"]]


def users_on(cluster: Cluster, shard: int, count: int, start: int = 1) -> list[int]:
    return [u for u in range(start, start + 1000) if cluster.shard_of(u) == shard][:count]


def upgrade(cluster: Cluster, user: int, channels: list[int] | None = None) -> bytes:
    token = cluster.token(user, channels)
    return (
        f"GET /?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def address(cluster: Cluster) -> tuple[str, int]:
    host, port = cluster.url.removeprefix("ws://").split(":")
    return host, int(port)


def masked_text(payload: bytes) -> bytes:
    """A client text frame (masked with a zero key, so the payload reads as it is)."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def latency_probe(
    client: AsyncClient, peer, seconds: float, every: float = 0.05
) -> list[float]:
    """Broadcast to CHANNEL every ``every`` s for ``seconds``; how long each took to reach
    ``peer`` (every one must arrive)."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    probe = 0
    while time.monotonic() < deadline:
        probe += 1
        sent = time.monotonic()
        await client.broadcast_to_channel(CHANNEL, {"probe": probe})
        await peer.wait_for(
            lambda frames, n=probe: any(
                f.get("type") == "message" and f["data"].get("probe") == n for f in frames
            ),
            timeout=10,
        )
        latencies.append(time.monotonic() - sent)
        await asyncio.sleep(every)  # pacing the probe, not synchronisation
    return latencies


# -- bytes pipelined after the upgrade request ---------------------------------------------

CLOSE_FRAME = bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big")


def pipelined_tails(cluster: Cluster) -> list[bytes]:
    return [
        b"\0" * 10,  # not a frame at all
        upgrade(cluster, 999),  # a second GET
        CLOSE_FRAME,  # a close frame in the same write as the request
        b"\xff" * 64,
        masked_text(b'{"type":"ping"}') + b"\0\0",
    ]


async def send_raw(cluster: Cluster, data: bytes, timeout: float = 5.0) -> bytes:
    """Write ``data`` in one go; what the server answers until it closes (or the deadline)."""
    reader, writer = await asyncio.open_connection(*address(cluster))
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout * TIME_FACTOR):
                while chunk := await reader.read(65536):
                    received += chunk
        return received
    finally:
        writer.close()


def test_bytes_pipelined_after_the_upgrade_cost_only_that_connection(ucc_cluster):
    cluster: Cluster = ucc_cluster(shards=2)
    before = epochs(cluster)
    tails = pipelined_tails(cluster)

    async def scenario() -> None:
        peers = [await connect_peer(cluster, u, [CHANNEL]) for u in (*users_on(cluster, 0, 1),)]
        peers += [await connect_peer(cluster, users_on(cluster, 1, 1)[0], [CHANNEL])]
        async with AsyncClient(cluster.command, timeout=5 * TIME_FACTOR) as client:
            for attempt in range(20):
                user = 100 + attempt  # both shards get some
                answer = await send_raw(cluster, upgrade(cluster, user) + tails[attempt % 5], 1)
                # the connection is failed (often before its 101 is written) or served
                assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:100]
                await client.broadcast_to_channel(CHANNEL, {"after": attempt})
                for peer in peers:
                    await peer.wait_for(
                        lambda frames, n=attempt: any(
                            f.get("type") == "message" and f["data"].get("after") == n
                            for f in frames
                        )
                    )
            assert all(not peer.closed.is_set() for peer in peers)
        for peer in peers:
            await peer.close()

    asyncio.run(scenario())
    assert cluster.proc.poll() is None
    assert epochs(cluster) == before


def test_random_bytes_after_the_upgrade_never_hurt_a_bystander(ucc_cluster):
    """Fuzz: request + arbitrary tail, written in arbitrary pieces, to the shard a bystander
    shares; the shard survives every one and the bystander receives throughout."""
    cluster: Cluster = ucc_cluster(shards=1)
    before = epochs(cluster)
    token = cluster.token(1, [CHANNEL])
    timeout = 10 * TIME_FACTOR
    with (
        connect_sync(f"{cluster.url}/?token={token}", open_timeout=timeout) as bystander,
        Client(cluster.command, timeout=5 * TIME_FACTOR) as client,
    ):
        assert json.loads(bystander.recv(timeout))["type"] == "hello"
        rounds = [0]

        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            tail=st.one_of(
                st.binary(max_size=200),
                st.lists(st.sampled_from(pipelined_tails(cluster)), max_size=3).map(b"".join),
            ),
            cuts=st.lists(st.integers(0, 1200), max_size=4),
        )
        def attempt(tail: bytes, cuts: list[int]) -> None:
            rounds[0] += 1
            data = upgrade(cluster, 2 + rounds[0] % 50) + tail
            edges = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
            with socket.create_connection(address(cluster), timeout=timeout) as sock:
                for start, end in itertools.pairwise(edges):
                    sock.sendall(data[start:end])
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass
            client.broadcast_to_channel(CHANNEL, {"round": rounds[0]})
            frame = json.loads(bystander.recv(timeout))
            assert frame["data"] == {"round": rounds[0]}

        attempt()
    assert cluster.proc.poll() is None
    assert epochs(cluster) == before


# -- a frame flood from clients --------------------------------------------------------------

FLOODER = r"""
import socket, sys, time
host, port, seconds, *requests = sys.argv[1:]
frame = bytes([0x81, 0x8F]) + b"\0\0\0\0" + b'{"type":"ping"}'
chunk = frame * 2000
deadline = time.monotonic() + float(seconds)
policy_closes = connects = 0
while time.monotonic() < deadline:
    for request in requests:
        connects += 1
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request.encode())
            sock.settimeout(0.05)
            seen = b""
            end = min(deadline, time.monotonic() + 2)
            while time.monotonic() < end:
                try:
                    sock.send(chunk)
                except (BlockingIOError, socket.timeout):
                    pass
                except OSError:
                    break
                try:
                    data = sock.recv(1 << 20)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                seen = (seen + data)[-4096:]
                if b"\x88" in seen and (1008).to_bytes(2, "big") in seen:
                    policy_closes += 1
                    break
print(connects, policy_closes, flush=True)
"""


def start_flooder(cluster: Cluster, users: list[int], seconds: float) -> subprocess.Popen[bytes]:
    host, port = address(cluster)
    requests = [upgrade(cluster, u, [CHANNEL]).decode() for u in users]
    return subprocess.Popen(
        [sys.executable, "-c", FLOODER, host, str(port), str(seconds), *requests],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


UNLIMITED = (
    "--client-frame-rate=1e12",
    "--client-frame-burst=1000000000",
    "--client-byte-rate=1e15",
    "--client-byte-burst=1000000000000",
)


@pytest.mark.parametrize(
    ("limits", "seconds"),
    [((), 20.0), (UNLIMITED, 10.0)],
    ids=["default-budget", "no-budget-busy-shard"],
)
def test_a_frame_flood_does_not_restart_the_shard_nor_delay_a_bystander(
    ucc_cluster, limits, seconds
):
    cluster: Cluster = ucc_cluster(shards=2, args=limits)
    before = epochs(cluster)
    flooders, (bystander_user,) = users_on(cluster, 0, 3), users_on(cluster, 0, 1, start=500)
    flood = start_flooder(cluster, flooders, seconds)
    try:

        async def scenario() -> list[float]:
            peer = await connect_peer(cluster, bystander_user, [CHANNEL])
            async with AsyncClient(cluster.command, timeout=10 * TIME_FACTOR) as client:
                latencies = await latency_probe(client, peer, seconds - 2)
            await peer.close()
            return latencies

        latencies = asyncio.run(scenario())
        out, _ = flood.communicate(timeout=seconds + 30)
        connects, policy_closes = map(int, out.split())
    finally:
        stop(flood)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(
        f"\nflood {limits or 'default budget'}: {len(latencies)} probes, bystander latency"
        f" p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; flooder connects {connects},"
        f" closed 1008 {policy_closes}"
    )
    assert epochs(cluster) == before  # busy, never hung: no restart
    assert p99 < 1.0 * TIME_FACTOR  # the goal is ~100 ms; loose here, see ucc bench
    status = cluster.status()["shards"][0]
    if limits:
        assert policy_closes == 0 and "closed_rate_limit" not in status
    else:
        assert policy_closes >= 1
        assert status["closed_rate_limit"] >= policy_closes


# -- backends -----------------------------------------------------------------------------------


def test_a_backend_that_never_reads_cannot_delay_another(ucc_cluster):
    cluster: Cluster = ucc_cluster(shards=2)
    supervisor = psutil.Process(cluster.proc.pid)
    rss_before = supervisor.memory_info().rss
    context = zmq.Context.instance()
    deaf = context.socket(zmq.DEALER)
    deaf.setsockopt(zmq.LINGER, 0)
    deaf.connect(cluster.command)
    command = b'{"cmd":"broadcast_to_channel","channel":5,"data":"x"}'
    stop_flag = asyncio.Event()

    async def flood() -> int:
        sent = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and sent < 2_000_000:
            try:
                for _ in range(500):
                    deaf.send(command, zmq.NOBLOCK)
                    sent += 1
            except zmq.Again:
                pass
            await asyncio.sleep(0)
        stop_flag.set()
        return sent

    async def measure() -> list[float]:
        rtts = []
        async with AsyncClient(cluster.command, timeout=10 * TIME_FACTOR) as client:
            while not stop_flag.is_set():
                start = time.monotonic()
                await client.request("router_stats")
                rtts.append(time.monotonic() - start)
                await asyncio.sleep(0.02)  # pacing
        return rtts

    async def scenario() -> tuple[int, list[float]]:
        sent, rtts = await asyncio.gather(flood(), measure())
        return sent, rtts

    try:
        sent, rtts = asyncio.run(scenario())
        with Client(cluster.command, timeout=5 * TIME_FACTOR) as client:
            stats = wait_until(
                lambda: (s := client.request("router_stats"))["dropped_replies"] and s,
                10,
                what="for replies to the deaf backend to be dropped",
            )
    finally:
        deaf.close(linger=0)
    growth = supervisor.memory_info().rss - rss_before
    p99 = percentile(rtts, 0.99)
    print(
        f"\ndeaf backend sent {sent} commands; another backend's RTT p50"
        f" {percentile(rtts, 0.5) * 1000:.1f} ms p99 {p99 * 1000:.1f} ms;"
        f" replies dropped {stats['dropped_replies']}; supervisor RSS +{growth >> 20} MiB"
    )
    assert p99 < 0.5 * TIME_FACTOR
    assert stats["dropped_replies"] > 0
    assert growth < 200 << 20


def test_an_ok_is_delivered_and_an_overloaded_is_not(ucc_cluster):
    """A stopped shard takes no credit back: the router acks exactly its window, then refuses;
    once the shard runs again, exactly the acknowledged messages arrive."""
    window = 5
    cluster: Cluster = ucc_cluster(
        shards=2, args=(f"--shard-queue-messages={window}", "--hang-timeout=60")
    )
    (member,) = users_on(cluster, 0, 1)

    async def scenario() -> None:
        peer = await connect_peer(cluster, member, [CHANNEL])
        pid = cluster.shard_pid(0)
        async with AsyncClient(cluster.command, timeout=5 * TIME_FACTOR) as client:
            await settled(client)  # the status query above is credited back
        os.kill(pid, signal.SIGSTOP)
        try:
            outcomes = []
            async with AsyncClient(cluster.command, timeout=5 * TIME_FACTOR) as client:
                for i in range(20):
                    try:
                        await client.broadcast_to_channel(CHANNEL, {"i": i})
                        outcomes.append("ok")
                    except Overloaded as exc:
                        assert "nothing was sent" in exc.message
                        outcomes.append("overloaded")
                stats = await client.request("router_stats")
        finally:
            cluster.resume(pid)
        assert outcomes == ["ok"] * window + ["overloaded"] * (20 - window)
        assert stats["commands_refused"] == 20 - window
        async with AsyncClient(cluster.command, timeout=5 * TIME_FACTOR) as client:
            await wait_for_ok(client)
        await peer.wait_for(lambda frames: any(f.get("data") == "last" for f in frames), timeout=10)
        assert [m["data"] for m in peer.messages] == [{"i": i} for i in range(window)] + ["last"]
        await peer.close()

    async def settled(client: AsyncClient) -> None:
        deadline = time.monotonic() + 10 * TIME_FACTOR
        while (await client.request("router_stats"))["queued_to_shards"]["0"][0]:
            assert time.monotonic() < deadline, "shard 0 never consumed its queue"
            await asyncio.sleep(0.05)

    async def wait_for_ok(client: AsyncClient) -> None:
        deadline = time.monotonic() + 10 * TIME_FACTOR
        while True:  # credit comes back with the resumed shard's next heartbeat
            try:
                await client.broadcast_to_channel(CHANNEL, "last")
                return
            except Overloaded:
                assert time.monotonic() < deadline, "the window never reopened"
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_invalid_utf8_in_a_text_frame_closes_1007(ucc_cluster):
    cluster: Cluster = ucc_cluster(shards=1)
    timeout = 10 * TIME_FACTOR
    with connect_sync(f"{cluster.url}/?token={cluster.token(3)}", open_timeout=timeout) as ws:
        assert json.loads(ws.recv(timeout))["type"] == "hello"
        ws.send(b'{"type":"ping","x":"\xc3("}', text=True)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    assert cluster.status()["shards"][0]["closed_invalid_utf8"] == 1
