"""The router's Redis half: what this host exchanges with the other hosts through the Redis link.

Owns: whether the link is connected, the operations queued for it (taken by the RouterActor with
:meth:`OtherHosts.take_ops`), a copy of the link's counters for ``router_stats``, and the
translation both ways: which channel topics to listen to, the other hosts' part of a gather
(the :data:`~actors.gather.REDIS` participant), presence by deltas (this host's, pulled from its
shards once a second and published as deltas, and the replicas of the other hosts' that answer
presence queries: :mod:`actors.presence`), and broadcasts and backend commands arriving from other
hosts. Must never do I/O, read a clock (``now`` is a
parameter) or block, and never hold the link's own state: it queues operations, is told events
(:mod:`actors.hostlink`), and reads a copy of the link's counters, all on the router's thread.

It is part of its :class:`~actors.router.RouterCore` (which creates it when the host has a Redis
link) and uses the core's shard-side services: the channel index, the credit windows, the
gathers in flight.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from actors.gather import REDIS, Gather, GatherSpec
from actors.guarantees import from_redis
from actors.hostlink import (
    AreOnline,
    AskPresence,
    ChannelMarks,
    Deliveries,
    Delivery,
    FetchPresence,
    LinkEvent,
    LinkState,
    OnlineInChannel,
    OnlineUsers,
    PresenceDrift,
    PresenceHeard,
    PresenceLoaded,
    PresenceQuery,
    PublishPresence,
    ReadHistory,
    RedisOp,
    Results,
    StorePresence,
    Subscribe,
    TopicsReady,
    Unsubscribe,
)
from actors.ids import ChannelId, ShardIndex
from actors.presence import Action, AskSnapshot, Change, LocalPresence, Replicas, channels_of
from actors.topicgaps import Fill, TopicGaps
from actors.wire import shardwire
from actors.wire.commands import CommandError

if TYPE_CHECKING:
    from actors.router import RouterCore, ShardSlot

UNREACHED = "redis unavailable: other hosts were not reached"
SYNCING = "the other hosts' presence is being synced: their part may be incomplete"
MAX_DELTA_CHANGES = 10_000  # beyond, a snapshot is stored instead (a delta is one message)
TOPIC_WAIT = 2.0  # seconds a membership's confirmation waits for its topic at most


@dataclass(slots=True)
class _Held:
    """A membership confirmation (``INDEXED`` ``seq`` to shard ``index``, incarnation
    ``epoch``) waiting for the topics of ``channels`` (until ``deadline``)."""

    deadline: float
    index: ShardIndex
    epoch: int
    seq: int
    channels: set[ChannelId]


class OtherHosts:
    """The other hosts of a cluster, as the router sees them through its Redis link."""

    def __init__(self, core: RouterCore, generation: str | None = None) -> None:
        """``generation``: this router's presence generation (default: a new random one; a
        restarted host is a new generation, which the other hosts sync from nothing)."""
        self._core = core
        self.local = LocalPresence(generation or secrets.token_hex(6))
        self.replicas = Replicas()
        # the shards the presence pull in flight asked: index -> (epoch, everything)
        self._pulled: dict[ShardIndex, tuple[int, bool]] = {}
        self._pull_started = 0.0
        self.up = False  # the link is connected to Redis
        self._ops: list[RedisOp] = []
        # a function returning a copy of the link's counters (taken under the link's lock):
        # the router never holds the dict the link's threads write
        self.link_stats: Callable[[], Mapping[str, int]] | None = None
        # the channels whose topic Redis confirmed the listener is subscribed to, and the
        # membership confirmations waiting for theirs (see :meth:`hold`)
        self.ready: set[ChannelId] = set()
        self._held: list[_Held] = []
        # the channel topics' gaps, repaired from the history (a read each: a tenth of the
        # queries in flight at most), and the repairs waiting for the link, with their deadline
        self.gaps = TopicGaps(max_repairs=max(1, core.max_queries // 10))
        self._deferred: list[tuple[Fill, float]] = []
        # the time of the router's latest event or tick: a read's answer (or its time up)
        # finishes a gather whose combiner has no clock of its own
        self.now = 0.0

    def queue(self, op: RedisOp) -> None:
        """Queue an operation for the link that nobody waits for."""
        self._ops.append(op)

    def take_ops(self) -> list[RedisOp]:
        """The operations for the link queued since the last call, oldest first."""
        ops, self._ops = self._ops, []
        return ops

    # -- called by the core ----------------------------------------------------------------

    def channel_gained(self, channel: ChannelId) -> None:
        """The host's first member of ``channel``: listen to its topic."""
        self._ops.append(Subscribe(channel))

    def channel_lost(self, channel: ChannelId) -> None:
        """The host's last member of ``channel`` left: stop listening."""
        self.ready.discard(channel)
        self._ops.append(Unsubscribe(channel))
        self.gaps.forget(channel)

    def hold(self, slot: ShardSlot, gained: Collection[ChannelId], seq: int, now: float) -> bool:
        """Whether the confirmation of membership change ``seq`` must wait (True: it will be
        sent when it may): until Redis has confirmed the topics of the channels it gained (a
        client told hello must receive what is published from then on, from any host, this
        one too: with history, this host delivers its own broadcasts from the topic), and
        after those of the same shard held before it (the shard takes a confirmation for all
        the earlier ones). At most TOPIC_WAIT; not at all while the link is down."""
        if not self.up:
            return False
        waiting = {c for c in gained if c not in self.ready}
        behind = any(h.index == slot.index and h.epoch == slot.epoch for h in self._held)
        if not waiting and not behind:
            return False
        self._held.append(_Held(now + TOPIC_WAIT, slot.index, slot.epoch, seq, waiting))
        return True

    def holding(self) -> bool:
        """Whether confirmations are held for their topics, or repairs wait for the link
        (:meth:`tick` is then due at their deadlines, or sooner)."""
        return bool(self._held) or bool(self._deferred)

    def tick(self, now: float) -> None:
        """The router's tick: the held confirmations whose time is up go, and so do the
        messages held behind a repair that waited for the link in vain (the gap stays)."""
        self.now = now
        self.release(now)
        if self._deferred and not self.up:
            due = [fill for fill, deadline in self._deferred if now >= deadline]
            self._deferred = [(f, d) for f, d in self._deferred if now < d]
            for fill in due:  # (a gap among what was held waits for the link in turn)
                self._repair(self._give_up(fill, now), now)

    def release(self, now: float, everything: bool = False) -> None:
        """Send the held confirmations whose topics are ready (or whose time is up), in order
        per shard."""
        core, keep = self._core, []
        blocked: set[tuple[ShardIndex, int]] = set()
        for held in self._held:
            held.channels -= self.ready
            key = (held.index, held.epoch)
            if key not in blocked and (everything or not held.channels or now >= held.deadline):
                slot = core.slots[held.index]
                if slot.epoch == held.epoch and slot in core.up_shards():
                    core.send(held.index, shardwire.indexed(held.seq), now)
            else:
                blocked.add(key)
                keep.append(held)
        self._held = keep

    def join(
        self,
        qid: int,
        gather: Gather,
        remote: Callable[[int], RedisOp | PresenceQuery],
        now: float,
    ) -> None:
        """Add the other hosts to gather ``qid``: if the link is up, a presence query is
        answered at once from the replicas and anything else asks them through the link;
        else they are counted missing at once (the reply then says ``"cluster": false``)."""
        gather.redis = True
        if not self.up:
            gather.missing.add(REDIS)
            return
        op = remote(qid)
        if isinstance(op, OnlineUsers | OnlineInChannel | AreOnline):
            gather.answers[REDIS] = self._presence_answer(op)
            if not self.replicas.in_sync(now):
                gather.cluster_error = SYNCING
            return
        self._ops.append(op)
        gather.waiting.add(REDIS)

    def _presence_answer(self, op: PresenceQuery) -> dict[str, Any]:
        replicas = self.replicas
        if isinstance(op, OnlineUsers):
            return {"users": replicas.online_users()}
        if isinstance(op, OnlineInChannel):
            return {"users": replicas.online_in(op.channel)}
        return {"online": replicas.are_online(op.users)}

    def annotate(self, gather: Gather, result: dict[str, Any]) -> None:
        """A reply is ready: say whether the other hosts took part (``cluster``)."""
        if gather.redis:
            result["cluster"] = REDIS in gather.answers and gather.cluster_error is None
            if not result["cluster"]:
                result["cluster_error"] = gather.cluster_error or UNREACHED

    def statistics(self) -> dict[str, Any]:
        """The link's counters, for ``router_stats`` (``redis``), if the link gave a source,
        and presence's (``presence``: the replicas' counters, this host's ``seq`` and
        ``users``)."""
        local = self.local
        presence = {"seq": local.seq, "users": local.users(), **self.replicas.statistics()}
        stats: dict[str, Any] = {"presence": presence, "topic_gaps": self.gaps.statistics()}
        if self.link_stats is not None:
            stats["redis"] = dict(self.link_stats())
        return stats

    # -- events from the link --------------------------------------------------------------

    def link_event(self, event: LinkEvent, now: float) -> None:
        """Something the link reported (see :mod:`actors.hostlink`)."""
        self.now = now
        if isinstance(event, LinkState):
            self.link_state(event.up, now)
            self._core.guarantees.link_state(event.up, now)
        elif isinstance(event, Results):
            for result in event.results:
                self.result(result.qid, result.ok, result.body)
        elif isinstance(event, Deliveries):
            for delivery in event.deliveries:
                self.deliver(delivery, now)
        elif isinstance(event, ChannelMarks):
            self._core.observers.replace_marks(event.channels, now)
        elif isinstance(event, TopicsReady):
            self.ready.update(c for c in event.channels if c in self._core.index)
            self.release(now)
            self._core.guarantees.topics_ready(now)
        elif isinstance(event, PresenceHeard):
            for news in event.news:
                self._act(self.replicas.news(news, now))
        elif isinstance(event, PresenceLoaded):
            self._act(self.replicas.loaded(event.host, event.snapshot, now))
        elif isinstance(event, PresenceDrift):
            self.local.snapshot_wanted = True

    def link_state(self, up: bool, now: float) -> None:
        """The link (re)connected, or lost Redis: stop waiting for it."""
        self.up = up
        if up:
            # the other hosts may have missed deltas meanwhile: they sync from this snapshot;
            # and this host hears of them again, and syncs, before its answers are whole
            self.local.snapshot_wanted = True
            self.replicas.link_up(now)
            deferred, self._deferred = self._deferred, []
            for fill, _deadline in deferred:  # the topics' gaps found before it said so
                self._repair(fill, now)
        else:
            self.ready.clear()  # the listener subscribes again, and Redis confirms again
            self.release(0.0, everything=True)
            for qid, gather in list(self._core.pending.items()):
                if REDIS in gather.waiting:
                    self.result(qid, False, None)

    def result(self, qid: int, ok: bool, body: Any) -> None:
        """The link's answer to operation ``qid`` (``ok`` false: Redis failed it)."""
        gather = self._core.pending.get(qid)
        if gather is None or REDIS not in gather.waiting:
            return
        if ok:
            gather.answered(REDIS, body)
        else:
            gather.gave_up(REDIS)
        if not gather.waiting:
            self._core.finish(qid)

    def deliver(self, delivery: Delivery, now: float) -> None:
        """A broadcast or a backend command from another host (or this host's probe). A
        channel's, from its topic, after the messages the topic skipped (see
        :mod:`actors.topicgaps`)."""
        channel = delivery.channel
        if channel is None or channel not in self._core.index:
            self._deliver(delivery, now)
            return
        ready, fill = self.gaps.arrive(delivery, self._core.guarantees.history.size)
        for each in ready:
            self._deliver(each, now)
        self._repair(fill, now)

    def _repair(self, fill: Fill | None, now: float) -> None:
        """Read the messages a channel's topic skipped from Redis; deliver them, then what the
        topic brought meanwhile. While the link is down (its listener, subscribed again, may
        deliver before the link says it is up), the read waits for it, ``gather_timeout`` at
        most; beyond ``max_queries`` the gap stays."""
        ttl_ms = int(self._core.guarantees.history.ttl * 1000)
        while fill is not None:
            if not self.up:
                self._deferred.append((fill, now + self._core.gather_timeout))
                return
            read = partial(_read_history, fill.channel, fill.since, fill.count, ttl_ms)
            spec = GatherSpec((), self._filled(fill), None, remote=read)
            if self._core.start_internal(spec, now) is not None:
                return  # the read's combiner goes on (the link is up: not at once)
            fill = self._give_up(fill, now)

    def _give_up(self, fill: Fill, now: float) -> Fill | None:
        """No read for ``fill``: the held messages go on; a gap among them is the next fill."""
        ready, again = self.gaps.filled(fill.channel, fill.token, None)
        for each in ready:
            self._deliver(each, now)
        return again

    def _filled(self, fill: Fill) -> Callable[[Gather], dict[str, Any]]:
        def combine(gather: Gather) -> dict[str, Any]:
            body = gather.answers.get(REDIS)
            answer = None if body is None else from_redis(body, fill.since, "", fill.count)
            ready, again = self.gaps.filled(fill.channel, fill.token, answer)
            for each in ready:
                self._deliver(each, self.now)
            self._repair(again, self.now)
            return {}

        return combine

    def _deliver(self, delivery: Delivery, now: float) -> None:
        if delivery.control is not None:
            self._control(delivery.users, delivery.control, now)
        else:
            self._broadcast(delivery, now)

    def _broadcast(self, delivery: Delivery, now: float) -> None:
        """To a channel's local members, or to users. Its publisher has had its answer already:
        where there is no room, it is dropped, counted (``remote_dropped``): a channel message
        with history leaves a gap in the offsets its clients see (they resume to fill it), a
        critical one waits for the user's next connection."""
        core = self._core
        channel, users, frame = delivery.channel, delivery.users, delivery.frame
        if channel is not None:
            message = shardwire.channel_delivery(channel, frame, delivery.offset)
            targets: dict[ShardIndex, list[bytes]] = {
                index: message for index in core.members(channel)
            }
        elif delivery.critical_id is not None:
            payload = shardwire.pack_criticals([(delivery.critical_id, frame)])
            targets = {
                index: [shardwire.CRITICAL, shardwire.pack_ids(group), payload]
                for index, group in core.up_groups(users).items()
            }
        else:
            targets = {
                index: shardwire.users_delivery(group, frame)
                for index, group in core.up_groups(users).items()
            }
        for index, msg in targets.items():
            if not core.offer(index, msg, now):
                core.counters["remote_dropped"] += 1
                if delivery.critical_id is not None:
                    core.guarantees.undelivered(index, msg)

    def _control(self, users: list[int], control: dict[str, Any], now: float) -> None:
        """A backend command from another host for users we have: apply it, answer nobody. A
        ``disconnect`` with ``ban`` (what is left of it) bans the users here too."""
        core = self._core
        if control["op"] == "acked":
            core.guarantees.acked_elsewhere(users, str(control["id"]), now)
            return
        if control["op"] == "probe_back":  # this host's own read (see Guarantees._read)
            core.guarantees.probe_back(control["qid"], now)
            return
        if control["op"] == "who":
            core.observers.answer_who(control, now)
            return
        if control["op"] == "set_channel":
            core.observers.mark(ChannelId(control["channel"]), bool(control["join_leave"]), now)
            return
        if control["op"] == "snapshot":  # another host syncs from us: at the next tick
            self.local.snapshot_wanted = True
            return
        ban = control.get("ban")
        if control["op"] == "disconnect" and ban is not None:
            for user in users:
                core.ban(user, ban)
        for index, group in core.up_groups(users).items():
            for user in group:
                body = shardwire.user_control(control["op"], user, control.get("channel"))
                core.send(index, shardwire.query(0, body), now)  # qid 0: no gather waits

    # -- presence ---------------------------------------------------------------------------

    def presence_tick(self, now: float) -> None:
        """Once a second: the replicas' housekeeping (expiry, syncs to retry), and a pull of
        this host's presence: each up shard is asked what changed (everything, where the
        mirror of it is not to be trusted), and :meth:`presence_done` publishes the delta. The
        pull is skipped while the last one is out or ``max_queries`` are in flight (the next
        one will do)."""
        core, local = self._core, self.local
        self._act(self.replicas.tick(now))
        if self._pulled:  # the last one is still in flight (a gather lasts < 1 s: rare)
            self._heartbeat()
            return
        asked = {
            slot.index: (slot.epoch, local.wants_full(slot.index, slot.epoch))
            for slot in core.up_shards()
        }
        spec = GatherSpec(
            set(asked),
            lambda _gather: {},
            lambda index: shardwire.QueryPresence(asked[index][1]),
        )
        self._pulled, self._pull_started = asked, now
        try:
            core.start_gather(None, None, spec, now)
        except CommandError:  # overloaded: no pull, but the host must stay alive for the others
            self._pulled = {}
            self._heartbeat()

    def presence_done(self, gather: Gather) -> None:
        """The shards' presence answers are in (or their time is up): fold them into this
        host's presence, and queue its delta (or heartbeat), and its snapshot when due."""
        core, local = self._core, self.local
        asked, self._pulled = self._pulled, {}
        up = {slot.index for slot in core.up_shards()}
        for index, (epoch, full) in asked.items():
            slot = core.slots[index]
            answer = gather.answers.get(index)
            if slot.epoch != epoch:
                local.shard_gone(index)
            elif answer is None:
                local.shard_missing(index)
            else:
                local.shard_answer(index, epoch, full, _changes(answer["users"]))
        for index in local.known_shards():  # a shard down since, or not asked: gone
            if index not in asked or index not in up:
                local.shard_gone(index)
        seq, changes = local.take_delta()
        if len(changes) > MAX_DELTA_CHANGES:  # too big for one message: a snapshot instead
            local.snapshot_wanted = True
            changes = []  # the others see seq move on without changes (a gap), and sync
        snapshot = self.up and local.due_snapshot(self._pull_started)
        if snapshot:  # first: a host that syncs on the delta reads this one
            self._ops.append(StorePresence(local.generation, seq, local.snapshot()))
        self._ops.append(PublishPresence(local.generation, seq, tuple(changes), local.users()))

    def _heartbeat(self) -> None:
        """Keep this host alive in the others' presence (and in Redis's hosts) when no pull
        can be made: the current ``seq``, no changes."""
        local = self.local
        self._ops.append(PublishPresence(local.generation, local.seq, (), local.users()))

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, AskSnapshot):
                self._ops.append(AskPresence(action.host))
            else:
                self._ops.append(FetchPresence(action.host))


def _read_history(channel: ChannelId, since: int, limit: int, ttl_ms: int, qid: int) -> RedisOp:
    return ReadHistory(qid, channel, since, limit, ttl_ms)


def _changes(entries: list[list[Any]]) -> list[Change]:
    """A shard's presence answer (``[[user, [channels] or null], ...]``) as changes."""
    return [(int(user), channels_of(channels)) for user, channels in entries]
