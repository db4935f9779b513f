"""Frames a WebSocket client sends (subscribe, unsubscribe, ping, refresh, resume, ack), decoded
by a pure function.

Owns: validation of client frames and their error codes (docs/protocol.md). Must never do I/O
or decide policy (whether the token allows a channel is the connection's business).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from actors.ids import MAX_ID, ChannelId, parse_id
from actors.wire.errors import PeerError

KINDS = ("subscribe", "unsubscribe", "ping", "refresh", "resume", "ack")
MAX_TOKEN = 16 * 1024  # characters: a longer ``refresh`` token is refused as a bad frame
MAX_EPOCH = 64  # characters of a ``resume``'s epoch (the server's are 12)
MAX_ACK_ID = 128  # characters of an ``ack``'s id


class ClientFrameError(PeerError):
    """A client frame the connection answers with an error frame."""


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type":"ping"}``: answered ``{"type":"pong"}``."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: ChannelId


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: ChannelId


@dataclass(frozen=True, slots=True)
class Refresh:
    """A new token for the connection (a non-empty string, not checked here)."""

    token: str


@dataclass(frozen=True, slots=True)
class Resume:
    """``{"type":"resume","channel":C,"offset":N,"epoch":"E"}``: send ``channel``'s messages
    after ``offset`` of ``epoch`` (the last position the client saw; ``offset`` 0 and ``epoch``
    "" when it saw none: a missing ``epoch`` is ""), then live ones."""

    channel: ChannelId
    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Ack:
    """``{"type":"ack","id":"…"}``: the client has the critical message ``id``."""

    id: str


ClientFrame = Ping | Subscribe | Unsubscribe | Refresh | Resume | Ack


def parse_client_frame(payload: bytes) -> ClientFrame:
    """The client frame in ``payload``, or ClientFrameError."""
    try:
        text = payload.decode("utf-8")  # UTF-8 only (json.loads would sniff UTF-16)
    except UnicodeDecodeError:
        # not even a text frame (RFC 6455 §8.1): the connection closes it with 1007
        raise ClientFrameError("invalid_utf8", "text frames must be valid UTF-8") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise ClientFrameError("bad_json", "frames must be JSON") from None
    if not isinstance(body, dict):
        raise ClientFrameError("bad_frame", "a frame must be a JSON object")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise ClientFrameError("bad_frame", "field 'type' must be a string")
    if kind not in KINDS:
        raise ClientFrameError("unknown_type", f"unknown frame type {kind[:64]!r}")
    if kind == "ping":
        return Ping()
    if kind == "refresh":
        token = body.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN:
            raise ClientFrameError(
                "bad_frame", f"field 'token' must be a non-empty string of at most {MAX_TOKEN}"
            )
        return Refresh(token)
    if kind == "ack":
        return _ack(body)
    channel = parse_id(body.get("channel"))
    if channel is None:
        raise ClientFrameError("bad_frame", "field 'channel' must be a positive integer")
    if kind == "resume":
        return _resume(ChannelId(channel), body)
    return Subscribe(ChannelId(channel)) if kind == "subscribe" else Unsubscribe(ChannelId(channel))


def _resume(channel: ChannelId, body: dict[str, object]) -> Resume:
    offset = body.get("offset")
    if type(offset) is not int or not 0 <= offset <= MAX_ID:  # neither a bool nor a float
        raise ClientFrameError("bad_frame", f"field 'offset' must be an integer from 0 to {MAX_ID}")
    epoch = body.get("epoch", "")
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH:
        raise ClientFrameError(
            "bad_frame", f"field 'epoch' must be a string of at most {MAX_EPOCH} characters"
        )
    return Resume(channel, offset, epoch)


def _ack(body: dict[str, object]) -> Ack:
    id = body.get("id")
    if not isinstance(id, str) or not 0 < len(id) <= MAX_ACK_ID:
        raise ClientFrameError(
            "bad_frame", f"field 'id' must be a non-empty string of at most {MAX_ACK_ID}"
        )
    return Ack(id)
