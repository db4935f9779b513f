"""Processes and I/O: the supervisor, the acceptor, the shard worker, the Redis link, the client
library, the command-line interface, the benchmark and the fault-injection test kit.

They move bytes and carry out what the pure cores in :mod:`actors` decide.
"""
