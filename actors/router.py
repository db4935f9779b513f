"""The router's logic: the channel → shards index, shard liveness, routing and scatter/gather.

Owns: which shards are up (and in which incarnation, the *epoch*), which shards hold members of
which channel, and the queries in flight. Every method appends what must be sent to
``self.outbox`` (to shards), ``self.replies`` (to backends) and, in a cluster of hosts,
``self.to_redis`` (operations for the Redis link, which answers through :meth:`redis_result`);
the RouterActor moves the bytes. In a gather, the Redis link is one more participant
(``REDIS``): it brings the other hosts' part of an answer, or the news that they were not reached.
Must never do I/O, read a clock (``now`` is a parameter) or block: a shard that is down or slow
only ever costs a missing answer in a reply, never a wait.

Flow control: the core counts what it queues to each shard and what the shard reports it has
consumed (``shardwire``'s credit). A broadcast whose target shards have no room (more than
``queue_messages`` messages or ``queue_bytes`` bytes in flight, or a backlog whose oldest
message is older than ``queue_delay``) is refused whole with ``overloaded``, and nothing of it is
queued: an ``ok: true`` means the message was queued to every shard holding members. Queries
count in the window but are never refused by it (they are small, and at most ``max_queries``
are in flight); deliveries from other hosts that find no room are dropped and counted.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from actors.gather import (
    REDIS,
    Combiner,
    Gather,
    RedisOp,
    are_online,
    broadcast,
    is_online,
    presence_snapshot,
    sum_connections,
    union_users,
)
from actors.ids import ChannelId, ShardIndex, stable_hash
from actors.wire import commands, frames, shardwire
from actors.wire.commands import Command, CommandError

log = logging.getLogger("ucc.router")

MARK_SPAN = 0.01  # seconds of sending one backlog age mark covers (see ShardSlot.marks)


class ShardState(Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


@dataclass(slots=True)
class ShardSlot:
    index: ShardIndex
    state: ShardState = ShardState.DOWN
    epoch: int = -1
    pid: int = 0
    last_seen: float = 0.0
    channels: set[ChannelId] = field(default_factory=set)
    # credit (see shardwire): totals queued to this incarnation and consumed by it
    sent_messages: int = 0
    sent_bytes: int = 0
    acked_messages: int = 0
    acked_bytes: int = 0
    # (sent_messages after the mark's last message, when its first was sent): the oldest
    # unconsumed mark dates the backlog; one mark per MARK_SPAN keeps this short
    marks: deque[tuple[int, float]] = field(default_factory=deque)

    @property
    def identity(self) -> bytes:
        return shardwire.identity(self.index, self.epoch)

    def reset_credit(self) -> None:
        """A new incarnation (or none): nothing is in flight to it."""
        self.sent_messages = self.sent_bytes = self.acked_messages = self.acked_bytes = 0
        self.marks.clear()

    def queued(self, size: int, now: float) -> None:
        self.sent_messages += 1
        self.sent_bytes += size
        marks = self.marks
        if marks and now - marks[-1][1] < MARK_SPAN:
            marks[-1] = (self.sent_messages, marks[-1][1])
        else:
            marks.append((self.sent_messages, now))

    def credit(self, messages: int, size: int) -> None:
        """The shard has consumed ``messages`` messages and ``size`` bytes in all."""
        self.acked_messages = max(self.acked_messages, min(messages, self.sent_messages))
        self.acked_bytes = max(self.acked_bytes, min(size, self.sent_bytes))
        marks = self.marks
        while marks and marks[0][0] <= self.acked_messages:
            marks.popleft()

    def in_flight(self) -> tuple[int, int]:
        return self.sent_messages - self.acked_messages, self.sent_bytes - self.acked_bytes

    def backlog_age(self, now: float) -> float:
        """How long the oldest message not yet consumed has waited (0 if none)."""
        return now - self.marks[0][1] if self.marks else 0.0


@dataclass(frozen=True, slots=True)
class ShardEvent:
    """A change of a shard's state, for the supervisor."""

    index: ShardIndex
    state: ShardState
    epoch: int
    pid: int


class RouterCore:
    def __init__(
        self,
        shards: int,
        gather_timeout: float = 1.0,
        max_command: int = 1 << 20,
        cluster: bool = False,
        queue_messages: int = 20_000,
        queue_bytes: int = 64 << 20,
        queue_delay: float = 0.1,
        max_queries: int = 10_000,
    ) -> None:
        self.queue_messages = queue_messages
        self.queue_bytes = queue_bytes
        self.queue_delay = queue_delay
        self.max_queries = max_queries
        self.slots = [ShardSlot(ShardIndex(i)) for i in range(shards)]
        self.index: dict[ChannelId, set[ShardIndex]] = {}
        self.gather_timeout = gather_timeout
        self.max_command = max_command
        self.pending: dict[int, Gather] = {}
        self._next_qid = 1
        self.outbox: list[tuple[bytes, list[bytes]]] = []
        self.replies: list[tuple[list[bytes], bytes]] = []
        self.events: list[ShardEvent] = []
        self.cluster = cluster  # a Redis link exists
        self.cluster_up = False  # ...and is connected
        self.to_redis: list[RedisOp] = []
        self.link_counters: dict[str, int] | None = None  # the Redis link's, shown in stats
        self.counters = {
            "commands": 0,
            "errors": 0,
            "stale_messages": 0,
            "dropped_to_shards": 0,
            "dropped_replies": 0,
            "commands_refused": 0,  # answered overloaded: nothing of them was queued
            "remote_dropped": 0,  # deliveries from other hosts that found no room
            "internal_errors": 0,  # a bug met while handling a command (logged)
        }

    # -- shard lifecycle -------------------------------------------------------------------

    def shard_starting(self, index: int, epoch: int, pid: int) -> None:
        """The supervisor started incarnation ``epoch`` of shard ``index``."""
        slot = self.slots[index]
        if epoch > slot.epoch:
            self._drop(slot, now=None)
            slot.epoch, slot.pid, slot.state = epoch, pid, ShardState.STARTING

    def shard_down(self, index: int, epoch: int, now: float) -> None:
        """Incarnation ``epoch`` of shard ``index`` died or was killed."""
        slot = self.slots[index]
        if slot.epoch == epoch and slot.state is not ShardState.DOWN:
            self._drop(slot, now)
            slot.state = ShardState.DOWN

    def check_hung(self, now: float, timeout: float) -> list[ShardSlot]:
        """Declare down the up shards silent for ``timeout`` seconds, and report them to the
        supervisor, which kills them. A shard's heartbeat is a timer on its event loop, so it
        stops when the loop stops turning (SIGSTOP, an endless callback); a busy loop still
        turns (every turn's work is bounded: connections' reads by their budget, deliveries by
        the shard's work cap, and the router never queues more than the credit window), so
        load alone does not look hung."""
        hung = [s for s in self.up_shards() if now - s.last_seen > timeout]
        for slot in hung:
            self.shard_down(slot.index, slot.epoch, now)
            self.events.append(ShardEvent(slot.index, ShardState.DOWN, slot.epoch, slot.pid))
        return hung

    def _drop(self, slot: ShardSlot, now: float | None) -> None:
        """Forget a shard's memberships and stop waiting for it."""
        for channel in slot.channels:
            self._unindex(channel, slot.index)
        slot.channels = set()
        slot.reset_credit()
        for qid, gather in list(self.pending.items()):
            if slot.index in gather.waiting:
                gather.waiting.discard(slot.index)
                gather.missing.add(slot.index)
                if not gather.waiting:
                    self._finish(qid)

    def up_shards(self) -> list[ShardSlot]:
        return [slot for slot in self.slots if slot.state is ShardState.UP]

    # -- messages from shards --------------------------------------------------------------

    def shard_message(self, sender: bytes, msg: list[bytes], now: float) -> None:
        parsed = shardwire.parse_identity(sender)
        if parsed is None or not 0 <= parsed[0] < len(self.slots) or not msg:
            self.counters["stale_messages"] += 1
            return
        slot = self.slots[parsed[0]]
        kind = msg[0]
        if kind == shardwire.HELLO:
            self._hello(slot, parsed[1], msg, now)
            return
        if parsed[1] != slot.epoch or slot.state is not ShardState.UP:
            self.counters["stale_messages"] += 1  # an old incarnation's last words
            return
        slot.last_seen = now
        if kind == shardwire.HEARTBEAT and len(msg) > 1:
            consumed = shardwire.unpack_ids(msg[1])
            if len(consumed) == 2:
                slot.credit(consumed[0], consumed[1])
        elif kind == shardwire.DELTA:
            self._delta(slot, shardwire.unpack_ids(msg[1]), shardwire.unpack_ids(msg[2]))
            self._indexed(slot, msg[3:], now)
        elif kind == shardwire.RESULT:
            self._result(slot, shardwire.unpack_id(msg[1]), json.loads(msg[2]))
        elif kind == shardwire.SYNC:  # the whole truth, after the shard dropped a delta
            channels = {ChannelId(c) for c in shardwire.unpack_ids(msg[1])}
            self._delta(slot, list(channels - slot.channels), list(slot.channels - channels))
            self._indexed(slot, msg[2:], now)

    def _indexed(self, slot: ShardSlot, seq: list[bytes], now: float) -> None:
        """Confirm a numbered membership change: the shard holds its clients' hello and
        subscribed frames until then (see shardwire)."""
        if seq:
            self._send(slot.index, shardwire.indexed(shardwire.unpack_id(seq[0])), now)

    def _hello(self, slot: ShardSlot, epoch: int, msg: list[bytes], now: float) -> None:
        body = json.loads(msg[1])
        if epoch < slot.epoch or (epoch == slot.epoch and slot.state is ShardState.DOWN):
            self.counters["stale_messages"] += 1  # an old or already-dead incarnation
            return
        self._drop(slot, now)
        slot.epoch, slot.pid, slot.state, slot.last_seen = epoch, body["pid"], ShardState.UP, now
        self._delta(slot, body["channels"], [])
        self.events.append(ShardEvent(slot.index, ShardState.UP, epoch, slot.pid))

    def _delta(self, slot: ShardSlot, gained: list[int], lost: list[int]) -> None:
        for raw in gained:
            channel = ChannelId(raw)
            slot.channels.add(channel)
            shards = self.index.get(channel)
            if shards is None:
                shards = self.index[channel] = set()
                if self.cluster:  # the host's first member: listen to the channel's topic
                    self.to_redis.append(("subscribe", 0, channel))
            shards.add(slot.index)
        for raw in lost:
            channel = ChannelId(raw)
            slot.channels.discard(channel)
            self._unindex(channel, slot.index)

    def _unindex(self, channel: ChannelId, index: ShardIndex) -> None:
        shards = self.index.get(channel)
        if shards is not None:
            shards.discard(index)
            if not shards:
                del self.index[channel]
                if self.cluster:  # the host's last member left: stop listening
                    self.to_redis.append(("unsubscribe", 0, channel))

    def _result(self, slot: ShardSlot, qid: int, body: Any) -> None:
        gather = self.pending.get(qid)
        if gather is None or slot.index not in gather.waiting:
            return  # answered after its deadline: already replied without it
        gather.waiting.discard(slot.index)
        gather.answers[slot.index] = body
        if not gather.waiting:
            self._finish(qid)

    # -- commands from backends ------------------------------------------------------------

    def command(self, envelope: list[bytes], raw: bytes, now: float) -> None:
        self.counters["commands"] += 1
        try:
            cmd = commands.decode(raw, self.max_command)
            self._dispatch(envelope, cmd, now)
        except CommandError as exc:
            self.counters["commands_refused" if exc.code == "overloaded" else "errors"] += 1
            request = commands.request_id(raw) if exc.code != "too_large" else None
            self.replies.append((envelope, commands.error_reply(request, exc.code, exc.message)))
        except (RecursionError, OverflowError, ValueError, TypeError, KeyError) as exc:
            # a hole in validation (a bug) must cost this command, never the router: said once
            # in the log with its traceback, counted, and answered
            self.counters["internal_errors"] += 1
            log.exception("router: a command could not be processed: %.200r", raw)
            reply = commands.error_reply(
                commands.request_id(raw), "internal_error", f"cannot process: {exc!r}"[:200]
            )
            self.replies.append((envelope, reply))

    def _dispatch(self, envelope: list[bytes], cmd: Command, now: float) -> None:
        name, args = cmd.name, cmd.args
        if name == "broadcast_to_channel":
            channel = args["channel"]
            frame = frames.channel_message(channel, cmd.data_json)
            self._check_frame(frame)
            shards = self.index.get(channel, ())
            message = shardwire.channel_delivery(channel, frame)
            self._admit(shards, message, now)
            for index in shards:
                self._send(index, message, now)
            publish = ("publish_channel", channel, frame)
            self._finish_broadcast(envelope, cmd, now, len(shards), publish)
        elif name in ("broadcast_to_user", "broadcast_to_users"):
            users = [args["user"]] if name == "broadcast_to_user" else args["users"]
            frame = frames.direct_message(cmd.data_json)
            self._check_frame(frame)
            groups = self._up_groups(users)
            self._admit(groups, shardwire.users_delivery((), frame), now)
            sent = self._deliver(groups, frame, now)
            self._finish_broadcast(envelope, cmd, now, sent, ("publish_users", users, frame))
        elif name == "get_online_users_in_channel":
            shards = set(self.index.get(args["channel"], ()))
            query = {"op": "online_channel", **args}
            remote = ("online_channel", args["channel"])
            self._gather(envelope, cmd, shards, now, union_users, lambda _: query, None, remote)
        elif name == "get_online_users":
            everyone = self._all()
            query = {"op": "online"}
            self._gather(
                envelope, cmd, everyone, now, union_users, lambda _: query, None, ("online",)
            )
        elif name in ("is_user_online", "are_users_online"):
            users = [args["user"]] if name == "is_user_online" else args["users"]
            groups = self._by_shard(users)
            combine = is_online if name == "is_user_online" else are_online
            self._gather(
                envelope,
                cmd,
                set(groups),
                now,
                combine,
                lambda i: {"op": "are_online", "users": groups[i]},
                {"users": users},
                ("are_online", users),
            )
        elif name in ("subscribe", "unsubscribe", "disconnect"):
            index = self._shard_of(args["user"])
            query = {"op": name, **args}
            # in a cluster, the hosts that have the user apply it too (connections counts ours)
            forward = ("publish_users", [args["user"]], b"", query)
            self._gather(
                envelope, cmd, {index}, now, sum_connections, lambda _: query, None, forward
            )
        elif name == "router_stats":
            self._reply(envelope, cmd, self.statistics())
        elif name == "status":
            self._gather(envelope, cmd, self._all(), now, self._status, lambda _: {"op": "status"})
        else:  # pragma: no cover - COMMANDS and this table are kept in step by tests
            raise AssertionError(name)

    def _up_groups(self, users: list[int]) -> dict[ShardIndex, list[int]]:
        """``users`` by shard, for the shards that are up."""
        groups = self._by_shard(users)
        return {i: g for i, g in groups.items() if self.slots[i].state is ShardState.UP}

    def _deliver(self, groups: dict[ShardIndex, list[int]], frame: bytes, now: float) -> int:
        for index, group in groups.items():
            self._send(index, shardwire.users_delivery(group, frame), now)
        return len(groups)

    def _room(self, index: ShardIndex, size: int, now: float) -> str | None:
        """Why one more message of ``size`` bytes does not fit in shard ``index``'s window,
        or None if it does."""
        slot = self.slots[index]
        messages, queued = slot.in_flight()
        if messages >= self.queue_messages:
            return f"shard {index} has {messages} deliveries queued (limit {self.queue_messages})"
        if queued + size > self.queue_bytes:
            return f"shard {index} has {queued} bytes queued (limit {self.queue_bytes})"
        if messages > shardwire.CREDIT_MESSAGES or queued > shardwire.CREDIT_BYTES:
            age = slot.backlog_age(now)
            if age > self.queue_delay:
                return f"shard {index} is {age:.2f} s behind (limit {self.queue_delay} s)"
        return None

    def _admit(self, shards: Iterable[ShardIndex], message: list[bytes], now: float) -> None:
        """Refuse (CommandError ``overloaded``) unless every shard has room for ``message``
        (its users list aside, which is small): all or nothing."""
        size = shardwire.size(message[1], message[2])
        for index in shards:
            reason = self._room(index, size, now)
            if reason is not None:
                raise CommandError("overloaded", f"{reason}; nothing was sent, retry later")

    def _finish_broadcast(
        self, envelope: list[bytes], cmd: Command, now: float, shards: int, publish: RedisOp
    ) -> None:
        """Reply at once on one host; in a cluster, once Redis has taken the message."""
        if not self.cluster:
            self._reply(envelope, cmd, {"shards": shards})
            return
        self._gather(
            envelope, cmd, set(), now, broadcast, lambda _: {}, {"shards": shards}, publish
        )

    def _check_frame(self, frame: bytes) -> None:
        if len(frame) > self.max_command:
            raise CommandError("too_large", "the message exceeds the frame size limit")

    def _shard_of(self, user: int) -> ShardIndex:
        return stable_hash(user, len(self.slots))

    def _by_shard(self, users: list[int]) -> dict[ShardIndex, list[int]]:
        groups: dict[ShardIndex, list[int]] = {}
        for user in users:
            groups.setdefault(self._shard_of(user), []).append(user)
        return groups

    def _all(self) -> set[ShardIndex]:
        return {slot.index for slot in self.slots}

    def _send(self, index: ShardIndex, msg: list[bytes], now: float) -> None:
        slot = self.slots[index]
        slot.queued(shardwire.size(msg[1], msg[2]), now)
        self.outbox.append((slot.identity, msg))

    def _reply(self, envelope: list[bytes], cmd: Command, result: dict[str, Any]) -> None:
        self.replies.append((envelope, commands.reply(cmd.id, result)))

    def _gather(
        self,
        envelope: list[bytes],
        cmd: Command,
        shards: set[ShardIndex],
        now: float,
        combine: Combiner,
        query: Callable[[ShardIndex], dict[str, Any]],
        args: dict[str, Any] | None = None,
        remote: RedisOp | None = None,
    ) -> None:
        """Ask ``shards`` (and, in a cluster, the Redis link with ``remote``); reply when all
        have answered or at the deadline, with what came back."""
        if len(self.pending) >= self.max_queries:
            raise CommandError(
                "overloaded", f"{len(self.pending)} queries in flight (limit {self.max_queries})"
            )
        qid = self._next_qid
        self._next_qid += 1
        deadline = now + self.gather_timeout
        redis = self.cluster and remote is not None
        gather = Gather(envelope, cmd.id, combine, deadline, set(), args=args or {}, redis=redis)
        self.pending[qid] = gather
        if redis and remote is not None:
            if self.cluster_up:
                self.to_redis.append((remote[0], qid, *remote[1:]))
                gather.waiting.add(REDIS)
            else:
                gather.missing.add(REDIS)
        for index in sorted(shards):
            if self.slots[index].state is not ShardState.UP:
                gather.missing.add(index)
                continue
            self._send(index, shardwire.query(qid, query(index)), now)
            gather.waiting.add(index)
        if not gather.waiting:
            self._finish(qid)

    def tick(self, now: float) -> None:
        """Answer the queries whose deadline has passed with what they have."""
        for qid, gather in list(self.pending.items()):
            if now >= gather.deadline:
                gather.missing |= gather.waiting
                gather.waiting.clear()
                self._finish(qid)

    def next_deadline(self) -> float | None:
        return min((g.deadline for g in self.pending.values()), default=None)

    def _finish(self, qid: int) -> None:
        gather = self.pending.pop(qid)
        result = gather.combine(gather)
        if gather.envelope is None:  # a presence snapshot for the Redis link
            if not gather.missing:  # a partial one would hide a slow shard's users: skip it
                self.to_redis.append(("snapshot", 0, result))
            return
        result["missing_shards"] = sorted(i for i in gather.missing if i >= 0)
        if gather.redis:
            result["cluster"] = REDIS in gather.answers
            if not result["cluster"]:
                result["cluster_error"] = "redis unavailable: other hosts were not reached"
        self.replies.append((gather.envelope, commands.reply(gather.request, result)))

    # -- the Redis link --------------------------------------------------------------------

    def redis_result(self, qid: int, ok: bool, body: Any) -> None:
        """The Redis link's answer to operation ``qid`` (``ok`` false: Redis failed it)."""
        gather = self.pending.get(qid)
        if gather is None or REDIS not in gather.waiting:
            return
        gather.waiting.discard(REDIS)
        if ok:
            gather.answers[REDIS] = body
        else:
            gather.missing.add(REDIS)
        if not gather.waiting:
            self._finish(qid)

    def redis_state(self, up: bool) -> None:
        """The link (re)connected, or lost Redis: stop waiting for it."""
        self.cluster_up = up
        if not up:
            for qid, gather in list(self.pending.items()):
                if REDIS in gather.waiting:
                    self.redis_result(qid, False, None)

    def remote_delivery(
        self, channel: int | None, users: list[int], frame: bytes, now: float
    ) -> None:
        """A broadcast from another host: to a channel's local members, or to users. Its
        publisher has had its answer already: where there is no room, it is dropped, counted."""
        if channel is not None:
            message = shardwire.channel_delivery(channel, frame)
            targets: dict[ShardIndex, list[bytes]] = {
                index: message for index in self.index.get(ChannelId(channel), ())
            }
        else:
            targets = {
                index: shardwire.users_delivery(group, frame)
                for index, group in self._up_groups(users).items()
            }
        for index, msg in targets.items():
            if self._room(index, shardwire.size(msg[1], msg[2]), now) is None:
                self._send(index, msg, now)
            else:
                self.counters["remote_dropped"] += 1

    def remote_control(self, users: list[int], control: dict[str, Any], now: float) -> None:
        """A backend command from another host for users we have: apply it, answer nobody."""
        for index, group in self._up_groups(users).items():
            for user in group:
                body = {**control, "user": user}
                self._send(index, shardwire.query(0, body), now)  # qid 0: no gather waits

    def snapshot(self, now: float) -> None:
        """Gather this host's presence from its shards, for the Redis link to publish."""
        if len(self.pending) >= self.max_queries:
            return  # the next one, when there is room
        qid = self._next_qid
        self._next_qid += 1
        gather = Gather(None, None, presence_snapshot, now + self.gather_timeout, set())
        self.pending[qid] = gather
        for slot in self.up_shards():
            self._send(slot.index, shardwire.query(qid, {"op": "snapshot"}), now)
            gather.waiting.add(slot.index)
        if not gather.waiting:
            self._finish(qid)

    def _status(self, gather: Gather) -> dict[str, Any]:
        rows = []
        for slot in self.slots:
            row: dict[str, Any] = {
                "index": slot.index,
                "pid": slot.pid,
                "epoch": slot.epoch,
                "state": slot.state.value,
            }
            answer = gather.answers.get(slot.index)
            if answer is None and slot.state is ShardState.UP:
                row["state"] = "unresponsive"
            row.update(answer or {"connections": 0, "users": 0, "channels": 0})
            rows.append(row)
        return {"shards": rows, "channels_indexed": len(self.index)}

    def statistics(self) -> dict[str, Any]:
        """The router's own counters, answered at once without asking any shard."""
        return {
            **self.counters,
            "pending_queries": len(self.pending),
            "channels_indexed": len(self.index),
            "shards": {slot.index: slot.state.value for slot in self.slots},
            # [messages, bytes] queued to each shard and not yet consumed (its credit window)
            "queued_to_shards": {slot.index: list(slot.in_flight()) for slot in self.slots},
            **({"redis": dict(self.link_counters)} if self.link_counters is not None else {}),
        }

    def close_all(self) -> None:
        """Shutting down: answer every query in flight with what it has."""
        for qid in list(self.pending):
            gather = self.pending[qid]
            gather.missing |= gather.waiting
            gather.waiting.clear()
            self._finish(qid)
