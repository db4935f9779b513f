"""The operating system's name of the calling thread (Linux: what ``top -H``, ``ps -L`` and
/proc/<pid>/task/<tid>/comm show), so that a host's threads can be told apart when measuring:
``ucc-router``, ``ucc-shard-0``, ``ucc-redis-*``, and ZeroMQ's own ``ZMQbg/IO/0``.

Owns: :func:`name_this_thread`. Must never fail: on a platform without ``prctl`` it does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

PR_SET_NAME = 15
MAX_NAME = 15  # bytes the kernel keeps (16 with the terminating NUL)


def name_this_thread(name: str) -> None:
    """Give the calling OS thread ``name`` (truncated to 15 bytes)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:MAX_NAME]), 0, 0, 0)
