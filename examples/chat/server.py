"""The demo chat's backend: serves the page, mints tokens, turns posted messages into broadcasts.

A tiny HTTP server (the standard library's ``ThreadingHTTPServer``) in front of a running
``ucc serve``: it talks to ucc's command endpoint with :class:`shards.client.Client` (one
client, behind a lock: it is not thread-safe) and signs connection tokens with the same secret
as ``ucc token`` (``--secret``, ``$UCC_SECRET`` or the secret file ``ucc serve`` created).

Endpoints (every answer but the static files is JSON; errors are ``{"error", "message"}``
with a 4xx or 5xx status):

- ``GET /``, ``/app.js``, ``/ucc.js``: the page, its script and the browser client
  (``clients/js/ucc.js`` of this checkout);
- ``POST /token`` ``{"name": "alice"}``: ``{"token", "user", "name", "url", "channel"}``, a
  token for the chat channel; the user id is derived from the name (case-insensitive), so it
  is the same after a restart of this backend;
- ``POST /post`` ``{"text": "hi"}`` with ``Authorization: Bearer <token>``: broadcasts
  ``{"user", "name", "text", "ts"}`` to the channel; answers its ``offset`` and ``epoch``;
- ``GET /members``: ``[{"user", "name"}, ...]``, the users online in the channel;
- ``GET /history``: the channel's kept messages ``{"epoch", "offset", "messages"}``.

Run it against a running ``ucc serve`` (see README.md): it prints ``chat on
http://HOST:PORT/`` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import unicodedata
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from actors.wire import tokens
from shards.client import Client, UccError
from shards.config import resolve_secret

HERE = Path(__file__).resolve().parent
UCC_JS = HERE.parent.parent / "clients" / "js" / "ucc.js"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
}
MAX_NAME = 32  # characters
MAX_TEXT = 2000  # characters
MAX_BODY = 16 * 1024  # bytes of a request body
MAX_USERS = 10_000  # names remembered (a bound on this process's memory)
HISTORY_LIMIT = 100
MAX_HANDLERS = 64  # requests handled at once (each a thread); beyond, 503 at once
MARK_EVERY = 10.0  # seconds: the channel's join/leave mark is renewed at most this often


class HttpError(Exception):
    """An answer other than 200: ``status`` with ``{"error": code, "message": message}``."""

    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def user_id(name: str) -> int:
    """The user id of ``name``: stable (a hash of its case-folded form), 1 to 2**48 (exact as
    a JavaScript number)."""
    digest = hashlib.sha256(name.casefold().encode()).digest()
    return int.from_bytes(digest[:6], "big") + 1


def clean_name(value: object) -> str:
    """A display name: a string of 1 to MAX_NAME characters, no control characters."""
    if not isinstance(value, str):
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad_name", "'name' must be a string")
    name = unicodedata.normalize("NFC", value).strip()
    if not name:
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad_name", "'name' must not be empty")
    if len(name) > MAX_NAME:
        raise HttpError(
            HTTPStatus.BAD_REQUEST, "bad_name", f"'name' must be at most {MAX_NAME} characters"
        )
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise HttpError(
            HTTPStatus.BAD_REQUEST, "bad_name", "'name' must not hold control characters"
        )
    return name


def clean_text(value: object) -> str:
    """A message: a string of 1 to MAX_TEXT characters; newlines and tabs are the only control
    characters kept."""
    if not isinstance(value, str):
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad_text", "'text' must be a string")
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad_text", "'text' must not be empty")
    if len(text) > MAX_TEXT:
        raise HttpError(
            HTTPStatus.BAD_REQUEST, "bad_text", f"'text' must be at most {MAX_TEXT} characters"
        )
    if any(unicodedata.category(c).startswith("C") and c not in "\n\t" for c in text):
        raise HttpError(
            HTTPStatus.BAD_REQUEST, "bad_text", "'text' must not hold control characters"
        )
    return text


class Chat:
    """The backend's state: the ucc client (behind a lock), the secret, the names."""

    def __init__(
        self, client: Client, secret: str, channel: int, ucc_url: str, ttl: float, ucc_js: Path
    ) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.secret = secret
        self.channel = channel
        self.ucc_url = ucc_url
        self.ttl = ttl
        self.ucc_js = ucc_js
        self.names: dict[int, str] = {}  # user id -> the name it was last given as
        self.names_lock = threading.Lock()
        self.marked = float("-inf")  # when the channel's join/leave mark was last set

    def command(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """A ucc command's reply; HttpError 502 (504 on a timeout) when it fails."""
        try:
            with self.lock:
                return self.client.request(cmd, **fields)
        except TimeoutError as exc:
            raise HttpError(HTTPStatus.GATEWAY_TIMEOUT, "ucc_timeout", str(exc)) from None
        except UccError as exc:
            raise HttpError(HTTPStatus.BAD_GATEWAY, f"ucc_{exc.code}", exc.message) from None

    def name_of(self, user: int) -> str:
        with self.names_lock:
            return self.names.get(user, f"user {user}")

    def token(self, body: dict[str, Any]) -> dict[str, Any]:
        name = clean_name(body.get("name"))
        user = user_id(name)
        with self.names_lock:
            known = self.names.get(user)
            if known is not None and known.casefold() != name.casefold():
                raise HttpError(
                    HTTPStatus.CONFLICT, "name_taken", "this name is taken; pick another one"
                )
            if known is None and len(self.names) >= MAX_USERS:
                raise HttpError(
                    HTTPStatus.SERVICE_UNAVAILABLE, "too_many_users", "too many users for now"
                )
            self.names[user] = name
        # mark the channel again (at most every MARK_EVERY s): a restarted `ucc serve`
        # (without Redis) forgot the mark
        now = time.monotonic()
        if now - self.marked >= MARK_EVERY:
            self.marked = now
            with contextlib.suppress(HttpError):
                self.command("set_channel", channel=self.channel, join_leave=True)
        token = tokens.mint(self.secret, user, [self.channel], ttl=self.ttl)
        return {
            "token": token,
            "user": user,
            "name": name,
            "url": self.ucc_url,
            "channel": self.channel,
        }

    def post(self, authorization: str | None, body: dict[str, Any]) -> dict[str, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(
                HTTPStatus.UNAUTHORIZED, "unauthorized", "send 'Authorization: Bearer <token>'"
            )
        try:
            claims = tokens.verify(self.secret, token.strip(), now=time.time())
        except tokens.TokenError as exc:
            raise HttpError(HTTPStatus.UNAUTHORIZED, "unauthorized", str(exc)) from None
        if self.channel not in claims.channels:
            raise HttpError(
                HTTPStatus.FORBIDDEN, "forbidden", "this token is not for the chat's channel"
            )
        text = clean_text(body.get("text"))
        data = {
            "user": claims.user,
            "name": self.name_of(claims.user),
            "text": text,
            "ts": round(time.time(), 3),
        }
        reply = self.command("broadcast_to_channel", channel=self.channel, data=data)
        return {"ok": True, "offset": reply.get("offset"), "epoch": reply.get("epoch")}

    def members(self) -> list[dict[str, Any]]:
        reply = self.command("get_online_users_in_channel", channel=self.channel)
        users = reply.get("users")
        if not isinstance(users, list):
            raise HttpError(HTTPStatus.BAD_GATEWAY, "ucc_bad_reply", "no 'users' in the reply")
        members = [{"user": user, "name": self.name_of(user)} for user in users]
        return sorted(members, key=lambda m: (str(m["name"]).casefold(), m["user"]))

    def history(self) -> dict[str, Any]:
        try:
            reply = self.command("history", channel=self.channel, limit=HISTORY_LIMIT)
        except HttpError as exc:
            if exc.code == "ucc_history_disabled":
                return {"epoch": "", "offset": 0, "messages": []}
            raise
        return {
            "epoch": reply.get("epoch"),
            "offset": reply.get("offset"),
            "messages": reply.get("messages"),
        }


class Handler(BaseHTTPRequestHandler):
    server_version = "ucc-chat"
    timeout = 10.0  # seconds a client may take to send its request (then it is dropped)
    chat: Chat  # set on the class made by make_handler

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, too long a header): JSON too."""
        self.close_connection = True
        status = HTTPStatus(code)
        self._json(status, {"error": "bad_request", "message": message or status.phrase})

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def do_PUT(self) -> None:
        self._answer(self._not_allowed)

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def _not_allowed(self) -> Any:
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "bad_method", "use GET or POST")

    def _get(self) -> Any:
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            filename, kind = STATIC[path]
            return self._file(HERE / filename, kind)
        if path == "/ucc.js":
            return self._file(self.chat.ucc_js, "text/javascript; charset=utf-8")
        if path == "/members":
            return self.chat.members()
        if path == "/history":
            return self.chat.history()
        if path in ("/token", "/post"):
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "bad_method", f"use POST {path}")
        raise HttpError(HTTPStatus.NOT_FOUND, "not_found", f"no such page: {path[:100]}")

    def _post(self) -> Any:
        path = self.path.split("?", 1)[0]
        if path not in ("/token", "/post"):
            raise HttpError(HTTPStatus.NOT_FOUND, "not_found", f"no such endpoint: {path[:100]}")
        body = self._body()
        if path == "/token":
            return self.chat.token(body)
        return self.chat.post(self.headers.get("Authorization"), body)

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "length_required", "send Content-Length")
        size = int(length)
        if size > MAX_BODY:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_large",
                f"the body must be at most {MAX_BODY} bytes",
            )
        raw = self.rfile.read(size)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad_json", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad_json", "the body must be an object")
        return body

    def _file(self, path: Path, kind: str) -> None:
        try:
            content = path.read_bytes()
        except OSError:
            raise HttpError(
                HTTPStatus.NOT_FOUND, "not_found", f"{path.name} is missing ({path})"
            ) from None
        self._send(HTTPStatus.OK, content, kind)

    def _answer(self, handle: Any) -> None:
        try:
            result = handle()
        except HttpError as exc:
            if exc.status >= HTTPStatus.INTERNAL_SERVER_ERROR:
                sys.stderr.write(f"ucc-chat: {exc.code}: {exc.message}\n")
            self._json(exc.status, {"error": exc.code, "message": exc.message})
            return
        except Exception as exc:  # a bug: answer 500, keep serving
            sys.stderr.write(f"ucc-chat: internal error: {exc!r}\n")
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal", "message": "internal error"}
            )
            return
        if result is not None:
            self._json(HTTPStatus.OK, result)

    def _json(self, status: HTTPStatus, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: HTTPStatus, content: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(content)


BUSY_BODY = b'{"error": "busy", "message": "too many requests at once"}'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(BUSY_BODY), BUSY_BODY)
)


class ChatServer(ThreadingHTTPServer):
    """A thread per request, at most ``MAX_HANDLERS`` at once: beyond, 503 at once (slow
    clients cannot take every thread)."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (http.server's 5 drops bursts of connects)

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_HANDLERS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Server6(ChatServer):
    """The same on an IPv6 address (``--host ::1``)."""

    address_family = socket.AF_INET6


def make_handler(chat: Chat) -> type[Handler]:
    return type("ChatHandler", (Handler,), {"chat": chat})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The ucc demo chat's backend.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument(
        "--ucc-url",
        default=os.environ.get("UCC_URL") or "ws://127.0.0.1:8765",
        help="ucc's WebSocket URL, as the browser reaches it (default: $UCC_URL)",
    )
    parser.add_argument(
        "--command", default=None, help="ucc's command endpoint (default: $UCC_COMMAND)"
    )
    parser.add_argument(
        "--secret", default=None, help="the token secret (default: as `ucc token` finds it)"
    )
    parser.add_argument("--channel", type=int, default=1, help="the chat's channel id")
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="tokens' lifetime (s)")
    parser.add_argument("--ucc-js", type=Path, default=UCC_JS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.channel < 2**63:
        print("ucc-chat: error: --channel must be a positive integer", file=sys.stderr)
        return 2
    if not 0 < args.token_ttl <= 86_400 * 365:
        print("ucc-chat: error: --token-ttl must be from 0 to a year", file=sys.stderr)
        return 2
    try:
        secret, _ = resolve_secret(args.secret, create=False)
    except OSError as exc:
        print(
            f"ucc-chat: error: no token secret ({exc}); run `ucc serve` first (it creates"
            " one), or pass --secret / set UCC_SECRET",
            file=sys.stderr,
        )
        return 2
    if not secret:
        print("ucc-chat: error: the token secret is empty", file=sys.stderr)
        return 2
    try:
        client = Client(args.command, timeout=5.0)
    except ValueError as exc:
        print(f"ucc-chat: error: {exc}", file=sys.stderr)
        return 2
    chat = Chat(client, secret, args.channel, args.ucc_url, args.token_ttl, args.ucc_js)
    try:
        # members get join/leave frames: the page keeps its list of members online from them
        chat.command("set_channel", channel=args.channel, join_leave=True)
    except HttpError as exc:
        print(f"ucc-chat: error: cannot reach ucc: {exc.message}", file=sys.stderr)
        client.close()
        return 1
    try:
        server_class = Server6 if ":" in args.host else ChatServer
        server = server_class((args.host, args.port), make_handler(chat))
    except OSError as exc:
        print(f"ucc-chat: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        client.close()
        return 1
    server.daemon_threads = True
    host, port = str(args.host), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    print(f"chat on http://{shown}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
