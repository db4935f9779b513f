"""A shard's side of resume: which live messages a resuming connection gets, and when.

Owns: the resumes under way on one shard (per channel and connection), and, for a short while
after a connection starts receiving a channel's live messages (its hello, a ``subscribed``), the
offset of the first one it was written. Decides, for each live channel message with an offset,
which of the channel's connections get it now, which wait for the router's replay, and which
have it already; and what to ask the router (:class:`Ask`). Must never do I/O, read a clock
(``now`` is a parameter) or touch a connection: the CacheActor carries out what it says.

The three cases of a resume of channel C from offset N:

- **Nothing live yet** (the usual case: a client resumes right after it connects, before
  hello): C's live messages for the connection are held until the router's answer (the replay
  of N+1..L, then ``resumed``); then the held ones after L follow, in order, and until the next
  live one (or RESUME_FLOOR_LIFE) a message at or below the last one written is dropped as a
  duplicate. A held or later message beyond the next offset is a gap (in a cluster, the host's
  topic and the replay can race): the router is asked again, quietly, from the last offset
  written, and what follows waits again. A resume from nothing (offset 0, no epoch: a client
  asking its position on a channel it just joined) replays nothing, and its held messages at or
  below L go before the answer (they came live after the join), the others after it. (In a
  cluster, the router answers once those have reached the shard: see ``Guarantees._read``;
  one at or below L that arrives after the answer, past the router's wait, is dropped.)
- **Live messages were written already** (a resume after hello): the first one's offset F is
  known for FRESH_LIFE; the router replays only N+1..F-1, after them: every message once, but
  the back-fill arrives after the live ones that followed it.
- **No answer** within RESUME_WAIT (or more than MAX_HELD messages held meanwhile): the resume
  has failed, and the connection is closed (1013): its client reconnects and resumes again.
- **No history** (``--history-size 0``): the answer is ``resumed`` with ``recovered: false``, and
  the held messages (without offsets) follow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from actors.ids import ChannelId, ConnId

RESUME_FLOOR_LIFE = 5.0  # seconds a resumed connection's duplicate filter lasts at most
FRESH_LIFE = 30.0  # seconds after hello (or subscribed) that a late resume is still exact
RESUME_WAIT = 10.0  # seconds a resume waits for the router's answer; then it has failed
MAX_HELD = 10_000  # live messages held for one resume at most; beyond, it has failed


@dataclass(frozen=True, slots=True)
class Ask:
    """A resume to send to the router: replay ``channel`` after ``offset`` in ``epoch`` to
    ``conn``; ``quiet``: no ``resumed`` frame unless it cannot (a gap the shard fills by
    itself); ``before``: nothing from this offset on (0: no bound)."""

    conn: ConnId
    channel: ChannelId
    offset: int
    epoch: str
    quiet: bool = False
    before: int = 0


@dataclass(slots=True)
class _Resuming:
    """While ``buffer`` is a list, the router's answer is awaited and live messages wait there;
    after it (``buffer`` None), messages up to ``floor`` are duplicates, ``floor + 1`` is next."""

    epoch: str
    buffer: list[tuple[int, bytes]] | None
    floor: int
    since: float  # when the router was asked (buffer) or answered (floor)
    from_nothing: bool = False  # asked with offset 0 and no epoch: to learn the position


class Resumes:
    """The resumes of one shard's connections (see the module's docstring)."""

    def __init__(self, history: bool = True) -> None:
        """``history``: channel messages carry offsets (else :meth:`opened` notes nothing)."""
        self.history = history
        self.resuming: dict[ChannelId, dict[ConnId, _Resuming]] = {}
        # connections written a channel's live messages from a moment on: those not written
        # one yet (by channel), and the first one's offset; since when, oldest first
        self.unseen: dict[ChannelId, set[ConnId]] = {}
        self._first: dict[tuple[ConnId, ChannelId], int] = {}
        # what opened() noted, by the time it did, oldest first: the conns and channels in two
        # flat lists per time (kept small: every new connection passes through here, and the
        # idle memory per connection is a target); a key noted again, or resumed, may linger
        # in an older bucket, which then only expires it early (harmless: it is a hint)
        self._fresh: deque[tuple[float, list[ConnId], list[ChannelId]]] = deque()
        self._backfill: dict[tuple[ConnId, ChannelId], float] = {}  # since when
        self._now = 0.0

    # -- the connection's life -------------------------------------------------------------

    def opened(self, conn: ConnId, channel: ChannelId, now: float) -> None:
        """From now on, ``conn`` is written ``channel``'s live messages (hello, subscribed)."""
        if not self.history:
            return
        self.unseen.setdefault(channel, set()).add(conn)
        fresh = self._fresh
        if not fresh or fresh[-1][0] != now:
            fresh.append((now, [], []))
        fresh[-1][1].append(conn)
        fresh[-1][2].append(channel)

    def ended(self, conn: ConnId, channel: ChannelId) -> None:
        """``conn`` left ``channel`` (unsubscribed, closed): forget it there."""
        self._backfill.pop((conn, channel), None)
        self._forget_fresh(conn, channel)
        states = self.resuming.get(channel)
        if states is not None and states.pop(conn, None) is not None and not states:
            del self.resuming[channel]

    def sweep(self, now: float) -> list[tuple[ConnId, ChannelId]]:
        """Forget the first offsets older than FRESH_LIFE, and the duplicate filters of
        resumes answered more than RESUME_FLOOR_LIFE ago (the channel went quiet). Returns the
        resumes that failed: no answer from the router within RESUME_WAIT (it was lost on the
        way, or the shard's incarnation changed), or more than MAX_HELD messages held; they are
        forgotten, and their connections must be closed (the client reconnects and resumes:
        anything else would be a silent gap)."""
        self._now = now  # for the gaps live() finds: as of the shard's last tick
        fresh = self._fresh
        while fresh and now - fresh[0][0] > FRESH_LIFE:
            _since, conns, channels = fresh.popleft()
            for conn, channel in zip(conns, channels, strict=True):
                self._forget_fresh(conn, channel)
        failed = [key for key, since in self._backfill.items() if now - since > RESUME_WAIT]
        for channel, states in list(self.resuming.items()):
            for conn, state in list(states.items()):
                if state.buffer is None and now - state.since > RESUME_FLOOR_LIFE:
                    self.ended(conn, channel)
                elif state.buffer is not None and now - state.since > RESUME_WAIT:
                    failed.append((conn, channel))
        for conn, channel in failed:
            self.ended(conn, channel)
        return failed

    def size(self) -> int:
        """How many entries are kept (for tests and statistics)."""
        held = sum(len(states) for states in self.resuming.values())
        noted = sum(len(conns) for conns in self.unseen.values()) + len(self._first)
        return held + noted + len(self._backfill)

    def overflowing(self) -> list[tuple[ConnId, ChannelId]]:
        """The resumes holding more than MAX_HELD messages (failed: see :meth:`sweep`);
        forgotten."""
        over = [
            (conn, channel)
            for channel, states in self.resuming.items()
            for conn, state in states.items()
            if state.buffer is not None and len(state.buffer) > MAX_HELD
        ]
        for conn, channel in over:
            self.ended(conn, channel)
        return over

    # -- a resume --------------------------------------------------------------------------

    def busy(self, conn: ConnId, channel: ChannelId) -> bool:
        """A resume of ``channel`` on ``conn`` awaits the router's answer already."""
        state = self.resuming.get(channel, {}).get(conn)
        return (conn, channel) in self._backfill or (state is not None and state.buffer is not None)

    def start(self, conn: ConnId, channel: ChannelId, offset: int, epoch: str, now: float) -> Ask:
        """A client's resume (``conn`` is subscribed to ``channel`` by now; not :meth:`busy`):
        what to ask the router."""
        first = self._forget_fresh(conn, channel)
        if first is not None:
            self._backfill[conn, channel] = now
            return Ask(conn, channel, offset, epoch, before=first)
        from_nothing = offset == 0 and not epoch
        self.resuming.setdefault(channel, {})[conn] = _Resuming(epoch, [], 0, now, from_nothing)
        return Ask(conn, channel, offset, epoch)

    def live(
        self, channel: ChannelId, offset: int, frame: bytes, conns: tuple[ConnId, ...]
    ) -> tuple[tuple[ConnId, ...], list[Ask]]:
        """A live message of ``channel`` at ``offset`` for ``conns``: those to write it to now
        (``conns`` itself, unchanged, when no resume concerns it), and what to ask the router
        (gaps)."""
        if self.unseen:
            waiting = self.unseen.pop(channel, None)
            for conn in waiting or ():
                self._first[conn, channel] = offset
        resuming = self.resuming.get(channel) if self.resuming else None
        if not resuming:
            return conns, []
        # the resuming connections (few) are all among ``conns`` (subscribed): decide for them,
        # and leave ``conns`` itself alone unless one of them must not have the message now
        skip: set[ConnId] = set()
        asks: list[Ask] = []
        for conn, state in list(resuming.items()):
            if state.buffer is not None:
                state.buffer.append((offset, frame))
                skip.add(conn)
            elif offset > state.floor + 1:  # a gap after the replay: fill it, quietly
                state.buffer, state.since = [(offset, frame)], self._now
                asks.append(Ask(conn, channel, state.floor, state.epoch, quiet=True))
                skip.add(conn)
            elif offset == state.floor + 1:
                self.ended(conn, channel)
            else:  # at or below the floor: replayed already
                skip.add(conn)
        if not skip:
            return conns, asks
        return tuple(c for c in conns if c not in skip), asks

    def answered(
        self,
        conn: ConnId,
        channel: ChannelId,
        latest: int,
        epoch: str,
        frames: bytes,
        now: float,
    ) -> tuple[bytes, Ask | None]:
        """The router's answer (``frames``: the replay, then ``resumed`` unless quiet; messages up
        to ``latest`` of ``epoch`` are in it or gone): what to write to ``conn`` now, and what to
        ask again (a gap among the held messages)."""
        if self._backfill.pop((conn, channel), None) is not None:  # live flows already
            return frames, None
        state = self.resuming.get(channel, {}).get(conn)
        if state is None or state.buffer is None:
            return b"", None  # closed, unsubscribed, or a late duplicate
        top, held = latest, state.buffer
        # a resume from nothing (no epoch: a client asking for its position on a channel it
        # just joined) is answered with the latest offset and no replay; what it held came
        # live after the join, so it is owed even at or below that offset (the broadcast can
        # reach the router's history before the resume does), and goes before the answer,
        # whose ``resumed`` gives the client its position
        owed = [f for offset, f in held if offset <= latest] if epoch and state.from_nothing else []
        state.from_nothing = False  # a quiet ask for a gap that follows replays what it held
        chunks = owed + ([frames] if frames else [])
        rest: list[tuple[int, bytes]] = []
        for i, (offset, frame) in enumerate(held):
            if not epoch:  # no history: no offsets; everything held follows
                chunks.append(frame)
            elif offset <= top:
                continue
            elif offset != top + 1:
                rest = held[i:]
                break
            else:
                chunks.append(frame)
                top = offset
        if not epoch:
            self.ended(conn, channel)
            return b"".join(chunks), None
        if rest:
            state.epoch, state.buffer, state.floor = epoch, rest, top
            return b"".join(chunks), Ask(conn, channel, top, epoch, quiet=True)
        state.epoch, state.buffer, state.floor, state.since = epoch, None, top, now
        return b"".join(chunks), None

    def _forget_fresh(self, conn: ConnId, channel: ChannelId) -> int | None:
        """Stop noting for ``conn`` on ``channel``; the first live offset it was written, if
        one was."""
        waiting = self.unseen.get(channel)
        if waiting is not None:
            waiting.discard(conn)
            if not waiting:
                del self.unseen[channel]
        return self._first.pop((conn, channel), None)
