"""The public ZeroMQ command protocol: decoding requests and encoding replies (pure functions).

Owns: the table of commands and their fields (required, and optional ones with their
defaults), validation, error codes. See docs/protocol.md. A broadcast to users carries
``"critical"`` and ``"ttl"`` in its args only when it is critical (``ttl`` then defaults to
:data:`CRITICAL_TTL`); a ``ttl`` without ``"critical": true`` is checked, then dropped.
Must never do I/O or touch router state: it turns bytes into a :class:`Command` or a
:class:`CommandError`, and results into reply bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from actors.ids import MAX_ID, parse_id
from actors.wire import frames
from actors.wire.errors import PeerError

MAX_IDS_PER_COMMAND = 100_000
MAX_SECONDS = 1e9  # about 31 years: longer is a mistake, and would overflow a float's use
MAX_HISTORY_LIMIT = 1_000  # messages in one ``history`` reply, at most
CRITICAL_TTL = 86_400.0  # seconds a critical message is kept when its command names no ttl


class Field(Enum):
    ID = "a positive integer"
    IDS = "a list of positive integers"
    DATA = "any JSON value"
    SECONDS = f"a number of seconds from 0 to {MAX_SECONDS:.0e}"
    TTL = f"a number of seconds above 0, at most {MAX_SECONDS:.0e}"
    OFFSET = f"an integer from 0 to {MAX_ID}"
    LIMIT = f"an integer from 1 to {MAX_HISTORY_LIMIT}"
    FLAG = "true or false"


COMMANDS: dict[str, dict[str, Field]] = {
    "broadcast_to_channel": {"channel": Field.ID, "data": Field.DATA},
    "broadcast_to_user": {"user": Field.ID, "data": Field.DATA},
    "broadcast_to_users": {"users": Field.IDS, "data": Field.DATA},
    "get_online_users_in_channel": {"channel": Field.ID},
    "get_online_users": {},
    "is_user_online": {"user": Field.ID},
    "are_users_online": {"users": Field.IDS},
    "subscribe": {"user": Field.ID, "channel": Field.ID},
    "unsubscribe": {"user": Field.ID, "channel": Field.ID},
    "disconnect": {"user": Field.ID},
    "status": {},
    "router_stats": {},
    "history": {"channel": Field.ID},
    "snapshot": {},
    "get_user_connections": {"user": Field.ID},
    "set_channel": {"channel": Field.ID, "join_leave": Field.FLAG},
}
# fields a command may carry, validated when present
_CRITICAL = {"critical": Field.FLAG, "ttl": Field.TTL}
OPTIONAL: dict[str, dict[str, Field]] = {
    "disconnect": {"ban": Field.SECONDS},
    "history": {"since": Field.OFFSET, "limit": Field.LIMIT},
    "broadcast_to_user": _CRITICAL,
    "broadcast_to_users": _CRITICAL,
}
# the values of optional fields a command did not carry (in its args all the same)
DEFAULTS: dict[str, dict[str, Any]] = {
    "history": {"since": 0, "limit": 100},
}


# the members the decoder compares with, as plain names: reading an Enum member off its class
# costs 73-120 ns in Python 3.11 (a plain global ~6-12), several times per command
_ID, _IDS, _DATA_FIELD = Field.ID, Field.IDS, Field.DATA


class CommandError(PeerError):
    """A request the router refuses; ``code`` is one of the documented error codes."""


# Not frozen (read-only by use): a frozen dataclass's __init__ sets each field through
# object.__setattr__, 1.9 µs against 0.5 by timeit on this box, a fifth of a decode's ~7 µs.
@dataclass(slots=True)
class Command:
    name: str
    id: Any
    args: dict[str, Any]
    data_json: bytes = b"null"  # the ``data`` field, re-encoded once as compact JSON


def decode(raw: bytes, max_size: int) -> Command:
    """Parse and validate one request. Raises CommandError with the reply's code and message."""
    if len(raw) > max_size:
        raise CommandError("too_large", f"command of {len(raw)} bytes exceeds {max_size}")
    exact = not has_long_number(raw)  # every integer in it fits in 64 bits
    try:
        body = orjson.loads(raw) if exact else _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CommandError("bad_json", f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CommandError("bad_json", "a command must be a JSON object")
    name = body.get("cmd")
    if not isinstance(name, str):
        raise CommandError("bad_request", "field 'cmd' must be a string")
    spec = COMMANDS.get(name)
    if spec is None:
        raise CommandError("unknown_command", f"unknown command {name[:64]!r}")
    args: dict[str, Any] = {}
    data_json = b"null"
    for key, kind in spec.items():
        if key not in body:
            raise CommandError("bad_request", f"missing field {key!r}")
        value = body[key]
        if kind is _ID:
            if parse_id(value) is None:
                raise CommandError("bad_request", f"field {key!r} must be {kind.value}")
        elif kind is _DATA_FIELD:
            data_json = _dumps(value) if exact else _encode_data(value)
            continue
        elif kind is _IDS:
            if not isinstance(value, list) or any(parse_id(v) is None for v in value):
                raise CommandError("bad_request", f"field {key!r} must be {kind.value}")
            if len(value) > MAX_IDS_PER_COMMAND:
                raise CommandError(
                    "bad_request", f"field {key!r} holds more than {MAX_IDS_PER_COMMAND} ids"
                )
            value = list(dict.fromkeys(value))
        else:  # FLAG (``_optional`` checks every other kind)
            value = _optional(key, kind, value)
        args[key] = value
    optional = OPTIONAL.get(name)
    if optional is not None:
        for key, kind in optional.items():
            if key in body:
                args[key] = _optional(key, kind, body[key])
        for key, value in DEFAULTS.get(name, {}).items():
            args.setdefault(key, value)
        if optional is _CRITICAL:
            if args.pop("critical", False):
                args["critical"] = True
                args.setdefault("ttl", CRITICAL_TTL)
            else:
                args.pop("ttl", None)
    return Command(name, body.get("id"), args, data_json)


def _optional(key: str, kind: Field, value: Any) -> Any:
    """``value`` if it is a valid ``kind``; CommandError ``bad_request`` if not."""
    if kind is Field.FLAG:
        valid = isinstance(value, bool)
    elif kind is Field.OFFSET or kind is Field.LIMIT:
        top = MAX_ID if kind is Field.OFFSET else MAX_HISTORY_LIMIT
        valid = type(value) is int and (0 if kind is Field.OFFSET else 1) <= value <= top
    else:  # SECONDS, TTL: numbers (NaN fails the range check too)
        valid = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and 0 <= value <= MAX_SECONDS
            and (kind is Field.SECONDS or value > 0)
        )
    if not valid:
        raise CommandError("bad_request", f"field {key!r} must be {kind.value}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(
        f"{name} is not JSON"
    )  # Python's json accepts NaN and Infinity; browsers do not


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


# The codec: orjson (a compiled one: a command's decode, validation and the data's re-encoding
# take ~2.5 µs instead of ~6.9 µs). It reads an integer outside -2**63 .. 2**64 - 1 as a float,
# which would change a backend's data, so a command with 20 digits in a row, or a minus and 19
# (a long number, or merely digits in a string), goes through Python's json module instead,
# whose integers are exact. Both refuse NaN, Infinity and numbers beyond a double's range;
# orjson also refuses a lone surrogate in a string (the json module reads it; its data is then
# refused when encoded).
# Found by mapping every digit to 0 and looking for 19 zeros in a row (any such number has
# them), and only then for 20 zeros, or a minus and 19: passes in C over the command. (A
# regular expression did the same: ~32,000 instructions for a command of ~110 bytes, a fifth
# of the router's work per broadcast. By callgrind, with a call's overhead, for a ~160-byte
# broadcast_to_user: ~7,200 with both searches always, ~4,800 with the first search alone.)
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN = b"0" * 19  # in both: most commands are cleared by this one search
_LONG_POSITIVE = b"0" * 20
_LONG_NEGATIVE = b"-" + b"0" * 19


def has_long_number(raw: bytes) -> bool:
    """Whether ``raw`` holds 20 digits in a row, or a minus and 19: an integer that may not
    fit in 64 bits (or merely digits in a string). Such a command is read by Python's json
    module, whose integers are exact, instead of orjson."""
    digits = raw.translate(_DIGITS_TO_ZERO)
    if _NINETEEN not in digits:
        return False
    return _LONG_POSITIVE in digits or _LONG_NEGATIVE in digits


# built once: json.loads with options builds a new decoder on every call
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_REPLY_OPTIONS = orjson.OPT_NON_STR_KEYS


def _dumps(value: Any) -> bytes:
    """orjson's encoding, or the json module's for data nested deeper than orjson encodes
    (254 levels: it reads deeper than it writes)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _encode_data(value)


def _encode_data(value: Any) -> bytes:
    try:
        return frames.dumps(value)
    except UnicodeEncodeError:  # a lone surrogate: not representable in UTF-8
        raise CommandError("bad_json", "not valid JSON: a lone surrogate in a string") from None


def _encode_reply(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, option=_REPLY_OPTIONS)
    except TypeError:  # an integer beyond 64 bits (an id read by the json module)
        return json.dumps(body, separators=(",", ":")).encode()


def request_id(raw: bytes) -> Any:
    """Best effort: the ``id`` of a request that failed to decode, so its error can carry it."""
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return body.get("id") if isinstance(body, dict) else None


def reply(request: Any, result: dict[str, Any]) -> bytes:
    return _encode_reply({"id": request, "ok": True, **result})


def error_reply(request: Any, code: str, message: str) -> bytes:
    body = {"id": request, "ok": False, "error": {"code": code, "message": message}}
    return _encode_reply(body)
