"""Channel history: offsets, epochs and the last messages of every channel, kept in memory.

Owns: :class:`HistoryStore` (the router's store when there is no Redis), :class:`Position`,
:class:`Recovery` and :func:`recovery`, the pure resume decision that the Redis path shares.
Must never do I/O, read a clock (``now`` is a parameter; it is expected not to go backwards)
or use threads: the router's single owner calls it.

Rules (docs/protocol.md states them for clients):

- A channel's state is its ``epoch`` (random, 12 hex digits), its ``offset`` (the last one
  assigned; the first message gets 1) and its last ``size`` messages. The kept messages are
  always a gapless run of offsets ending at ``offset`` (possibly empty).
- A state lives ``ttl`` seconds after its last message (or its creation): then it is dropped
  (counted ``expired``), by :meth:`HistoryStore.expire` or lazily when the channel is next
  touched, and the channel starts again with a new epoch at offset 1.
- ``memory`` bounds every state's cost: ``len(data) + MESSAGE_COST`` per kept message plus
  ``CHANNEL_COST`` per channel. Over it, whole states are evicted least recently appended first
  (counted ``evicted``; a state already past its ttl is counted ``expired``). The channel being
  appended to is never evicted by its own append: its oldest messages are trimmed instead. A
  message that could not be kept even alone (``len(data) + MESSAGE_COST + CHANNEL_COST >
  memory``) gets its offset but is not kept, and neither are the channel's older messages (what
  is kept must end at the latest offset): a resume across it is ``recovered: false``.
- :meth:`HistoryStore.position` of a channel with no state creates it (new epoch, offset 0), so
  that a client who saw nothing yet holds an epoch that stays valid while the state lives.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

REPLAY_BYTES = 8 << 20  # a resume needing more data bytes than this is answered recovered: false
MESSAGE_COST = 64  # bytes counted per kept message besides its data (the tuple, the deque slot)
CHANNEL_COST = 256  # bytes counted per channel state (the state object, its deque, its key)


def new_epoch() -> str:
    """A fresh random epoch: 12 hex digits."""
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel is: the last offset assigned in ``epoch`` (0: none yet)."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Recovery:
    """The answer to a resume (or a history read): whether nothing is missing, the channel's
    latest offset and epoch, and the messages as ``(offset, data_json)``, oldest first."""

    recovered: bool
    offset: int
    epoch: str
    messages: list[tuple[int, bytes]]


def recovery(
    position: Position,
    first_kept: int,
    messages: list[tuple[int, bytes]],
    offset: int,
    epoch: str,
    max_bytes: int,
) -> Recovery:
    """Decide a resume from ``position`` of a channel now at ``offset`` in ``epoch``.

    ``first_kept`` is the channel's oldest kept offset (``offset + 1`` when none is kept) and
    ``messages`` what the store holds with an offset above ``position.offset``, oldest first.
    Recovered iff the epoch is the same, the client is not ahead, every offset after its own is
    still kept (and ``messages`` are exactly those, a safety net against a store that returned
    fewer), and their data fit in ``max_bytes``. Otherwise nothing is replayed: the client goes
    live from ``offset`` and refetches from its backend.
    """
    n = position.offset
    refused = Recovery(False, offset, epoch, [])
    if position.epoch != epoch or n > offset or n < 0:
        return refused
    if n == offset:
        return Recovery(True, offset, epoch, [])
    if n + 1 < first_kept or len(messages) != offset - n or messages[0][0] != n + 1:
        return refused
    if sum(len(data) for _, data in messages) > max_bytes:
        return refused
    return Recovery(True, offset, epoch, messages)


class _State:
    """One channel's state. ``messages`` holds ``(offset, data)``; ``cost`` is this state's
    share of :attr:`HistoryStore.bytes` (``CHANNEL_COST`` included)."""

    __slots__ = ("cost", "epoch", "last", "messages", "offset")

    def __init__(self, epoch: str, now: float) -> None:
        self.epoch = epoch
        self.offset = 0
        self.messages: deque[tuple[int, bytes]] = deque()
        self.last = now
        self.cost = CHANNEL_COST

    def first_kept(self) -> int:
        return self.messages[0][0] if self.messages else self.offset + 1


class HistoryStore:
    """Every channel's state, in an ordered dict from least to most recently appended (or
    created): expiry and eviction pop from its front, in time proportional to what they drop."""

    __slots__ = (
        "_new_epoch",
        "_states",
        "bytes",
        "enabled",
        "evicted",
        "expired",
        "memory",
        "messages",
        "size",
        "ttl",
    )

    def __init__(
        self, size: int, ttl: float, memory: int, new_epoch: Callable[[], str] = new_epoch
    ) -> None:
        if size < 0 or ttl <= 0 or memory < 0:
            raise ValueError("history needs size >= 0, ttl > 0 and memory >= 0")
        self.size = size
        self.ttl = ttl
        self.memory = memory
        self.enabled = size > 0
        self._new_epoch = new_epoch
        self._states: OrderedDict[int, _State] = OrderedDict()
        self.bytes = 0  # the cost of every state (see the module docstring)
        self.messages = 0  # messages kept, all channels
        self.evicted = 0
        self.expired = 0

    # -- the hot path ----------------------------------------------------------------------

    def append(self, channel: int, data: bytes, now: float) -> Position:
        """Give ``data`` (a message's data JSON) the channel's next offset and keep it."""
        if not self.enabled:
            raise ValueError("history is off (size 0): nothing may be appended")
        state = self._states.get(channel)
        if state is None or now - state.last > self.ttl:
            state = self._create(channel, now)
        else:
            self._states.move_to_end(channel)
            state.last = now
        state.offset = offset = state.offset + 1
        cost = len(data) + MESSAGE_COST
        if cost + CHANNEL_COST > self.memory:
            self._drop_messages(state)  # it cannot be kept: keep none (see the docstring)
            if self.bytes > self.memory:
                self._fit(state, now)
            return Position(offset, state.epoch)
        messages = state.messages
        messages.append((offset, data))
        state.cost += cost
        self.bytes += cost
        if len(messages) > self.size:
            dropped = len(messages.popleft()[1]) + MESSAGE_COST
            state.cost -= dropped
            self.bytes -= dropped
        else:
            self.messages += 1
        if self.bytes > self.memory:
            self._fit(state, now)
        return Position(offset, state.epoch)

    # -- reading -----------------------------------------------------------------------------

    def position(self, channel: int, now: float) -> Position:
        """The channel's latest offset and epoch; creates its state if it has none."""
        state = self._state(channel, now)
        return Position(state.offset, state.epoch)

    def recover(
        self, channel: int, offset: int, epoch: str, now: float, max_bytes: int = REPLAY_BYTES
    ) -> Recovery:
        """What a client that has seen up to ``offset`` in ``epoch`` missed (see
        :func:`recovery`); creates the channel's state if it has none."""
        state = self._state(channel, now)
        kept = state.messages
        first = state.first_kept()
        start = offset + 1 - first
        messages = list(islice(kept, start, None)) if 0 <= start < len(kept) else []
        return recovery(
            Position(offset, epoch), first, messages, state.offset, state.epoch, max_bytes
        )

    def read(self, channel: int, since: int, limit: int, now: float) -> Recovery:
        """At most ``limit`` kept messages with an offset above ``since``, oldest first.
        ``recovered`` says whether offset ``since + 1`` was still kept (or is yet to come), that
        is, whether nothing between ``since`` and the messages returned is missing."""
        state = self._state(channel, now)
        kept = state.messages
        first = state.first_kept()
        start = max(0, since + 1 - first)
        messages = list(islice(kept, start, start + limit)) if limit > 0 else []
        recovered = first <= since + 1 <= state.offset + 1
        return Recovery(recovered, state.offset, state.epoch, messages)

    # -- bounds ----------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Drop the states idle for more than ``ttl``; how many were dropped."""
        states, ttl = self._states, self.ttl
        dropped = 0
        while states:
            state = next(iter(states.values()))
            if now - state.last <= ttl:
                break
            states.popitem(last=False)
            self._forget(state)
            dropped += 1
        self.expired += dropped
        return dropped

    def clear(self) -> None:
        """Forget every channel's state (their next message starts a new epoch)."""
        self._states.clear()
        self.bytes = self.messages = 0

    def stats(self) -> dict[str, int]:
        return {
            "channels": len(self._states),
            "messages": self.messages,
            "bytes": self.bytes,
            "evicted": self.evicted,
            "expired": self.expired,
        }

    # -- internals ---------------------------------------------------------------------------

    def _state(self, channel: int, now: float) -> _State:
        """The channel's live state, created (and the bound kept) if it has none."""
        state = self._states.get(channel)
        if state is None or now - state.last > self.ttl:
            state = self._create(channel, now)
            if self.bytes > self.memory:
                self._fit(state, now)
        return state

    def _create(self, channel: int, now: float) -> _State:
        """A new state for ``channel`` at the end of the order (an expired one is dropped)."""
        old = self._states.pop(channel, None)
        if old is not None:
            self._forget(old)
            self.expired += 1
        state = _State(self._new_epoch(), now)
        self._states[channel] = state
        self.bytes += CHANNEL_COST
        return state

    def _forget(self, state: _State) -> None:
        self.bytes -= state.cost
        self.messages -= len(state.messages)

    def _drop_messages(self, state: _State) -> None:
        self.bytes -= state.cost - CHANNEL_COST
        self.messages -= len(state.messages)
        state.cost = CHANNEL_COST
        state.messages.clear()

    def _fit(self, keep: _State, now: float) -> None:
        """Evict the least recently appended states other than ``keep`` (the last in the
        order) until the bound holds, then trim ``keep``'s oldest messages if need be."""
        states, ttl = self._states, self.ttl
        while self.bytes > self.memory:
            state = next(iter(states.values()))
            if state is keep:
                break
            states.popitem(last=False)
            self._forget(state)
            if now - state.last > ttl:
                self.expired += 1
            else:
                self.evicted += 1
        messages = keep.messages
        while self.bytes > self.memory and messages:
            dropped = len(messages.popleft()[1]) + MESSAGE_COST
            keep.cost -= dropped
            self.bytes -= dropped
            self.messages -= 1
