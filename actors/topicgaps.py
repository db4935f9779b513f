"""Gaps in a channel's topic, and their repair: the messages a host's listener did not hear.

Owns: for each channel with members on this host, the last offset (and epoch) delivered from
the channel's topic, and the repairs under way, with the messages held meanwhile. Decides, for
each delivery from a topic, whether it goes to the shards now, waits behind a repair, or shows
a gap (then the router reads the missing messages from Redis: :class:`Fill`). Must never do
I/O, read a clock or block: :class:`~actors.hosts.OtherHosts` carries out what it says.

Why: in a cluster with history, every host delivers a channel's messages from its topic, its
own broadcasts included, in Redis's order. A subscription is not continuous: the listener starts
over when a node fails or a topic's slot moves, and what is published while it subscribes again
(or was still unread on a healthy node's connection when it dropped them all) reaches no client
of this host, although the publisher's reply said the cluster took part. Those messages are in
the channel's history. So the next message from the topic shows the gap (an offset past the
next one, in the same epoch): it is held, the missing ones are read from Redis and delivered
first, then what was held, in order. The host's clients see every offset, in order, without a
resume of their own.

A gap is left as it is (counted ``gaps_unfilled``: the held messages go on, and the clients see
the gap, which their resume fills or reports) when the history cannot hold all of it
(``max_gap``); when ``max_repairs`` are under way already; when the read fails, times out or is
refused; when the channel's history no longer holds all of it (its epoch changed, it was
trimmed, or a failover lost it); and when more than ``max_held`` messages of the channel, or
``max_held_bytes`` over all channels, would be held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.history import Recovery
from actors.hostlink import Delivery
from actors.ids import ChannelId
from actors.wire import frames

MAX_HELD = 1_000  # messages of one channel held during its repair at most
MAX_HELD_BYTES = 8 << 20  # bytes held during repairs, over all channels, at most
HELD_COST = 128  # bytes counted per held message besides its frame
MAX_REPAIRS = 1_000  # repairs under way at most (each is a read: a query in flight)


@dataclass(frozen=True, slots=True)
class Fill:
    """Read ``channel``'s ``count`` messages after ``since`` in ``epoch`` (the gap) and hand the
    answer to :meth:`TopicGaps.filled` with ``token``."""

    channel: ChannelId
    since: int
    count: int
    epoch: str
    token: int


@dataclass(slots=True)
class _Repair:
    token: int
    since: int  # the last offset delivered before the gap
    epoch: str
    max_gap: int  # the most messages the channel's history keeps
    held: list[Delivery] = field(default_factory=list)  # the first one showed the gap
    size: int = 0  # bytes held, as counted


Step = tuple[list[Delivery], Fill | None]  # deliver these now, in order; then read this


class TopicGaps:
    """The gaps in the topics of one host's channels (see the module's docstring)."""

    def __init__(
        self,
        max_held: int = MAX_HELD,
        max_held_bytes: int = MAX_HELD_BYTES,
        max_repairs: int = MAX_REPAIRS,
    ) -> None:
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.max_repairs = max_repairs
        self._last: dict[ChannelId, tuple[str, int]] = {}  # channel -> (epoch, offset)
        self._repairs: dict[ChannelId, _Repair] = {}
        self._held_bytes = 0
        self._tokens = 0
        self.counters = dict.fromkeys(("gaps", "gaps_filled", "gaps_unfilled", "gap_messages"), 0)

    def arrive(self, delivery: Delivery, max_gap: int) -> Step:
        """A delivery from ``delivery.channel``'s topic (a message, or a probe coming back);
        ``max_gap``: the most messages the channel's history keeps."""
        channel = delivery.channel
        assert channel is not None
        repair = self._repairs.get(channel)
        if repair is not None:
            return self._hold(channel, repair, delivery)
        offset = delivery.offset
        if not offset:  # no history: nothing to compare
            return [delivery], None
        known = self._last.get(channel)
        if known is None or known[0] != delivery.epoch or offset <= known[1] + 1:
            self._advance(channel, delivery)
            return [delivery], None
        since = known[1]
        self.counters["gaps"] += 1
        size = len(delivery.frame) + HELD_COST
        if (
            offset - since > max_gap  # the history kept at most offset - max_gap + 1.. then
            or len(self._repairs) >= self.max_repairs
            or self._held_bytes + size > self.max_held_bytes
        ):
            self.counters["gaps_unfilled"] += 1
            self._advance(channel, delivery)
            return [delivery], None
        self._tokens += 1
        repair = _Repair(self._tokens, since, delivery.epoch, max_gap, [delivery], size)
        self._repairs[channel] = repair
        self._held_bytes += size
        return [], Fill(channel, since, offset - since - 1, delivery.epoch, repair.token)

    def _hold(self, channel: ChannelId, repair: _Repair, delivery: Delivery) -> Step:
        size = len(delivery.frame) + HELD_COST
        if len(repair.held) >= self.max_held or self._held_bytes + size > self.max_held_bytes:
            # too much comes during the read: the gap stays, what was held goes on now
            released = [*self._end(channel, repair), delivery]
            self.counters["gaps_unfilled"] += 1
            for each in released:
                self._advance(channel, each)
            return released, None
        repair.held.append(delivery)
        repair.size += size
        self._held_bytes += size
        return [], None

    def filled(self, channel: ChannelId, token: int, answer: Recovery | None) -> Step:
        """The read of :class:`Fill` ``token`` answered ``answer`` (None: it failed, timed out
        or was refused; ``recovered``: the history held the gap's first message): the missing
        messages it holds, then the held ones (a gap among those starts another repair: then
        the rest wait again)."""
        repair = self._repairs.get(channel)
        if repair is None or repair.token != token:
            return [], None  # given up (too much held) or forgotten meanwhile
        held = self._end(channel, repair)
        first = held[0].offset
        out: list[Delivery] = []
        if answer is not None and answer.recovered and answer.epoch == repair.epoch:
            for offset, data in answer.messages:
                if repair.since < offset < first:
                    frame = frames.channel_message(channel, data, offset, repair.epoch)
                    out.append(Delivery(channel, [], frame, offset=offset, epoch=repair.epoch))
        complete = len(out) == first - repair.since - 1
        self.counters["gaps_filled" if complete else "gaps_unfilled"] += 1
        self.counters["gap_messages"] += len(out)
        self._last[channel] = (repair.epoch, first - 1)  # the first held one follows
        fill = None
        for delivery in held:  # through arrive: a later gap among them is repaired too
            ready, again = self.arrive(delivery, repair.max_gap)
            out.extend(ready)
            # once one is found, the channel is repairing again: the rest are held behind it
            fill = fill or again
        return out, fill

    def forget(self, channel: ChannelId) -> None:
        """This host's last member of ``channel`` left: stop following its topic. What was held
        for it is dropped: it was for no one now (a resume from nothing waiting for a held
        probe is answered without it, as when its probe is lost)."""
        self._last.pop(channel, None)
        repair = self._repairs.get(channel)
        if repair is not None:
            self._end(channel, repair)

    def _end(self, channel: ChannelId, repair: _Repair) -> list[Delivery]:
        del self._repairs[channel]
        self._held_bytes -= repair.size
        return repair.held

    def _advance(self, channel: ChannelId, delivery: Delivery) -> None:
        """``delivery`` goes on: the channel's last offset is its, if later (or of a new
        epoch)."""
        if delivery.offset:
            known = self._last.get(channel)
            if known is None or known[0] != delivery.epoch or delivery.offset > known[1]:
                self._last[channel] = (delivery.epoch, delivery.offset)

    def statistics(self) -> dict[str, int]:
        return {
            **self.counters,
            "channels": len(self._last),
            "repairing": len(self._repairs),
            "held_bytes": self._held_bytes,
        }
