"""The actors and the pure cores they wrap.

Pure cores (no sockets, threads, clocks or pykka; a unit test drives them synchronously):
:mod:`~actors.cache` (a shard's user connection cache), :mod:`~actors.router` (the channel →
shards index, credit windows, scatter/gather), :mod:`~actors.gather` (combining answers),
:mod:`~actors.policy` (the supervisor's restart policy), :mod:`~actors.ratelimit` (token
buckets) and :mod:`~actors.ids` (ids and the sharding function). The codecs live in
:mod:`actors.wire`.

Actors (thin; each owns its sockets on one thread): :mod:`~actors.router_actor` (binds the
command and shard endpoints), :mod:`~actors.cache_actor` (connects a shard to the router), and
their machinery, :mod:`~actors.inbox` (a pykka inbox that also polls ZeroMQ sockets and an
eventfd) and :mod:`~actors.loopactor` (a pykka actor on an asyncio loop). Nothing here starts a
process or touches a WebSocket: that is :mod:`shards`. Nothing here imports :mod:`shards`.
"""
