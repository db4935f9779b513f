"""Critical messages: kept per user until acknowledged or expired, and re-sent until acked.

Owns: :class:`CriticalStore` (the router's store when there is no Redis: every user's
unacknowledged critical messages, bounded per user and in bytes), :class:`CriticalTracker` (a
shard's record of what each live connection was sent and not yet acked, and when to re-send
it) and :class:`CriticalLimit`. Must never do I/O, read a clock (``now`` is a parameter) or use
threads: the router and each shard's ``CacheActor`` drive them.

- :meth:`CriticalStore.add` is all-or-nothing: a command for several users is refused whole
  (:class:`CriticalLimit`, counted ``refused``) when ANY of them already holds ``per_user``
  unexpired messages, or when storing it for all of them would exceed ``memory`` bytes
  (``len(data) + ENTRY_COST`` per user and message).
- A message expires when ``now >= expires`` (``expires = now + ttl`` when added). Expired
  messages are dropped by :meth:`CriticalStore.expire`, and before every :meth:`add` (so that
  a bound is never held by what has expired); either way :meth:`expire` returns them, once.
- :class:`CriticalTracker` re-sends an unacknowledged message on the same connection every
  ``timeout`` seconds, at most ``retries`` times; ``timeout`` after the last re-send it forgets
  it (counted ``gave_up``; the store still holds it for the user's next connection). An ack
  on any of the user's connections forgets it on all of them. A connection belongs to one user.
"""

from __future__ import annotations

import heapq
import secrets
from dataclasses import dataclass

ENTRY_COST = 128  # bytes counted per stored (user, message) besides the data
_COMPACT_MIN = 64  # heaps are rebuilt when stale entries outnumber live ones (and this)


class CriticalLimit(Exception):
    """A critical message was refused: a user's bound or the memory bound is reached."""

    code = "limit"


@dataclass(slots=True)
class Critical:
    """One critical message held for ``user``: ``data`` is its data JSON."""

    id: str
    user: int
    data: bytes
    expires: float


class CriticalStore:
    """Every user's unacknowledged critical messages, in insertion order per user."""

    __slots__ = (
        "_counter",
        "_expired",
        "_heap",
        "_users",
        "acked",
        "bytes",
        "expired",
        "memory",
        "messages",
        "per_user",
        "prefix",
        "refused",
        "unknown_acks",
    )

    def __init__(self, per_user: int, memory: int, prefix: str | None = None) -> None:
        if per_user < 1 or memory < 0:
            raise ValueError("critical messages need per_user >= 1 and memory >= 0")
        self.per_user = per_user
        self.memory = memory
        self.prefix = secrets.token_hex(4) if prefix is None else prefix
        self._counter = 0
        self._users: dict[int, dict[str, Critical]] = {}
        # (expires, user, id) of every stored message; an entry whose message is gone (acked)
        # or was replaced is stale and skipped when popped
        self._heap: list[tuple[float, int, str]] = []
        self._expired: list[Critical] = []  # dropped, not yet returned by expire()
        self.bytes = 0
        self.messages = 0
        self.acked = self.expired = self.unknown_acks = self.refused = 0

    def new_id(self) -> str:
        """An id no other message of this store (or, by the random prefix, process) has."""
        self._counter += 1
        return f"{self.prefix}-{self._counter}"

    def add(
        self, users: list[int], data: bytes, ttl: float, now: float, id: str | None = None
    ) -> str:
        """Keep ``data`` for every user in ``users`` for ``ttl`` seconds; its id (``id``, or a
        new one). Raises :class:`CriticalLimit` and stores nothing when a bound is reached.
        Adding an id a user already holds replaces that message (in its place)."""
        if ttl <= 0:
            raise ValueError("a critical message needs a positive ttl")
        self._drop_expired(now)
        targets = list(dict.fromkeys(users))
        cost = len(data) + ENTRY_COST
        for user in targets:
            held = self._users.get(user, {})
            if len(held) >= self.per_user and (id is None or id not in held):
                self.refused += 1
                raise CriticalLimit(
                    f"user {user} holds {len(held)} unacknowledged critical messages"
                    f" (limit {self.per_user})"
                )
        freed = 0  # by the messages this one replaces
        if id is not None:
            for user in targets:
                old = self._users.get(user, {}).get(id)
                if old is not None:
                    freed += len(old.data) + ENTRY_COST
        if self.bytes - freed + cost * len(targets) > self.memory:
            self.refused += 1
            raise CriticalLimit(
                f"critical messages would hold more than {self.memory} bytes (--critical-memory)"
            )
        if id is None:
            id = self.new_id()
        expires = now + ttl
        for user in targets:
            held = self._users.setdefault(user, {})
            replaced = held.get(id)
            if replaced is not None:
                self.bytes -= len(replaced.data) + ENTRY_COST
                self.messages -= 1
            held[id] = Critical(id, user, data, expires)
            heapq.heappush(self._heap, (expires, user, id))
        self.bytes += cost * len(targets)
        self.messages += len(targets)
        self._compact()
        return id

    def pending(self, user: int, now: float) -> list[Critical]:
        """The user's unexpired messages, oldest first."""
        held = self._users.get(user)
        if not held:
            return []
        return [critical for critical in held.values() if critical.expires > now]

    def ack(self, user: int, id: str) -> bool:
        """Forget the user's message ``id``; False if the user holds no such message."""
        held = self._users.get(user)
        critical = held.pop(id, None) if held is not None else None
        if critical is None:
            self.unknown_acks += 1
            return False
        if not held:
            del self._users[user]
        self._remove(critical)
        self.acked += 1
        self._compact()
        return True

    def expire(self, now: float) -> list[Critical]:
        """The messages dropped because their ttl passed, since the last call."""
        self._drop_expired(now)
        expired, self._expired = self._expired, []
        return expired

    def stats(self) -> dict[str, int]:
        return {
            "users": len(self._users),
            "messages": self.messages,
            "bytes": self.bytes,
            "acked": self.acked,
            "expired": self.expired,
            "unknown_acks": self.unknown_acks,
            "refused": self.refused,
        }

    # -- internals ---------------------------------------------------------------------------

    def _remove(self, critical: Critical) -> None:
        self.bytes -= len(critical.data) + ENTRY_COST
        self.messages -= 1

    def _drop_expired(self, now: float) -> None:
        heap, users = self._heap, self._users
        while heap and heap[0][0] <= now:
            expires, user, id = heapq.heappop(heap)
            held = users.get(user)
            critical = held.get(id) if held is not None else None
            if held is None or critical is None or critical.expires != expires:
                continue  # stale: acked, or replaced by a later add
            del held[id]
            if not held:
                del users[user]
            self._remove(critical)
            self.expired += 1
            self._expired.append(critical)

    def _compact(self) -> None:
        """Rebuild the heap when stale entries (acked messages) outnumber live ones."""
        if len(self._heap) > max(_COMPACT_MIN, 2 * self.messages):
            self._heap = [
                (critical.expires, critical.user, critical.id)
                for held in self._users.values()
                for critical in held.values()
            ]
            heapq.heapify(self._heap)


class _Sent:
    """A message sent on one connection and not yet acked: re-sent ``sends`` times so far,
    next due at ``due``; ``seq`` names its live entry in the tracker's heap."""

    __slots__ = ("due", "frame", "sends", "seq", "user")

    def __init__(self, user: int, frame: bytes, due: float, seq: int) -> None:
        self.user = user
        self.frame = frame
        self.sends = 0
        self.due = due
        self.seq = seq


class CriticalTracker:
    """What each live connection of one shard was sent and has not acknowledged."""

    __slots__ = (
        "_conns",
        "_heap",
        "_seq",
        "_users",
        "gave_up",
        "resent",
        "retries",
        "timeout",
        "tracked",
    )

    def __init__(self, timeout: float, retries: int) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("acks need timeout > 0 and retries >= 0")
        self.timeout = timeout
        self.retries = retries
        self._conns: dict[int, dict[str, _Sent]] = {}
        self._users: dict[int, set[int]] = {}  # user -> conns that hold any of their entries
        # (due, seq, conn, id); an entry whose seq is no longer its message's is stale
        self._heap: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self.resent = self.gave_up = 0
        self.tracked = 0  # entries, all connections

    def sent(self, conn: int, user: int, id: str, frame: bytes, now: float) -> bool:
        """``frame`` (message ``id`` of ``user``) is being sent on ``conn``; False if ``conn``
        already has it unacknowledged (then it must not be sent again)."""
        held = self._conns.get(conn)
        if held is None:
            held = self._conns[conn] = {}
        elif id in held:
            return False
        self._seq += 1
        due = now + self.timeout
        held[id] = _Sent(user, frame, due, self._seq)
        self.tracked += 1
        self._users.setdefault(user, set()).add(conn)
        heapq.heappush(self._heap, (due, self._seq, conn, id))
        return True

    def due(self, now: float) -> list[tuple[int, bytes]]:
        """``(conn, frame)`` to re-send now. An entry already re-sent ``retries`` times is
        forgotten instead, ``timeout`` after its last re-send (counted ``gave_up``)."""
        heap, conns = self._heap, self._conns
        out: list[tuple[int, bytes]] = []
        while heap and heap[0][0] <= now:
            _, seq, conn, id = heapq.heappop(heap)
            held = conns.get(conn)
            entry = held.get(id) if held is not None else None
            if held is None or entry is None or entry.seq != seq:
                continue  # stale: acked, forgotten or closed
            if entry.sends >= self.retries:
                self._drop(conn, held, id)
                self.gave_up += 1
                continue
            entry.sends += 1
            self.resent += 1
            self._seq += 1
            entry.seq = self._seq
            entry.due = now + self.timeout
            heapq.heappush(heap, (entry.due, entry.seq, conn, id))
            out.append((conn, entry.frame))
        return out

    def acked(self, conn: int, id: str) -> int | None:
        """``conn`` acknowledged ``id``: the user, if ``conn`` had it (then it is forgotten on
        all of that user's connections), else None."""
        held = self._conns.get(conn)
        entry = held.get(id) if held is not None else None
        if entry is None:
            return None
        self.forget(entry.user, id)
        return entry.user

    def forget(self, user: int, id: str) -> None:
        """Message ``id`` of ``user`` was acknowledged elsewhere: stop re-sending it."""
        for conn in list(self._users.get(user, ())):
            held = self._conns.get(conn)
            if held is not None and id in held:
                self._drop(conn, held, id)
        self._compact()

    def closed(self, conn: int) -> None:
        """``conn`` is gone: forget what it was sent."""
        held = self._conns.pop(conn, None)
        if held is None:
            return
        self.tracked -= len(held)
        for user in {entry.user for entry in held.values()}:
            self._unindex(user, conn)
        self._compact()

    def stats(self) -> dict[str, int]:
        return {
            "tracked": self.tracked,
            "resent": self.resent,
            "gave_up": self.gave_up,
        }

    # -- internals ---------------------------------------------------------------------------

    def _drop(self, conn: int, held: dict[str, _Sent], id: str) -> None:
        entry = held.pop(id)
        self.tracked -= 1
        if not held:
            del self._conns[conn]
            self._unindex(entry.user, conn)

    def _unindex(self, user: int, conn: int) -> None:
        conns = self._users.get(user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._users[user]

    def _compact(self) -> None:
        """Rebuild the heap when stale entries outnumber live ones."""
        heap = self._heap
        if len(heap) > max(_COMPACT_MIN, 2 * self.tracked):
            self._heap = [
                (entry.due, entry.seq, conn, id)
                for conn, held in self._conns.items()
                for id, entry in held.items()
            ]
            heapq.heapify(self._heap)
