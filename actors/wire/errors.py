"""What the wire codecs raise when the peer sent something we refuse.

h11's split: a :class:`PeerError` means "the peer sent garbage" and becomes a clear answer at
the boundary (an error frame, an error reply, an HTTP status, a close code); it never means "we
misused the API". Our own mistakes raise ordinary exceptions (``ValueError``, ``TypeError``,
``AssertionError``...), which are bugs: the code that meets one while serving a single peer
closes or answers that peer (counted, logged with a traceback); anywhere else they crash the
process, and supervision restarts it.

The tree (websockets' ``exceptions.py`` is the model)::

    PeerError                  code + message; what the peer is told
    ├── ClientFrameError       a WebSocket client's frame (clientwire): an error frame, or
    │                          close 1007 for invalid UTF-8
    ├── CommandError           a backend's command (commands): ``{"ok": false, "error": ...}``,
    │                          ``overloaded`` included
    ├── HeadError              an upgrade request's head (httphead): its HTTP ``status``
    └── TokenError             a connection token (tokens): HTTP 401

Owns: :class:`PeerError`. Must never be raised for our own mistakes. (Messages between hosts,
in :mod:`actors.wire.cluster`, are not answered: a malformed one is counted and dropped.)
"""

from __future__ import annotations


class PeerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
