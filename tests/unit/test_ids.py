"""actors.ids: the sharding function (stable_hash = jump_hash ∘ splitmix64) and parse_id."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ids import MAX_ID, jump_hash, parse_id, splitmix64, stable_hash

# -- splitmix64 -------------------------------------------------------------------------------


def test_splitmix64_reference_values():
    # the first outputs of the reference SplitMix64 generator seeded with 0 and 1
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(1) == 0x910A2DEC89025CC1


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_splitmix64_stays_64_bit(x):
    assert 0 <= splitmix64(x) < 2**64


# -- jump_hash --------------------------------------------------------------------------------

# Published test vectors of the jump consistent hash (Lamping and Veach), as used by the Go,
# C, Python and Elixir implementations.
JUMP_VECTORS = [
    (1, 1, 0),
    (42, 57, 43),
    (0xDEAD10CC, 1, 0),
    (0xDEAD10CC, 666, 361),
    (256, 1024, 520),
    (1, 128, 55),
    (129, 128, 120),
    (4, 2, 1),
    (7, 2, 0),
    (128, 100_000_000, 38172097),
    (128, 2_147_483_648, 1644467860),
    (2**64 - 1, 128, 92),
    (int(hashlib.sha1(b"abc").hexdigest(), 16), 5, 2),  # reduced to 64 bits
    (-42, 57, 8),  # negative keys are read as unsigned
]


@pytest.mark.parametrize(("key", "buckets", "expected"), JUMP_VECTORS)
def test_jump_hash_reference_vectors(key, buckets, expected):
    assert jump_hash(key, buckets) == expected


@pytest.mark.parametrize("buckets", [0, -1, -666])
def test_jump_hash_refuses_non_positive_buckets(buckets):
    with pytest.raises(ValueError):
        jump_hash(1, buckets)


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=10_000))
def test_jump_hash_in_range(key, buckets):
    assert 0 <= jump_hash(key, buckets) < buckets


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 31])
def test_jump_hash_moves_about_one_in_n_plus_one_keys(n):
    keys = [splitmix64(i) for i in range(20_000)]
    moved = [k for k in keys if jump_hash(k, n) != jump_hash(k, n + 1)]
    expected = len(keys) / (n + 1)
    assert abs(len(moved) - expected) < 0.1 * expected
    # a key that moves only ever moves to the new bucket
    assert all(jump_hash(k, n + 1) == n for k in moved)


def test_jump_hash_spreads_evenly():
    buckets = 8
    counts = [0] * buckets
    for i in range(20_000):
        counts[jump_hash(splitmix64(i), buckets)] += 1
    for count in counts:
        assert abs(count - 2_500) < 250


# -- stable_hash ------------------------------------------------------------------------------

# Pinned now: a change of the sharding function would move every user to another shard after
# an upgrade, so it must be deliberate (and this table updated with it).
PINNED = {
    1: [0, 0, 0, 3, 15, 72, 527],
    2: [0, 0, 0, 0, 0, 19, 19],
    3: [0, 1, 1, 4, 14, 72, 473],
    42: [0, 0, 0, 0, 0, 88, 151],
    1000: [0, 0, 0, 0, 12, 33, 639],
    123456789: [0, 0, 0, 4, 10, 91, 534],
    MAX_ID: [0, 1, 1, 1, 12, 12, 515],
}
PINNED_SHARDS = (1, 2, 3, 8, 16, 100, 1000)


@pytest.mark.parametrize(("user", "expected"), sorted(PINNED.items()))
def test_stable_hash_pinned_values(user, expected):
    assert [stable_hash(user, n) for n in PINNED_SHARDS] == expected


def test_stable_hash_is_jump_of_splitmix():
    for user in (1, 5, 99, 10**12, MAX_ID):
        assert stable_hash(user, 13) == jump_hash(splitmix64(user), 13)


@given(st.integers(min_value=1, max_value=MAX_ID), st.integers(min_value=1, max_value=4096))
def test_stable_hash_deterministic_and_in_range(user, shards):
    first = stable_hash(user, shards)
    assert first == stable_hash(user, shards)
    assert 0 <= first < shards
    assert type(first) is int


def test_stable_hash_uses_every_shard():
    assert {stable_hash(user, 4) for user in range(1, 200)} == {0, 1, 2, 3}


def test_stable_hash_of_one_shard_is_zero():
    assert {stable_hash(user, 1) for user in range(1, 500)} == {0}


# -- parse_id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 2, 42, MAX_ID])
def test_parse_id_accepts_positive_63_bit_ints(value):
    assert parse_id(value) == value


@pytest.mark.parametrize(
    "value",
    [0, -1, -MAX_ID, MAX_ID + 1, 2**64, True, False, 1.0, 7.5, "1", b"1", None, [1], {"id": 1}],
)
def test_parse_id_refuses(value):
    assert parse_id(value) is None
