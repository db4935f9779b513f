"""Allowed origins: which web pages' scripts may open a WebSocket (the ``Origin`` header).

Owns: parsing ``--allowed-origin`` patterns and matching an ``Origin`` header against them, as
pure functions. A pattern is ``scheme://host[:port]``: the scheme and host are compared without
regard to case, a default port (``http`` 80, ``https`` 443, ``ws`` 80, ``wss`` 443) is the same
as no port, and ``*`` stands for exactly one whole DNS label of the host
(``https://*.example.com`` matches ``https://a.example.com``, not ``https://example.com`` nor
``https://a.b.example.com``). Must never raise anything but ValueError from a pattern (a
configuration error: ``ucc serve`` exits 2), and never raise at all from :meth:`Origins.allows`,
whatever the header holds; ``Origin: null`` (a sandboxed frame, a ``file:`` page) is never
allowed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
MAX_ORIGIN = 512  # a longer Origin header is not an origin this server lists
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")

# an origin: (scheme, host labels or an IP literal as one item, port)
Origin = tuple[str, tuple[str, ...], int | None]


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """One allowed origin; ``labels`` holds ``"*"`` where any one label matches."""

    scheme: str
    labels: tuple[str, ...]
    port: int | None  # None: the scheme has no default port and none was given

    @property
    def wildcard(self) -> bool:
        return "*" in self.labels

    def matches(self, origin: Origin) -> bool:
        scheme, labels, port = origin
        if scheme != self.scheme or port != self.port or len(labels) != len(self.labels):
            return False
        return all(p in ("*", label) for p, label in zip(self.labels, labels, strict=True))


def parse_pattern(text: str) -> OriginPattern:
    """The pattern ``text`` (an ``--allowed-origin`` value), or ValueError saying why not."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    try:
        scheme, labels, port = _split(text, wildcards=True)
    except _Invalid as exc:
        raise ValueError(
            f"--allowed-origin {shown!r}: {exc}; expected scheme://host[:port] such as"
            " https://app.example.com or https://*.example.com"
        ) from None
    return OriginPattern(scheme, labels, port)


def parse_origin(text: str) -> Origin | None:
    """An ``Origin`` header's value as an origin, or None if it is not one (``null`` among
    them). Never raises."""
    if len(text) > MAX_ORIGIN or text.strip().lower() == "null":
        return None
    try:
        return _split(text.strip(), wildcards=False)
    except _Invalid:
        return None


class Origins:
    """The allowed origins of a server: ``allows(header)`` says whether an upgrade carrying
    ``Origin: header`` may proceed (None: no Origin header, not a browser: allowed)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        parsed = [parse_pattern(text) for text in patterns]
        self.patterns = tuple(parsed)
        self._exact = {(p.scheme, p.labels, p.port) for p in parsed if not p.wildcard}
        self._wildcards = tuple(p for p in parsed if p.wildcard)

    @property
    def any(self) -> bool:
        """No pattern configured: every origin is allowed."""
        return not self.patterns

    def allows(self, header: str | None) -> bool:
        if header is None or not self.patterns:
            return True
        origin = parse_origin(header)
        if origin is None:
            return False
        if origin in self._exact:
            return True
        return any(p.matches(origin) for p in self._wildcards)


class _Invalid(Exception):
    """Why a text is not an origin (turned into ValueError or None by the callers)."""


def _split(text: str, wildcards: bool) -> Origin:
    if not text.isascii():
        raise _Invalid("non-ASCII characters (write an international domain in its xn-- form)")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or _SCHEME.fullmatch(scheme) is None:
        raise _Invalid("no scheme:// at its start")
    if any(c in rest for c in "/?#@\\") or not rest:
        raise _Invalid("an origin has a host and maybe a port, no path, query or user")
    host, port = _host_port(rest.lower())
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
    if host.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv6 address") from None
        return scheme, (f"[{ip.compressed}]",), port
    labels = tuple(host.split("."))
    for label in labels:
        if label == "*":
            if not wildcards:
                raise _Invalid("'*' in an origin")
        elif _LABEL.fullmatch(label) is None:
            raise _Invalid(f"the host label {label[:64]!r} is not a DNS label")
    if len(host) > 253:
        raise _Invalid("the host is longer than 253 characters")
    if labels[-1] == "*":
        raise _Invalid("'*' may stand for a sub-domain label, not the top-level domain")
    if "*" in labels and all(label.isdigit() for label in labels if label != "*"):
        raise _Invalid("'*' in an IP address")
    return scheme, labels, port


def _host_port(rest: str) -> tuple[str, int | None]:
    if rest.startswith("["):  # an IPv6 literal
        end = rest.find("]")
        if end < 0:
            raise _Invalid("an unclosed '[' in the host")
        host, tail = rest[: end + 1], rest[end + 1 :]
        if tail and not tail.startswith(":"):
            raise _Invalid("something after the IPv6 address that is not a port")
        port_text = tail[1:] if tail else None
    else:
        host, sep, port_text_ = rest.partition(":")
        port_text = port_text_ if sep else None
    if port_text is None:
        return host, None
    if _PORT.fullmatch(port_text) is None or not 0 < int(port_text) <= 65535:
        raise _Invalid(f"the port {port_text[:8]!r} is not a number from 1 to 65535")
    return host, int(port_text)
