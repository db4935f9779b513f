"""Deadlines for tests: the time factor, and polling a condition until it holds.

Owns: ``UCC_TEST_TIME_FACTOR`` (read once; every deadline of the kit is multiplied by it) and
:func:`wait_until` / :func:`wait_until_async`, which fail with an AssertionError that says what
was awaited. :func:`wait_until` sleeps: never call it from a coroutine, use
:func:`wait_until_async` there.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

TIME_FACTOR = float(os.environ.get("UCC_TEST_TIME_FACTOR", "1"))


def _timed_out(timeout: float, what: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout * TIME_FACTOR:.1f} s waiting {what}")


def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); AssertionError at the
    deadline (``timeout`` seconds times :data:`TIME_FACTOR`)."""
    deadline = time.monotonic() + timeout * TIME_FACTOR
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """:func:`wait_until` for coroutines: ``condition`` may be a plain function or a coroutine
    function (awaited); the loop runs between polls."""
    deadline = time.monotonic() + timeout * TIME_FACTOR
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(interval)
