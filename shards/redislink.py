"""The Redis link: this host's connection to the other hosts of a cluster.

Owns: two threads and their Redis connections. The *worker* runs operations queued by the
RouterActor (publish, presence deltas and snapshots, probes) in batches and reports each result
back; the *listener* holds the pub/sub subscriptions (the host's inbox, the cluster's presence
topic, and one topic per channel the host has members of), remembers them, and replays them
after every reconnect. A periodic self-probe through the host's own inbox catches a
subscription that silently stopped receiving.

Two modes, chosen by the URL: a single Redis (``redis://``, ``rediss://``, ``unix://``: PUBLISH
and SUBSCRIBE), or a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://`` naming one seed
node or several, ``host1:port1,host2:port2``: redis-py's ``RedisCluster``, sharded pub/sub with
SPUBLISH and SSUBSCRIBE, Redis 7+ or Valkey). In cluster mode every new client (each reconnect
of either thread) starts from the nodes the link's previous client knew (primaries and
replicas, as discovered) and the URL's seeds: the loss of any one node, a seed included, leaves
others to discover the cluster from. The hosts' keys and inboxes share one hash tag (one slot);
each channel's topic and history have a tag of their own, so channels spread over the
cluster's slots (:mod:`actors.wire.cluster`); every script names a key (``KEYS[1]``) to be
routed to its slot's node. A sharded subscription that Redis ends unasked (the topic's slot
moved) is made again at the slot's new owner.

The router talks to the link in the types of :mod:`actors.hostlink`: it submits operations
(:data:`~actors.hostlink.RedisOp`) and is told events (:data:`~actors.hostlink.LinkEvent`:
``LinkState``, ``Results``, ``Deliveries``) through ``notify``, called from the link's threads.
Its counters are written by both threads under a lock; the router reads a copy (:meth:`stats`).

Channel history and critical messages (issue 11) live in Redis too, cluster-wide: the worker runs
the scripts of :mod:`actors.wire.cluster` (APPEND assigns a channel message's offset, keeps it and
publishes it in one step; READ_HISTORY, STORE_CRITICAL, FETCH_CRITICAL, ACK_CRITICAL), and the
listener turns what they publish into deliveries: a channel message with history is delivered
on every host that listens to the channel, *its publisher too* (so that every host delivers
in Redis's order), with its offset; a critical message carries its id; an ``acked`` control
tells the other hosts to stop re-sending a critical message. What is read back from Redis is
sealed, and checked like a message (``forged``), but not against the replay window.

Must never block the router (``submit`` never waits, and fails fast with a bounded queue) and
never crash on what Redis sends: a malformed message is counted and dropped, and so is a forged
one (every message and presence snapshot is sealed under the cluster key, see
:mod:`actors.wire.cluster`; ``forged`` counts those without a valid seal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterError, RedisClusterException
from redis.retry import Retry

from actors.hostlink import (
    AckCritical,
    AnswerUserConnections,
    AppendChannel,
    AskPresence,
    ChannelMarks,
    Deliveries,
    Delivery,
    FetchCritical,
    FetchPresence,
    LinkEvent,
    LinkState,
    OpResult,
    PresenceDrift,
    PresenceHeard,
    PresenceLoaded,
    PublishChannel,
    PublishHosts,
    PublishPresence,
    PublishUsers,
    ReadHistory,
    RedisOp,
    RedisRequest,
    Results,
    SetChannel,
    StoreCritical,
    StorePresence,
    Subscribe,
    TopicsReady,
    Unsubscribe,
    UserConnections,
)
from actors.ids import ChannelId, parse_id
from actors.osthread import name_this_thread
from actors.presence import PRESENCE_TTL, LoadedSnapshot, PresenceNews
from actors.wire import cluster, frames
from actors.wire.cluster import ClusterKey, Layout, Message, Rejected
from shards.config import cluster_url

log = logging.getLogger("ucc.redis")

QUEUE_LIMIT = 10_000
BATCH = 256  # operations run in one pipeline, or messages received per notify, at most
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 3.0
PRESENCE_TTL_MS = int(PRESENCE_TTL * 1000)  # a host's presence expiry, refreshed every second
SUBSCRIBE_TIMEOUT = 5.0  # seconds the listener's first subscriptions may take to be confirmed
NODE_PROBE_REFRESH = 5.0  # seconds between two choices of the topics that probe each node
# a UserConnections waits this long for the hosts it asked, then reports what came (shorter
# than the router's gather timeout, 1 s by default, so that a partial answer still counts)
ASK_TIMEOUT = 0.8
LISTENER_WAIT = 0.05  # a connected worker polls this often for the listener's subscription
BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)
# Redis is away (or the cluster has no owner for our slot): fail what is queued, reconnect
ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN
    RedisClusterException,  # no reachable node, slot not covered
)
# the link's counters (``stats``), all from 0
COUNTERS = (
    "published",
    "received",
    "malformed",
    "forged",
    "replayed",
    "reconnects",
    "resubscribed",  # a topic whose slot moved to another node, subscribed again there
    "history_appended",
    "history_read",
    "critical_stored",
    "critical_refused",
    "acks",
    "oversized",
    "marks_set",
    "who_asked",
    "who_answers",
    "who_replied",
    "who_answers_dropped",
    "who_partial",
    "presence_loaded",  # other hosts' snapshots read and verified (a replica synced from it)
    "presence_drift",  # this host's user set in Redis found short of its users: rewritten
)
Client = redis.Redis | RedisCluster


class Resubscribe(Exception):
    """The listener must start over (a topic's slot moved, a node's probes stopped): expected,
    logged without a traceback."""


@dataclass(frozen=True, slots=True)
class Probe:
    """The worker's own operation: a message to this host's inbox, that the listener must see
    within PROBE_TIMEOUT (else its subscription silently stopped receiving)."""

    qid: ClassVar[int] = 0  # nobody waits for it


Work = RedisRequest | Probe  # what the worker runs (topic changes go to the listener)
HOST_CONTROLS = ("set_channel", "who", "answer", "snapshot")  # controls for the host, not for users


@dataclass(slots=True)
class Ask:
    """A :class:`~actors.hostlink.UserConnections` in flight: the hosts the WHO script told
    (None until its reply is read: an answer may come first), the answers so far."""

    deadline: float  # time.monotonic()
    hosts: set[str] | None = None
    answered: set[str] = field(default_factory=set)
    records: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False

    def result(self, qid: int) -> OpResult:
        missing = sorted((self.hosts or set()) - self.answered)
        body: dict[str, Any] = {"connections": self.records, "missing_hosts": missing}
        if self.truncated:
            body["truncated"] = True
        return OpResult(qid, True, body)


class Backoff:
    """Delays between reconnection attempts: ``delays`` in turn, then the last one for good.
    ``reset`` after a success, so that the next failure starts again from the smallest."""

    def __init__(self, delays: tuple[float, ...] = BACKOFF) -> None:
        self.delays = delays
        self.failures = 0  # consecutive failures since the last reset

    def next_delay(self) -> float:
        """A failure: how long to wait before the next attempt."""
        self.failures += 1
        return self.delays[min(self.failures - 1, len(self.delays) - 1)]

    def reset(self) -> None:
        self.failures = 0


def host_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def cluster_seed(url: str) -> str | None:
    """The plain URL (``redis://`` or ``rediss://``) of the first seed node if ``url`` names a
    Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``, one seed or several); None if
    it names a single Redis. ValueError if a seed is bad (:func:`shards.config.cluster_url`)."""
    parsed = cluster_url(url)
    return None if parsed is None else parsed.plain


class RedisLink:
    def __init__(
        self,
        url: str,
        name: str,
        notify: Callable[[LinkEvent], None],
        key: ClusterKey,
        ask_timeout: float = ASK_TIMEOUT,
        host: str | None = None,
    ) -> None:
        """``host``: this host's id on Redis (default: a new one, :func:`host_id`); it names
        the host's inbox, so it is fixed from here on."""
        self.url = url
        self.key = key
        parsed = cluster_url(url)
        self.sharded = parsed is not None  # a Redis Cluster: sharded pub/sub
        self._target = url if parsed is None else parsed.plain  # credentials, options
        self.seeds = () if parsed is None else parsed.seeds
        # cluster mode: the nodes (host, port) the last client of either thread knew, that the
        # next one starts from with the seeds (under its lock: both threads make clients)
        self._known_nodes: tuple[tuple[str, int], ...] = ()
        self._nodes_lock = threading.Lock()
        self._publish = "SPUBLISH" if self.sharded else "PUBLISH"
        self._publish_users = cluster.SPUBLISH_USERS if self.sharded else cluster.PUBLISH_USERS
        self._publish_hosts = cluster.SPUBLISH_HOSTS if self.sharded else cluster.PUBLISH_HOSTS
        self._append = cluster.SAPPEND if self.sharded else cluster.APPEND
        self._read_history = cluster.SREAD_HISTORY if self.sharded else cluster.READ_HISTORY
        self._store_critical = cluster.SSTORE_CRITICAL if self.sharded else cluster.STORE_CRITICAL
        self._ack_critical = cluster.SACK_CRITICAL if self.sharded else cluster.ACK_CRITICAL
        self._who = cluster.SWHO if self.sharded else cluster.WHO
        self._set_channel = cluster.SSET_CHANNEL if self.sharded else cluster.SET_CHANNEL
        self._presence_delta = cluster.SPRESENCE_DELTA if self.sharded else cluster.PRESENCE_DELTA
        self._store_presence = cluster.SSTORE_PRESENCE if self.sharded else cluster.STORE_PRESENCE
        self._leave = cluster.SLEAVE if self.sharded else cluster.LEAVE
        self.layout = Layout(name)
        self.host = host or host_id()
        self.notify = notify
        self.ops: queue.Queue[Work | None] = queue.Queue(QUEUE_LIMIT)
        self.topics: set[str] = {self.layout.host_topic(self.host), self.layout.presence_topic}
        self._topics_lock = threading.Lock()  # the listener changes topics, the worker reads
        # cluster mode: a probe through one subscribed topic of each node (not only the inbox's
        # node): topic -> when the oldest of its probes not seen back yet was sent (under
        # _probe_lock: the worker sends, the listener sees them back)
        self._node_probes: dict[str, float] = {}
        self._probe_lock = threading.Lock()
        self._probe_topics: tuple[float, list[str]] = (0.0, [])  # (when chosen, topics)
        self._unsubscribing: dict[str, int] = {}  # our own sunsubscribes not confirmed yet
        self._topic_changes: queue.SimpleQueue[tuple[bool, str]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.up = False
        self.last_probe_seen = time.monotonic()
        # written by both threads: only through _count; read by others only through stats()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._counters_lock = threading.Lock()
        # the UserConnections in flight, by qid: written by both threads, under their lock
        self.ask_timeout = ask_timeout
        self._asks: dict[int, Ask] = {}
        self._asks_lock = threading.Lock()
        self.listen_backoff = Backoff()  # the listener's (the worker keeps its own)
        # set while the listener is subscribed (every topic it had when it last subscribed)
        self._listening = threading.Event()
        self._listener_lost = False  # the listener lost Redis (the listener's only)
        self._worker_client: Client | None = None  # the worker thread's only
        self._threads = [
            threading.Thread(target=self._work, name="ucc-redis-worker", daemon=True),
            threading.Thread(target=self._listen, name="ucc-redis-listener", daemon=True),
        ]

    def _client(self) -> Client:
        """A new client (in cluster mode, this discovers the cluster's nodes: it may raise)."""
        options: dict[str, Any] = {
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
            "health_check_interval": 0,
        }
        if self.sharded:
            # few, short retries (each refreshes the slot map): the link has its own backoff
            retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2)
            # the first seed comes from the URL (with its credentials and options, which apply
            # to every node); the others, and every node known so far, as startup nodes
            nodes = self.startup_nodes()[1:]
            others = [ClusterNode(h, p) for h, p in nodes]  # type: ignore[no-untyped-call]
            client = RedisCluster(url=self._target, startup_nodes=others, retry=retry, **options)
            self._remember_nodes(client)
            return client
        return redis.Redis.from_url(self._target, **options)

    def startup_nodes(self) -> list[tuple[str, int]]:
        """Where a new cluster client discovers the cluster from: the URL's seeds (the first
        one first), then every node the link's last client knew (no duplicates). A client
        tries them all (in a random order) until one answers ``CLUSTER SLOTS``."""
        with self._nodes_lock:
            known = self._known_nodes
        return list(dict.fromkeys([*self.seeds, *known]))

    def _remember_nodes(self, client: Client) -> None:
        """Keep the nodes ``client`` knows (primaries and replicas, as it last discovered them)
        for the next client: called when a client is made and before one is closed."""
        if not isinstance(client, RedisCluster):
            return
        with contextlib.suppress(Exception):  # a client's state is not worth a crash
            found = client.get_nodes()  # type: ignore[no-untyped-call]
            nodes = tuple(dict.fromkeys((node.host, int(node.port)) for node in found))
            if nodes:
                with self._nodes_lock:
                    self._known_nodes = nodes

    def _close_client(self, client: Client) -> None:
        """Close ``client`` (its sockets), keeping what it knew of the cluster's nodes."""
        self._remember_nodes(client)
        with contextlib.suppress(*ERRORS):
            client.close()

    def _ping(self, client: Client) -> None:
        if isinstance(client, RedisCluster):
            # a keyed command: it asks the node that owns our slot (not every node), and fails
            # while the cluster is down (a PING would not)
            client.exists(self.layout.hosts)
        else:
            client.ping()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stats(self) -> dict[str, int]:
        """A copy of the counters (``published``, ``received``, ``malformed``, ``forged``,
        ``replayed``, ``reconnects`` (either connection re-established after losing Redis);
        ``history_appended``, ``history_read``,
        ``critical_stored``, ``critical_refused`` (over the per-user bound), ``acks``;
        ``oversized`` (answers beyond the bounds), ``marks_set``, ``who_asked`` (requests this
        host sent), ``who_answers`` (answers taken), ``who_replied`` (answers sent),
        ``who_answers_dropped`` (late, duplicate, unasked, or for another host), ``who_partial``
        (requests reported at their deadline)), safe to take from any thread."""
        with self._counters_lock:
            return dict(self._counters)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counters_lock:
            self._counters[name] += amount

    def submit(self, op: RedisOp) -> None:
        """Queue an operation (from the router's thread); never blocks."""
        if isinstance(op, Subscribe | Unsubscribe):
            topic = self.layout.channel_topic(op.channel)
            self._topic_changes.put((isinstance(op, Subscribe), topic))
            return
        try:
            self.ops.put_nowait(op)
        except queue.Full:
            self._fail([op])

    def close(self, timeout: float = 2.0) -> None:
        """Leave the cluster at once (delete this host's presence) and stop the threads."""
        self.stopping.set()
        with contextlib.suppress(queue.Full):
            self.ops.put_nowait(None)
        for thread in self._threads:
            thread.join(timeout)
        with contextlib.suppress(*ERRORS):
            client = self._client()
            try:
                leave = cluster.encode_presence(self.key, self.host, "leave", "", 0, _now_ms())
                layout = self.layout
                client.eval(self._leave, 1, layout.hosts, layout.prefix, self.host, 0, leave)
            finally:
                self._close_client(client)

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        name_this_thread("ucc-redis-work")
        try:
            self._work_loop()
        finally:  # its socket closed now, rather than by the garbage collector some day
            client, self._worker_client = self._worker_client, None
            if client is not None:
                self._close_client(client)

    def _work_loop(self) -> None:
        backoff = Backoff()
        next_probe = 0.0
        lost = False  # a client was dropped for an error: the next one is a reconnect
        while not self.stopping.is_set():
            client = self._worker_client
            if client is None:
                client = self._worker_client = self._connect()
                if client is None:
                    self._fail(self._drain(0.0))  # fail fast while Redis is away
                    self.stopping.wait(backoff.next_delay())
                    continue
                if backoff.failures or lost:
                    self._count("reconnects")
                backoff.reset()
                lost = False
            if self.up and not self._listening.is_set():
                # the listener is subscribing again: until it is back, a message published
                # with history would reach no client of this host, so the link is down
                self._set_state(False)
            # up only once the listener is subscribed too (its client reconnects on its own):
            # until then, a message published with history would reach no client of this host
            # either, while its reply said the cluster took part
            if not self.up:
                if not self._listening.wait(LISTENER_WAIT):
                    self._fail(self._drain(0.0))
                    continue
                self.last_probe_seen = time.monotonic()
                self._set_state(True)
            batch = self._drain(PROBE_INTERVAL / 2)
            now = time.monotonic()
            if now >= next_probe:
                batch.append(Probe())
                next_probe = now + PROBE_INTERVAL
            try:
                self._run(client, batch)
                self._expire_asks()
            except ERRORS as exc:
                log.warning("redis: %s; reconnecting", exc)
                self._set_state(False)  # first: the router must see the failures as the link's
                self._fail(batch)
                self._close_client(client)
                self._worker_client = None
                lost = True
            except Exception:  # a bug costs this batch, not the link
                log.exception("redis: unexpected error running %d operations", len(batch))
                self._fail(batch)

    def _connect(self) -> Client | None:
        client = None
        try:
            client = self._client()
            self._ping(client)
        except ERRORS:
            if client is not None:
                self._close_client(client)
            return None
        return client

    def _drain(self, wait: float) -> list[Work]:
        batch: list[Work] = []
        try:
            op = self.ops.get(timeout=wait) if wait else self.ops.get_nowait()
            while op is not None:
                batch.append(op)
                if len(batch) >= BATCH:
                    break
                op = self.ops.get_nowait()
        except queue.Empty:
            pass
        return batch

    def _run(self, client: Client, batch: list[Work]) -> None:
        if not batch:
            return
        layout, host, key = self.layout, self.host, self.key
        now_ms = int(time.time() * 1000)
        pipe = client.pipeline(transaction=False)
        node_probe: bytes | None = None  # the probe, for each node's topic too (cluster mode)

        def script(source: str, *args: Any) -> None:
            # EVAL spelled out: a cluster pipeline has no eval(); KEYS[1] routes it to our slot
            pipe.execute_command(
                "EVAL", source, 1, layout.hosts, layout.prefix, host, now_ms, *args
            )

        def channel_script(channel: int, source: str, *args: Any) -> None:
            # the same in the channel's own slot: KEYS[1] is its stream
            stream, _meta = layout.history_keys(channel)
            pipe.execute_command(
                "EVAL", source, 1, stream, layout.prefix, host, now_ms, channel, *args
            )

        for op in batch:
            if isinstance(op, PublishChannel):
                message = Message(host, None, op.frame, channel=op.channel, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                pipe.execute_command(self._publish, layout.channel_topic(op.channel), payload)
            elif isinstance(op, PublishUsers):
                message = Message(host, op.users, op.frame, control=op.control, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                script(self._publish_users, payload, *op.users)
            elif isinstance(op, PublishHosts):
                control = dict(op.control)
                if "ban" in control:  # its end, so that a replay later bans nobody
                    control["until"] = now_ms + int(float(control["ban"]) * 1000)
                message = Message(host, op.users, b"", control=control, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                script(self._publish_hosts, payload)
            elif isinstance(op, PublishPresence):
                ttl = PRESENCE_TTL_MS
                sealed = cluster.encode_presence(
                    key, host, "delta", op.generation, op.seq, now_ms, op.changes
                )
                online = [user for user, state in op.changes if state is not None]
                offline = [user for user, state in op.changes if state is None]
                counts = (len(online), op.users, *online, *offline)
                script(self._presence_delta, now_ms + ttl, ttl, sealed, *counts)
            elif isinstance(op, StorePresence):
                ttl = PRESENCE_TTL_MS
                snapshot = cluster.seal_snapshot(key, host, op.generation, op.seq, op.users)
                notice = cluster.encode_presence(
                    key, host, "snapshot", op.generation, op.seq, now_ms
                )
                script(self._store_presence, now_ms + ttl, ttl, snapshot, notice, *op.users)
            elif isinstance(op, FetchPresence):
                pipe.get(layout.snapshot_key(op.host))
            elif isinstance(op, AskPresence):
                control = {"op": "snapshot", "to": op.host}  # not to be replayed elsewhere
                message = Message(host, None, b"", control=control, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                pipe.execute_command(self._publish, layout.host_topic(op.host), payload)
            elif isinstance(op, AppendChannel):
                message = Message(
                    host, None, op.data, channel=op.channel, sent_ms=now_ms, history=True
                )
                payload = cluster.encode(message, key)
                size, ttl = max(1, op.size), max(1, op.ttl_ms)
                topic = layout.channel_topic(op.channel)
                channel_script(op.channel, self._append, new_epoch(), size, ttl, payload, topic)
            elif isinstance(op, ReadHistory):
                since, limit, ttl = max(0, op.since), max(1, op.limit), max(1, op.ttl_ms)
                probed: tuple[bytes, str] | tuple[()] = ()
                if op.probe:  # published by the script after the read: see probe_back
                    message = Message(
                        host, None, b"%d" % op.qid, probe=True, channel=op.channel, sent_ms=now_ms
                    )
                    probed = (cluster.encode(message, key), layout.channel_topic(op.channel))
                read = self._read_history
                channel_script(op.channel, read, new_epoch(), since, limit, ttl, *probed)
            elif isinstance(op, StoreCritical):
                users = list(dict.fromkeys(op.users))
                ttl = max(1, op.ttl_ms)
                message = Message(
                    host,
                    users,
                    op.data,
                    critical=op.id,
                    expires_ms=now_ms + ttl,
                    sent_ms=now_ms,
                )
                payload = cluster.encode(message, key)
                args = (op.id, now_ms + ttl, ttl, op.per_user, *users)
                script(self._store_critical, payload, *args)
            elif isinstance(op, FetchCritical):
                script(cluster.FETCH_CRITICAL, op.user)
            elif isinstance(op, AckCritical):
                control = {"op": "acked", "id": op.id}
                message = Message(host, [op.user], b"", control=control, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                script(self._ack_critical, payload, op.user, op.id)
            elif isinstance(op, SetChannel):
                control = {"op": "set_channel", "channel": op.channel, "join_leave": op.join_leave}
                message = Message(host, [], b"", control=control, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                script(self._set_channel, payload, op.channel, "1" if op.join_leave else "0")
            elif isinstance(op, UserConnections):
                control = {"op": "who", "user": op.user, "qid": op.qid}
                message = Message(host, [op.user], b"", control=control, sent_ms=now_ms)
                payload = cluster.encode(message, key)
                if op.qid:  # before the script runs: an answer may arrive before its reply
                    with self._asks_lock:
                        self._asks[op.qid] = Ask(time.monotonic() + self.ask_timeout)
                script(self._who, payload, op.user)
            elif isinstance(op, AnswerUserConnections):
                payload = self._sealed_answer(op, now_ms)
                pipe.execute_command(self._publish, layout.host_topic(op.to_host), payload)
            else:  # the probe: through the inbox, and one topic of each other node
                message = Message(host, None, b"", probe=True, sent_ms=now_ms)
                probe = cluster.encode(message, key)
                pipe.execute_command(self._publish, layout.host_topic(host), probe)
                node_probe = probe
        results = pipe.execute(raise_on_error=False)
        if node_probe is not None:
            self._probe_nodes(client, node_probe)
        events: list[OpResult] = []
        for op, value in zip(batch, results, strict=True):
            if isinstance(value, Exception):
                if isinstance(value, ERRORS):
                    raise value
                log.error("redis: %s failed: %s", type(op).__name__, value)
                self._fail([op])
            elif isinstance(op, UserConnections):
                done = self._asked(op, value)
                if done is not None:
                    events.append(done)
            elif isinstance(op, FetchPresence):
                self.notify(PresenceLoaded(op.host, self._snapshot(op.host, value)))
            elif isinstance(op, PublishPresence) and value == 0:
                # the user set lost members (it expired, was evicted or deleted): rewrite it
                self._count("presence_drift")
                self.notify(PresenceDrift())
            else:
                try:
                    answer: dict[str, Any] | None = self._answer(op, value, now_ms)
                except (ValueError, TypeError, IndexError, AttributeError):
                    log.error("redis: %s: unexpected reply %.200r", type(op).__name__, value)
                    self._count("malformed")
                    answer = None
                if op.qid:
                    events.append(OpResult(op.qid, answer is not None, answer))
        published = sum(
            isinstance(
                op,
                PublishChannel
                | PublishUsers
                | PublishHosts
                | AppendChannel
                | SetChannel
                | UserConnections
                | AnswerUserConnections
                | AskPresence,
            )
            for op in batch
        )
        self._count("published", published)
        if events:
            self.notify(Results(events))

    def _fail(self, batch: list[Work]) -> None:
        for op in batch:
            self._drop_ask(op)
            if isinstance(op, FetchPresence):
                self.notify(PresenceLoaded(op.host, None))
        events = [OpResult(op.qid, False, None) for op in batch if op.qid]
        if events:
            self.notify(Results(events))

    # -- the user connections RPC (both threads) --------------------------------------------

    def _sealed_answer(self, op: AnswerUserConnections, now_ms: int) -> bytes:
        """The sealed answer to host ``op.to_host``'s ``who``: at most MAX_ANSWER_RECORDS
        records, fewer (halving) until it fits MAX_ANSWER_BYTES (``truncated`` then)."""
        control = cluster.answer_control(op.to_host, op.request, op.connections)
        while True:
            message = Message(self.host, None, b"", control=control, sent_ms=now_ms)
            payload = cluster.encode(message, self.key)
            records = control["connections"]
            if len(payload) <= cluster.MAX_ANSWER_BYTES or not records:
                return payload
            control = {**control, "connections": records[: len(records) // 2], "truncated": True}

    def _drop_ask(self, op: Work) -> None:
        if isinstance(op, UserConnections):
            with self._asks_lock:
                self._asks.pop(op.qid, None)

    def _asked(self, op: UserConnections, value: Any) -> OpResult | None:
        """The WHO script told ``value`` (the hosts): the result if every one of them has
        answered already (none asked: at once), else None (the listener or the deadline will
        report it)."""
        self._count("who_asked")
        hosts = {_text(h) for h in value} if isinstance(value, list) else set()
        with self._asks_lock:
            ask = self._asks.get(op.qid)
            if ask is None:
                return None  # qid 0: nobody waits
            ask.hosts = hosts
            for host in ask.answered - hosts:  # answers from hosts not asked: not theirs
                ask.answered.discard(host)
                ask.records = [r for r in ask.records if r.get("host") != host]
                self._count("who_answers_dropped")
            if ask.answered != hosts:
                return None
            del self._asks[op.qid]
        return ask.result(op.qid)

    def _take_answer(self, origin: str, control: dict[str, Any]) -> None:
        """An answer from host ``origin`` (the listener): kept if its ``who`` is in flight,
        that host was asked (or the script's reply is not read yet) and had not answered; the
        result reported once every host asked has answered."""
        qid = control["qid"]
        with self._asks_lock:
            ask = self._asks.get(qid)
            if (
                ask is None
                or origin in ask.answered
                or (ask.hosts is not None and origin not in ask.hosts)
            ):
                ask = None
            else:
                ask.answered.add(origin)
                ask.records.extend({**r, "host": origin} for r in control["connections"])
                ask.truncated = ask.truncated or control.get("truncated") is True
                if ask.answered != ask.hosts:
                    qid = 0  # more to come
                else:
                    del self._asks[qid]
        if ask is None:
            self._count("who_answers_dropped")
            return
        self._count("who_answers")
        if qid:
            self.notify(Results([ask.result(qid)]))

    def _expire_asks(self) -> None:
        """Report the requests whose deadline passed with what came (``missing_hosts``). One
        whose script reply is not read yet is left to the worker (it has not told them yet)."""
        now = time.monotonic()
        with self._asks_lock:
            due = [
                qid
                for qid, ask in self._asks.items()
                if now >= ask.deadline and ask.hosts is not None
            ]
            done = [self._asks.pop(qid).result(qid) for qid in due]
        if done:
            self._count("who_partial", len(done))
            self.notify(Results(done))

    def _set_state(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            if up:
                log.info("redis link up")
            else:
                log.warning("redis link down")
            self.notify(LinkState(up))

    # -- the listener ------------------------------------------------------------------------

    def _listen(self) -> None:
        name_this_thread("ucc-redis-lsn")
        while not self.stopping.is_set():
            try:
                self._subscribed_loop()
            except Resubscribe as exc:  # expected: a topic moved, or a node stopped answering
                log.info("redis pub/sub: %s; subscribing again", exc)
                self.listen_backoff.reset()
            except ERRORS as exc:
                log.warning("redis pub/sub: %s; resubscribing", exc)
                self._listener_lost = True  # its next subscription is a reconnect
            except Exception:  # a bug must not silently end cross-host delivery for good
                log.exception("redis pub/sub: unexpected error; resubscribing")
            self.stopping.wait(self.listen_backoff.next_delay())

    def _subscribed_loop(self) -> None:
        client = self._client()
        # subscription confirmations are kept: the router waits for its topics' (TopicsReady)
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            inbox = self.layout.host_topic(self.host)
            presence = self.layout.presence_topic.encode()
            self._unsubscribing.clear()
            with self._probe_lock:
                self._node_probes.clear()
            self._apply_topic_changes()
            self._subscribe(pubsub, True, *self.topics)
            awaiting = set(self.topics)  # until Redis confirmed them all, the link is not up
            subscribed_at = time.monotonic()
            # subscribed again: the next failure is a new outage, to be retried soon
            self.listen_backoff.reset()
            self.last_probe_seen = time.monotonic()
            while not self.stopping.is_set():
                self._sync_topics(pubsub)
                deliveries: list[Delivery] = []
                ready: list[ChannelId] = []
                news: list[PresenceNews] = []
                message = self._next_message(pubsub, 0.05)
                while message is not None and len(deliveries) + len(ready) + len(news) < BATCH:
                    kind = message.get("type")
                    if kind in ("message", "smessage") and message["channel"] == presence:
                        heard = self._presence_news(message["data"])
                        if heard is not None:
                            news.append(heard)
                    elif kind in ("message", "smessage"):
                        delivery = self._decode(message)
                        if delivery is not None:
                            deliveries.append(delivery)
                    elif kind in ("subscribe", "ssubscribe"):
                        topic = message["channel"].decode(errors="replace")
                        channel = self.layout.channel_of_topic(topic)
                        if channel is not None:
                            ready.append(ChannelId(channel))
                        elif topic == inbox:  # from now on, every mark change reaches us
                            self.notify(ChannelMarks(self._join(client)))
                        awaiting.discard(topic)
                        if not awaiting and not self._listening.is_set():
                            if self._listener_lost:
                                self._count("reconnects")
                                self._listener_lost = False
                            self._listening.set()  # the worker may say the link is up
                    elif kind == "sunsubscribe":
                        self._unsubscribed(message)
                    message = self._next_message(pubsub, 0)
                if ready:
                    self.notify(TopicsReady(ready))
                if deliveries:
                    self.notify(Deliveries(deliveries))
                if news:
                    self.notify(PresenceHeard(news))
                if awaiting and time.monotonic() - subscribed_at > SUBSCRIBE_TIMEOUT:
                    # a node took the subscriptions and never confirmed them (it hangs): ask
                    # again, with a new client and the slot map as it is now
                    raise Resubscribe(f"{len(awaiting)} topics not confirmed in time")
                self._expire_asks()
                if self.up and time.monotonic() - self.last_probe_seen > PROBE_TIMEOUT:
                    log.warning("redis pub/sub: probes stopped arriving; resubscribing")
                    return
                stale = self._stale_node_probe()
                if stale is not None:
                    log.warning(
                        "redis pub/sub: probes through %s stopped arriving (its node does not"
                        " answer, or the topic moved); resubscribing",
                        stale,
                    )
                    return
        finally:
            self._listening.clear()
            with contextlib.suppress(*ERRORS):
                pubsub.close()
            self._close_client(client)

    def _unsubscribed(self, message: dict[str, Any]) -> None:
        """A sharded subscription ended: ours (confirmed), or one Redis ended unasked because
        the topic's slot moved to another node (resharding, a failover). Then the listener
        starts over with a new client, which learns the new slot map and subscribes at the
        new owners (a message published meanwhile is not heard: with history, the router
        reads it back when the topic shows the gap, see actors.topicgaps)."""
        topic = message["channel"].decode(errors="replace")
        pending = self._unsubscribing.get(topic, 0)
        if pending:
            if pending == 1:
                del self._unsubscribing[topic]
            else:
                self._unsubscribing[topic] = pending - 1
            return
        if topic in self.topics:
            self._count("resubscribed")
            raise Resubscribe(f"{topic} moved to another node")

    def _apply_topic_changes(self) -> list[tuple[bool, str]]:
        changes = []
        with contextlib.suppress(queue.Empty):
            while True:
                add, topic = self._topic_changes.get_nowait()
                with self._topics_lock:
                    (self.topics.add if add else self.topics.discard)(topic)
                changes.append((add, topic))
        return changes

    def _node_probe_topics(self, client: Client, now: float) -> list[str]:
        """Cluster mode: one subscribed channel topic of each node that serves some but not
        the inbox (whose probe covers its node), chosen again every NODE_PROBE_REFRESH
        seconds (a pass over the topics: their slots). Each probe round publishes the probe
        through them: one that does not come back within PROBE_TIMEOUT means that node's
        subscription is dead (the node hangs, or the slot moved), and the listener starts
        over."""
        if not isinstance(client, RedisCluster):
            return []
        chosen_at, topics = self._probe_topics
        if now - chosen_at < NODE_PROBE_REFRESH:
            return topics
        with self._topics_lock:
            wanted = list(self.topics)
        manager = client.nodes_manager
        inbox = self.layout.host_topic(self.host).encode()
        inbox_node = manager.get_node_from_slot(key_slot(inbox))
        per_node: dict[str, str] = {}
        for topic in wanted:
            node = manager.get_node_from_slot(key_slot(topic.encode()))
            if node.name != inbox_node.name and node.name not in per_node:
                per_node[node.name] = topic
        self._probe_topics = (now, list(per_node.values()))
        return self._probe_topics[1]

    def _probe_nodes(self, client: Client, probe: bytes) -> None:
        """Publish ``probe`` through one topic of each other node (:meth:`_node_probe_topics`),
        in a pipeline of its own (one reply per operation in the main one). A failure here
        is not the link's: the probe does not come back, and the listener starts over."""
        sent = time.monotonic()
        topics = self._node_probe_topics(client, sent)
        if not topics:
            return
        pipe = client.pipeline(transaction=False)
        for topic in topics:
            pipe.execute_command(self._publish, topic, probe)
            with self._probe_lock:
                self._node_probes.setdefault(topic, sent)
        pipe.execute(raise_on_error=False)

    def _stale_node_probe(self) -> str | None:
        """A still-subscribed topic whose probe has not come back within PROBE_TIMEOUT."""
        now = time.monotonic()
        with self._probe_lock:
            for topic, sent in list(self._node_probes.items()):
                if topic not in self.topics:
                    del self._node_probes[topic]  # unsubscribed since: its probes stop
                elif now - sent > PROBE_TIMEOUT:
                    return topic
        return None

    def _sync_topics(self, pubsub: Any) -> None:
        for add, topic in self._apply_topic_changes():
            self._subscribe(pubsub, add, topic)

    def _subscribe(self, pubsub: Any, add: bool, *topics: str) -> None:
        """(Un)subscribe: SSUBSCRIBE and SUNSUBSCRIBE in a Redis Cluster."""
        if self.sharded:
            if not add:
                for topic in topics:
                    self._unsubscribing[topic] = self._unsubscribing.get(topic, 0) + 1
            (pubsub.ssubscribe if add else pubsub.sunsubscribe)(*topics)
        else:
            (pubsub.subscribe if add else pubsub.unsubscribe)(*topics)

    def _join(self, client: Client) -> list[ChannelId]:
        """The listener's inbox subscription is confirmed: count this host among the live ones
        (the scripts that tell other hosts something, a mark change among them, read them; the
        presence tick keeps it there), then read the channels marked for join/leave. In this
        order, and on the listener's thread (which delivers what the inbox brings after it), a
        mark set before the read is in it, and one set after reaches the inbox and the router
        after it: none is missed, none goes back."""
        expires = _now_ms() + PRESENCE_TTL_MS
        client.zadd(self.layout.hosts, {self.host: expires})
        return self._read_marks(client)

    def _read_marks(self, client: Client) -> list[ChannelId]:
        """The channels marked for join/leave (a member that is no id is counted malformed)."""
        marks: list[ChannelId] = []
        for member in client.smembers(self.layout.marks):
            text = _text(member)
            channel = int(text) if text.isdigit() and len(text) <= 19 else None
            if channel is None or parse_id(channel) is None:
                self._count("malformed")
            else:
                marks.append(ChannelId(channel))
        return sorted(marks)

    def _next_message(self, pubsub: Any, timeout: float) -> dict[str, Any] | None:
        if self.sharded:
            message: dict[str, Any] | None = pubsub.get_sharded_message(timeout=timeout)
        else:
            message = pubsub.get_message(timeout=timeout)
        return message

    def _decode(self, message: dict[str, Any]) -> Delivery | None:
        self._count("received")
        topic = message["channel"].decode(errors="replace")
        decoded = cluster.decode(message["data"], self.key, _now_ms())
        if isinstance(decoded, Rejected):
            self._count(decoded.value)
            return None
        channel = self.layout.channel_of_topic(topic)
        if decoded.probe:
            qid = decoded.frame  # a read's probe (READ_HISTORY's) carries the read's id
            if decoded.origin != self.host:
                return None
            if topic == self.layout.host_topic(self.host):
                self.last_probe_seen = time.monotonic()
            elif not qid:  # one of the probes of each node's topics
                with self._probe_lock:
                    self._node_probes.pop(topic, None)
            elif channel is None or channel != decoded.channel:
                self._count("forged")  # sealed for another channel: replayed onto this topic
            elif not qid.isdigit() or len(qid) > 19:
                self._count("malformed")
            else:
                return Delivery(ChannelId(channel), [], b"", {"op": "probe_back", "qid": int(qid)})
            return None
        if decoded.history:  # every host delivers it, its publisher too: Redis's order
            if channel is None or channel != decoded.channel:
                self._count("forged")
                return None
            frame = frames.channel_message(channel, decoded.frame, decoded.offset, decoded.epoch)
            return Delivery(
                ChannelId(channel), [], frame, offset=decoded.offset, epoch=decoded.epoch
            )
        if decoded.origin == self.host:
            return None  # our own broadcast: already delivered on this host
        if decoded.critical is not None:
            if channel is not None or decoded.channel is not None:
                self._count("forged")
                return None
            if decoded.expires_ms <= _now_ms():
                return None  # a late copy: nothing to keep re-sending
            frame = frames.critical_message(decoded.critical, decoded.frame)
            users = decoded.users or []
            return Delivery(None, users, frame, critical_id=decoded.critical)
        if channel != decoded.channel:
            # sealed for another channel (or for users): replayed onto this topic
            self._count("forged")
            return None
        control = decoded.control
        if control is not None and control["op"] in HOST_CONTROLS:
            if channel is not None:  # on a channel's topic: not ours to take
                self._count("forged")
                return None
            return self._host_control(decoded.origin, control)
        if channel is None and decoded.users is None:
            self._count("malformed")
            return None
        target = None if channel is None else ChannelId(channel)
        if control is not None and "ban" in control:
            left = cluster.ban_remaining(control, _now_ms())
            control = {k: v for k, v in control.items() if k not in ("until", "ban")}
            if left is None:  # it has passed (a late copy): nothing more to do
                return None
            control["ban"] = left
        return Delivery(target, decoded.users or [], decoded.frame, control)

    def _host_control(self, origin: str, control: dict[str, Any]) -> Delivery | None:
        """A control for this host (on its inbox: :func:`_decode` checked that the message is
        sealed for no channel): a mark change, a ``who`` to answer, an answer to take, a
        request for a fresh presence snapshot (another host syncs)."""
        op = control["op"]
        if op == "set_channel":
            channel = ChannelId(control["channel"])
            mark = {"op": "set_channel", "channel": channel, "join_leave": control["join_leave"]}
            return Delivery(None, [], b"", control=mark)
        if op == "who":
            user = control["user"]
            who = {"op": "who", "user": user, "qid": control["qid"], "reply_to": origin}
            return Delivery(None, [user], b"", control=who)
        if control["to"] != self.host:  # for another host, replayed onto our inbox
            self._count("forged")
            return None
        if op == "snapshot":
            return Delivery(None, [], b"", control={"op": "snapshot"})
        self._take_answer(origin, control)
        return None

    def _answer(self, op: Work, value: Any, now_ms: int) -> dict[str, Any]:
        """An operation's Redis reply, in the shape of the shards' answers (the history and
        critical operations: the shapes their docstrings in :mod:`actors.hostlink` give)."""
        if isinstance(op, AppendChannel):
            self._count("history_appended")
            offset = int(value[0])
            if not 0 < offset <= cluster.MAX_OFFSET:  # ValueError: this operation fails
                raise ValueError(f"offset {offset} out of range")
            return {"offset": offset, "epoch": _text(value[1])}
        if isinstance(op, ReadHistory):
            self._count("history_read")
            return self._history(op.channel, value)
        if isinstance(op, StoreCritical):
            kind, amount = _text(value[0]), int(value[1])
            if kind == "limit":
                self._count("critical_refused")
                return {"limit": amount}
            self._count("critical_stored")
            return {"value": amount}
        if isinstance(op, FetchCritical):
            return self._criticals(op.user, value, now_ms)
        if isinstance(op, AckCritical):
            self._count("acks")
            return {"value": max(0, int(value))}
        if isinstance(op, SetChannel):
            self._count("marks_set")
            return {"value": int(value)}
        if isinstance(op, AnswerUserConnections):
            self._count("who_replied")
            return {"value": int(value)}
        return {"value": value}

    def _history(self, channel: int, value: list[Any]) -> dict[str, Any]:
        """The READ_HISTORY script's answer: its kept messages opened (seal checked, not age).
        An entry that is not a message sealed for this channel (or not at an offset's place) is
        counted (``forged`` or ``malformed``) and skipped, and so is everything kept before it:
        ``first`` moves past it, so that the messages from ``first`` on stay gapless (a resume
        from before the gap is then not recovered, rather than silently missing one)."""
        epoch, latest = _text(value[0]), int(value[1])
        if not 0 <= latest < cluster.MAX_OFFSET:  # ValueError: this operation fails, counted
            raise ValueError(f"offset {latest} out of range")
        first = latest + 1 if value[2] is None else (_entry_offset(value[2]) or latest + 1)
        first = min(first, latest + 1)
        messages: list[list[Any]] = []  # [offset, "<data json>"]
        for entry, fields in value[3]:
            offset = _entry_offset(entry)
            if offset is None:  # not an entry APPEND made
                self._count("forged")
                continue
            raw = fields[1] if len(fields) == 2 and fields[0] == b"m" else None
            opened = Rejected.FORGED if raw is None else cluster.open_stored(raw, self.key)
            if not isinstance(opened, Rejected) and (
                not opened.history or opened.channel != channel
            ):
                opened = Rejected.FORGED
            data = None if isinstance(opened, Rejected) else _utf8(opened.frame)
            if isinstance(opened, Rejected) or data is None:
                self._count(opened.value if isinstance(opened, Rejected) else "malformed")
                first = max(first, offset + 1)
                messages.clear()
                continue
            messages.append([offset, data])
        return {"epoch": epoch, "offset": latest, "first": first, "messages": messages}

    def _criticals(self, user: int, value: list[Any], now_ms: int) -> dict[str, Any]:
        """The FETCH_CRITICAL script's answer: the user's messages opened (seal checked, not
        age). One not sealed as this id for this user is counted ``forged`` and left out; one
        whose sealed expiry has passed is left out."""
        messages: list[list[str]] = []  # [id, "<data json>"]
        for i in range(0, len(value) - 1, 2):
            id, raw = _text(value[i]), value[i + 1]
            opened = Rejected.FORGED if raw is None else cluster.open_stored(raw, self.key)
            if isinstance(opened, Rejected):
                self._count(opened.value)
            elif opened.critical != id or user not in (opened.users or ()):
                self._count("forged")
            elif (data := _utf8(opened.frame)) is None:
                self._count("malformed")
            elif opened.expires_ms > now_ms:
                messages.append([id, data])
        return {"messages": messages}

    def _presence_news(self, raw: bytes) -> PresenceNews | None:
        """A message on the presence topic: another host's, opened and checked (ours, and
        what is refused, counted, are dropped)."""
        self._count("received")
        news = cluster.decode_presence(raw, self.key, _now_ms())
        if isinstance(news, Rejected):
            self._count(news.value)
            return None
        return None if news.host == self.host else news

    def _snapshot(self, host: str, raw: Any) -> LoadedSnapshot | None:
        """Host ``host``'s stored snapshot (the worker opens it and builds its indexes, off the
        router's thread); None (counted, if it is there but refused) if there is none."""
        if raw is None:
            return None
        loaded = cluster.open_snapshot(self.key, host, raw if isinstance(raw, bytes) else None)
        if isinstance(loaded, Rejected):
            self._count(loaded.value)
            return None
        self._count("presence_loaded")
        return loaded


def _now_ms() -> int:
    return int(time.time() * 1000)


def new_epoch() -> str:
    """A channel state's epoch: 12 random hex characters (as actors.history's)."""
    return secrets.token_hex(6)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _entry_offset(entry: Any) -> int | None:
    """The offset of a stream entry id ``<offset>-1``; None for any other id."""
    head, separator, tail = _text(entry).partition("-")
    if separator != "-" or tail != "1" or not head.isdigit() or len(head) > 19:
        return None
    offset = int(head)
    return offset if 0 < offset <= cluster.MAX_OFFSET else None
