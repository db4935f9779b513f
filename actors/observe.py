"""What the router lets backends and members observe: the event stream, the snapshot it resyncs
from, connection metadata, and joins and leaves pushed to channel members.

Owns: the :class:`~actors.eventlog.EventLog` (sequencing and publishing events), the commands
``snapshot``, ``get_user_connections`` and ``set_channel``, the set of channels whose members are
told joins and leaves (sent to every shard, which reports those channels' joins and leaves), and
the join/leave frames waiting for the next flush (one delivery per channel per JOIN_LEAVE_TICK,
the frames in the order they happened). It is part of its :class:`~actors.router.RouterCore`
(``core.observers``) and uses the core's services (gathers, credit windows, the Redis half).
Must never do I/O, read a clock (``now`` is a parameter) or block.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from actors.eventlog import EventLog
from actors.gather import REDIS, Gather, GatherSpec
from actors.hostlink import AnswerUserConnections, PublishChannel, SetChannel, UserConnections
from actors.ids import ChannelId, ShardIndex
from actors.wire import frames, shardwire
from actors.wire.commands import Command, CommandError

if TYPE_CHECKING:
    from actors.router import RouterCore, ShardSlot

JOIN_LEAVE_TICK = 0.05  # seconds: joins and leaves of a channel go out together at most this late
MAX_CHANGES_PER_TICK = 100  # a channel's joins and leaves per tick; beyond: one presence_changed
MAX_RECORDS = 1_000  # connections of one user answered to another host at most
MAX_SNAPSHOTS = 8  # snapshots in flight at most (each walks every connection of the host)


class Observers:
    """Events, snapshots, metadata and join/leave, for the core (``core.observers``)."""

    def __init__(self, core: RouterCore, events: EventLog) -> None:
        self._core = core
        self.events = events
        self.marks: set[ChannelId] = set()  # channels whose members are told joins and leaves
        # their net changes waiting for the flush: channel -> user -> joined (a join and a leave
        # of the same user within one tick cancel out: members never saw either)
        self._pending: dict[ChannelId, dict[int, bool]] = {}
        # who is in each marked channel, by shard (from the shards' joins and leaves): a shard
        # that dies cannot say its users left; the router does
        self._joined: dict[ShardIndex, dict[ChannelId, set[int]]] = {}
        self._flush_at: float | None = None
        self.counters = {
            "join_leave_frames": 0,
            "join_leave_dropped": 0,
            "join_leave_cancelled": 0,
            "join_leave_summarised": 0,
        }

    # -- commands --------------------------------------------------------------------------

    def snapshot(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        """Every connection of the host, consistent with the event stream at ``seq``."""
        core, events = self._core, self.events
        if events.watching() >= MAX_SNAPSHOTS:
            raise CommandError(
                "overloaded", f"{MAX_SNAPSHOTS} snapshots in flight: retry in a moment"
            )

        def combine(gather: Gather) -> dict[str, Any]:
            answers = {
                ShardIndex(i): list(body["connections"])
                for i, body in gather.answers.items()
                if i is not REDIS
            }
            connections = events.patch(gather.qid, answers)
            return {"seq": events.seq, "host": events.host, "connections": connections}

        spec = GatherSpec(
            {slot.index for slot in core.slots}, combine, lambda _i: shardwire.QueryConnections()
        )
        qid = core.start_gather(envelope, cmd.id, spec, now)
        if qid in core.pending:
            down = [slot.index for slot in core.slots if slot.index in core.pending[qid].missing]
            events.watch(qid, down)

    def user_connections(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        """``user``'s connections, on this host (its shard) and, in a cluster, the others."""
        user = cmd.args["user"]
        host = self.events.host

        def combine(gather: Gather) -> dict[str, Any]:
            found: list[dict[str, Any]] = []
            for who, body in gather.answers.items():
                if who is REDIS:
                    found += body.get("connections", [])
                else:
                    found += [{**record, "host": host} for record in body["connections"]]
            result: dict[str, Any] = {"connections": found}
            missing = gather.answers.get(REDIS, {}).get("missing_hosts")
            if missing:
                result["missing_hosts"] = missing
            return result

        query = shardwire.QueryUserConnections(user)
        spec = GatherSpec(
            {self._core.shard_of(user)},
            combine,
            lambda _i: query,
            remote=lambda qid: UserConnections(qid, user),
        )
        self._core.start_gather(envelope, cmd.id, spec, now)

    def answer_who(self, control: dict[str, Any], now: float) -> None:
        """Another host asks for a user's connections here (a ``who`` control): ask the user's
        shard, and answer through the link."""
        user, qid, reply_to = control["user"], control["qid"], control["reply_to"]
        hosts = self._core.hosts

        def combine(gather: Gather) -> dict[str, Any]:
            # the link adds "host" there, from the answer's seal
            found = [r for body in gather.answers.values() for r in body["connections"]]
            found = found[:MAX_RECORDS]
            if hosts is not None:
                hosts.queue(AnswerUserConnections(reply_to, qid, found))
            return {}

        query = shardwire.QueryUserConnections(user)
        spec = GatherSpec({self._core.shard_of(user)}, combine, lambda _i: query)
        if self._core.start_internal(spec, now) is None and hosts is not None:
            hosts.queue(AnswerUserConnections(reply_to, qid, []))  # an answer, if empty

    def set_channel(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        """Mark (or unmark) a channel: its members are told joins and leaves; in a cluster, on
        every host."""
        channel: ChannelId = cmd.args["channel"]
        on: bool = cmd.args["join_leave"]
        self.mark(channel, on, now)
        result = {"channel": channel, "join_leave": on}
        core = self._core
        if core.hosts is None:
            core.reply(envelope, cmd, result)
            return
        spec = GatherSpec(
            (), _marked, None, result, remote=lambda qid: SetChannel(qid, channel, on)
        )
        core.start_gather(envelope, cmd.id, spec, now)

    # -- marks and joins/leaves ------------------------------------------------------------

    def mark(self, channel: ChannelId, on: bool, now: float) -> None:
        """Mark or unmark ``channel`` here, and tell the shards if that changed anything."""
        if (channel in self.marks) == on:
            return
        if on:
            self.marks.add(channel)
        else:
            self.marks.discard(channel)
            self._pending.pop(channel, None)
            for joined in self._joined.values():
                joined.pop(channel, None)
        self._tell_shards(now)

    def replace_marks(self, channels: list[ChannelId], now: float) -> None:
        """The cluster's marks (the link read them after connecting): they replace ours."""
        marks = set(channels)
        if marks != self.marks:
            self.marks = marks
            for joined in self._joined.values():
                for channel in [c for c in joined if c not in marks]:
                    del joined[channel]
            self._tell_shards(now)

    def shard_up(self, slot: ShardSlot, now: float) -> None:
        """A shard (re)started: it must know the marks."""
        if self.marks:
            self._core.send(slot.index, shardwire.marks(sorted(self.marks)), now)

    def _tell_shards(self, now: float) -> None:
        message = shardwire.marks(sorted(self.marks))
        for slot in self._core.up_shards():
            self._core.send(slot.index, message, now)

    def joins_and_leaves(self, index: ShardIndex, raw: bytes, now: float) -> None:
        """Shard ``index``'s joins and leaves (shardwire ``W``): queued for the next flush, in
        order."""
        try:
            changes = json.loads(raw)
            parsed = [(int(c), int(u), bool(j)) for c, u, j in changes]
        except (ValueError, TypeError, RecursionError):
            self.events.counters["events_malformed"] += 1
            return
        members = self._joined.setdefault(index, {})
        for channel, user, joined in parsed:
            if channel in self.marks:
                users = members.setdefault(ChannelId(channel), set())
                if joined:
                    users.add(user)
                else:
                    users.discard(user)
                self._queue(ChannelId(channel), user, joined, now)

    def shard_died(self, index: ShardIndex, now: float) -> None:
        """Shard ``index`` is gone: its users left the marked channels they were in."""
        for channel, users in self._joined.pop(index, {}).items():
            for user in sorted(users):
                self._queue(channel, user, False, now)

    def _queue(self, channel: ChannelId, user: int, joined: bool, now: float) -> None:
        changes = self._pending.setdefault(channel, {})
        if changes.get(user) is (not joined):
            del changes[user]  # joined and left (or left and came back) within the tick
            self.counters["join_leave_cancelled"] += 2
        else:
            changes[user] = joined
        if self._flush_at is None:
            self._flush_at = now + JOIN_LEAVE_TICK

    def flush(self, now: float) -> None:
        """Deliver the queued joins and leaves whose tick is over: per channel, one message to
        each shard holding members (a shard with no room drops it, counted), and each frame
        to the other hosts. More than MAX_CHANGES_PER_TICK changes of one channel in a tick (a
        mass reconnect) go as one ``presence_changed`` frame instead (members refetch the
        channel's presence): a member is written at most that many frames per tick, whatever
        the churn, so a 10,000-member channel never costs members x changes bytes."""
        if self._flush_at is None or now < self._flush_at:
            return
        core, hosts = self._core, self._core.hosts
        pending, self._pending, self._flush_at = self._pending, {}, None
        for channel, changes in pending.items():
            if not changes:
                continue
            if len(changes) > MAX_CHANGES_PER_TICK:
                joins = sum(changes.values())
                queued = [frames.presence_changed(channel, joins, len(changes) - joins)]
                self.counters["join_leave_summarised"] += len(changes)
            else:
                queued = [frames.join_leave(j, channel, u) for u, j in changes.items()]
            message = shardwire.channel_delivery(channel, b"".join(queued))
            for index in core.members(channel):
                if not core.offer(index, message, now):
                    self.counters["join_leave_dropped"] += len(queued)
            self.counters["join_leave_frames"] += len(queued)
            if hosts is not None and hosts.up:
                for frame in queued:
                    hosts.queue(PublishChannel(0, channel, frame))

    def next_deadline(self) -> float | None:
        return self._flush_at

    def statistics(self) -> dict[str, Any]:
        return {
            "events": {**self.events.counters, "seq": self.events.seq, "host": self.events.host},
            "join_leave": {**self.counters, "channels": len(self.marks)},
        }


def _marked(gather: Gather) -> dict[str, Any]:
    """The reply of ``set_channel`` in a cluster: the mark, and how many hosts were told."""
    result = dict(gather.args)
    body = gather.answers.get(REDIS)
    if body is not None:
        result["hosts"] = body.get("value", 0)
    return result
