"""Restart intensity, OTP style: at most ``max_restarts`` restarts of a shard per ``period``.

Owns: the decision whether a dead shard may be restarted, and after what backoff. Must never
start processes or read a clock: the supervisor passes ``now`` and carries out the decision.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Decision:
    restart: bool
    delay: float
    restarts_in_period: int


@dataclass
class RestartPolicy:
    max_restarts: int = 5
    period: float = 30.0
    backoff: float = 0.05
    max_backoff: float = 2.0
    _history: dict[int, deque[float]] = field(default_factory=dict)

    def on_exit(self, index: int, now: float) -> Decision:
        """A shard died at ``now``: restart it (after ``delay``: none for the first death in
        the period, then ``backoff`` doubled per earlier death, 100 ms, 200 ms, ... up to
        ``max_backoff``) or give up on the host."""
        history = self._history.setdefault(index, deque())
        while history and now - history[0] > self.period:
            history.popleft()
        if len(history) >= self.max_restarts:
            return Decision(False, 0.0, len(history))
        delay = 0.0 if not history else min(self.max_backoff, self.backoff * 2 ** len(history))
        history.append(now)
        return Decision(True, delay, len(history))
