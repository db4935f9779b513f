"""Processes and I/O: the supervisor, the acceptor, the shard worker, the client, the CLI.

The pure logic these drive lives in :mod:`actors`.
"""
