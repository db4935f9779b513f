"""``ucc bench``: a load generator that measures a ucc server (or the reference server).

Owns nothing at import time: the CLI imports :mod:`shards.bench.args` (the parser, light) to
build its parser, and :mod:`shards.bench.runner` only when ``ucc bench`` runs. Modules, from the
wire up:

- :mod:`~shards.bench.loadclient`: the lean client side of one WebSocket (raw asyncio protocol).
- :mod:`~shards.bench.fleet`: client processes, each holding many load clients.
- :mod:`~shards.bench.publisher`: the backend side: pipelined ZeroMQ commands at a rate.
- :mod:`~shards.bench.servers`: starting (or attaching to) the server under test.
- :mod:`~shards.bench.probes`: CPU time, RSS, and the cache's own memory (tracemalloc).
- :mod:`~shards.bench.reference`: a plain ``websockets`` server fanning out with ``broadcast()``.
- :mod:`~shards.bench.scenarios`: idle, fanout, rooms, direct, connect.
- :mod:`~shards.bench.report`: the table, the progress line and the JSON object.
- :mod:`~shards.bench.runner`: the whole run (server, scenario, reference, sweep).
- :mod:`~shards.bench.args`: the ``ucc bench`` command line.

Must never be imported by the server: it is a client of the public protocols only.
"""
