"""System tests start real ``ucc serve`` processes (fixtures from :mod:`shards.testing`)."""
