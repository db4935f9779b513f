"""A steady stream of channel broadcasts from a thread of its own, for tests that do something
to a host (kill a shard, reconnect a client) while messages keep flowing."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from shards.client import Client, Overloaded
from shards.testing.waiting import TIME_FACTOR


@dataclass
class BroadcastStream:
    """Broadcasts ``{"n": k}`` (k = 0, 1, ...) to ``channel`` through ``command`` every
    ``interval`` seconds until stopped or ``limit`` were accepted; keeps each accepted
    broadcast's ``offset`` (history on) in order. An ``overloaded`` refusal was not sent: it is
    sent again. Use it as a context manager (the thread stops at its end); an exception of the
    thread is kept in ``errors``.

    Example::

        with BroadcastStream(host.command, channel=1) as stream:
            wait_until(lambda: len(stream.offsets) > 30)
            host.kill_shard(0)
        assert not stream.errors
    """

    command: str
    channel: int
    interval: float = 0.001
    limit: int = 20_000
    offsets: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        try:
            with Client(self.command, timeout=5.0 * TIME_FACTOR) as client:
                while not self.stop.is_set() and not self.done():
                    self.send(client)
                    self.stop.wait(self.interval)
        except BaseException as exc:
            self.errors.append(exc)

    def done(self) -> bool:
        return len(self.offsets) >= self.limit

    def send(self, client: Client) -> None:
        """One broadcast, and what its reply says (a subclass may keep something else)."""
        try:
            reply = client.broadcast_to_channel(self.channel, {"n": len(self.offsets)})
        except Overloaded:
            return
        self.offsets.append(reply["offset"])

    def __enter__(self) -> BroadcastStream:
        self.thread = threading.Thread(target=self.run, name="broadcast-stream", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10 * TIME_FACTOR)
        if self.thread.is_alive():
            raise AssertionError("the broadcast stream did not stop within 10 s")
