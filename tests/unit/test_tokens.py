"""actors.tokens: minting and verifying HS256 connection tokens."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from actors.ids import MAX_ID
from actors.tokens import MAX_TOKEN_CHANNELS, Claims, TokenError, mint, verify

SECRET = "s3cret-" * 10  # long enough for HS256 and HS512 without key-length warnings
FAR = 4_000_000_000  # an exp far in the future
NOW = 1_700_000_000.0


def sign(payload: dict[str, object], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def refused(token: str, now: float | None = NOW, secret: str = SECRET) -> str:
    with pytest.raises(TokenError) as info:
        verify(secret, token, now=now)
    return str(info.value)


# -- round trip -------------------------------------------------------------------------------


def test_mint_verify_round_trip():
    before = time.time()
    claims = verify(SECRET, mint(SECRET, 42, [1, 2], ttl=60.0))
    assert claims.user == 42
    assert claims.channels == (1, 2)
    assert before + 59 <= claims.exp <= time.time() + 61


def test_mint_without_channels():
    token = mint(SECRET, 7)
    assert verify(SECRET, token) == Claims(7, (), verify(SECRET, token).exp)
    assert "channels" not in jwt.decode(token, SECRET, algorithms=["HS256"])


def test_minted_claims_are_the_documented_ones():
    payload = jwt.decode(mint(SECRET, 42, [3]), SECRET, algorithms=["HS256"])
    assert payload["sub"] == "42"
    assert payload["channels"] == [3]
    assert isinstance(payload["exp"], int)
    assert jwt.get_unverified_header(mint(SECRET, 42))["alg"] == "HS256"


def test_verify_with_now_before_exp():
    claims = verify(SECRET, sign({"sub": "9", "exp": FAR, "channels": [5]}), now=NOW)
    assert claims == Claims(9, (5,), float(FAR))


def test_largest_user_id():
    assert verify(SECRET, sign({"sub": str(MAX_ID), "exp": FAR})).user == MAX_ID


def test_leading_zeros_are_digits():
    assert verify(SECRET, sign({"sub": "0042", "exp": FAR})).user == 42


def test_duplicate_channels_are_dropped_in_order():
    claims = verify(SECRET, sign({"sub": "1", "exp": FAR, "channels": [3, 1, 3, 2, 1]}))
    assert claims.channels == (3, 1, 2)


def test_max_channels_are_accepted():
    channels = list(range(1, MAX_TOKEN_CHANNELS + 1))
    claims = verify(SECRET, sign({"sub": "1", "exp": FAR, "channels": channels}))
    assert len(claims.channels) == MAX_TOKEN_CHANNELS


@pytest.mark.parametrize("user", [0, -1, MAX_ID + 1, True, "42", 4.2])
def test_mint_refuses_bad_users(user):
    with pytest.raises(ValueError):
        mint(SECRET, user)


@pytest.mark.parametrize("channels", [[0], [1, True], ["1"], [1.5]])
def test_mint_refuses_bad_channels(channels):
    with pytest.raises(ValueError):
        mint(SECRET, 1, channels)


# -- expiry -----------------------------------------------------------------------------------


def test_expired_token():
    assert "expired" in refused(mint(SECRET, 1, ttl=-10.0), now=None)


def test_expired_relative_to_now():
    token = sign({"sub": "1", "exp": FAR})
    assert verify(SECRET, token, now=FAR - 1.0).user == 1
    assert "expired" in refused(token, now=float(FAR))
    assert "expired" in refused(token, now=FAR + 100.0)


def test_missing_exp():
    assert "exp" in refused(sign({"sub": "1"}))


@pytest.mark.parametrize("exp", ["soon", None, [FAR], {"t": FAR}])
def test_exp_not_a_number(exp):
    refused(sign({"sub": "1", "exp": exp}))


def test_exp_as_a_numeric_string_is_refused_not_a_crash():
    """exp is a number (docs/protocol.md). PyJWT lets "4000000000" through (int() of it works);
    verify must still answer TokenError (a 401), not raise TypeError at ``exp <= now``."""
    refused(sign({"sub": "1", "exp": str(FAR)}), now=NOW)


# -- algorithm --------------------------------------------------------------------------------


def test_hs512_is_refused():
    message = refused(sign({"sub": "1", "exp": FAR}, algorithm="HS512"))
    assert "HS256" in message


def test_alg_none_is_refused():
    token = jwt.encode({"sub": "1", "exp": FAR}, None, algorithm="none")
    assert "HS256" in refused(token)


def test_alg_none_with_a_forged_hs256_payload_is_refused():
    def b64(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': '1', 'exp': FAR})}."
    refused(token)


def test_missing_alg_is_refused():
    def b64(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    good = sign({"sub": "1", "exp": FAR})
    _header, payload, signature = good.split(".")
    refused(f"{b64({'typ': 'JWT'})}.{payload}.{signature}")


# -- signature and format ---------------------------------------------------------------------


def test_wrong_secret():
    token = mint(SECRET, 1)
    refused(token, secret="another-secret-" * 5)


def test_tampered_payload():
    token = sign({"sub": "1", "exp": FAR})
    header, _payload, signature = token.split(".")
    other = sign({"sub": "2", "exp": FAR}).split(".")[1]
    refused(f"{header}.{other}.{signature}")


def test_missing_token():
    assert refused("") == "missing token"


@pytest.mark.parametrize("token", ["abc", "a.b.c", "....", "Bearer x"])
def test_malformed_token(token):
    refused(token)


# -- sub --------------------------------------------------------------------------------------


def test_missing_sub():
    refused(sign({"exp": FAR}))


@pytest.mark.parametrize(
    "sub",
    [
        42,  # not a string
        True,
        ["42"],
        "",
        "abc",
        "4.2",
        "42a",
        " 42",
        "+42",
        "-42",
        "0",
        "000",
        "٤٢",  # Arabic-Indic digits: isdigit() but not ASCII
        "²",
        str(MAX_ID + 1),
        "9" * 40,
    ],
)
def test_bad_sub(sub):
    assert "sub" in refused(sign({"sub": sub, "exp": FAR}))


# -- channels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels",
    [
        "1,2",
        5,
        None,
        {"1": True},
        [True],
        [1, False],
        ["1"],
        [0],
        [-3],
        [1.0],
        [[1]],
        [MAX_ID + 1],
        list(range(1, MAX_TOKEN_CHANNELS + 2)),
    ],
)
def test_bad_channels(channels):
    assert "channels" in refused(sign({"sub": "1", "exp": FAR, "channels": channels}))
