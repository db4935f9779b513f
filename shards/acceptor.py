"""The acceptor: accept a TCP connection, peek at its upgrade request, check the token, and hand
the socket to the user's shard.

Owns: the listening socket and connections not yet handed over. It reads the request head with
``MSG_PEEK`` (bounded: at most 8 KiB, and a deadline), so the bytes stay in the kernel for the
shard's WebSocket handshake. Must never proxy bytes, and never let a slow or hostile client hold
anything beyond its own small, bounded entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors import httphead
from actors.httphead import Head, HeadError
from actors.tokens import Claims, TokenError, verify

log = logging.getLogger("ucc.acceptor")

MAX_PENDING = 10_000
ACCEPT_PAUSE = 0.1
PEEK_RETRY = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # a slow client costs ever fewer peeks

# route(claims, socket): the router takes the socket over (hands it to a shard, holds it for a
# restarting one, or answers 503 itself)
Router = Callable[[Claims, socket.socket], None]


@dataclass(slots=True)
class _Pending:
    sock: socket.socket
    deadline: float
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None


class Acceptor:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        secret: str,
        route: Router,
        handshake_timeout: float,
    ) -> None:
        self.loop = loop
        self.listener = listener
        self.secret = secret
        self.route = route
        self.handshake_timeout = handshake_timeout
        self.pending: dict[int, _Pending] = {}
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and drop every connection not yet handed over."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for fd in list(self.pending):
            self._drop(fd)

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off, do not crash or spin
                log.warning("accept failed: %s; pausing accepts for %.1f s", exc, ACCEPT_PAUSE)
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.pending) >= MAX_PENDING:
                self._refuse(sock, 503, "Service Unavailable", "too many pending handshakes")
                continue
            entry = _Pending(sock, time.monotonic() + self.handshake_timeout)
            fd = sock.fileno()
            self.pending[fd] = entry
            entry.timer = self.loop.call_later(self.handshake_timeout, self._expire, fd)
            self.loop.add_reader(fd, self._readable, fd)

    def _resume(self) -> None:
        if self.listener.fileno() >= 0:  # not closed meanwhile
            self.loop.add_reader(self.listener.fileno(), self._accept)

    def _readable(self, fd: int) -> None:
        # one readiness is enough: from now on the bytes stay unread, so the fd would stay
        # readable; poll again with a short backoff until the head is complete
        self.loop.remove_reader(fd)
        entry = self.pending.get(fd)
        if entry is not None:
            self._peek(fd, entry)

    def _peek(self, fd: int, entry: _Pending) -> None:
        if self.pending.get(fd) is not entry:
            return  # gone (a retry timer outliving its connection; the fd may be reused)
        try:
            data = entry.sock.recv(httphead.MAX_HEAD, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        except OSError:
            self._drop(fd)
            return
        if data == b"":
            self._drop(fd)  # the client went away
            return
        try:
            head = httphead.parse_head(data) if data else None
        except HeadError as exc:
            self._finish(fd)
            reason = _REASONS.get(exc.status, "Bad Request")
            self._refuse(entry.sock, exc.status, reason, exc.reason)
            return
        if head is None:
            delay = PEEK_RETRY[min(entry.attempts, len(PEEK_RETRY) - 1)]
            entry.attempts += 1
            self.loop.call_later(delay, self._peek, fd, entry)
            return
        self._finish(fd)
        self._serve(entry.sock, head)

    def _serve(self, sock: socket.socket, head: Head) -> None:
        if not head.is_upgrade:
            if head.path == "/healthz":
                self._refuse(sock, 200, "OK", "ok", head)
            else:
                self._refuse(sock, 426, "Upgrade Required", "this endpoint speaks WebSocket", head)
            return
        try:
            claims = verify(self.secret, head.token(), now=time.time())
        except TokenError as exc:
            self._refuse(sock, 401, "Unauthorized", str(exc), head)
            return
        self.route(claims, sock)

    def _expire(self, fd: int) -> None:
        entry = self.pending.get(fd)
        if entry is not None:
            entry.timer = None
            self._finish(fd)
            self._refuse(entry.sock, 408, "Request Timeout", "handshake deadline passed")

    def _finish(self, fd: int) -> _Pending | None:
        entry = self.pending.pop(fd, None)
        if entry is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)
            if entry.timer is not None:
                entry.timer.cancel()
        return entry

    def _drop(self, fd: int) -> None:
        entry = self._finish(fd)
        if entry is not None:
            entry.sock.close()

    def refuse_unavailable(self, sock: socket.socket) -> None:
        """A handed-over connection whose shard died before taking it: 503, retry soon."""
        body = "the user's shard is restarting"
        self._refuse(sock, 503, "Service Unavailable", body, None, {"Retry-After": "1"})

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
        with contextlib.suppress(OSError):
            sock.send(httphead.response(status, reason, body, extra))
            # read what was peeked, so that close() sends FIN rather than RST
            sock.recv(head.size if head is not None else httphead.MAX_HEAD)
            sock.shutdown(socket.SHUT_WR)
        sock.close()


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
