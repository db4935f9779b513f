"""The backend side of a benchmark: broadcast commands over ZeroMQ, at a rate or flat out.

Owns: one DEALER socket to the command endpoint, pre-encoded commands (``data`` carries
``{"t": <monotonic ns at send>, "p": <padding>}``, so clients compute the delivery latency),
pipelining with a bounded number of unanswered commands, an optional *gate* (the fan-out
scenario holds publishing while the slowest sentinel client is too far behind, which is what
"as fast as the server absorbs" means), and the command round-trip histogram. A command the
server refuses as ``overloaded`` is counted apart (nothing of it was delivered) and makes the
publisher pause for ``BACKOFF`` before its next send, as a well-behaved backend would. Must
never block the event loop (every ZeroMQ call is ``NOBLOCK``) and never run unbounded: it stops
at ``count`` commands or at ``deadline``, whichever comes first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from shards.bench.loadclient import bucket

BACKOFF = 0.005  # seconds without sending after an ``overloaded`` reply
# From PACED_RATE commands/s, what is due goes out once per PACE and replies are read then, not
# as they come. Waking per command (a 50 µs wait at 20,000/s) made the bench's own process
# take ~117 % of a core at `direct --rate 20000`, against ~32 % paced: CPU taken from the
# server it measures. Round trips read that way are up to PACE too long (conservative); below
# PACED_RATE (so in `rooms --rate 1000` and every fan-out) every reply still wakes the loop.
PACE = 0.001
PACED_RATE = 2000.0
STAMP_DATA_BYTES = 30  # {"t":<19 digits>,"p":"  and  "}
Target = Callable[[int], tuple[str, int]]  # command index -> ("channel" | "user", id)


def schedule(count: int, rate: float, arrivals: str = "even", seed: int = 1) -> Iterator[float]:
    """When each of ``count`` commands at ``rate`` per second is due, in seconds from the
    start, one at a time (a long run holds none of them): evenly spaced (``even``), or as
    independent arrivals (``poisson``: many users, each sending on their own; seeded, so two
    runs send at the same times)."""
    if count <= 0:
        return iter(())
    if arrivals == "poisson":
        rng = random.Random(seed)
        gaps = (rng.expovariate(rate) for _ in range(count - 1))
        return itertools.accumulate(gaps, initial=0.0)
    return (n / rate for n in range(count))


def payload_padding(payload: int) -> bytes:
    """Padding so that the JSON ``data`` is ``payload`` bytes long."""
    return b"x" * max(0, payload - STAMP_DATA_BYTES)


@dataclass(slots=True)
class PublishResult:
    sent: int = 0
    acked: int = 0  # replies received (ok, refused or failed)
    refused: int = 0  # ``overloaded`` replies: not delivered, by the server's own account
    errors: int = 0  # other failures
    first_error: str = ""
    t_first_ns: int = 0
    t_last_ns: int = 0  # the last send
    t_last_ack_ns: int = 0
    rtt_hist: dict[int, int] = field(default_factory=dict)
    rtt_max_ns: int = 0
    counts: dict[tuple[str, int], int] = field(default_factory=dict)  # ok replies per target


def merge(results: list[PublishResult]) -> PublishResult:
    """The results of several publishers of one run, as one (the first send, the last send and
    the last reply of any; counts and histograms summed)."""
    if len(results) == 1:
        return results[0]
    out = PublishResult()
    for one in results:
        out.sent += one.sent
        out.acked += one.acked
        out.refused += one.refused
        out.errors += one.errors
        out.first_error = out.first_error or one.first_error
        out.rtt_max_ns = max(out.rtt_max_ns, one.rtt_max_ns)
        for index, n in one.rtt_hist.items():
            out.rtt_hist[index] = out.rtt_hist.get(index, 0) + n
        for key, n in one.counts.items():
            out.counts[key] = out.counts.get(key, 0) + n
    out.t_first_ns = min(one.t_first_ns for one in results)
    out.t_last_ns = max(one.t_last_ns for one in results)
    out.t_last_ack_ns = max(one.t_last_ack_ns for one in results)
    return out


class Publisher:
    """Commands to one server; one per run. Use :meth:`run` once, then :meth:`close`."""

    def __init__(self, endpoint: str, payload: int = 100, window: int = 1000) -> None:
        self.context: zmq.Context[Any] = zmq.Context.instance()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.padding = payload_padding(payload)
        self.window = window
        self._sent_at: dict[int, tuple[int, tuple[str, int]]] = {}  # id -> (ns, target)
        self._wake = asyncio.Event()
        self._pause_until = 0.0  # monotonic: backing off after an overloaded reply

    def close(self) -> None:
        self.sock.close(linger=0)

    def _encode(self, request_id: int, kind: str, target: int) -> bytes:
        now = time.monotonic_ns()
        if kind == "channel":
            head = b'{"id":%d,"cmd":"broadcast_to_channel","channel":%d' % (request_id, target)
        else:
            head = b'{"id":%d,"cmd":"broadcast_to_user","user":%d' % (request_id, target)
        return head + b',"data":{"t":%d,"p":"%b"}}' % (now, self.padding)

    def _drain(self, result: PublishResult) -> None:
        sock = self.sock
        now = time.monotonic_ns()
        while True:
            try:
                reply = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            comma = reply.find(b",")
            try:
                request_id = int(reply[6:comma])
            except ValueError:
                request_id = -1
            entry = self._sent_at.pop(request_id, None)
            if entry is None:
                continue
            sent, key = entry
            result.acked += 1
            result.t_last_ack_ns = now
            if reply.startswith(b',"ok":true', comma):
                result.counts[key] = result.counts.get(key, 0) + 1
            elif b'"code":"overloaded"' in reply:
                result.refused += 1
                self._pause_until = time.monotonic() + BACKOFF
            else:
                result.errors += 1
                if not result.first_error:
                    result.first_error = reply[:200].decode(errors="replace")
            rtt = now - sent
            index = bucket(rtt)
            result.rtt_hist[index] = result.rtt_hist.get(index, 0) + 1
            result.rtt_max_ns = max(result.rtt_max_ns, rtt)

    async def run(
        self,
        target: Target,
        count: int,
        rate: float | None,
        deadline: float,
        gate: Callable[[int], bool] | None = None,
        on_progress: Callable[[PublishResult], None] | None = None,
        arrivals: str = "even",
    ) -> PublishResult:
        """Send up to ``count`` commands (``rate`` per second, spaced as ``arrivals`` says:
        see :func:`schedule`; or flat out when None) until ``deadline``
        (``time.monotonic()``); then wait, until the deadline plus 5 s at most, for the
        replies to those sent."""
        times = schedule(count, rate, arrivals) if rate is not None else iter(())
        due = count if rate is None else 0  # commands due by now
        next_at = next(times, math.inf)  # when the first one not yet due is
        loop = asyncio.get_running_loop()
        fd = self.sock.getsockopt(zmq.FD)
        loop.add_reader(fd, self._wake.set)
        result = PublishResult()
        start = time.monotonic()
        result.t_first_ns = time.monotonic_ns()
        last_progress = start
        try:
            while result.sent < count:
                now = time.monotonic()
                if now >= deadline:
                    break
                while next_at <= now - start:
                    due += 1
                    next_at = next(times, math.inf)
                while (
                    result.sent < due
                    and len(self._sent_at) < self.window
                    and now >= self._pause_until
                    and (gate is None or gate(result.sent))
                ):
                    request_id = result.sent + 1
                    kind, ident = target(result.sent)
                    try:
                        self.sock.send(self._encode(request_id, kind, ident), zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._sent_at[request_id] = (time.monotonic_ns(), (kind, ident))
                    result.sent += 1
                    if result.sent % 64 == 0:
                        self._drain(result)
                self._drain(result)
                if on_progress is not None and now - last_progress >= 0.25:
                    last_progress = now
                    on_progress(result)
                if result.sent >= count:
                    break
                if now < self._pause_until:
                    wait = self._pause_until - now
                elif rate is not None and result.sent >= due:
                    wait = start + next_at - time.monotonic()
                    if rate >= PACED_RATE:
                        # not woken by replies meanwhile: ZeroMQ's descriptor stays readable
                        # until the socket is read, and asyncio would call back without end
                        loop.remove_reader(fd)
                        try:
                            await asyncio.sleep(max(PACE, min(wait, deadline - time.monotonic())))
                        finally:
                            loop.add_reader(fd, self._wake.set)
                        continue
                else:
                    wait = 0.001  # window full or gated: a reply or a sentinel frame frees it
                self._wake.clear()
                if wait > 0:
                    await self._wait(min(wait, max(0.0, deadline - time.monotonic())))
                else:
                    await asyncio.sleep(0)
            result.t_last_ns = time.monotonic_ns()
            final = min(deadline, time.monotonic()) + 5.0
            while self._sent_at and time.monotonic() < final:
                self._wake.clear()
                self._drain(result)
                if self._sent_at:
                    await self._wait(0.005)
            self._drain(result)
        finally:
            loop.remove_reader(fd)
        return result

    async def _wait(self, seconds: float) -> None:
        """Wait for the socket's edge-triggered FD or ``seconds``, whichever comes first."""
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass
