"""Measurements taken from outside the server: CPU time, resident memory, the cache's memory.

Owns: summing user + system CPU time over a set of processes (psutil), summing their RSS,
raising this process's open-files limit, and measuring the bytes of a
:class:`~actors.cache.UserConnectionCache` holding the scenario's connections.

The cache figure is measured *in the bench process*, not inside the server: the bench builds,
for each shard, the same ``UserConnectionCache`` the shard's CacheActor would hold (same users,
channels and connection ids, split with the server's sharding function), with ``recipients()``
materialised for every channel as after a first broadcast, and reads the bytes it allocated with
``tracemalloc``. It is the cache's own data structure, so no server hook is needed. Must never
change the server, and never hide a process it could not measure (it is skipped, and the
figure covers the processes that were there).
"""

from __future__ import annotations

import contextlib
import resource
import time
import tracemalloc
from collections.abc import Iterable, Sequence

import psutil

from actors.cache import UserConnectionCache
from actors.ids import ChannelId, ConnId, UserId, stable_hash


def raise_open_files_limit(wanted: int = 1 << 20) -> int:
    """Raise RLIMIT_NOFILE: the soft limit to the hard one, and both to ``wanted`` when this
    process may (root). Servers the bench starts inherit it. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError, ValueError), open("/proc/sys/fs/nr_open") as handle:
        wanted = min(wanted, int(handle.read()))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User + system CPU seconds of ``processes`` (not of their waited-for children)."""
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def rss_bytes(processes: Iterable[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class CpuMeter:
    """CPU seconds used by a fixed set of processes between :meth:`start` and :meth:`stop`.

    A process that exits in between takes its CPU time with it (the kernel keeps no record we
    can read), so :attr:`lost` lists such pids and the figure must not be trusted then."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self.processes = list(processes)
        self.cpu = 0.0
        self.wall = 0.0
        self.lost: list[int] = []
        self._cpu0 = 0.0
        self._wall0 = 0.0

    def start(self) -> CpuMeter:
        self._cpu0 = cpu_seconds(self.processes)
        self._wall0 = time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        self.cpu = cpu_seconds(self.processes) - self._cpu0
        self.wall = time.monotonic() - self._wall0
        self.lost = [proc.pid for proc in self.processes if not proc.is_running()]
        return self

    @property
    def percent(self) -> float:
        """CPU use as a percentage of one core (200 = two cores busy)."""
        return 100.0 * self.cpu / self.wall if self.wall > 0 else 0.0


def cache_bytes(plans: Sequence[tuple[int, tuple[int, ...]]], shards: int) -> int:
    """Bytes allocated by the shards' caches holding one connection per plan (see above)."""
    now = time.time()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        caches = [UserConnectionCache() for _ in range(max(1, shards))]
        next_conn = [1] * len(caches)
        for offset, (user, channels) in enumerate(plans):
            index = stable_hash(user, len(caches))
            conn = ConnId(next_conn[index])
            next_conn[index] += 1
            caches[index].connect(
                conn, UserId(user), [ChannelId(c) for c in channels], now + offset * 1e-4
            )
        for cache in caches:
            for channel in cache.channels():
                cache.recipients(channel)
        used = tracemalloc.get_traced_memory()[0] - before
        del caches
    finally:
        tracemalloc.stop()
    return used
