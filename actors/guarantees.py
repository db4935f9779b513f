"""The router's delivery guarantees: channel history (offsets, resume) and critical messages.

Owns: what the router does for issue 11's contract, as the part of its
:class:`~actors.router.RouterCore` that the core hands these commands and shard messages to:
a channel broadcast with history (its offset), a client's resume (the replay, then live with no
gap and no duplicate), the ``history`` command, critical messages (kept until acknowledged or
expired, sent to every new connection of their user), and acknowledgements. The history and the
critical messages live here, in the router's process, never in a shard's: a shard that crashes
takes none of them along. In a cluster of hosts they live in Redis instead (while the link is
up; the local stores take over while it is down), through the Redis link's operations.

Must never do I/O, read a clock or block (like the core): Redis's part goes through gathers and
link operations.

Ordering, on one host: the router assigns a channel's offsets and queues deliveries to a shard in
that order, on the one pipe to the shard that also carries the resume's answer; a shard buffers a
resuming connection's live messages until the answer and drops what it already holds
(``CacheActor``). In a cluster, Redis assigns them (one script: offset, stream, publish) and
every host, this one included, delivers from the channel's topic: one order for everyone. A
shard that sees a gap after a resume (the host's topic subscription raced the replay) asks again,
quietly, from where it is.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.critical import Critical, CriticalLimit, CriticalStore
from actors.gather import REDIS, Gather, GatherSpec
from actors.history import REPLAY_BYTES, HistoryStore, Position, Recovery, recovery
from actors.hostlink import (
    AckCritical,
    AppendChannel,
    FetchCritical,
    PublishUsers,
    ReadHistory,
    StoreCritical,
)
from actors.ids import ChannelId, ShardIndex
from actors.wire import frames, shardwire
from actors.wire.commands import Command, CommandError

if TYPE_CHECKING:
    from actors.router import RouterCore, ShardSlot

DEFAULT_CRITICAL_TTL = 86_400.0
WAIT_FOR_TOPIC = 2.0  # seconds a resume waits for the host's topic subscription at most
# seconds a resume from nothing, read from Redis, waits for its read's probe to come back on
# the channel's topic at most once the read is answered (see Guarantees._read; to the next tick
# of the router, 0.1 s, after that); then it is answered without it
WAIT_FOR_PROBE = 1.0
MAX_PENDING_ACKS = 10_000  # acks kept for Redis while the link is down
MAX_UNDELIVERED = 10_000  # critical messages kept to queue again to a shard that had no room


@dataclass(frozen=True, slots=True)
class _Resume:
    """A resume from connection ``conn`` of shard ``index`` (incarnation ``incarnation``)."""

    index: ShardIndex
    incarnation: int
    conn: int
    channel: ChannelId
    offset: int
    epoch: str
    quiet: bool
    before: int
    deadline: float  # of its wait for the channel's topic


# a frame with an offset and an epoch is at most this much longer than the same without
POSITION_BYTES = 64
INTERNAL = "internal"  # the request of a gather that no backend waits for


class Guarantees:
    """History and critical messages, for the core (``core.guarantees``)."""

    def __init__(self, core: RouterCore, history: HistoryStore, critical: CriticalStore) -> None:
        self._core = core
        self.history = history
        self.critical = critical
        self.counters = {"resumes": 0, "recovered": 0, "not_recovered": 0, "unprobed": 0}
        self._waiting: list[_Resume] = []  # resumes waiting for their channel's topic
        # acks made while the link was down, for Redis when it is back (oldest dropped)
        self._acks: deque[tuple[int, str]] = deque(maxlen=MAX_PENDING_ACKS)
        # critical messages a shard had no room for: (shard, incarnation, message), retried
        self._undelivered: deque[tuple[ShardIndex, int, list[bytes]]] = deque()
        self.undelivered_dropped = 0
        # resumes from nothing read from Redis, by the read's id: answers waiting for the
        # read's probe (with their deadline: set by the first tick after the answer), and
        # probes back before their read's answer
        self._unprobed: dict[int, tuple[_Resume, Recovery, float | None]] = {}
        self._probed: set[int] = set()

    def _linked(self) -> bool:
        """Whether Redis holds the history and the critical messages right now."""
        hosts = self._core.hosts
        return hosts is not None and hosts.up

    # -- channel broadcasts ----------------------------------------------------------------

    def broadcast_to_channel(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        """With history: the message gets the channel's next offset. On one host (or while the
        link is down), from the local store, delivered at once; in a cluster, from Redis, and
        delivered here when it comes back on the channel's topic."""
        core = self._core
        channel: ChannelId = cmd.args["channel"]
        data = cmd.data_json
        # sized, not encoded: the frame is made once, with its offset (here or from Redis)
        plain = frames.channel_message_size(channel, len(data))
        core.check_size(plain)
        shards = core.members(channel)
        size = plain + POSITION_BYTES + 16  # + the offset and epoch, + the argument's
        core.refuse_unless_room(dict.fromkeys(shards, size), now)  # nothing appended if refused

        def append(qid: int) -> AppendChannel:
            return AppendChannel(
                qid, channel, data, self.history.size, int(self.history.ttl * 1000)
            )

        if self._linked():
            spec = GatherSpec(
                (), self._appended(channel, data, now), None, {"shards": len(shards)}, append
            )
            core.start_gather(envelope, cmd.id, spec, now)
            return
        # (the link, if any, is down: ``append`` is not run, and the reply says cluster: false)
        extra = self._append_here(channel, data, now)
        core.finish_broadcast(envelope, cmd, now, len(shards), append, extra)

    def _append_here(self, channel: ChannelId, data: bytes, now: float) -> dict[str, Any]:
        """Offset from the local store, delivered to this host's members at once."""
        core = self._core
        position = self.history.append(channel, data, now)
        frame = frames.channel_message(channel, data, position.offset, position.epoch)
        message = shardwire.channel_delivery(channel, frame, position.offset)
        for index in core.members(channel):
            core.send(index, message, now)
        return {"offset": position.offset, "epoch": position.epoch}

    def _appended(self, channel: ChannelId, data: bytes, now: float) -> Callable[[Gather], Any]:
        """The reply of a broadcast with history in a cluster: Redis's offset and epoch. If the
        link went down meanwhile, this host's own history takes over, as it does for the
        broadcasts that follow while the link is down: delivered here, with this host's epoch
        (clients that resume later see the change), and the reply says ``cluster: false``.
        (Had Redis run it after all, its copy reaches no listener of ours on the dead link; one
        that reached another host's clients is what ``cluster: false`` warns of.) If Redis only
        did not answer in time, the reply is an error ``unavailable``: it may still run it."""

        def combine(gather: Gather) -> dict[str, Any]:
            body = gather.answers.get(REDIS)
            hosts = self._core.hosts
            if body is None and hosts is not None and hosts.up:
                # no answer in time, the link up: Redis may run it yet (delivering it here
                # too): a copy from this host's store would be a second one
                text = "redis did not answer in time: the message may or may not be delivered"
                return {"ok": False, "error": {"code": "unavailable", "message": text}}
            if body is None:
                return {**gather.args, **self._append_here(channel, data, now)}
            return {**gather.args, "offset": body["offset"], "epoch": body["epoch"]}

        return combine

    # -- resume ----------------------------------------------------------------------------

    def resume(self, slot: ShardSlot, argument: bytes, payload: bytes, now: float) -> None:
        """A client's resume (or a shard's quiet one, to fill a gap): answer its shard with
        the messages after the client's offset, then ``resumed`` (see shardwire ``V``). In a
        cluster, once the host listens to the channel's topic (a message published between
        the read and the subscription would be in neither)."""
        conn, channel, offset, quiet, before = shardwire.unpack_ids(argument)
        request = _Resume(
            slot.index,
            slot.epoch,
            conn,
            ChannelId(channel),
            offset,
            payload.decode(errors="replace"),
            bool(quiet),
            before,
            now + WAIT_FOR_TOPIC,
        )
        self.counters["resumes"] += 1
        hosts = self._core.hosts
        if not self.history.enabled:
            self._send_resumed(request, Recovery(False, 0, "", []), now)
        elif hosts is None:
            answer = self.history.recover(request.channel, offset, request.epoch, now)
            self._send_resumed(request, answer, now)
        elif hosts.up and request.channel not in hosts.ready:
            self._waiting.append(request)
        else:
            self._read(request, now)

    def _read(self, request: _Resume, now: float) -> None:
        """Read a resume's messages from Redis (through the link), and answer it. If Redis fails
        it, this host's store answers (it holds nothing of Redis's epoch: see link_state).

        A resume from nothing is answered only once the channel's messages up to the read's
        offset have reached the shard too: the connection is owed those that came after it
        joined, and the shard drops one at or below the offset that arrives after the answer
        (a repeat, for any other resume). Another host's message reaches this one through the
        channel's topic, which can lag the read; so the read publishes a probe on the topic
        after it (in the same script: Redis's order), and the answer waits until the probe is
        back (:meth:`probe_back`), the messages before it delivered: at most WAIT_FOR_PROBE."""

        def replay(gather: Gather) -> dict[str, Any]:
            body = gather.answers.get(REDIS)
            if body is None:
                self._probed.discard(gather.qid)
                answer = self.history.recover(channel, request.offset, request.epoch, now)
            else:
                answer = from_redis(body, request.offset, request.epoch)
                if probe and gather.qid not in self._probed:
                    self._unprobed[gather.qid] = (request, answer, None)
                    return {}
                self._probed.discard(gather.qid)
            self._send_resumed(request, answer, now)
            return {}

        channel, size = request.channel, self.history.size
        ttl_ms = int(self.history.ttl * 1000)
        since = request.offset
        hosts = self._core.hosts  # a probe comes back only through a topic listened to
        listened = hosts is not None and hosts.up and channel in hosts.ready
        probe = not since and not request.epoch and listened
        spec = GatherSpec(
            (),
            replay,
            None,
            remote=lambda qid: ReadHistory(qid, channel, since, size, ttl_ms, probe),
        )
        self._core.start_internal(spec, now)  # refused: no answer; the shard closes it (1013)

    def probe_back(self, qid: int, now: float) -> None:
        """The probe of read ``qid`` came back on its channel's topic: answer its resume (or,
        if the read's answer is still to come, remember it for then)."""
        waiting = self._unprobed.pop(qid, None)
        if waiting is not None:
            self._send_resumed(waiting[0], waiting[1], now)
        elif qid in self._core.pending:  # not one whose read has failed or timed out
            self._probed.add(qid)

    def _without_probe(self, qid: int, now: float) -> None:
        """Answer the resume of read ``qid`` whose probe will not come (counted)."""
        request, answer, _deadline = self._unprobed.pop(qid)
        self.counters["unprobed"] += 1
        self._send_resumed(request, answer, now)

    def topics_ready(self, now: float) -> None:
        """The link confirmed topics (or time passed): the resumes waiting for theirs go on."""
        hosts = self._core.hosts
        if not self._waiting or hosts is None:
            return
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            if not hosts.up or request.channel in hosts.ready or now >= request.deadline:
                self._read(request, now)
            else:
                self._waiting.append(request)

    def _send_resumed(self, request: _Resume, answer: Recovery, now: float) -> None:
        slot = self._core.slots[request.index]
        if slot.epoch != request.incarnation:
            return  # the shard restarted meanwhile: its connections (and their ids) are gone
        self.counters["recovered" if answer.recovered else "not_recovered"] += 1
        before, channel = request.before, request.channel
        parts = [
            frames.channel_message(channel, data, offset, answer.epoch)
            for offset, data in answer.messages
            if not before or offset < before
        ]
        if not request.quiet or not answer.recovered:  # a gap that cannot be filled: said
            parts.append(frames.resumed(channel, answer.offset, answer.epoch, answer.recovered))
        message = shardwire.resumed(
            request.conn, channel, answer.offset, answer.epoch, b"".join(parts)
        )
        self._core.send(slot.index, message, now)

    # -- the history command ---------------------------------------------------------------

    def history_command(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        if not self.history.enabled:
            raise CommandError(
                "history_disabled", "this server keeps no history (--history-size 0)"
            )
        channel: ChannelId = cmd.args["channel"]
        since, limit = cmd.args.get("since", 0), cmd.args.get("limit", 100)
        if self._core.hosts is None:
            answer = self.history.read(channel, since, limit, now)
            self._core.reply(envelope, cmd, _history_reply(answer))
            return
        history = self.history

        def combine(gather: Gather) -> dict[str, Any]:
            body = gather.answers.get(REDIS)
            if body is None:
                return _history_reply(history.read(channel, since, limit, now))
            return _history_reply(from_redis(body, since, str(body["epoch"]), limit))

        ttl_ms = int(history.ttl * 1000)
        spec = GatherSpec(
            (), combine, None, remote=lambda qid: ReadHistory(qid, channel, since, limit, ttl_ms)
        )
        self._core.start_gather(envelope, cmd.id, spec, now)

    # -- critical messages -----------------------------------------------------------------

    def broadcast_critical(
        self, envelope: list[bytes], cmd: Command, users: list[int], now: float
    ) -> None:
        """A critical message to ``users``: kept until one of each user's connections
        acknowledges it or ``ttl`` passes, and delivered now to their connections here (and,
        through Redis, on the other hosts)."""
        core = self._core
        data = cmd.data_json
        ttl = float(cmd.args.get("ttl", DEFAULT_CRITICAL_TTL))
        message_id = self.critical.new_id()
        frame = frames.critical_message(message_id, data)
        core.check_frame(frame)
        payload = shardwire.pack_criticals([(message_id, frame)])
        messages = {
            index: [shardwire.CRITICAL, shardwire.pack_ids(group), payload]
            for index, group in core.up_groups(users).items()
        }
        core.refuse_unless_room(
            {index: shardwire.size(m[1], m[2]) for index, m in messages.items()}, now
        )
        if self._linked():
            spec = GatherSpec(
                (),
                self._stored(messages, users, message_id, data, ttl, now),
                None,
                {"shards": len(messages), "message_id": message_id},
                lambda qid: StoreCritical(
                    qid, users, message_id, data, int(ttl * 1000), self.critical.per_user
                ),
            )
            core.start_gather(envelope, cmd.id, spec, now)
            return
        self._keep_here(users, data, ttl, now, message_id)
        for index, msg in messages.items():
            core.send(index, msg, now)
        core.finish_broadcast(
            envelope,
            cmd,
            now,
            len(messages),
            lambda qid: PublishUsers(qid, users, frame),
            {"message_id": message_id},
        )

    def _keep_here(self, users: list[int], data: bytes, ttl: float, now: float, mid: str) -> None:
        try:
            self.critical.add(users, data, ttl, now, mid)
        except CriticalLimit as exc:
            raise CommandError("limit", str(exc)) from None

    def _stored(
        self,
        messages: Mapping[ShardIndex, list[bytes]],
        users: list[int],
        message_id: str,
        data: bytes,
        ttl: float,
        now: float,
    ) -> Callable[[Gather], dict[str, Any]]:
        """The reply of a critical message stored in Redis, which also delivers it here once
        Redis has taken it (its per-user bound is Redis's to check, across hosts)."""
        core = self._core

        def combine(gather: Gather) -> dict[str, Any]:
            body = gather.answers.get(REDIS)
            if body is not None and "limit" in body:
                text = f"user {body['limit']} holds {self.critical.per_user} critical messages"
                return {"ok": False, "error": {"code": "limit", "message": text}}
            if body is None:  # Redis failed it: keep it here at least
                try:
                    self._keep_here(users, data, ttl, now, message_id)
                except CommandError as exc:
                    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            for index, msg in messages.items():
                if not core.offer(index, msg, now):
                    self.undelivered(index, msg)
            result = {**gather.args}
            if body is not None:
                result["hosts"] = body.get("value", 0)
            return result

        return combine

    def new_connection(self, slot: ShardSlot, argument: bytes, now: float) -> None:
        """A new connection of a user: send it the user's pending critical messages, in order
        (the shard sends them right after ``hello``)."""
        conn, user = shardwire.unpack_ids(argument)
        here = self.critical.pending(user, now)
        incarnation = slot.epoch
        if self._core.hosts is None:
            if here:
                self._send_pending(slot, incarnation, conn, _entries(here), now)
            return

        def fetched(gather: Gather) -> dict[str, Any]:
            body = gather.answers.get(REDIS) or {"messages": []}
            entries = [(str(i), str(d).encode()) for i, d in body["messages"]]
            seen = {i for i, _ in entries}
            entries += [(i, d) for i, d in _entries(here) if i not in seen]
            if entries:
                self._send_pending(slot, incarnation, conn, entries, now)
            return {}

        spec = GatherSpec((), fetched, None, remote=lambda qid: FetchCritical(qid, user))
        if self._core.start_internal(spec, now) is None and here:  # what this host has, then
            self._send_pending(slot, incarnation, conn, _entries(here), now)

    def _send_pending(
        self,
        slot: ShardSlot,
        incarnation: int,
        conn: int,
        entries: list[tuple[str, bytes]],
        now: float,
    ) -> None:
        if slot.epoch != incarnation:
            return
        criticals = [(i, frames.critical_message(i, data)) for i, data in entries]
        self._core.send(slot.index, shardwire.pending(conn, criticals), now)

    def ack(self, argument: bytes, payload: bytes) -> None:
        """A client acknowledged critical message ``payload`` of user ``argument``."""
        user = shardwire.unpack_id(argument)
        message_id = payload.decode(errors="replace")
        known = self.critical.ack(user, message_id)  # an unknown one is counted there
        hosts = self._core.hosts
        if known or (hosts is not None and hosts.up):  # (Redis's copy: it knows, not we)
            self._core.observers.events.emit("critical_delivered", {"user": user, "id": message_id})
        if hosts is not None and hosts.up:
            hosts.queue(AckCritical(user, message_id))
        elif hosts is not None:  # for Redis's copy, once the link is back
            self._acks.append((user, message_id))

    def link_state(self, up: bool, now: float) -> None:
        """The link (re)connected or went down. Back up: the acks made meanwhile go to Redis,
        and this host's own history is forgotten (it was written while Redis was away: a resume
        must never find it recovered against Redis's), so are the resumes waiting for a topic
        (answered now)."""
        hosts = self._core.hosts
        if hosts is None:
            return
        if up:
            while self._acks:
                hosts.queue(AckCritical(*self._acks.popleft()))
            self.history.clear()
        else:  # the probes will not come back
            self._probed.clear()
            for qid in list(self._unprobed):
                self._without_probe(qid, now)
        self.topics_ready(now)

    def acked_elsewhere(self, users: list[int], message_id: str, now: float) -> None:
        """Another host got the ack: the shard here stops re-sending it."""
        core = self._core
        for index, group in core.up_groups(users).items():
            for user in group:
                core.send(index, shardwire.acked(user, message_id), now)

    def undelivered(self, index: ShardIndex, msg: list[bytes]) -> None:
        """A critical message (``K``, ``L``) that shard ``index`` had no room for: queued again
        later (:meth:`tick`), so that a live connection gets it without waiting for the user's
        next one; at most MAX_UNDELIVERED (beyond: counted, and it waits for that)."""
        if len(self._undelivered) >= MAX_UNDELIVERED:
            self.undelivered_dropped += 1
            return
        self._undelivered.append((index, self._core.slots[index].epoch, msg))

    # -- time and statistics ---------------------------------------------------------------

    def retrying(self) -> bool:
        """Whether :meth:`tick` has something to retry or to give up on (resumes waiting for
        their channel's topic or their read's probe, critical messages a shard had no room
        for): the router ticks often then."""
        return bool(self._waiting or self._undelivered or self._unprobed)

    def tick(self, now: float) -> None:
        self.history.expire(now)
        for gone in self.critical.expire(now):
            self._core.observers.events.emit("critical_expired", {"user": gone.user, "id": gone.id})
        if self._waiting:
            self.topics_ready(now)
        for qid, (request, answer, deadline) in list(self._unprobed.items()):
            if deadline is None:  # answered since the last tick: the wait starts now
                self._unprobed[qid] = (request, answer, now + WAIT_FOR_PROBE)
            elif now >= deadline:  # the probe is lost (the listener reconnects)
                self._without_probe(qid, now)
        for _ in range(len(self._undelivered)):
            index, incarnation, msg = self._undelivered.popleft()
            if self._core.slots[index].epoch != incarnation:
                continue  # its connections are gone; new ones get it after hello
            if not self._core.offer(index, msg, now):
                self._undelivered.append((index, incarnation, msg))

    def statistics(self) -> dict[str, Any]:
        return {
            "history": self.history.stats(),
            "critical": {
                **self.critical.stats(),
                "retrying": len(self._undelivered),
                "retry_dropped": self.undelivered_dropped,
            },
            "resumes": dict(self.counters),
        }


def _entries(pending: list[Critical]) -> list[tuple[str, bytes]]:
    return [(c.id, c.data) for c in pending]


def from_redis(body: dict[str, Any], offset: int, epoch: str, limit: int = 0) -> Recovery:
    """A :class:`Recovery` from a ReadHistory answer (see :func:`actors.history.recovery`)."""
    messages = [(int(o), str(d).encode()) for o, d in body["messages"]]
    latest, current = int(body["offset"]), str(body["epoch"])
    if limit:  # the history command: what is there, whatever the client's epoch
        return Recovery(int(body["first"]) <= offset + 1, latest, current, messages)
    asked = Position(offset, epoch)  # the client's
    return recovery(asked, int(body["first"]), messages, latest, current, REPLAY_BYTES)


def _history_reply(answer: Recovery) -> dict[str, Any]:
    return {
        "epoch": answer.epoch,
        "offset": answer.offset,
        "messages": [{"offset": o, "data": json.loads(d)} for o, d in answer.messages],
    }
