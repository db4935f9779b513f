"""The pytest plugin of the kit (the ``pytest11`` entry point ``ucc``): its fixtures.

Owns: ``ucc_host`` (a factory of :class:`~shards.testing.host.Host`), ``ucc_cluster`` (the
same factory under its former name), ``redis_server`` and ``redis_cluster_server``. Everything
a fixture starts is killed when the test ends, whatever its outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from shards.testing.host import Host
from shards.testing.redis import RedisClusterServer, RedisServer

Server = TypeVar("Server", RedisServer, RedisClusterServer)


def _closed_at_the_end(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis-protocol server on a free port, killed when the test ends."""
    yield from _closed_at_the_end(RedisServer())


@pytest.fixture
def redis_cluster_server() -> Iterator[RedisClusterServer]:
    """A fresh 3-node Redis Cluster (``url``: ``redis+cluster://…``), killed when the test ends."""
    yield from _closed_at_the_end(RedisClusterServer())


@pytest.fixture
def ucc_host() -> Iterator[Callable[..., Host]]:
    """A factory of ucc hosts, ``ucc_host(shards=2, args=(...), env={...}, secret=...)``, all
    torn down (process group killed) when the test ends, whatever its outcome."""
    hosts: list[Host] = []

    def start(**kwargs: Any) -> Host:
        host = Host(**kwargs)
        hosts.append(host)
        return host

    try:
        yield start
    finally:
        for host in hosts:
            host.close()


@pytest.fixture
def ucc_cluster(ucc_host: Callable[..., Host]) -> Callable[..., Host]:
    """The former name of ``ucc_host``, kept for existing tests: each call starts one host."""
    return ucc_host
