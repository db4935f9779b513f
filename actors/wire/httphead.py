"""The HTTP upgrade request head, as far as the acceptor needs it (a pure, bounded parser).

Owns: finding the end of the request head in peeked bytes, the request line, the headers the
acceptor uses, and where the token is (``?token=`` or ``Authorization: Bearer``). Must never
validate the WebSocket handshake itself (the shard's websockets protocol does) and never accept
more than ``limit`` bytes of head.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from actors.wire.errors import PeerError

MAX_HEAD = 8 * 1024


class HeadError(PeerError):
    """The request cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"http_{status}", reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    size: int  # bytes up to and including the blank line

    @property
    def is_upgrade(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket"

    def token(self) -> str:
        """The bearer token from the query string or the Authorization header ('' if none)."""
        values = self.query.get("token")
        if values:
            return values[0]
        scheme, _, credentials = self.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip()
        return ""


def parse_head(data: bytes, limit: int = MAX_HEAD) -> Head | None:
    """The request head in ``data``, None if it is not complete yet, or HeadError."""
    end = data.find(b"\r\n\r\n", 0, limit)
    if end < 0:
        if len(data) >= limit:
            raise HeadError(431, "request header fields too large")
        return None
    try:
        text = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise HeadError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HeadError(400, "malformed request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HeadError(400, "malformed header line")
        headers.setdefault(name.lower(), value.strip())
    try:
        url = urlsplit(target)
    except ValueError:  # e.g. "//[": an unclosed IPv6 bracket
        raise HeadError(400, "malformed request target") from None
    return Head(method, url.path or "/", parse_qs(url.query), headers, end + 4)


def response(status: int, reason: str, body: str, extra: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a plain-text body."""
    payload = body.encode() + b"\n"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
