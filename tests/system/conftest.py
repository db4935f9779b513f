"""System tests start real ``ucc serve`` processes (fixtures from :mod:`shards.testing`).

Every test in this directory is marked ``slow``: ``pytest -m "not slow"`` runs the unit tests
only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chromium_kit import find_chromium
from playwright.sync_api import Browser, Page, sync_playwright

from shards.testing import TIME_FACTOR, RedisClusterServer, RedisServer

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


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless, driven by Playwright (one browser per test module: while
    Playwright's sync API runs, its event loop is the running loop of the main thread, so a
    test that calls ``asyncio.run`` must not share a module with a browser test)."""
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(
            executable_path=find_chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def new_page(
    chromium: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Page]]:
    """``new_page(name)``: a page in a fresh browser context (its own storage, like a new
    tab of another user). At the end of the test, each page's screenshot is saved as
    ``tmp_path/<name>.png`` and its console errors are reported if the test failed."""
    pages: list[tuple[str, Page, list[str]]] = []

    def make(name: str) -> Page:
        context = chromium.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.set_default_timeout(10_000 * TIME_FACTOR)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        pages.append((name, page, errors))
        return page

    try:
        yield make
    finally:
        for name, page, errors in pages:
            try:
                if not page.is_closed():
                    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            finally:
                page.context.close()
            if errors:
                print(f"browser console errors of {name} ({request.node.name}): {errors}")
