"""Connection tokens: HS256 JWTs carrying the user id and the channels a connection may join.

Owns: minting and checking tokens. Claims: ``sub`` (decimal digits, a positive user id),
``exp`` (required), optional ``channels`` (list of positive integers), and ``aud`` / ``iss``,
checked only when the server is configured with an audience / issuer (``--token-audience``,
``--token-issuer``). Must never accept any algorithm other than HS256, nor a token without
``exp``, and never raise anything but :class:`TokenError` from :func:`verify`, whatever the
(signed or unsigned) token holds.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import jwt

from actors.ids import MAX_ID, ChannelId, UserId, parse_id
from actors.wire.errors import PeerError

ALGORITHM = "HS256"
MAX_TOKEN_CHANNELS = 1024
MAX_EXP = 253_402_300_799  # 9999-12-31T23:59:59Z: a later (or non-finite) exp is refused
MAX_ID_DIGITS = len(str(MAX_ID))  # 19: a longer sub (leading zeros aside) is out of range
# what a library parsing attacker-chosen JSON may raise besides its own errors (a number with
# more than 4,300 digits, nesting deeper than the recursion limit, a float overflow)
_DECODE_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError)


class TokenError(PeerError):
    """The token is missing, malformed, badly signed, expired or carries bad claims: 401, with
    ``str(error)`` (the message alone) as the body."""

    def __init__(self, message: str) -> None:
        super().__init__("unauthorized", message)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class Claims:
    user: UserId
    channels: tuple[ChannelId, ...]
    exp: float


def mint(
    secret: str,
    user: int,
    channels: list[int] | None = None,
    ttl: float = 3600.0,
    *,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A signed token for ``user`` valid for ``ttl`` seconds (with ``aud`` / ``iss`` if given)."""
    if parse_id(user) is None:
        raise ValueError(f"user id must be a positive integer below 2**63, not {user!r}")
    payload: dict[str, object] = {"sub": str(user), "exp": int(time.time() + ttl)}
    if channels is not None:
        for channel in channels:
            if parse_id(channel) is None:
                raise ValueError(f"channel ids must be positive integers, not {channel!r}")
        payload["channels"] = list(channels)
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify(
    secret: str,
    token: str,
    now: float | None = None,
    *,
    audience: str | None = None,
    issuer: str | None = None,
    leeway: float = 0.0,
    max_channels: int = MAX_TOKEN_CHANNELS,
) -> Claims:
    """The claims of a valid token, or TokenError saying what is wrong (never anything else).

    ``audience`` / ``issuer``: when given, the token's ``aud`` must be that string (or a list
    of strings holding it, as RFC 7519 allows) and its ``iss`` exactly that string; when not,
    those claims are not looked at. ``leeway``: seconds of clock skew allowed on ``exp`` (and
    ``nbf``/``iat``). ``max_channels``: a token listing more channels is refused.
    """
    if not token:
        raise TokenError("missing token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError(f"malformed token: {_reason(exc)}") from None
    except _DECODE_ERRORS as exc:
        raise TokenError(f"malformed token: {type(exc).__name__}") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"algorithm must be {ALGORITHM}, not {_shown(header.get('alg'))}")
    # aud and iss are checked below, with types an attacker cannot surprise
    options = {"require": ["exp", "sub"], "verify_sub": False, "verify_aud": False}
    options["verify_iss"] = False
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options=options,  # type: ignore[arg-type]
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {_reason(exc)}") from None
    except _DECODE_ERRORS as exc:
        raise TokenError(f"invalid token: {type(exc).__name__}") from None
    if not isinstance(payload, dict):  # PyJWT insists on an object; say so if it ever does not
        raise TokenError("invalid token: its payload is not a JSON object")
    exp = _exp(payload["exp"])
    if now is not None and exp + leeway <= now:
        raise TokenError("token expired")
    if audience is not None:
        _audience(payload.get("aud"), audience)
    if issuer is not None and _plain(payload.get("iss")) != issuer:
        raise TokenError(f"claim 'iss' must be {issuer!r}")
    user = _user(payload["sub"])
    channels = _channels(payload.get("channels", []), max_channels)
    return Claims(UserId(user), channels, exp)


def _plain(value: object) -> str | None:
    """``value`` if it is a str (a subclass or any other type is not compared)."""
    return value if type(value) is str else None


def _audience(aud: object, audience: str) -> None:
    """``aud`` names ``audience``: the string itself, or a list of strings holding it."""
    if _plain(aud) == audience:
        return
    if type(aud) is list and len(aud) <= 64 and any(_plain(item) == audience for item in aud):
        return
    raise TokenError(f"claim 'aud' must be {audience!r}")


def _exp(value: object) -> float:
    """``exp`` as a float: a finite number of seconds no later than the year 9999."""
    if type(value) not in (int, float):
        raise TokenError("claim 'exp' must be a number")
    assert isinstance(value, int | float)
    # compare before converting: float() of an int beyond 1.8e308 raises OverflowError
    if not (isinstance(value, int) or math.isfinite(value)) or value > MAX_EXP:
        raise TokenError(f"claim 'exp' must be a finite time no later than {MAX_EXP}")
    return float(value)


def _user(sub: object) -> int:
    """``sub`` as a user id: ASCII decimal digits (leading zeros allowed), 1 to 2**63 - 1."""
    if not isinstance(sub, str) or not sub.isascii() or not sub.isdigit():
        raise TokenError("claim 'sub' must be a string of decimal digits")
    # bound the length first: int() of more than 4,300 digits raises ValueError, and a long
    # string of digits costs quadratic time to convert
    digits = sub.lstrip("0")
    user = int(digits) if 0 < len(digits) <= MAX_ID_DIGITS else 0
    if not 0 < user <= MAX_ID:
        raise TokenError("claim 'sub' must be a positive user id below 2**63")
    return user


def _channels(raw: object, limit: int) -> tuple[ChannelId, ...]:
    """``channels``: a list of at most ``limit`` ids, duplicates dropped in order."""
    if not isinstance(raw, list):
        raise TokenError(f"claim 'channels' must be a list of at most {limit} ids")
    if len(raw) > limit:
        raise TokenError(f"claim 'channels' lists {len(raw)} channels; at most {limit} allowed")
    channels: dict[ChannelId, None] = {}
    for value in raw:
        channel = parse_id(value)
        if channel is None:
            raise TokenError("claim 'channels' must hold positive integer channel ids")
        channels[ChannelId(channel)] = None
    return tuple(channels)


def _reason(exc: jwt.PyJWTError) -> str:
    """PyJWT's reason, short and free of Python advice (it quotes the JSON decoder's errors)."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return "its JSON is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return f"a number in it has more than {sys.get_int_max_str_digits()} digits"
    text = str(exc)
    return text if len(text) <= 100 else text[:97] + "..."


def _shown(value: object) -> str:
    """A short repr of an attacker-chosen value for an error message."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "(a huge int)"
    return text if len(text) <= 40 else text[:37] + "..."
