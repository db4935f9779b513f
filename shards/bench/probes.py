"""Measurements taken from outside the server: CPU time, resident memory, the cache's memory.

Owns: summing user + system CPU time over a set of processes (psutil), summing their RSS,
the CPU time and context switches of each of their threads (:class:`ThreadMeter`, from /proc:
the server names its threads ``ucc-router``, ``ucc-shard-N``...), raising this process's
open-files limit, and measuring the bytes of a :class:`~actors.cache.UserConnectionCache`
holding the scenario's connections.

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
import os
import resource
import time
import tracemalloc
from collections.abc import Iterable, Sequence
from pathlib import Path

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


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_counters(
    processes: Iterable[psutil.Process],
) -> dict[tuple[str, int], tuple[float, int]]:
    """For each thread of ``processes``: (CPU seconds, context switches), keyed by (its name,
    its id); the name is its process's, then ``/`` and its own if it differs
    (``ucc-supervisor/ZMQbg/IO/0``). Linux only (empty elsewhere)."""
    counters: dict[tuple[str, int], tuple[float, int]] = {}
    for proc in processes:
        base = Path(f"/proc/{proc.pid}")
        try:
            process_name = (base / "comm").read_text().strip()
            tasks = list((base / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                name = (task / "comm").read_text().strip()
                stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
                status = (task / "status").read_text()
            except (OSError, IndexError):
                continue  # the thread ended meanwhile
            cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS  # utime, stime
            switches = sum(
                int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
            )
            label = process_name if name == process_name else f"{process_name}/{name}"
            counters[(label, int(task.name))] = (cpu, switches)
    return counters


class ThreadMeter:
    """CPU time and context switches of each thread of ``processes`` between :meth:`start`
    and :meth:`stop` (to the clock tick: 10 ms on most systems), per unit of work."""

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        self.processes = list(processes)
        self._before: dict[tuple[str, int], tuple[float, int]] = {}
        self.used: dict[str, tuple[float, int]] = {}  # by name: threads of one name added up

    def start(self) -> ThreadMeter:
        self._before = thread_counters(self.processes)
        return self

    def stop(self) -> ThreadMeter:
        # per thread, then by name: a thread that ended meanwhile takes its time with it (it
        # is not subtracted from the others of its name); one that started counts from 0
        used: dict[str, tuple[float, int]] = {}
        for key, (cpu, switches) in thread_counters(self.processes).items():
            cpu0, switches0 = self._before.get(key, (0.0, 0))
            total = used.get(key[0], (0.0, 0))
            used[key[0]] = (total[0] + cpu - cpu0, total[1] + switches - switches0)
        self.used = used
        return self

    def per(self, units: int) -> dict[str, list[float]]:
        """Each thread's ``[CPU µs, context switches]`` per unit (a command), busiest first;
        threads that used nothing are left out."""
        if units <= 0:
            return {}
        rows = sorted(self.used.items(), key=lambda item: -item[1][0])
        return {
            name: [round(cpu * 1e6 / units, 1), round(switches / units, 2)]
            for name, (cpu, switches) in rows
            if cpu > 0 or switches > 0
        }


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
