"""Actors and the pure logic they own: the cache, the router index, the wire codecs.

Nothing in this package opens a socket or starts a process; the actors here own their
state and are driven by the I/O code in :mod:`shards`.
"""
