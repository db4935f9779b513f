"""Thread names and the bench's per-thread accounting, on this very process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from actors.osthread import name_this_thread
from shards.bench.probes import ThreadMeter, thread_counters


def test_a_thread_is_named_for_the_operating_system():
    names: list[str] = []

    def named() -> None:
        name_this_thread("ucc-test-a-very-long-name")
        names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=named)
    thread.start()
    thread.join(10)
    assert names == ["ucc-test-a-very"]  # the kernel keeps 15 bytes


def test_the_meter_gives_each_thread_its_cpu_and_switches_per_unit():
    me = psutil.Process()
    stop = threading.Event()

    def burn() -> None:
        name_this_thread("ucc-burner")
        deadline = time.monotonic() + 5
        while not stop.is_set() and time.monotonic() < deadline:
            sum(range(1000))

    thread = threading.Thread(target=burn)
    thread.start()
    try:
        meter = ThreadMeter([me]).start()
        start = time.process_time()
        while time.process_time() - start < 0.3:  # this process burns 0.3 s (both threads)
            stop.wait(0.01)
        meter.stop()  # while the thread lives: a thread that ended is gone from /proc
    finally:
        stop.set()
        thread.join(10)
    process = Path("/proc/self/comm").read_text().strip()
    per = meter.per(10)
    assert f"{process}/ucc-burner" in per
    cpu_us, switches = per[f"{process}/ucc-burner"]
    assert cpu_us > 0 and switches >= 0
    assert list(per) == sorted(per, key=lambda name: -per[name][0])  # busiest first
    assert meter.per(0) == {}


def test_counters_are_per_thread():
    counters = thread_counters([psutil.Process()])
    assert (Path("/proc/self/comm").read_text().strip(), threading.get_native_id()) in counters
    assert all(cpu >= 0 and switches >= 0 for cpu, switches in counters.values())
