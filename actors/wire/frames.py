"""WebSocket frames the server writes, encoded once and written to many connections.

Owns: the bytes of server-to-client text frames (RFC 6455 §5.2: FIN, opcode, no mask — a server
never masks, so one encoded frame is valid for every recipient) and the JSON payloads of the
server's frames. Must never parse client frames (the websockets Sans-I/O protocol does that).
"""

from __future__ import annotations

import json
import struct

_TEXT = 0x81  # FIN + opcode 1 (text)
PING = b"\x89\x00"  # FIN + opcode 9, empty payload


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked text frame carrying ``payload`` (already UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", _TEXT, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", _TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _TEXT, 127, n)
    return header + payload


def is_text_frame(frame: bytes, limit: int) -> bool:
    """Whether ``frame`` is exactly one complete, unmasked, final text frame of at most
    ``limit`` payload bytes: what a server may write to a client as it is."""
    if len(frame) < 2 or frame[0] != _TEXT or frame[1] & 0x80:
        return False
    n, header = frame[1] & 0x7F, 2
    if n == 126:
        if len(frame) < 4:
            return False
        n, header = struct.unpack_from("!H", frame, 2)[0], 4
    elif n == 127:
        if len(frame) < 10:
            return False
        n, header = struct.unpack_from("!Q", frame, 2)[0], 10
    return n <= limit and len(frame) == header + n


# built once: json.dumps with options builds a new encoder on every call (a broadcast's frame
# quotes its epoch: that construction was ~7 % of the router's instructions per broadcast)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: object) -> bytes:
    """Compact JSON, as the server writes it everywhere (raises ``UnicodeEncodeError`` for a
    lone surrogate in a string: not representable in UTF-8)."""
    return _ENCODER.encode(value).encode()


def channel_message(channel: int, data_json: bytes, offset: int = 0, epoch: str = "") -> bytes:
    """The frame for a broadcast to ``channel``; ``data_json`` is the data, already JSON.

    With an ``offset`` (1 or more: the channel keeps a history), the frame carries the
    channel's position, ``"offset"`` and ``"epoch"``; without (0), it is the frame of a server
    with no history, byte for byte."""
    if offset <= 0:
        return text_frame(b'{"type":"message","channel":%d,"data":%b}' % (channel, data_json))
    return text_frame(
        b'{"type":"message","channel":%d,"offset":%d,"epoch":%b,"data":%b}'
        % (channel, offset, dumps(epoch), data_json)
    )


def direct_message(data_json: bytes) -> bytes:
    """The frame for a broadcast to a user (no ``channel`` key)."""
    return text_frame(b'{"type":"message","data":%b}' % data_json)


def channel_message_size(channel: int, data_size: int, offset: int = 0, epoch: str = "") -> int:
    """The length of :func:`channel_message`'s frame for data of ``data_size`` bytes, without
    encoding it (a broadcast's size is checked before the frame exists)."""
    payload = len(b'{"type":"message","channel":%d,"data":}' % channel) + data_size
    if offset > 0:
        payload += len(b',"offset":%d,"epoch":' % offset) + len(dumps(epoch))
    return payload + (2 if payload < 126 else 4 if payload < 1 << 16 else 10)


def critical_message(id: str, data_json: bytes) -> bytes:
    """The frame of a critical message to a user: a direct message with the ``id`` the client
    acknowledges (``{"type":"ack","id":…}``)."""
    return text_frame(b'{"type":"message","id":%b,"data":%b}' % (dumps(id), data_json))


def resumed(channel: int, offset: int, epoch: str, recovered: bool) -> bytes:
    """The answer to a client's ``resume``, after the messages it recovered: the channel's
    latest ``offset`` and ``epoch``, and whether nothing was missed (``recovered``)."""
    return text_frame(
        dumps(
            {
                "type": "resumed",
                "channel": channel,
                "offset": offset,
                "epoch": epoch,
                "recovered": recovered,
            }
        )
    )


def hello(user: int, channels: list[int], heartbeat: float) -> bytes:
    return text_frame(
        dumps({"type": "hello", "user": user, "channels": channels, "heartbeat": heartbeat})
    )


def refreshed(exp: float) -> bytes:
    """The answer to a client's accepted ``refresh``: the connection's new expiry."""
    shown: float = int(exp) if exp == int(exp) else exp  # a JWT's exp is usually whole seconds
    return text_frame(dumps({"type": "refreshed", "exp": shown}))


def join_leave(joined: bool, channel: int, user: int) -> bytes:
    """A member of ``channel`` is told that ``user`` joined it (first connection subscribed) or
    left it (last one gone): ``{"type":"join"|"leave","channel":C,"user":U}``."""
    kind = b"join" if joined else b"leave"
    return text_frame(b'{"type":"%b","channel":%d,"user":%d}' % (kind, channel, user))


def presence_changed(channel: int, joins: int, leaves: int) -> bytes:
    """Too many joins and leaves of ``channel`` at once to list (a mass reconnect): members are
    told how many, and refetch the channel's presence if they keep it."""
    return text_frame(
        b'{"type":"presence_changed","channel":%d,"joins":%d,"leaves":%d}'
        % (channel, joins, leaves)
    )


def error(code: str, message: str) -> bytes:
    return text_frame(dumps({"type": "error", "code": code, "message": message}))


PONG = text_frame(b'{"type":"pong"}')
DRAIN = text_frame(b'{"type":"drain","reason":"server shutting down: reconnect"}')
