"""The acceptor: accept a TCP connection, peek at its upgrade request, check the token, and hand
the socket to the user's shard.

Owns: the listening socket and connections not yet handed over. It reads the request head with
``MSG_PEEK`` (bounded: at most 8 KiB, and a deadline), so the bytes stay in the kernel for the
shard's WebSocket handshake. Must never proxy bytes, and never let a slow or hostile client hold
anything beyond its own small, bounded entry: pending handshakes are capped per source address
(:class:`PendingLimits`) besides the global cap, every refusal is counted (``counters``) and
summed up in at most one log line every few seconds (:class:`RefusalReport`), and an unexpected
error while handling one connection closes that connection only.

Before an upgrade is placed, the perimeter (in this order): the source address's connect rate
(:class:`ConnectRates`, 429 with ``Retry-After``), the page's ``Origin`` (:class:`Origins`,
403), the token (401: signature, expiry, and ``aud``/``iss``/channel count when configured),
and the user's ban (:class:`BanTable`, 403; see :meth:`Acceptor.ban`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from actors.origins import Origins
from actors.ratelimit import TokenBucket
from actors.wire import httphead
from actors.wire.httphead import Head, HeadError
from actors.wire.tokens import MAX_TOKEN_CHANNELS, Claims, TokenError, verify

log = logging.getLogger("ucc.acceptor")

ACCEPT_PAUSE = 0.1
PEEK_RETRY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # a slow client costs ever fewer peeks
REPORT_INTERVAL = 5.0  # at most one summary line of refusals per this many seconds
RETRY_AFTER = {"Retry-After": "1"}

# what ``Acceptor.counters`` counts, each from 0
COUNTERS = (
    "accepted",  # TCP connections accepted
    "routed",  # valid upgrade requests placed with their shard (see Place)
    "health_checks",  # GET /healthz answered 200
    "closed_by_client",  # the client went away before sending its request
    "refused_per_address",  # 503: its address already has max_pending_per_address pending
    "refused_pending",  # 503: max_pending handshakes pending in all
    "handshake_timeouts",  # 408: no complete request head within the handshake deadline
    "bad_requests",  # 400 (malformed head) and 431 (head larger than 8 KiB)
    "not_websocket",  # 426: a request that is not a WebSocket upgrade
    "unauthorized",  # 401: no token, or a bad one (also a wrong aud/iss, too many channels)
    "forbidden_origin",  # 403: an Origin header not among --allowed-origin (or `null`)
    "rate_limited",  # 429: its address opened upgrades faster than --connect-rate (burst 2x)
    "banned",  # 403: the token's user is banned on this host (Acceptor.ban)
    "unavailable",  # 503: the user's shard is restarting (answered for the supervisor)
    "internal_errors",  # an unexpected error while handling one connection: closed
    "accept_errors",  # accept() failed (e.g. EMFILE): accepts paused for ACCEPT_PAUSE
)
# refusals that mean the server is under pressure, not that one client is wrong
_PRESSURE = frozenset(
    {"refused_per_address", "refused_pending", "internal_errors", "accept_errors"}
)

MAX_RATE_ADDRESSES = 65_536  # source addresses whose connect rate is tracked at once
MAX_BAN_SECONDS = 366 * 24 * 3600.0  # a longer ban is this long (a year is forever enough)

# place(claims, socket): the supervisor takes the socket over and places it with the user's
# shard (hands it over, holds it for a restarting shard, or answers 503 itself)
Place = Callable[[Claims, socket.socket], None]


def address_key(address: object) -> str:
    """The source a per-address cap applies to, from an ``accept()`` address: the IPv4 address,
    or the /64 network of an IPv6 one (a single host usually has a whole /64 to pick from)."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return str(address)  # not an IP socket: one key per distinct address
    host = address[0].partition("%")[0]  # a link-local address's scope: the same host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class PendingLimits:
    """Slots for pending handshakes: at most ``max_total`` in all, ``max_per_address`` from any
    one source address. A plain class: the acceptor takes a slot at accept and gives it back
    when the connection leaves the pending set (handed over, refused, timed out, gone)."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        if max_total <= 0 or max_per_address <= 0:
            raise ValueError("the pending handshake caps must be positive")
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._by_address: dict[str, int] = {}

    def admit(self, key: str) -> str | None:
        """Take a slot for a handshake from ``key``: None if taken, else the refusal's counter
        (``refused_per_address`` or ``refused_pending``); a refusal takes no slot."""
        held = self._by_address.get(key, 0)
        if held >= self.max_per_address:
            return "refused_per_address"
        if self.total >= self.max_total:
            return "refused_pending"
        self._by_address[key] = held + 1
        self.total += 1
        return None

    def release(self, key: str) -> None:
        """Give back a slot taken by :meth:`admit` (an address with none left is forgotten)."""
        held = self._by_address.get(key, 0)
        if held <= 0:
            raise ValueError(f"no pending handshake from {key} to release")
        if held == 1:
            del self._by_address[key]
        else:
            self._by_address[key] = held - 1
        self.total -= 1

    def pending(self, key: str) -> int:
        """Slots ``key`` holds now."""
        return self._by_address.get(key, 0)

    @property
    def addresses(self) -> int:
        """How many addresses hold a slot."""
        return len(self._by_address)


class ConnectRates:
    """How fast each source address may open upgrades: a :class:`TokenBucket` per address key,
    ``rate`` per second with a burst of ``burst``. A plain class, time as a parameter.

    Bounded: addresses are kept in least-recently-used order, and one whose bucket has had
    time to fill up again (idle for ``burst / rate`` seconds) is forgotten, since a fresh
    bucket is the same thing; so the table holds only the addresses seen in the last
    ``burst / rate`` seconds (2 s with the default burst of 2R). An attacker with very many
    addresses cannot grow it past ``max_addresses`` either: beyond it, the least recently
    seen address is forgotten early (it starts again with a full bucket, so the cost of the
    bound is that such an attacker's addresses get their burst again, never that an honest
    address is refused). Each entry costs a few hundred bytes: ``max_addresses`` of 65,536
    is some 20 MB at most.
    """

    def __init__(self, rate: float, burst: float, max_addresses: int = MAX_RATE_ADDRESSES) -> None:
        if not (rate > 0 and burst >= 1 and max_addresses > 0) or math.isinf(rate):
            raise ValueError("a connect rate needs a finite rate > 0, a burst >= 1, a bound > 0")
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        self.idle = burst / rate  # after this long without a connection, a bucket is full
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, key: str, now: float) -> float | None:
        """None if ``key`` may open one more upgrade now (it is counted), else the seconds
        until it may (at least 1, whole: a ``Retry-After`` value)."""
        self._forget_idle(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        if bucket.take(1, now):
            return None
        return float(max(1, math.ceil((1 - bucket.tokens) / self.rate)))

    def _forget_idle(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if now - bucket.stamp < self.idle:
                return  # the oldest is still refilling, so is everyone after it
            del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class BanTable:
    """Users whose new connections are refused until a time (monotonic seconds). A plain
    class, time as a parameter. Bounded by the bans in force: an expired ban is dropped when
    its user is looked up, and all expired ones are swept whenever the table has doubled
    since the last sweep (amortised O(1) per ban)."""

    def __init__(self) -> None:
        self._until: dict[int, float] = {}
        self._sweep_at = 64

    def ban(self, user: int, until: float, now: float) -> None:
        """Refuse ``user`` until ``until``; an ``until`` not after ``now`` lifts the ban."""
        if until <= now:
            self._until.pop(user, None)
            return
        self._until[user] = until
        if len(self._until) >= self._sweep_at:
            self.sweep(now)
            self._sweep_at = max(64, 2 * len(self._until))

    def banned(self, user: int, now: float) -> float | None:
        """The seconds left of ``user``'s ban, or None if not banned."""
        until = self._until.get(user)
        if until is None:
            return None
        if until <= now:
            del self._until[user]
            return None
        return until - now

    def sweep(self, now: float) -> None:
        """Drop every expired ban."""
        self._until = {user: until for user, until in self._until.items() if until > now}

    def __len__(self) -> int:
        return len(self._until)


@dataclass
class RefusalReport:
    """Refusals since the last report, for one summary line per ``interval`` at most (a storm
    of refused sockets must not become a storm of log lines). A plain class: the caller says
    when (:meth:`due`, :meth:`take`) and logs the line at the level :meth:`take` returns."""

    interval: float = REPORT_INTERVAL
    max_addresses: int = 1_000  # distinct addresses tracked per report (a bounded dict)
    reasons: dict[str, int] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    since: float | None = None  # when the first refusal of this report happened
    last: float = float("-inf")  # when the last report was taken

    def add(self, reason: str, key: str, now: float) -> None:
        if self.since is None:
            self.since = now
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if key in self.addresses or len(self.addresses) < self.max_addresses:
            self.addresses[key] = self.addresses.get(key, 0) + 1

    def due(self, now: float) -> float:
        """Seconds until a report may be taken (0: now)."""
        return max(0.0, self.last + self.interval - now)

    def take(self, now: float) -> tuple[int, str] | None:
        """The summary (a logging level and a line) of the refusals since the last one, or None
        if there were none; starts a new report."""
        if self.since is None:
            return None
        total = sum(self.reasons.values())
        span = max(now - self.since, 0.0)
        by_reason = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        top = sorted(self.addresses.items(), key=lambda kv: -kv[1])[:3]
        sources = ", ".join(f"{key} ({count})" for key, count in top)
        plural = "" if total == 1 else "s"
        line = f"refused {total} connection{plural} in {span:.1f} s ({by_reason});"
        line += f" most from {sources}"
        level = logging.WARNING if _PRESSURE.intersection(self.reasons) else logging.INFO
        self.reasons = {}
        self.addresses = {}
        self.since = None
        self.last = now
        return level, line


@dataclass(slots=True)
class _Pending:
    sock: socket.socket
    key: str  # the address_key its slot is counted under
    peer: str  # the client's address, for log lines
    deadline: float
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None


class Acceptor:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        secret: str,
        place: Place,
        handshake_timeout: float,
        max_pending: int = 10_000,
        max_pending_per_address: int = 64,
        *,
        allowed_origins: Iterable[str] = (),
        connect_rate: float | None = None,
        token_audience: str | None = None,
        token_issuer: str | None = None,
        token_leeway: float = 0.0,
        max_channels_per_connection: int = MAX_TOKEN_CHANNELS,
    ) -> None:
        """``allowed_origins``: ``--allowed-origin`` patterns (ValueError if one is not valid;
        none: any origin, logged once here). ``connect_rate``: upgrades per second per source
        address, burst twice that but at least 1 (None: no limit). The ``token_*`` settings and
        ``max_channels_per_connection`` go to :func:`~actors.wire.tokens.verify`."""
        self.origins = Origins(allowed_origins)  # first: a bad pattern leaves nothing behind
        self.rates = None  # a burst of 2R, and at least one connection whatever R is
        if connect_rate is not None:
            self.rates = ConnectRates(connect_rate, max(1.0, 2 * connect_rate))
        self.bans = BanTable()
        self.token_audience = token_audience
        self.token_issuer = token_issuer
        self.token_leeway = token_leeway
        self.max_channels = max_channels_per_connection
        if self.origins.any:
            log.info(
                "any Origin is accepted: no --allowed-origin given (a web page on any site may"
                " open a connection with a token it holds)"
            )
        self.loop = loop
        self.listener = listener
        self.secret = secret
        self.place = place
        self.handshake_timeout = handshake_timeout
        self.limits = PendingLimits(max_pending, max_pending_per_address)
        self.pending: dict[int, _Pending] = {}
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # told every refusal (reason, address): the supervisor makes ``limit`` events of them
        self.on_refusal: Callable[[str, str], None] | None = None
        self.report = RefusalReport()
        self._report_timer: asyncio.TimerHandle | None = None
        self._error_logged = float("-inf")
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and drop every connection not yet handed over."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for fd in list(self.pending):
            self._drop(fd)
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report()

    # -- accepting ---------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off, do not crash or spin
                self._count("accept_errors", f"(accept failed: {exc.strerror or exc})")
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            self.counters["accepted"] += 1
            try:
                self._admit(sock, address)
            except Exception as exc:  # a bug, or a socket already reset: close it, go on
                self._failed(sock, _peer(address), exc)

    def _admit(self, sock: socket.socket, address: object) -> None:
        sock.setblocking(False)
        key = address_key(address)
        entry = _Pending(sock, key, _peer(address), time.monotonic() + self.handshake_timeout)
        refusal = self.limits.admit(key)
        if refusal is not None:
            self._count(refusal, key)
            if refusal == "refused_per_address":
                body = "too many pending handshakes from this address"
            else:
                body = "too many pending handshakes"
            self._refuse(sock, 503, "Service Unavailable", body, None, RETRY_AFTER)
            return
        fd = sock.fileno()
        self.pending[fd] = entry  # from here on, _finish gives the slot back
        try:
            entry.timer = self.loop.call_later(self.handshake_timeout, self._expire, fd)
            with contextlib.suppress(OSError):  # a client that already reset: its peek says so
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.loop.add_reader(fd, self._readable, fd)
        except Exception:
            self._finish(fd)
            raise

    def _resume(self) -> None:
        if self.listener.fileno() >= 0:  # not closed meanwhile
            self.loop.add_reader(self.listener.fileno(), self._accept)

    # -- bans ----------------------------------------------------------------------------------

    def ban(self, user: int, seconds: float) -> None:
        """Refuse ``user``'s new connections on this host with HTTP 403 for ``seconds`` from
        now (counted as ``banned``); a later call replaces the ban, and ``seconds`` of 0 lifts
        it. Connections already open are not touched (closing them is the ``disconnect``
        command's business). ValueError if ``seconds`` is negative or not a number; a ban
        longer than MAX_BAN_SECONDS lasts that long. The table holds only bans in force."""
        if not seconds >= 0:  # also NaN
            raise ValueError(f"a ban lasts 0 seconds or more, not {seconds!r}")
        now = time.monotonic()
        self.bans.ban(user, now + min(seconds, MAX_BAN_SECONDS), now)

    # -- one pending connection ----------------------------------------------------------------

    def _readable(self, fd: int) -> None:
        # one readiness is enough: from now on the bytes stay unread, so the fd would stay
        # readable; poll again with a short backoff until the head is complete
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(fd)
        entry = self.pending.get(fd)
        if entry is not None:
            self._peek(fd, entry)

    def _peek(self, fd: int, entry: _Pending) -> None:
        """Look at what the client has sent so far; act once the head is complete. Whatever
        goes wrong here concerns this connection only: it is closed, never the event loop."""
        if self.pending.get(fd) is not entry:
            return  # gone (a retry timer outliving its connection; the fd may be reused)
        try:
            self._look(fd, entry)
        except Exception as exc:
            if self.pending.get(fd) is entry:
                self._finish(fd)
            self._failed(entry.sock, entry.peer, exc, key=entry.key)

    def _look(self, fd: int, entry: _Pending) -> None:
        try:
            data = entry.sock.recv(httphead.MAX_HEAD, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":
            self._drop(fd)  # the client went away
            self.counters["closed_by_client"] += 1
            return
        try:
            head = httphead.parse_head(data) if data else None
        except HeadError as exc:
            self._finish(fd)
            self._count("bad_requests", entry.key)
            reason = _REASONS.get(exc.status, "Bad Request")
            self._refuse(entry.sock, exc.status, reason, exc.reason)
            return
        if head is None:
            delay = PEEK_RETRY[min(entry.attempts, len(PEEK_RETRY) - 1)]
            entry.attempts += 1
            self.loop.call_later(delay, self._peek, fd, entry)
            return
        self._finish(fd)
        self._serve(entry, head)

    def _serve(self, entry: _Pending, head: Head) -> None:
        sock = entry.sock
        if not head.is_upgrade:
            if head.path == "/healthz":
                self.counters["health_checks"] += 1
                self._refuse(sock, 200, "OK", "ok", head)
            else:
                self._count("not_websocket", entry.key)
                self._refuse(sock, 426, "Upgrade Required", "this endpoint speaks WebSocket", head)
            return
        if self.rates is not None:
            wait = self.rates.admit(entry.key, time.monotonic())
            if wait is not None:
                self._count("rate_limited", entry.key)
                body = "too many connections from this address: retry later"
                extra = {"Retry-After": str(int(wait))}
                self._refuse(sock, 429, "Too Many Requests", body, head, extra)
                return
        if not self.origins.allows(head.headers.get("origin")):
            self._count("forbidden_origin", entry.key)
            self._refuse(sock, 403, "Forbidden", "origin not allowed", head)
            return
        try:
            claims = verify(
                self.secret,
                head.token(),
                now=time.time(),
                audience=self.token_audience,
                issuer=self.token_issuer,
                leeway=self.token_leeway,
                max_channels=self.max_channels,
            )
        except TokenError as exc:
            self._count("unauthorized", entry.key)
            self._refuse(sock, 401, "Unauthorized", str(exc), head)
            return
        if self.bans.banned(claims.user, time.monotonic()) is not None:
            self._count("banned", entry.key)
            self._refuse(sock, 403, "Forbidden", "this user is banned for now", head)
            return
        self.counters["routed"] += 1
        try:
            self.place(claims, sock)
        except Exception as exc:
            # the supervisor may already have handed the socket on: close our copy, write nothing
            self._failed(sock, entry.peer, exc, key=entry.key, answer=False)

    def _expire(self, fd: int) -> None:
        entry = self.pending.get(fd)
        if entry is not None:
            entry.timer = None
            self._finish(fd)
            self._count("handshake_timeouts", entry.key)
            self._refuse(entry.sock, 408, "Request Timeout", "handshake deadline passed")

    def _finish(self, fd: int) -> _Pending | None:
        """Take the connection out of the pending set (and give its slot back)."""
        entry = self.pending.pop(fd, None)
        if entry is not None:
            self.limits.release(entry.key)
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)
            if entry.timer is not None:
                entry.timer.cancel()
        return entry

    def _drop(self, fd: int) -> None:
        entry = self._finish(fd)
        if entry is not None:
            entry.sock.close()

    def _failed(
        self,
        sock: socket.socket,
        peer: str,
        exc: Exception,
        key: str | None = None,
        answer: bool = True,
    ) -> None:
        """An unexpected error while handling one connection: answer 500 (unless the socket may
        be someone else's by now) and close it; log it (with its traceback at most once per
        REPORT_INTERVAL; the others are summed up in the refusal report)."""
        self._count("internal_errors", key or peer)
        now = time.monotonic()
        if now - self._error_logged >= REPORT_INTERVAL:
            self._error_logged = now
            log.warning("closed the connection from %s: unexpected %r", peer, exc, exc_info=exc)
        if answer:
            with contextlib.suppress(Exception):
                self._refuse(sock, 500, "Internal Server Error", "internal error")
        with contextlib.suppress(Exception):
            sock.close()

    # -- answers -------------------------------------------------------------------------------

    def refuse_unavailable(self, sock: socket.socket) -> None:
        """A handed-over connection whose shard died before taking it: 503, retry soon."""
        self.counters["unavailable"] += 1
        body = "the user's shard is restarting"
        self._refuse(sock, 503, "Service Unavailable", body, None, RETRY_AFTER)

    def _refuse(
        self,
        sock: socket.socket,
        status: int,
        reason: str,
        body: str,
        head: Head | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Answer with a plain HTTP response and close (consuming the head, so no RST)."""
        try:
            sock.send(httphead.response(status, reason, body, extra))
            # read what was peeked (or what arrived), so that close() sends FIN rather than RST
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sock.recv(head.size if head is not None else httphead.MAX_HEAD)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone: nothing to answer
        finally:
            sock.close()

    # -- counting ------------------------------------------------------------------------------

    def _count(self, reason: str, key: str) -> None:
        """Count a refusal and see that it is reported (one summary line per REPORT_INTERVAL)."""
        self.counters[reason] += 1
        if self.on_refusal is not None:
            self.on_refusal(reason, key)
        self.report.add(reason, key, time.monotonic())
        if self._report_timer is None:
            delay = self.report.due(time.monotonic())
            self._report_timer = self.loop.call_later(delay, self._report)

    def _report(self) -> None:
        self._report_timer = None
        summary = self.report.take(time.monotonic())
        if summary is not None:
            level, line = summary
            log.log(level, "%s", line)


def _peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "(unnamed)"


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
