"""Process limits that ``ucc serve`` raises at start (shards, being child processes, inherit them).

Owns: the open-files limit. Every connection is a file descriptor, in the supervisor while its
handshake is pending and in its shard afterwards; the usual soft default of 1024 turns a few
hundred idle sockets into EMFILE for everyone. Must never lower a limit, nor fail ``serve`` when
a limit cannot be raised (it says what it got instead).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import NamedTuple

NR_OPEN = Path("/proc/sys/fs/nr_open")  # Linux: the most a process may ever open


class OpenFilesLimit(NamedTuple):
    """The soft RLIMIT_NOFILE before and after raising it, and the hard limit."""

    before: int
    after: int
    hard: int

    def allows(self, files: int) -> bool:
        """Whether the (raised) soft limit lets the process open ``files`` files."""
        return self.after == resource.RLIM_INFINITY or self.after >= files

    def describe(self) -> str:
        """The log line, e.g. ``open files limit: 1024 -> 1048576``."""
        if self.before != self.after:
            return f"open files limit: {_shown(self.before)} -> {_shown(self.after)}"
        if self.after == self.hard:
            return f"open files limit: {_shown(self.after)} (already the hard limit)"
        return f"open files limit: {_shown(self.after)} (could not raise it to {_shown(self.hard)})"


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise the soft RLIMIT_NOFILE as far as allowed: to the hard limit (or, if that is
    unlimited, to the most the kernel allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in _targets(hard):
        if soft == resource.RLIM_INFINITY or target <= soft:
            break  # never lower it
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue  # e.g. an unlimited hard limit that the kernel caps lower: try the cap
        break
    return OpenFilesLimit(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)


def _targets(hard: int) -> list[int]:
    """The soft limits to try, best first."""
    targets = [hard]
    if hard == resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError):
            targets.append(int(NR_OPEN.read_text()))
        targets.append(1_048_576)
    return targets


def _shown(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)
