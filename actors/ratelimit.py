"""Token buckets: how much a client may send, at a sustained rate with a burst allowance.

Owns: :class:`TokenBucket`, a pure counter with time as a parameter (a unit test drives it
without a clock). Must never read a clock or decide what happens to whoever is over budget
(closing a connection with 1008 is the connection's business).
"""

from __future__ import annotations


class TokenBucket:
    """``capacity`` tokens at most, refilled at ``rate`` tokens per second.

    ``take(amount, now)`` spends ``amount`` tokens if the bucket holds them (True), or leaves
    it untouched (False): whoever is refused has hit the limit. A request larger than the whole
    capacity is always refused.
    """

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True
