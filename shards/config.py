"""Configuration of ``ucc serve`` and the secret that signs connection tokens.

Owns: defaults, reading the environment once, and the private secret file. Must never log or
print the secret itself.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_COMMAND = "tcp://127.0.0.1:5555"
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``ucc serve`` needs; built once from flags and environment."""

    secret: str
    shards: int = field(default_factory=lambda: os.cpu_count() or 1)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    command: str = DEFAULT_COMMAND
    redis: str | None = None
    cluster_name: str = "default"
    heartbeat: float = 25.0
    heartbeat_timeout: float = 60.0
    handshake_timeout: float = 5.0
    max_frame: int = 64 * 1024
    max_command: int = 1024 * 1024
    write_buffer_limit: int = 4 * 1024 * 1024
    send_buffer: int = 0  # the kernel's send buffer per connection (SO_SNDBUF); 0: autotuned
    slow_consumer_timeout: float = 10.0  # a client this long behind with its writes: 4000
    gather_timeout: float = 1.0
    shutdown_timeout: float = 8.0
    drain_window: float = 1.0
    hang_timeout: float = 1.5
    # the handshake perimeter: connections accepted but not yet handed to a shard
    max_pending: int = 10_000
    max_pending_per_address: int = 64
    # each client's inbound budget (token buckets); over it, the connection is closed 1008
    client_frame_rate: float = 100.0
    client_frame_burst: int = 1_000
    client_byte_rate: float = 1024 * 1024
    client_byte_burst: int = 4 * 1024 * 1024
    # router -> shard: deliveries in flight per shard; beyond either, broadcasts are refused
    shard_queue_messages: int = 20_000
    shard_queue_bytes: int = 64 * 1024 * 1024
    shard_queue_delay: float = 0.1  # ...or when it is this far behind (seconds; see credit.py)
    max_queries: int = 10_000  # presence/status queries in flight on the router
    # under load, the router holds its sockets to take commands in batches: each hold sized to
    # gather ~8 commands at the measured rate, between batch_window (0: off) and
    # batch_window_max (None: DEFAULT_BATCH_WINDOW_MAX, or a quarter of shard_queue_delay if
    # that is less); see actors.router_actor.BatchWindow
    batch_window: float = 0.002
    batch_window_max: float | None = None
    # per backend on the command socket: commands read ahead and replies held for it
    backend_queue: int = 1_000
    # the perimeter (issue 10): browsers by origin, users by token, backends by CURVE key,
    # hosts by a MAC on every cluster message
    allowed_origins: tuple[str, ...] = ()  # empty: any origin (logged once at start)
    max_connections_per_user: int = 32  # per host; beyond: HTTP 429
    max_channels_per_connection: int = 1024  # a token listing more: 401; a subscribe: `limit`
    connect_rate: float = 200.0  # upgrades per second per source address (burst 2x): 429
    token_audience: str | None = None  # when set, tokens must carry this `aud`
    token_issuer: str | None = None  # when set, tokens must carry this `iss`
    token_leeway: float = 0.0  # seconds of clock skew allowed on `exp`
    command_key: str | None = None  # the server's CURVE secret key file (enables CURVE)
    command_clients: str | None = None  # a directory of admitted client `*.pub` keys
    insecure_command: bool = False  # allow a non-loopback command endpoint without CURVE
    cluster_secret: str | None = None  # the MAC key of cluster messages (default: derived)
    # nothing lost across a reconnect (issue 11): channel history (0 messages: off, no offsets),
    # kept in the router (or Redis), and critical messages kept per user until acknowledged
    history_size: int = 64  # messages kept per channel
    history_ttl: float = 300.0  # a channel's history lives this long after its last message
    history_memory: int = 64 * 1024 * 1024  # all channels' history, beyond: evict the oldest
    ack_timeout: float = 10.0  # re-send an unacknowledged critical message after this long
    ack_retries: int = 5  # ...at most this many times on one connection
    critical_per_user: int = 100  # unacknowledged critical messages per user (beyond: `limit`)
    critical_memory: int = 64 * 1024 * 1024  # all users' critical messages (beyond: `limit`)
    # issue 12: the ZeroMQ PUB endpoint of the host's event stream (None: no events)
    events: str | None = None
    # issue 13: HOST:PORT of the HTTP server for /metrics, /healthz, /readyz (None: off)
    metrics: str | None = None
    # the token the metrics port's /admin asks for (None: loopback clients only, no token)
    admin_token: str | None = None
    log_level: str = "INFO"


MIN_SECRET_BYTES = 32


def check_secret(secret: str, what: str = "") -> str:
    """``secret`` if it is long enough to key HMAC-SHA256 (32 bytes at least): the token
    secret, or ``what`` names another (the cluster secret)."""
    size = len(secret.encode())
    if size >= MIN_SECRET_BYTES:
        return secret
    if what:
        raise ValueError(f"{what} is {size} bytes; it must have at least {MIN_SECRET_BYTES}")
    raise ValueError(
        f"the token secret is {size} bytes; it must have at least {MIN_SECRET_BYTES} (HS256):"
        " use a longer --secret / UCC_SECRET, or delete the secret file to have a new random"
        " one created"
    )


def secret_path() -> Path:
    """Where the generated secret lives: ``$UCC_SECRET_FILE`` or the user's state directory."""
    explicit = os.environ.get("UCC_SECRET_FILE")
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ucc" / "secret"


def load_or_create_secret(path: Path) -> str:
    """Read the secret at ``path``, creating it (mode 0600, random) if it does not exist."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def resolve_secret(flag: str | None, create: bool) -> tuple[str, Path | None]:
    """The secret from ``--secret``, ``UCC_SECRET`` or the secret file (created if ``create``).

    Returns the secret and the file it came from (None when given explicitly).
    Raises FileNotFoundError when there is no secret anywhere and ``create`` is false.
    """
    value = flag or os.environ.get("UCC_SECRET")
    if value:
        return value, None
    path = secret_path()
    if create:
        return load_or_create_secret(path), path
    return path.read_text().strip(), path


CLUSTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_cluster_name(name: str) -> str:
    """``name`` if it can name a cluster of hosts in Redis (it goes inside hash tags:
    ``{ucc:<name>}``); ValueError with a one-line reason if not."""
    if CLUSTER_NAME.fullmatch(name) is None:
        raise ValueError(
            f"--cluster-name / UCC_CLUSTER {name[:80]!r}: 1 to 64 letters, digits or . _ -"
        )
    return name


MIN_ADMIN_TOKEN = 16  # characters: a guessable admin token is worse than none


DEFAULT_BATCH_WINDOW_MAX = 0.01  # seconds


def effective_batch_window_max(window_max: float | None, queue_delay: float) -> float:
    """``--batch-window-max`` as given, or its default: DEFAULT_BATCH_WINDOW_MAX, a quarter of
    ``--shard-queue-delay`` if that is less (so a short delay given alone stays valid)."""
    return window_max if window_max is not None else min(DEFAULT_BATCH_WINDOW_MAX, queue_delay / 4)


def check_batch_window(window: float, queue_delay: float, window_max: float = 0.0) -> None:
    """``--batch-window`` and ``--batch-window-max`` against ``--shard-queue-delay``: the
    router reads the shards' credit late by up to a window, so a window of half the delay or
    more would refuse broadcasts ``overloaded`` for a backlog that is not there. ValueError
    with the reason if so. (Off, ``window`` 0, the maximum does not matter; below the window,
    the window is the maximum.)"""
    if not window:
        return
    for flag, value in (("--batch-window", window), ("--batch-window-max", window_max)):
        if 2 * value >= queue_delay:
            raise ValueError(
                f"{flag} {value} must be less than half of --shard-queue-delay "
                f"{queue_delay}: the shards' credit is read up to a window late"
            )


def check_admin_token(token: str) -> str:
    """``token`` if it can guard the admin page; ValueError with a one-line reason if not
    (too short, or characters that do not survive a header or a URL's query unescaped)."""
    if len(token) < MIN_ADMIN_TOKEN:
        raise ValueError(
            f"--admin-token / UCC_ADMIN_TOKEN: at least {MIN_ADMIN_TOKEN} characters"
            f" (got {len(token)}); e.g. `python3 -c 'import secrets; print(secrets.token_hex(16))'`"
        )
    if not all(c.isascii() and (c.isalnum() or c in "-._~") for c in token):
        raise ValueError(
            "--admin-token / UCC_ADMIN_TOKEN: only letters, digits and - . _ ~"
            " (it travels in a header or a URL unescaped)"
        )
    return token


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_REDIS_PORT = 6379


@dataclass(frozen=True)
class ClusterURL:
    """A ``redis+cluster://`` (or ``rediss+cluster://``) URL taken apart: ``seeds``, the nodes
    it names (host, port), in order and without duplicates; ``plain``, the ``redis://`` (or
    ``rediss://``) URL of the first seed with the URL's credentials, database and options (what
    redis-py's ``RedisCluster(url=...)`` takes; the credentials apply to every node)."""

    plain: str
    seeds: tuple[tuple[str, int], ...]


def _authority(rest: str) -> tuple[str, str, str, str]:
    """What follows ``scheme://`` as (user information, ``@`` or ``""``, hosts, the rest: path,
    query, fragment). The user information ends at the *last* ``@``: a password may hold
    ``/``, ``?`` or ``#`` (it should be percent-encoded; people paste it as it is)."""
    userinfo, at, after = rest.rpartition("@")
    end = min((i for i in (after.find(c) for c in "/?#") if i >= 0), default=len(after))
    return userinfo, at, after[:end], after[end:]


def _hide_password(url: str) -> str:
    """``url`` with the password of its user information (if any) replaced by ``***``."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, hosts, tail = _authority(rest)
    user, colon, _password = userinfo.partition(":")
    if not (separator and at and colon):
        return url
    return f"{scheme}://{user}:***@{hosts}{tail}"


def _seed(item: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; ValueError with the reason if not."""
    if item.startswith("["):
        host, bracket, after = item[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"{item!r} is not [address] or [address]:port")
        port = after[1:] if after else None
    else:
        host, colon, port_text = item.partition(":")
        port = port_text if colon else None
        if ":" in port_text:
            raise ValueError(f"{item!r}: write an IPv6 address in brackets, [address]:port")
    if not host:
        raise ValueError(f"{item!r}: no host")
    if port is None:
        return host, DEFAULT_REDIS_PORT
    if not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"{item!r}: the port is not a number from 1 to 65535")
    return host, int(port)


def cluster_url(url: str) -> ClusterURL | None:
    """``url`` taken apart if it names a Redis Cluster (``redis+cluster://`` or
    ``rediss+cluster://``, one seed node or several separated by commas:
    ``redis+cluster://user:password@host1:7000,host2:7000,[::1]:7000/0?options``); None for
    any other scheme. ValueError (a one-line reason, without the password) if a seed is bad."""
    scheme, separator, rest = url.partition("://")
    plain_scheme = CLUSTER_SCHEMES.get(scheme.lower())
    if not separator or plain_scheme is None:
        return None
    userinfo, at, hosts, tail = _authority(rest)
    seeds: dict[tuple[str, int], None] = {}
    try:
        for item in hosts.split(","):
            if not item:
                raise ValueError("an empty node in the list (two commas, or one at an end)")
            seeds[_seed(item)] = None
    except ValueError as exc:
        raise ValueError(f"--redis {_hide_password(url)!r}: {exc}") from None
    database = tail.split("?", 1)[0].split("#", 1)[0].strip("/")
    if database not in ("", "0"):
        raise ValueError(f"--redis {_hide_password(url)!r}: a Redis Cluster has only database 0")
    host, port = next(iter(seeds))
    first = f"[{host}]" if ":" in host else host
    return ClusterURL(f"{plain_scheme}://{userinfo}{at}{first}:{port}{tail}", tuple(seeds))


def check_redis_url(url: str) -> str:
    """``url`` if the Redis link can use it; ValueError with a one-line reason if not (the
    password, if any, is not repeated in it)."""
    shown = _hide_password(url)
    if cluster_url(url) is not None:  # a Redis Cluster's seeds (it raises with the reason)
        return url
    parsed = urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"--redis {shown!r}: unsupported scheme {parsed.scheme or '(none)'!r};"
            f" use one of {', '.join(s + '://' for s in REDIS_SCHEMES)}"
        )
    if scheme == "unix":
        if not parsed.path:
            raise ValueError(f"--redis {shown!r}: a unix:// URL needs a socket path")
        return url
    if "," in parsed.netloc:
        raise ValueError(
            f"--redis {shown!r}: several nodes are for a Redis Cluster only:"
            f" write {scheme}+cluster://host1:port1,host2:port2"
        )
    try:
        parsed.port  # noqa: B018 - raises ValueError when the port is not a number in range
    except ValueError:
        raise ValueError(f"--redis {shown!r}: the port is not a number from 0 to 65535") from None
    if not parsed.hostname:
        raise ValueError(f"--redis {shown!r}: no host")
    database = parsed.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"--redis {shown!r}: the path must be a database number, e.g. /0")
    return url
