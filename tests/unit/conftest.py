"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from canned import CannedServer


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    """A canned command endpoint (canned.py) on 127.0.0.1, closed at the end of the test."""
    server = CannedServer()
    try:
        yield server
    finally:
        server.close()
