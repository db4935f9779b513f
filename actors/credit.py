"""Flow control towards one shard: what the router has queued to it and what it has consumed.

Owns: :class:`CreditWindow` (totals sent and acknowledged, in messages and bytes, and how long
the message that would have made the shard report has waited) and :class:`WindowLimits`. The
shard reports what it has consumed in every pulse (``shardwire.PULSE``); the difference is what
is in flight, and :meth:`CreditWindow.refusal` says why one more message must not be queued.
Must never do I/O or read a clock (``now`` is a parameter): the
:class:`~actors.router.RouterCore` decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from actors.wire import shardwire

MARK_SPAN = 0.01  # seconds of sending that one backlog age mark covers (see CreditWindow)


@dataclass(frozen=True, slots=True)
class WindowLimits:
    """A shard has no room when ``messages`` or ``size`` bytes are in flight to it, or when it
    is ``delay`` seconds behind (``--shard-queue-*``; see :meth:`CreditWindow.overdue_age`)."""

    messages: int = 20_000
    size: int = 64 << 20
    delay: float = 0.1


class CreditWindow:
    """One shard incarnation's window. Totals only grow; a new incarnation starts a new one."""

    __slots__ = ("acked_bytes", "acked_messages", "marks", "sent_bytes", "sent_messages")

    def __init__(self) -> None:
        self.sent_messages = self.sent_bytes = 0
        self.acked_messages = self.acked_bytes = 0
        # (sent_messages and sent_bytes after the mark's last message, when its first was
        # sent): the oldest mark not yet consumed dates the backlog; one mark per MARK_SPAN
        # keeps this short
        self.marks: deque[tuple[int, int, float]] = deque()

    def queued(self, size: int, now: float) -> None:
        """One message of ``size`` bytes was queued to the shard."""
        self.sent_messages += 1
        self.sent_bytes += size
        marks = self.marks
        if marks and now - marks[-1][2] < MARK_SPAN:
            marks[-1] = (self.sent_messages, self.sent_bytes, marks[-1][2])
        else:
            marks.append((self.sent_messages, self.sent_bytes, now))

    def dropped(self, messages: int, size: int) -> None:
        """The last ``messages`` messages queued (``size`` bytes) never left: the shard will
        never report them consumed, so they are taken back out of the window."""
        self.sent_messages -= messages
        self.sent_bytes -= size
        marks = self.marks
        while marks and marks[-1][0] > self.sent_messages:
            first_sent = marks.pop()[2]
            if self.sent_messages > self.acked_messages and (
                not marks or marks[-1][0] < self.sent_messages
            ):
                marks.append((self.sent_messages, self.sent_bytes, first_sent))

    def credit(self, messages: int, size: int) -> None:
        """The shard has consumed ``messages`` messages and ``size`` bytes in all (a report
        that is stale, or claims more than was sent, cannot open the window further)."""
        self.acked_messages = max(self.acked_messages, min(messages, self.sent_messages))
        self.acked_bytes = max(self.acked_bytes, min(size, self.sent_bytes))
        marks = self.marks
        while marks and marks[0][0] <= self.acked_messages:
            marks.popleft()

    def in_flight(self) -> tuple[int, int]:
        """Messages and bytes queued and not yet consumed."""
        return self.sent_messages - self.acked_messages, self.sent_bytes - self.acked_bytes

    def backlog_age(self, now: float) -> float:
        """How long the oldest message not yet consumed has waited (0 if none)."""
        return now - self.marks[0][2] if self.marks else 0.0

    def overdue_age(self, now: float) -> float:
        """How long the oldest message the shard would have reported, had it consumed it, has
        waited (0 if none): the one ``CREDIT_MESSAGES`` messages or ``CREDIT_BYTES`` bytes past
        its last report. A shard reports credit after that much consumed (or on its pulse), so
        up to that much may be consumed and still look in flight here, however old: at 500
        messages/s to a shard, 64 take 128 ms, more than ``--shard-queue-delay``'s 0.1 s, and
        dating the backlog by them refused broadcasts ``overloaded`` for a shard that was
        keeping up. (Dated by its mark: up to MARK_SPAN older than it is.)"""
        due_messages = self.acked_messages + shardwire.CREDIT_MESSAGES
        due_bytes = self.acked_bytes + shardwire.CREDIT_BYTES
        for messages, size, first_sent in self.marks:
            if messages >= due_messages or size >= due_bytes:
                return now - first_sent
        return 0.0

    def refusal(self, size: int, now: float, limits: WindowLimits) -> str | None:
        """Why one more message of ``size`` bytes must not be queued, or None if it fits. A
        backlog of a few messages is never "behind": at low rates credit comes back only with
        the pulse (every 0.25 s), and that is no backlog."""
        messages, queued = self.in_flight()
        if messages >= limits.messages:
            return f"{messages} deliveries queued (limit {limits.messages})"
        if queued + size > limits.size:
            return f"{queued} bytes queued (limit {limits.size})"
        if messages > shardwire.CREDIT_MESSAGES or queued > shardwire.CREDIT_BYTES:
            age = self.overdue_age(now)
            if age > limits.delay:
                return f"{age:.2f} s behind (limit {limits.delay} s)"
        return None
