"""A step of the wall clock (NTP, a VM resumed) must not look like inactivity.

The server runs with a ``sitecustomize`` that steps ``time.time()`` forward by an hour once a
file exists, in the supervisor and the shards alike (only the wall clock: monotonic time goes
on as it does). The stale sweep must go on measuring silence in monotonic time.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from shards.testing import TIME_FACTOR, Cluster

STEP = 3600.0
SITECUSTOMIZE = f"""
import os, time
_wall = time.time
_flag = os.environ["UCC_TEST_WALL_STEP_FILE"]
def _stepped():
    return _wall() + ({STEP} if os.path.exists(_flag) else 0.0)
time.time = _stepped
"""


def test_a_wall_clock_step_does_not_close_idle_connections(ucc_cluster, tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = tmp_path / "stepped"
    timeout = 5.0
    cluster: Cluster = ucc_cluster(
        shards=1,
        args=("--heartbeat", "1", "--heartbeat-timeout", str(timeout)),
        env={
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "UCC_TEST_WALL_STEP_FILE": str(flag),
        },
    )
    host, port = cluster.url.removeprefix("ws://").split(":")
    token = cluster.token(1, ttl=10 * STEP)  # still valid after the step
    request = (
        f"GET /?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    # a raw client that never answers the server's pings: silent from its hello on
    with socket.create_connection((host, int(port)), timeout=30 * TIME_FACTOR) as sock:
        sock.sendall(request)
        received = b""
        while b'"hello"' not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        silent_since = time.monotonic()
        # the server's first ping (after --heartbeat, 1 s, of silence) says it has taken note
        # of the silence so far; then the wall clock jumps an hour ahead, all over the server
        while b"\x89" not in received[received.index(b'"hello"') :]:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        flag.touch()
        while b"\x88" not in received:  # until the server's close frame
            chunk = sock.recv(65536)
            assert chunk, "closed without a close frame"
            received += chunk
        closed_after = time.monotonic() - silent_since
    close = received[received.index(b"\x88") :]
    assert int.from_bytes(close[2:4], "big") == 4002  # heartbeat timeout: silence, measured
    # in monotonic time: not at the first sweep after the step (within ~1 s of it, ~2.5 s of
    # silence), but once the connection has really been silent for the timeout (less one
    # sweep's granularity)
    assert closed_after >= timeout - 1.0, closed_after
