"""The messages between the router and the Redis link (this host's link to the other hosts).

Owns: the operations the router's Redis half (:class:`actors.hosts.OtherHosts`) submits to the
link, and the events the link reports back, as frozen slotted dataclasses (h11's events are the
model). Must never do anything: no I/O, no logic beyond the types. The link itself
(``shards.redislink``) runs the operations against Redis; this module is the contract between
the two, so that ``actors/`` needs nothing from ``shards/``.

Each operation that someone waits for carries ``qid``, the id of the gather waiting for its
result; ``qid`` 0 means nobody waits (the link reports a failure of such an operation to nobody).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from actors.ids import ChannelId
from actors.presence import Change, Channels, LoadedSnapshot, PresenceNews

# -- operations: router -> link (submitted from the router's thread; never block it) -----------


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Listen to ``channel``'s topic: this host has gained its first member of it."""

    channel: ChannelId


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop listening to ``channel``'s topic: this host has lost its last member of it."""

    channel: ChannelId


@dataclass(frozen=True, slots=True)
class PublishChannel:
    """Publish a channel broadcast's client frame on the channel's topic."""

    qid: int
    channel: ChannelId
    frame: bytes


@dataclass(frozen=True, slots=True)
class PublishUsers:
    """Publish to the inboxes of the hosts that have any of ``users``: a client frame, or (with
    ``control``, and an empty ``frame``) a backend command for them to apply (subscribe,
    unsubscribe, disconnect). The result is how many hosts were told (``{"value": n}``)."""

    qid: int
    users: list[int]
    frame: bytes
    control: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PublishHosts:
    """Publish a backend command for ``users`` to the inbox of every other live host, whether
    it has the users or not (a ``disconnect`` with a ``ban``: a banned user must not connect
    anywhere). The result is how many hosts were told (``{"value": n}``)."""

    qid: int
    users: list[int]
    control: dict[str, Any]


# -- presence queries: answered by the router from its replicas of the other hosts' presence
# (actors.presence), never sent to the link ------------------------------------------------


@dataclass(frozen=True, slots=True)
class OnlineUsers:
    """Every user online on the other hosts (``{"users": [...]}``)."""

    qid: int


@dataclass(frozen=True, slots=True)
class OnlineInChannel:
    """The users online in ``channel`` on the other hosts (``{"users": [...]}``)."""

    qid: int
    channel: ChannelId


@dataclass(frozen=True, slots=True)
class AreOnline:
    """Which of ``users`` are online on the other hosts (``{"online": [...]}``)."""

    qid: int
    users: list[int]


PresenceQuery = OnlineUsers | OnlineInChannel | AreOnline


# -- presence by deltas (actors.presence has the protocol) -----------------------------------


@dataclass(frozen=True, slots=True)
class PublishPresence:
    """Refresh this host's expiry (it stays in presence :data:`actors.presence.PRESENCE_TTL`
    more) and publish, sealed on the presence topic, delta ``seq`` of generation
    ``generation``: ``changes`` (each user's new state here: its channels, or None: offline;
    the link also updates the plain user set that routes user messages). No changes: a
    heartbeat at the current ``seq``."""

    generation: str
    seq: int
    changes: tuple[Change, ...]
    users: int  # how many users the host has now (the link checks its user set against it)
    qid: ClassVar[int] = 0  # nobody waits for it


@dataclass(frozen=True, slots=True)
class StorePresence:
    """Store this host's whole presence (``users``: user → channels) at ``seq``, sealed, for
    the other hosts to sync from; rewrite the plain user set from it; announce it on the
    presence topic."""

    generation: str
    seq: int
    users: Mapping[int, Channels]
    qid: ClassVar[int] = 0  # nobody waits for it


@dataclass(frozen=True, slots=True)
class FetchPresence:
    """Read host ``host``'s stored snapshot: reported as :class:`PresenceLoaded`."""

    host: str
    qid: ClassVar[int] = 0  # answered by an event of its own


@dataclass(frozen=True, slots=True)
class AskPresence:
    """Ask host ``host`` (a control on its inbox) to store a fresh snapshot."""

    host: str
    qid: ClassVar[int] = 0  # nobody waits for it


# -- history and critical messages (issue 11): kept in Redis, cluster-wide ---------------------


@dataclass(frozen=True, slots=True)
class AppendChannel:
    """A channel broadcast with history: in one step, Redis assigns the channel's next offset
    (creating its state with a new epoch if it has none), keeps ``data`` (the data JSON) in the
    channel's stream (at most ``size`` messages), makes the channel's state live ``ttl_ms`` more,
    and publishes the message with its offset and epoch on the channel's topic. Every host
    listening to the topic, THIS ONE INCLUDED, is told it as a :class:`Delivery` with ``offset``
    set (the origin does not deliver locally: everyone sees Redis's order). The result is
    ``{"offset": n, "epoch": "<epoch>"}``."""

    qid: int
    channel: ChannelId
    data: bytes
    size: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """The channel's kept messages with an offset above ``since``, oldest first, at most
    ``limit``: ``{"epoch": e, "offset": latest, "first": first kept offset (latest + 1 if none),
    "messages": [[offset, "<data json>"], ...]}``. A channel with no state gets one (a new epoch,
    offset 0, living ``ttl_ms``), so that its epoch is stable from then on."""

    qid: int
    channel: ChannelId
    since: int
    limit: int
    ttl_ms: int
    probe: bool = False  # then publish a probe on the channel's topic after the read (in the
    # same script): it comes back as a ``probe_back`` delivery (see Delivery)


@dataclass(frozen=True, slots=True)
class StoreCritical:
    """Keep critical message ``id`` (``data``: the data JSON) for each of ``users`` for
    ``ttl_ms``, all or nothing: if any user already holds ``per_user`` unexpired ones, nothing is
    stored and the result is ``{"limit": user}``. Else the other live hosts that have any of the
    users are told it (a :class:`Delivery` with ``critical_id``), and the result is
    ``{"value": hosts_told}``."""

    qid: int
    users: list[int]
    id: str
    data: bytes
    ttl_ms: int
    per_user: int


@dataclass(frozen=True, slots=True)
class FetchCritical:
    """``user``'s unexpired critical messages, in the order they were stored:
    ``{"messages": [["<id>", "<data json>"], ...]}``."""

    qid: int
    user: int


@dataclass(frozen=True, slots=True)
class AckCritical:
    """``user`` acknowledged critical message ``id`` here: forget it, and tell the other live
    hosts that have the user (a :class:`Delivery` with control ``{"op": "acked", "id": id}``),
    so that they stop re-sending it."""

    user: int
    id: str
    qid: ClassVar[int] = 0  # nobody waits for it


# -- issue 12: cluster-wide join/leave marks and connection metadata ---------------------------


@dataclass(frozen=True, slots=True)
class SetChannel:
    """Mark ``channel`` (``join_leave`` true) to push join/leave to its members, or unmark it,
    cluster-wide: in one step the mark is stored in Redis (what a host that starts or
    reconnects reads: :class:`ChannelMarks`) and every other live host is told it (a
    :class:`Delivery` with control ``{"op": "set_channel", "channel": C, "join_leave": b}``).
    The result is how many hosts were told (``{"value": n}``)."""

    qid: int
    channel: ChannelId
    join_leave: bool


@dataclass(frozen=True, slots=True)
class UserConnections:
    """``user``'s connections on the other live hosts: ``{"connections": [record, ...],
    "missing_hosts": [host, ...]}``, each record as a shard's answer to QueryUserConnections
    with ``"host"`` (the answering host's id, set by this link from the answer's seal).

    An RPC over the hosts' inboxes: the link asks every other live host that has the user (a
    :class:`Delivery` there, control ``{"op": "who", "user": U, "qid": q, "reply_to": H}``),
    whose router answers with :class:`AnswerUserConnections`. The result comes when every host
    asked has answered, or at the link's deadline (shorter than a gather's) with what came:
    ``missing_hosts`` then names the hosts that did not answer in time (else it is empty)."""

    qid: int
    user: int


@dataclass(frozen=True, slots=True)
class AnswerUserConnections:
    """This host's answer to another host's ``who`` request (control ``{"op": "who", ...}``):
    ``connections`` (this host's records of the user, without ``"host"``; at most
    ``MAX_ANSWER_RECORDS`` are sent) to host ``to_host``'s inbox, for its operation ``request``
    (the request's ``qid``: the asking host's, not one of ours; nobody here waits)."""

    to_host: str
    request: int
    connections: list[dict[str, Any]]
    qid: ClassVar[int] = 0  # nobody waits for it (``request`` is the asking host's)


# what the link's worker runs against Redis (and reports the result of, if ``qid``)
RedisRequest = (
    PublishChannel
    | PublishUsers
    | PublishHosts
    | PublishPresence
    | StorePresence
    | FetchPresence
    | AskPresence
    | AppendChannel
    | ReadHistory
    | StoreCritical
    | FetchCritical
    | AckCritical
    | SetChannel
    | UserConnections
    | AnswerUserConnections
)
# everything the router submits: requests, and topic changes (for the link's listener)
RedisOp = Subscribe | Unsubscribe | RedisRequest


# -- events: link -> router (sent from the link's threads, as messages to the RouterActor) ------


@dataclass(frozen=True, slots=True)
class LinkState:
    """The link (re)connected to Redis (``up``), or lost it."""

    up: bool


@dataclass(frozen=True, slots=True)
class OpResult:
    """The result of operation ``qid``: ``ok`` false if Redis failed it or was unreachable
    (``body`` is then None); else ``body`` has the shape of a shard's answer to the same query
    (``{"users": [...]}``, ``{"online": [...]}``, or ``{"value": ...}`` for a publication; the
    history and critical operations say theirs)."""

    qid: int
    ok: bool
    body: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Results:
    """The results of one batch of operations (only those someone waits for: ``qid`` != 0)."""

    results: list[OpResult]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message from another host: a client ``frame`` for ``channel``'s members (``channel``
    set, ``users`` empty) or for ``users`` (``channel`` None); or, with ``control``, a backend
    command to apply to ``users`` (``frame`` empty; ``{"op": "acked", "id": id}``: another host
    got the ack of critical message ``id``; ``{"op": "set_channel", "channel": C, "join_leave":
    b}``: another host changed a channel's join/leave mark, ``users`` empty; ``{"op": "who",
    "user": U, "qid": q, "reply_to": H}``: host ``H`` asks for ``U``'s connections here, ``users``
    ``[U]``, to be answered with :class:`AnswerUserConnections` (``H``, ``q``, records);
    ``{"op": "probe_back", "qid": q}``: the probe of this host's :class:`ReadHistory` ``q``
    came back on ``channel``'s topic, after every message published there before the read).

    ``offset`` > 0: a channel message with history (from any host, this one included), at that
    offset of ``epoch``. ``critical_id``: a critical message for ``users`` (to track until
    acknowledged)."""

    channel: ChannelId | None
    users: list[int]
    frame: bytes
    control: dict[str, Any] | None = None
    offset: int = 0
    critical_id: str | None = None
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Deliveries:
    """The messages received from other hosts in one batch."""

    deliveries: list[Delivery]


@dataclass(frozen=True, slots=True)
class TopicsReady:
    """Redis confirmed the listener's subscription to these channels' topics: from now on,
    whatever is published on them reaches this host (the router waits for this before it
    confirms a new membership to a shard, which then sends its clients hello)."""

    channels: list[ChannelId]


@dataclass(frozen=True, slots=True)
class ChannelMarks:
    """Every channel marked for join/leave cluster-wide (the whole set: it replaces what the
    router had), read from Redis each time the listener (re)subscribed to this host's inbox:
    from then on, every change arrives as a ``set_channel`` control :class:`Delivery` (one
    made between the read and the subscription may arrive too: applying it again is
    harmless)."""

    channels: list[ChannelId]


@dataclass(frozen=True, slots=True)
class PresenceHeard:
    """Presence messages from other hosts (deltas, heartbeats, snapshot announcements,
    leaves), opened and checked, in the order heard."""

    news: list[PresenceNews]


@dataclass(frozen=True, slots=True)
class PresenceLoaded:
    """The answer to :class:`FetchPresence`: ``snapshot`` None if Redis failed, or the host
    has none that verifies."""

    host: str
    snapshot: LoadedSnapshot | None


@dataclass(frozen=True, slots=True)
class PresenceDrift:
    """This host's user set in Redis holds fewer users than the host has (it expired, or was
    evicted): a snapshot, which rewrites it, is wanted."""


LinkEvent = (
    LinkState
    | Results
    | Deliveries
    | TopicsReady
    | ChannelMarks
    | PresenceHeard
    | PresenceLoaded
    | PresenceDrift
)
