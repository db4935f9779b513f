"""Child processes that are killed as a group: start one in a new session, kill it whole.

Owns: starting a command in its own session (so its process group is its pid, and everything it
forks stays in it), killing that group with SIGKILL and waiting for the child with a deadline,
and closing the pipes the caller asked for. Shared by the test kit (:mod:`shards.testing`) and
the bench (:mod:`shards.bench.servers`), which must never leave a process behind. Must never
signal a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

Process = subprocess.Popen[bytes]


def start(argv: Sequence[str], **popen: Any) -> Process:
    """Start ``argv`` in a new session (``popen``: more ``subprocess.Popen`` arguments)."""
    return subprocess.Popen(argv, start_new_session=True, **popen)


def kill(proc: Process, timeout: float = 10.0) -> int | None:
    """SIGKILL ``proc``'s whole process group, wait for ``proc`` at most ``timeout`` seconds,
    close its pipes; returns its exit code (None if it did not exit in time). Idempotent."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    code: int | None = None
    with contextlib.suppress(subprocess.TimeoutExpired):
        code = proc.wait(timeout)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return code
