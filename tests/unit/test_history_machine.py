"""actors.history: a random sequence of appends, resumes, reads, time passing and expiry keeps
HistoryStore equal to a plain model (lists, recomputed costs), and what clients see is sound:
offsets gapless from 1 within an epoch, at most ``size`` kept, the memory bound held, the epoch
changes exactly when the state was lost (ttl or eviction), a resume never skips or repeats."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from actors.history import CHANNEL_COST, MESSAGE_COST, REPLAY_BYTES, HistoryStore, Position

TTL = 10.0
CHANNELS = st.integers(min_value=1, max_value=4)
SIZES = st.one_of(st.integers(min_value=0, max_value=60), st.just(2000))  # 2000: never kept


@dataclass
class Model:
    epoch: str
    last: float
    offset: int = 0
    kept: list[tuple[int, bytes]] = field(default_factory=list)

    def cost(self) -> int:
        return CHANNEL_COST + sum(len(data) + MESSAGE_COST for _, data in self.kept)


class HistoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.made = 0  # epochs made so far: the store's next one is f"e{made + 1}"
        self.model: dict[int, Model] = {}  # in order of last append (or creation)
        self.evicted = self.expired = 0
        self.log: dict[tuple[str, int], bytes] = {}  # every message ever appended
        self.seen: dict[int, list[Position]] = {}  # positions clients were given, per channel

    @initialize(
        size=st.integers(min_value=1, max_value=5),
        memory=st.integers(min_value=CHANNEL_COST, max_value=1500),
    )
    def start(self, size, memory):
        counter = itertools.count(1)
        self.size, self.memory = size, memory
        self.store = HistoryStore(size, TTL, memory, new_epoch=lambda: f"e{next(counter)}")

    # -- the model -------------------------------------------------------------------------

    def total(self) -> int:
        return sum(state.cost() for state in self.model.values())

    def drop(self, channel: int) -> None:
        if self.now - self.model.pop(channel).last > TTL:
            self.expired += 1
        else:
            self.evicted += 1

    def fit(self, keep: int) -> None:
        while self.total() > self.memory and next(iter(self.model)) != keep:
            self.drop(next(iter(self.model)))
        kept = self.model[keep].kept
        while self.total() > self.memory and kept:
            del kept[0]

    def touch(self, channel: int, append: bool) -> tuple[Model, bool]:
        """The channel's state after lazy expiry (created if need be) and whether it is new."""
        state = self.model.get(channel)
        if state is not None and self.now - state.last > TTL:
            self.drop(channel)
            state = None
        created = state is None
        if state is None:
            self.made += 1
            state = self.model[channel] = Model(f"e{self.made}", self.now)
        if append:
            self.model[channel] = self.model.pop(channel)  # to the end
            state.last = self.now
        return state, created

    def give(self, channel: int, position: Position) -> None:
        """A client saw ``position``: check it against what it saw before of the channel."""
        seen = self.seen.setdefault(channel, [])
        if seen and seen[-1].epoch == position.epoch:
            assert position.offset >= seen[-1].offset
        seen.append(position)

    # -- rules -----------------------------------------------------------------------------

    @rule(channel=CHANNELS, length=SIZES)
    def append(self, channel, length):
        data = bytes([97 + channel]) * length
        state, created = self.touch(channel, append=True)
        before = state.epoch
        position = self.store.append(channel, data, self.now)
        # the epoch is new exactly when the state was lost (or never existed)
        assert position.epoch == before
        assert not created or position.offset == 1
        state.offset += 1
        assert position.offset == state.offset  # gapless within an epoch
        assert (position.epoch, position.offset) not in self.log
        self.log[position.epoch, position.offset] = data
        if len(data) + MESSAGE_COST + CHANNEL_COST > self.memory:
            state.kept.clear()
        else:
            state.kept.append((position.offset, data))
            del state.kept[: -self.size]
        self.fit(channel)
        self.give(channel, position)

    @rule(channel=CHANNELS)
    def position(self, channel):
        state, _ = self.touch(channel, append=False)
        self.fit(channel)
        position = self.store.position(channel, self.now)
        assert position == Position(state.offset, state.epoch)
        self.give(channel, position)

    @rule(
        channel=CHANNELS,
        pick=st.integers(min_value=0),
        back=st.integers(min_value=-1, max_value=8),
        max_bytes=st.one_of(st.integers(min_value=0, max_value=150), st.just(REPLAY_BYTES)),
    )
    def recover(self, channel, pick, back, max_bytes):
        seen = self.seen.get(channel)
        # a position some client was given (possibly from a lost epoch), moved back a little
        if seen:
            old = seen[pick % len(seen)]
            offset, epoch = max(0, old.offset - back), old.epoch
        else:
            offset, epoch = pick % 5, "e0"
        state, _ = self.touch(channel, append=False)
        self.fit(channel)
        result = self.store.recover(channel, offset, epoch, self.now, max_bytes)
        assert (result.offset, result.epoch) == (state.offset, state.epoch)
        first = state.kept[0][0] if state.kept else state.offset + 1
        wanted = [(n, data) for n, data in state.kept if n > offset]
        expected = (
            epoch == state.epoch
            and offset <= state.offset
            and (offset == state.offset or offset + 1 >= first)
            and sum(len(data) for _, data in wanted) <= max_bytes
        )
        assert result.recovered == expected
        if result.recovered:
            # no gap, no duplicate: exactly offset+1 .. latest, as they were appended
            assert [n for n, _ in result.messages] == list(range(offset + 1, state.offset + 1))
            for n, data in result.messages:
                assert self.log[epoch, n] == data
        else:
            assert result.messages == []
            # only lost history, a client ahead, or the byte bound refuse a resume
            lost = epoch != state.epoch or offset + 1 < first
            assert lost or offset > state.offset or max_bytes < REPLAY_BYTES
        self.give(channel, Position(result.offset, result.epoch))

    @rule(
        channel=CHANNELS,
        since=st.integers(min_value=0, max_value=12),
        limit=st.integers(min_value=1, max_value=6),
    )
    def read(self, channel, since, limit):
        state, _ = self.touch(channel, append=False)
        self.fit(channel)
        result = self.store.read(channel, since, limit, self.now)
        assert (result.offset, result.epoch) == (state.offset, state.epoch)
        assert result.messages == [(n, data) for n, data in state.kept if n > since][:limit]
        first = state.kept[0][0] if state.kept else state.offset + 1
        assert result.recovered == (first <= since + 1 <= state.offset + 1)
        everything = self.store.read(channel, 0, 1000, self.now).messages
        assert everything == state.kept
        assert len(everything) <= self.size
        assert [n for n, _ in everything] == list(range(first, state.offset + 1))

    @rule(seconds=st.sampled_from([0.0, 0.5, 3.0, 9.0, TTL, 11.0]))
    def advance(self, seconds):
        self.now += seconds

    @rule()
    def expire(self):
        idle = [c for c, state in self.model.items() if self.now - state.last > TTL]
        for channel in idle:
            self.drop(channel)
        assert self.store.expire(self.now) == len(idle)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def stats_match_the_model(self):
        if not hasattr(self, "store"):
            return
        assert self.store.stats() == {
            "channels": len(self.model),
            "messages": sum(len(state.kept) for state in self.model.values()),
            "bytes": self.total(),
            "evicted": self.evicted,
            "expired": self.expired,
        }

    @invariant()
    def bounds_hold(self):
        if not hasattr(self, "store"):
            return
        assert self.store.stats()["bytes"] <= self.memory
        assert all(len(state.kept) <= self.size for state in self.model.values())


TestHistoryMachine = HistoryMachine.TestCase
TestHistoryMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
