"""Frames a WebSocket client sends (subscribe, unsubscribe, ping, refresh), decoded by a pure
function.

Owns: validation of client frames and their error codes (docs/protocol.md). Must never do I/O
or decide policy (whether the token allows a channel is the connection's business).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from actors.ids import ChannelId, parse_id
from actors.wire.errors import PeerError

KINDS = ("subscribe", "unsubscribe", "ping", "refresh")
MAX_TOKEN = 16 * 1024  # characters: a longer ``refresh`` token is refused as a bad frame


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


ClientFrame = Ping | Subscribe | Unsubscribe | Refresh


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
    channel = parse_id(body.get("channel"))
    if channel is None:
        raise ClientFrameError("bad_frame", "field 'channel' must be a positive integer")
    return Subscribe(ChannelId(channel)) if kind == "subscribe" else Unsubscribe(ChannelId(channel))
