"""The metrics port (``ucc serve --metrics HOST:PORT``): ``GET /metrics`` (Prometheus text
format), ``GET /healthz`` and ``GET /readyz``, over a tiny HTTP/1.1 server on the supervisor's
loop (and the admin page and ``/ucc.js``, answered by :mod:`shards.admin`).

Owns: the listening socket of the metrics port, the parsing of its requests (:func:`parse_request`:
a request line and headers, bounded in size and time; GET only; ``Connection: close`` always),
the translation of the host's numbers into Prometheus metric families (:class:`HostCollector`,
over a private ``CollectorRegistry``) and the readiness verdict (:func:`readiness`). The numbers
come from a :data:`Source` (the supervisor asks the router, without blocking the loop). Must
never block the loop, keep a connection open after its answer, or touch the router's state.

Metrics (all from one snapshot per scrape; counters are the host's totals since it started,
kept across shard restarts by the router):

========================================  =========  ==============================
name                                      type       labels
========================================  =========  ==============================
ucc_connections                           gauge      shard
ucc_users                                 gauge
ucc_channels                              gauge
ucc_shard_up                              gauge      shard
ucc_frames_delivered_total                counter
ucc_bytes_sent_total                      counter
ucc_commands_total                        counter    cmd, result
ucc_command_seconds                       histogram
ucc_handshakes_total                      counter    status
ucc_closes_total                          counter    code
ucc_shard_restarts_total                  counter
ucc_redis_up                              gauge
ucc_redis_<counter>_total                 counter    (one per Redis link counter)
ucc_presence_hosts                        gauge      (other hosts replicated; with --redis)
ucc_presence_syncing                      gauge      (of those, replicas syncing)
ucc_presence_remote_users                 gauge      (users of other hosts replicated)
ucc_presence_<counter>_total              counter    (deltas, gaps, syncs, fetches, asks, expired)
ucc_topic_<counter>_total                 counter    (gaps, gaps_(un)filled, gap_messages)
========================================  =========  ==============================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shards.admin import AdminRoutes

log = logging.getLogger("ucc.metrics")

MAX_HEAD = 8 * 1024  # bytes of request line and headers at most (beyond: 431)
MAX_HEADERS = 64  # header lines at most (beyond: 431)
READ_TIMEOUT = 5.0  # seconds to send the whole head (a slow client is answered 408)
MAX_CLIENTS = 64  # connections served at once; more are closed at once (slowloris)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format

# the acceptor's counters that are the outcome of a handshake (label ``status``)
HANDSHAKE_STATUSES = (
    "routed",
    "closed_by_client",
    "refused_per_address",
    "refused_pending",
    "handshake_timeouts",
    "bad_requests",
    "not_websocket",
    "unauthorized",
    "forbidden_origin",
    "rate_limited",
    "banned",
    "unavailable",
    "internal_errors",
)


# -- requests --------------------------------------------------------------------------------


class BadRequest(Exception):
    """The client sent something we do not answer: ``status`` says how (400, 405, 431...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without its query string
    headers: Mapping[str, str]  # lower-case names
    query: str = ""  # after the ``?``, undecoded


def parse_request(head: bytes) -> Request:
    """The request in ``head`` (its request line and headers, up to and including the blank
    line); BadRequest if it is malformed, too large, not HTTP/1.x, or not a GET."""
    if len(head) > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BadRequest(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, "unsupported HTTP version")
    if not target.startswith("/"):
        raise BadRequest(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise BadRequest(400, "malformed header")
        headers[name.lower()] = value.strip()
    if method != "GET":
        raise BadRequest(405, "only GET is answered here")
    path, _, query = target.partition("?")
    return Request(method, path, headers, query)


# -- the numbers -----------------------------------------------------------------------------


def readiness(snapshot: Mapping[str, Any] | None) -> list[str]:
    """Why the host is not ready (empty: it is): a shard not up, or not answering, and with a
    Redis link, the link down. ``snapshot``: the router's numbers (None: it did not answer)."""
    if snapshot is None:
        return ["the router did not answer"]
    reasons = []
    for row in snapshot["shards"]:
        if row["state"] != "up":
            reasons.append(f"shard {row['index']} is {row['state']}")
    redis = snapshot.get("redis")
    if redis is not None and not redis.get("up"):
        reasons.append("the Redis link is down")
    if not snapshot.get("accepting", True):
        reasons.append("not accepting connections yet")
    return reasons


def _counter_name(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key.lower())


class HostCollector(Collector):
    """Prometheus metric families from one snapshot of the host's numbers (the router's
    :meth:`~actors.router.RouterCore.metrics`, plus the acceptor's counters under
    ``acceptor``). Plain: give it the snapshot, read the families."""

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        rows = snap.get("shards", [])
        connections = GaugeMetricFamily(
            "ucc_connections", "Client connections open, per shard", labels=["shard"]
        )
        up = GaugeMetricFamily(
            "ucc_shard_up", "1 if the shard is up and answered this scrape", labels=["shard"]
        )
        for row in rows:
            connections.add_metric([str(row["index"])], row.get("connections", 0))
            up.add_metric([str(row["index"])], 1 if row["state"] == "up" else 0)
        yield connections
        yield up
        yield GaugeMetricFamily(
            "ucc_users", "Users connected", value=sum(r.get("users", 0) for r in rows)
        )
        yield GaugeMetricFamily(
            "ucc_channels", "Channels with members on this host", value=snap.get("channels", 0)
        )
        totals: Mapping[str, int] = snap.get("totals", {})
        yield CounterMetricFamily(
            "ucc_frames_delivered",
            "Frames delivered to clients (one per recipient)",
            value=totals.get("frames_delivered", 0),
        )
        yield CounterMetricFamily(
            "ucc_bytes_sent",
            "Bytes of frames delivered to clients",
            value=totals.get("bytes_sent", 0),
        )
        closes = CounterMetricFamily(
            "ucc_closes", "Client connections closed, by close code", labels=["code"]
        )
        for key, value in sorted(totals.items()):
            if key.startswith("close_"):
                closes.add_metric([key.removeprefix("close_")], value)
        yield closes
        yield from self._commands(snap.get("commands"))
        handshakes = CounterMetricFamily(
            "ucc_handshakes", "WebSocket handshakes, by outcome", labels=["status"]
        )
        acceptor: Mapping[str, int] = snap.get("acceptor", {})
        for status in HANDSHAKE_STATUSES:
            handshakes.add_metric([status], acceptor.get(status, 0))
        # routed by the acceptor, then refused by the shard (429: the user's connections limit)
        handshakes.add_metric(["refused_per_user"], totals.get("refused_per_user", 0))
        yield handshakes
        yield CounterMetricFamily(
            "ucc_shard_restarts",
            "Shard processes started again after the first",
            value=snap.get("restarts", 0),
        )
        redis = snap.get("redis")
        yield GaugeMetricFamily(
            "ucc_redis_up",
            "1 if the Redis link is connected (0 without --redis)",
            value=1 if redis and redis.get("up") else 0,
        )
        for key, value in sorted((redis or {}).items()):
            if key != "up" and isinstance(value, int) and not isinstance(value, bool):
                name = f"ucc_redis_{_counter_name(key)}"
                yield CounterMetricFamily(name, f"Redis link: {key}", value=value)
        yield from _presence(snap.get("presence"))
        yield from _topic_gaps(snap.get("topic_gaps"))

    def _commands(self, commands: Mapping[str, Any] | None) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "ucc_commands", "Commands answered, by command and result", labels=["cmd", "result"]
        )
        if not commands:
            yield total
            yield HistogramMetricFamily(
                "ucc_command_seconds",
                "Time from a command's arrival at the router to its reply",
                buckets=[("+Inf", 0)],
                sum_value=0,
            )
            return
        for cmd, result, count in commands["results"]:
            total.add_metric([cmd, result], count)
        yield total
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip([*commands["buckets"], "+Inf"], commands["counts"], strict=True):
            cumulative += count
            buckets.append((str(float(bound)) if bound != "+Inf" else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "ucc_command_seconds",
            "Time from a command's arrival at the router to its reply",
            buckets=buckets,
            sum_value=commands["sum"],
        )


def exposition(snapshot: Mapping[str, Any]) -> bytes:
    """The Prometheus text format of ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(snapshot))
    return generate_latest(registry)


# -- the server ------------------------------------------------------------------------------

# the host's numbers, or None if the router did not answer in time
Source = Callable[[], Awaitable[Mapping[str, Any] | None]]
# a streamed answer (the admin page's events): writes its whole response, then returns
Stream = Callable[[asyncio.StreamWriter], Awaitable[None]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    allow: bool = False,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        head.append("Allow: GET")
    head.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class MetricsServer:
    """Answers the metrics port's requests, one per connection."""

    def __init__(
        self,
        source: Source,
        alive: Callable[[], bool] = lambda: True,
        admin: AdminRoutes | None = None,
    ) -> None:
        self.source = source
        self.alive = alive
        self.admin = admin
        self.server: asyncio.Server | None = None
        self.counters = {"requests": 0, "bad_requests": 0, "errors": 0, "refused": 0}
        self.clients = 0  # connections being served

    async def start(self, address: str) -> tuple[str, int]:
        host, port = split_address(address)
        self.server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD + 1)
        bound = self.server.sockets[0].getsockname()
        return bound[0], bound[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.admin is not None:
            self.admin.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            self.counters["refused"] += 1
            writer.close()
            return
        self.clients += 1
        try:
            peer = writer.get_extra_info("peername")
            answer = await self._answer(reader, peer[0] if peer else None)
            if isinstance(answer, bytes):
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
            else:
                await answer(writer)
        except (OSError, TimeoutError):
            pass  # the client went away or does not read: nothing to answer
        except Exception:  # a bug: this request's, never the server's
            self.counters["errors"] += 1
            log.exception("metrics: a request could not be answered")
        finally:
            self.clients -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, peer: str | None) -> bytes | Stream:
        self.counters["requests"] += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            request = parse_request(head)
        except TimeoutError:
            self.counters["bad_requests"] += 1
            return response(408, b"request head not received in time\n")
        except asyncio.LimitOverrunError:
            self.counters["bad_requests"] += 1
            return response(431, b"request head too large\n")
        except asyncio.IncompleteReadError:
            self.counters["bad_requests"] += 1
            return response(400, b"incomplete request\n")
        except BadRequest as exc:
            self.counters["bad_requests"] += 1
            return response(exc.status, f"{exc.reason}\n".encode(), allow=exc.status == 405)
        return await self.route(request, peer)

    async def route(self, request: Request, peer: str | None = None) -> bytes | Stream:
        if request.path == "/healthz":
            return response(200 if self.alive() else 503, b"ok\n")
        if request.path == "/metrics":
            snapshot = await self.source()
            if snapshot is None:
                return response(503, b"the router did not answer in time\n")
            return response(200, exposition(snapshot), CONTENT_TYPE)
        if request.path == "/readyz":
            snapshot = await self.source()
            reasons = readiness(snapshot)
            body = {"ready": False, "reasons": reasons} if reasons else {"ready": True}
            data = (json.dumps(body) + "\n").encode()
            return response(503 if reasons else 200, data, "application/json")
        if self.admin is not None and request.path in self.admin.PATHS:
            return self.admin.route(request, peer)
        return response(404, b"not found: /metrics, /healthz, /readyz, /admin, /ucc.js\n")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); ValueError if malformed."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics {address!r}: expected HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    return host or "127.0.0.1", int(port)


async def ask_with_timeout(
    ask: Callable[[Callable[[dict[str, Any]], None]], None], timeout: float
) -> dict[str, Any] | None:
    """Call ``ask(reply)`` (which makes someone call ``reply`` once, on any thread) and wait
    for the reply without blocking the loop; None after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dict[str, Any]] = loop.create_future()

    def reply(value: dict[str, Any]) -> None:
        def resolve() -> None:
            if not future.done():
                future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(resolve)

    ask(reply)
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        return None


PRESENCE_GAUGES = {
    "presence_hosts": ("ucc_presence_hosts", "Other hosts whose presence this host replicates"),
    "presence_syncing": ("ucc_presence_syncing", "Replicas syncing from a snapshot"),
    "presence_users": ("ucc_presence_remote_users", "Users of other hosts, as replicated"),
}
PRESENCE_COUNTERS = ("deltas", "gaps", "syncs", "fetches", "asks", "expired")


TOPIC_GAP_COUNTERS = {
    "gaps": "Gaps found in channel topics (messages the listener did not hear)",
    "gaps_filled": "Of those, filled from the history before what followed",
    "gaps_unfilled": "Of those, left as they were (clients see the gap and resume)",
    "gap_messages": "Messages read back from the history to fill gaps",
}


def _topic_gaps(gaps: Mapping[str, int] | None) -> Iterator[Metric]:
    """The repairs of channel topics' gaps (only in a cluster of hosts: ``--redis``)."""
    if not gaps:
        return
    for counter, text in TOPIC_GAP_COUNTERS.items():
        yield CounterMetricFamily(f"ucc_topic_{counter}", text, value=gaps.get(counter, 0))


def _presence(presence: Mapping[str, int] | None) -> Iterator[Metric]:
    """Presence by deltas (only in a cluster of hosts: ``--redis``)."""
    if not presence:
        return
    for key, (name, text) in PRESENCE_GAUGES.items():
        yield GaugeMetricFamily(name, text, value=presence.get(key, 0))
    for counter in PRESENCE_COUNTERS:
        value = presence.get(f"presence_{counter}", 0)
        text = f"Presence replicas: {counter}"
        yield CounterMetricFamily(f"ucc_presence_{counter}", text, value=value)
