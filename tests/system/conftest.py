"""System tests start real ``ucc serve`` processes (fixtures from :mod:`shards.testing`).

Every test in this directory is marked ``slow``: ``pytest -m "not slow"`` runs the unit tests
only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shards.testing import RedisClusterServer, RedisServer

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["redis", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of a single Redis, then of a 3-primary Redis Cluster (the kit's fixtures)."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_server").url)
    return str(request.getfixturevalue("redis_cluster_server").url)


@pytest.fixture(scope="module", params=["single", "cluster"])
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer | RedisClusterServer]:
    """A single Redis, then a 3-node Redis Cluster, shared by a module's tests (each test uses
    its own cluster name, so its keys and topics are its own)."""
    started = RedisServer() if request.param == "single" else RedisClusterServer()
    try:
        yield started
    finally:
        started.close()
