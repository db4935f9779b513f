"""The sharding function's test vectors: the table in docs/protocol.md ("Sharding function") is
what actors.ids computes, and an independent transcription of the documented pseudo-code agrees
with it. A client in another language checks itself against the same table."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ids import MAX_ID, splitmix64, stable_hash

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
COUNTS = (1, 2, 3, 4, 8)

# user id -> (splitmix64(user id), shard for N = 1, 2, 3, 4, 8)
VECTORS = {
    1: (0x910A2DEC89025CC1, (0, 0, 0, 3, 3)),
    2: (0x975835DE1C9756CE, (0, 0, 0, 0, 0)),
    3: (0x1D0B14E4DB018FED, (0, 1, 1, 1, 4)),
    4: (0x6E73E372E2338ACA, (0, 0, 2, 3, 7)),
    7: (0x63CBE1E459320DD7, (0, 1, 1, 1, 7)),
    42: (0xBDD732262FEB6E95, (0, 0, 0, 0, 0)),
    100: (0x23259B94F13CF544, (0, 0, 0, 3, 3)),
    12345: (0x22118258A9D111A0, (0, 0, 2, 2, 5)),
    2**32: (0xC42C5A1AA3820138, (0, 0, 0, 0, 0)),
    2**63 - 1: (0x2A67D7552E039EA7, (0, 1, 1, 1, 1)),
}

MASK = 2**64 - 1


def documented_stable_hash(user: int, shards: int) -> int:
    """docs/protocol.md's pseudo-code, transcribed line by line."""
    x = (user + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    key = x ^ (x >> 31)
    b, j = -1, 0
    while j < shards:
        b = j
        key = (key * 2862933555777941757 + 1) & MASK
        j = math.floor((b + 1) * (2.0**31 / float((key >> 33) + 1)))
    return b


@pytest.mark.parametrize("user", sorted(VECTORS))
def test_actors_ids_gives_the_pinned_vectors(user):
    mixed, shards = VECTORS[user]
    assert splitmix64(user) == mixed
    assert tuple(stable_hash(user, n) for n in COUNTS) == shards
    assert tuple(documented_stable_hash(user, n) for n in COUNTS) == shards


def _documented_table() -> dict[int, tuple[int, tuple[int, ...]]]:
    text = PROTOCOL.read_text()
    section = text[text.index("## Sharding function") :]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| (?:\S+ = )?(\d+) \| `0x([0-9a-f]{16})` \|((?: \d+ \|)+)$", line)
        if match:
            shards = tuple(int(cell) for cell in match.group(3).split("|") if cell.strip())
            rows[int(match.group(1))] = (int(match.group(2), 16), shards)
    return rows


def test_the_table_in_the_protocol_is_the_pinned_one():
    assert _documented_table() == VECTORS


def test_the_protocol_names_the_increment_before_the_finaliser():
    section = PROTOCOL.read_text().split("## Sharding function", 1)[1]
    assert "0x9E3779B97F4A7C15" in section
    assert "2862933555777941757" in section


@given(st.integers(min_value=1, max_value=MAX_ID), st.integers(min_value=1, max_value=64))
def test_the_documented_pseudo_code_is_the_sharding_function(user, shards):
    assert documented_stable_hash(user, shards) == stable_hash(user, shards)
