"""The admin page of the metrics port: ``GET /admin`` (a static page), ``GET /admin/events``
(a Server-Sent Events stream of the host's numbers, one event per second) and who may see them,
and ``GET /ucc.js`` (the browser client, ``clients/js/ucc.js``).

Owns: the access rule (:func:`admin_refusal`: loopback peers only, unless ``--admin-token`` is
set, then that token from anyone, as ``Authorization: Bearer`` or ``?token=``), the page's view
of one snapshot (:class:`AdminView`: totals and their rates per second, shards, the Redis link,
the last restarts, the largest channels) and the feed (:class:`AdminFeed`: one poll of the
router per second while at least one page is open, fanned out to every open stream, each
stream's queue bounded: a page that does not read is dropped). Must never block the loop nor
ask the router more than once per interval however many pages are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from shards.metrics import Request, Stream, readiness, response

STATIC = Path(__file__).parent / "static"
INTERVAL = 1.0  # seconds between two events of the stream
TOP_CHANNELS = 10  # largest channels shown
MAX_STREAMS = 8  # admin pages open at once (more: 503)
STREAM_QUEUE = 4  # events waiting for a slow page; beyond, the page is dropped
RETRY_MS = 2000  # the browser's EventSource reconnects after this long
STREAM_TIMEOUT = 10.0  # seconds a page may take to read one event before it is dropped

# the totals whose rates per second the page shows, and where they come from
RATES = ("frames_delivered", "bytes_sent", "commands", "connects")

# the host's numbers with the largest channels and the last restarts (None: no answer in time)
AdminSource = Callable[[], Awaitable[Mapping[str, Any] | None]]


def admin_refusal(request: Request, peer: str | None, token: str | None) -> tuple[int, str] | None:
    """Why ``request`` from ``peer`` (its IP address) may not see the admin page, as (HTTP
    status, reason); None if it may. Without ``token``: loopback peers only (403 otherwise).
    With it: the same token as ``Authorization: Bearer`` or ``?token=``, from anyone (401)."""
    if token is None:
        if peer is None or not is_loopback(peer):
            return 403, "the admin page answers loopback clients only (set --admin-token)"
        if not is_local_name(request.headers.get("host", "")):
            # a page of another site whose name was made to point at 127.0.0.1 (DNS
            # rebinding) would be same-origin with this one: it must name us as local
            return 403, "the admin page answers requests for localhost only (set --admin-token)"
        return None
    offered = bearer(request.headers.get("authorization", ""))
    if offered is None:
        offered = parse_qs(request.query).get("token", [""])[0]
    if offered and hmac.compare_digest(offered.encode(), token.encode()):
        return None
    return 401, "the admin page needs its token (Authorization: Bearer, or ?token=)"


def is_local_name(host_header: str) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address
    (``localhost``, ``127.x.y.z``, ``[::1]``, with or without a port)."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("localhost", "localhost."):
        return True
    return is_loopback(host)


def bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class AdminView:
    """The page's numbers from successive snapshots: each :meth:`update` gives the view of one
    snapshot, with rates per second since the previous one. Plain: no clock of its own."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, int]] | None = None

    def update(self, snapshot: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
        if snapshot is None:
            return {"at": time.time(), "answered": False, "ready": ["the router did not answer"]}
        totals = host_totals(snapshot)
        rates = dict.fromkeys(RATES, 0.0)
        if self._last is not None and now > self._last[0]:
            elapsed = now - self._last[0]
            for key in RATES:  # host totals only grow; a smaller one is a new count: 0
                rates[key] = round(max(0, totals[key] - self._last[1][key]) / elapsed, 1)
        self._last = (now, totals)
        rows = snapshot.get("shards", [])
        return {
            "at": time.time(),
            "answered": True,
            "ready": readiness(snapshot),
            "host": {
                key: snapshot[key]
                for key in ("websocket", "metrics", "uptime", "started_at")
                if key in snapshot
            },
            "shards": [
                {
                    key: row.get(key)
                    for key in ("index", "state", "pid", "epoch", "connections", "users")
                }
                | {"channels": row.get("channels")}
                for row in rows
            ],
            "totals": {
                "connections": sum(r.get("connections", 0) for r in rows),
                "users": sum(r.get("users", 0) for r in rows),
                "channels": snapshot.get("channels", 0),
                **totals,
            },
            "rates": rates,
            "restarts": snapshot.get("restarts", 0),
            "restart_log": list(snapshot.get("restart_log", [])),
            "largest": list(snapshot.get("largest", [])),
            "largest_missing": list(snapshot.get("largest_missing", [])),
            "redis": snapshot.get("redis"),
        }


def host_totals(snapshot: Mapping[str, Any]) -> dict[str, int]:
    """The counters whose rates the page shows, from one snapshot."""
    totals = snapshot.get("totals", {})
    commands = snapshot.get("commands") or {}
    return {
        "frames_delivered": int(totals.get("frames_delivered", 0)),
        "bytes_sent": int(totals.get("bytes_sent", 0)),
        "commands": sum(int(count) for _cmd, _result, count in commands.get("results", [])),
        "connects": int(snapshot.get("acceptor", {}).get("routed", 0)),
    }


def sse_event(data: Mapping[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``data`` as JSON (one line: JSON never holds a raw
    newline)."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class AdminFeed:
    """The events of ``/admin/events``: one poll of ``source`` per ``interval`` while at least
    one stream is open, the same event queued to every stream."""

    def __init__(self, source: AdminSource, interval: float = INTERVAL) -> None:
        self.source = source
        self.interval = interval
        self.view = AdminView()
        self.streams: set[asyncio.Queue[bytes]] = set()
        self.counters = {"streams_opened": 0, "streams_refused": 0, "streams_dropped": 0}
        self._task: asyncio.Task[None] | None = None

    def open(self) -> asyncio.Queue[bytes] | None:
        """A new stream's queue of events; None if ``MAX_STREAMS`` are open."""
        if len(self.streams) >= MAX_STREAMS:
            self.counters["streams_refused"] += 1
            return None
        queue: asyncio.Queue[bytes] = asyncio.Queue(STREAM_QUEUE)
        self.streams.add(queue)
        self.counters["streams_opened"] += 1
        if self._task is None or self._task.done():
            self.view = AdminView()  # rates since the last event, not since the last page
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="admin-feed")
        return queue

    def close(self, queue: asyncio.Queue[bytes]) -> None:
        self.streams.discard(queue)

    def stop(self) -> None:
        """Shutting down: no more polls, and every open stream ends."""
        if self._task is not None:
            self._task.cancel()
        for queue in self.streams:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            queue.put_nowait(b"")
        self.streams.clear()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while self.streams:
            started = loop.time()
            event = sse_event(self.view.update(await self.source(), loop.time()))
            for queue in list(self.streams):
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:  # the page does not read: it alone is dropped
                    self.counters["streams_dropped"] += 1
                    self.streams.discard(queue)
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                    queue.put_nowait(b"")  # its writer ends the response
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))


class AdminRoutes:
    """``/admin``, ``/admin/events`` and ``/ucc.js`` for the metrics server."""

    PATHS = ("/admin", "/admin/", "/admin/events", "/ucc.js")

    def __init__(self, source: AdminSource, token: str | None) -> None:
        self.feed = AdminFeed(source)
        self.token = token

    def route(self, request: Request, peer: str | None) -> bytes | Stream:
        if request.path == "/ucc.js":  # public: the page of any origin may import it
            return static_file("ucc.js", "text/javascript; charset=utf-8", cors=True)
        refusal = admin_refusal(request, peer, self.token)
        if refusal is not None:
            status, reason = refusal
            return response(status, f"{reason}\n".encode())
        if request.path == "/admin/events":
            queue = self.feed.open()
            if queue is None:
                return response(503, b"too many admin pages open\n")
            return lambda writer: self._stream(queue, writer)
        return static_file("admin.html", "text/html; charset=utf-8")

    async def _stream(self, queue: asyncio.Queue[bytes], writer: asyncio.StreamWriter) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            "Connection: close\r\nX-Accel-Buffering: no\r\n\r\n"
            f"retry: {RETRY_MS}\n\n"
        )
        writer.write(head.encode())
        try:
            while event := await queue.get():  # b"": dropped by the feed
                writer.write(event)
                await asyncio.wait_for(writer.drain(), STREAM_TIMEOUT)
        finally:
            self.feed.close(queue)

    def close(self) -> None:
        self.feed.stop()


def static_file(name: str, content_type: str, cors: bool = False) -> bytes:
    """One of the files in ``shards/static`` as a 200 response (404 if it is missing: a copy
    of the package without them)."""
    try:
        body = (STATIC / name).read_bytes()
    except OSError:
        return response(404, f"{name} is not installed with this copy of ucc\n".encode())
    extra = {"Access-Control-Allow-Origin": "*"} if cors else {}
    return response(200, body, content_type, headers=extra)
