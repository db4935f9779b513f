"""The wire codecs: every format that crosses a process boundary, as pure functions.

:mod:`~actors.wire.frames` (server → client WebSocket frames), :mod:`~actors.wire.clientwire`
(client → server frames), :mod:`~actors.wire.httphead` (the upgrade request the acceptor
peeks at), :mod:`~actors.wire.tokens` (connection tokens), :mod:`~actors.wire.commands` (the
ZeroMQ command protocol), :mod:`~actors.wire.shardwire` (router ↔ shard messages) and
:mod:`~actors.wire.cluster` (messages between hosts over Redis). Their errors derive from
:mod:`~actors.wire.errors`. Nothing here does I/O, reads a clock or keeps state between calls.
"""
