"""Connection tokens: HS256 JWTs carrying the user id and the channels a connection may join.

Owns: minting and checking tokens. Claims: ``sub`` (decimal digits, a positive user id),
``exp`` (required), optional ``channels`` (list of positive integers). Must never accept any
algorithm other than HS256, nor a token without ``exp``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from actors.ids import MAX_ID, ChannelId, UserId, parse_id

ALGORITHM = "HS256"
MAX_TOKEN_CHANNELS = 1024


class TokenError(Exception):
    """The token is missing, malformed, badly signed, expired or carries bad claims."""


@dataclass(frozen=True, slots=True)
class Claims:
    user: UserId
    channels: tuple[ChannelId, ...]
    exp: float


def mint(secret: str, user: int, channels: list[int] | None = None, ttl: float = 3600.0) -> str:
    """A signed token for ``user`` valid for ``ttl`` seconds."""
    if parse_id(user) is None:
        raise ValueError(f"user id must be a positive integer below 2**63, not {user!r}")
    payload: dict[str, object] = {"sub": str(user), "exp": int(time.time() + ttl)}
    if channels is not None:
        for channel in channels:
            if parse_id(channel) is None:
                raise ValueError(f"channel ids must be positive integers, not {channel!r}")
        payload["channels"] = list(channels)
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str, now: float | None = None) -> Claims:
    """The claims of a valid token, or TokenError saying what is wrong."""
    if not token:
        raise TokenError("missing token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError(f"malformed token: {exc}") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"algorithm must be {ALGORITHM}, not {header.get('alg')!r}")
    options = {"require": ["exp", "sub"], "verify_sub": False}
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options=options,  # type: ignore[arg-type]
            leeway=0,
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"invalid token: {exc}") from None
    exp = payload["exp"]
    if type(exp) not in (int, float):
        raise TokenError("claim 'exp' must be a number")
    if now is not None and exp <= now:
        raise TokenError("token expired")
    sub = payload["sub"]
    if not isinstance(sub, str) or not sub.isascii() or not sub.isdigit():
        raise TokenError("claim 'sub' must be a string of decimal digits")
    user = int(sub)
    if not 0 < user <= MAX_ID:
        raise TokenError("claim 'sub' must be a positive user id below 2**63")
    raw_channels = payload.get("channels", [])
    if not isinstance(raw_channels, list) or len(raw_channels) > MAX_TOKEN_CHANNELS:
        raise TokenError(f"claim 'channels' must be a list of at most {MAX_TOKEN_CHANNELS} ids")
    channels: list[ChannelId] = []
    for value in raw_channels:
        channel = parse_id(value)
        if channel is None:
            raise TokenError("claim 'channels' must hold positive integer channel ids")
        if channel not in channels:
            channels.append(ChannelId(channel))
    return Claims(UserId(user), tuple(channels), float(exp))
