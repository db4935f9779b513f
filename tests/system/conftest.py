"""System tests start real ``ucc serve`` processes (fixtures from :mod:`shards.testing`).

Every test in this directory is marked ``slow``: ``pytest -m "not slow"`` runs the unit tests
only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.slow)
