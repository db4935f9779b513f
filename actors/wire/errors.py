"""The one error the wire codecs raise: the peer sent something we refuse (h11's split: this is
"the peer sent garbage", never "we misused the API", which is a bug and may crash).

Owns: :class:`PeerError`, carrying a documented error ``code`` and a human ``message``. Must never
be raised for our own mistakes.
"""

from __future__ import annotations


class PeerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
