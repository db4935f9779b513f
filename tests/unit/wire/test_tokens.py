"""actors.wire.tokens: minting and verifying HS256 connection tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.ids import MAX_ID
from actors.wire.tokens import MAX_EXP, MAX_TOKEN_CHANNELS, Claims, TokenError, mint, verify

SECRET = "s3cret-" * 10  # long enough for HS256 and HS512 without key-length warnings
FAR = 4_000_000_000  # an exp far in the future
NOW = 1_700_000_000.0


def sign(payload: dict[str, object], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=algorithm)


def refused(token: str, now: float | None = NOW, secret: str = SECRET, **checks: object) -> str:
    with pytest.raises(TokenError) as info:
        verify(secret, token, now=now, **checks)  # type: ignore[arg-type]
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


# -- audience, issuer, leeway, channel limit (issue 10) ------------------------------------------

AUD = "ucc"
ISS = "https://auth.example.com"


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": AUD, "iss": ISS},
        {"aud": [AUD], "iss": ISS},
        {"aud": ["other", AUD], "iss": ISS},  # RFC 7519: a list naming this audience
    ],
)
def test_aud_and_iss_when_configured(claims):
    token = sign({"sub": "1", "exp": FAR, **claims})
    assert verify(SECRET, token, now=NOW, audience=AUD, issuer=ISS).user == 1


@pytest.mark.parametrize(
    ("claims", "named"),
    [
        ({"iss": ISS}, "'aud'"),  # missing
        ({"aud": "other", "iss": ISS}, "'aud'"),
        ({"aud": "UCC", "iss": ISS}, "'aud'"),  # exact, not case-insensitive
        ({"aud": ["other"], "iss": ISS}, "'aud'"),
        ({"aud": [], "iss": ISS}, "'aud'"),
        ({"aud": [[AUD]], "iss": ISS}, "'aud'"),
        ({"aud": {"x": AUD}, "iss": ISS}, "'aud'"),
        ({"aud": None, "iss": ISS}, "'aud'"),
        ({"aud": AUD}, "'iss'"),  # missing
        ({"aud": AUD, "iss": "https://evil.example"}, "'iss'"),
        ({"aud": AUD, "iss": [ISS]}, "'iss'"),  # iss is one string
        ({"aud": AUD, "iss": 1}, "'iss'"),
    ],
)
def test_wrong_or_missing_aud_or_iss_is_refused(claims, named):
    token = sign_text(json.dumps({"sub": "1", "exp": FAR, **claims}))  # PyJWT's encode checks
    assert named in refused(token, audience=AUD, issuer=ISS)


def test_aud_and_iss_are_not_looked_at_unless_configured():
    token = sign_text(json.dumps({"sub": "1", "exp": FAR, "aud": "someone-else", "iss": ["odd"]}))
    assert verify(SECRET, token, now=NOW).user == 1
    assert verify(SECRET, token, now=NOW, issuer=None, audience=None).user == 1
    assert "'aud'" in refused(token, audience=AUD)


def test_mint_with_aud_and_iss():
    token = mint(SECRET, 5, audience=AUD, issuer=ISS)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == AUD
    assert verify(SECRET, token, audience=AUD, issuer=ISS).user == 5


def test_leeway_on_exp():
    now = time.time()
    token = sign({"sub": "1", "exp": int(now) - 5})  # checked against now and PyJWT's clock
    assert "expired" in refused(token, now=now)
    assert "expired" in refused(token, now=None)
    assert "expired" in refused(token, now=now, leeway=4.0)
    assert verify(SECRET, token, now=now, leeway=60.0).user == 1
    assert verify(SECRET, token, leeway=60.0).user == 1


def test_max_channels():
    token = sign({"sub": "1", "exp": FAR, "channels": [1, 2, 3]})
    assert verify(SECRET, token, now=NOW, max_channels=3).channels == (1, 2, 3)
    assert "lists 3 channels; at most 2" in refused(token, max_channels=2)


# -- numbers out of range: a 401, never a traceback ---------------------------------------------


def sign_text(payload: str, header: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    """A token whose payload is exactly ``payload`` (JSON text json.dumps cannot write, e.g. an
    int of 5,000 digits), correctly signed with SECRET."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize(
    "sub",
    [
        "9" * 5_000,  # beyond Python's int() digit limit (4,300)
        "1" + "0" * 19,  # 20 digits: beyond signed 64 bit
        str(2**64),
        "0" * 30,
    ],
)
def test_sub_out_of_range_is_refused(sub):
    assert "sub" in refused(sign({"sub": sub, "exp": FAR}))


def test_sub_with_many_leading_zeros_is_the_id():
    """Leading zeros are digits (see above), however many: not an int() of 5,001 digits."""
    assert verify(SECRET, sign({"sub": "0" * 5_000 + "7", "exp": FAR}), now=NOW).user == 7


@pytest.mark.parametrize(
    "exp",
    [
        "9" * 400,  # an int beyond float range: float() would raise OverflowError
        "9" * 5_000,  # beyond the JSON decoder's digit limit
        str(MAX_EXP + 1),
        "1e300",
        "1e400",  # Python's JSON reads it as inf
        "Infinity",
        "-Infinity",
        "NaN",
        "true",
    ],
)
def test_exp_out_of_range_is_refused(exp):
    refused(sign_text(f'{{"sub":"1","exp":{exp}}}'))


def test_the_json_decoder_s_limits_are_explained_in_a_short_line():
    digits = refused(sign_text(f'{{"sub":"1","exp":{"9" * 5_000}}}'))
    assert digits == "invalid token: a number in it has more than 4300 digits"
    deep = refused(sign_text(f'{{"sub":"1","exp":{FAR},"x":{"[" * 5_000}{"]" * 5_000}}}'))
    assert deep == "invalid token: its JSON is nested too deeply"


def test_latest_exp_is_accepted():
    assert verify(SECRET, sign({"sub": "1", "exp": MAX_EXP}), now=NOW).exp == float(MAX_EXP)


@pytest.mark.parametrize(
    "channels",
    [
        "[" + "9" * 5_000 + "]",
        "[" + "9" * 400 + "]",
        f"[{2**63}]",
        "[1e400]",
        "[NaN]",
        "[1, [2, [3]]]",
        "[" * 5_000 + "]" * 5_000,  # nested beyond the recursion limit
    ],
)
def test_channels_out_of_range_are_refused(channels):
    refused(sign_text(f'{{"sub":"1","exp":{FAR},"channels":{channels}}}'))


@pytest.mark.parametrize(
    "header",
    [
        '{"alg":' + "9" * 5_000 + "}",
        '{"alg":' + "9" * 100 + "}",
        '{"alg":"HS256","kid":' + "[" * 5_000 + "]" * 5_000 + "}",
        '{"alg":"HS256","crit":[' + "9" * 400 + "]}",
        "[1]",
    ],
)
def test_hostile_headers_are_refused(header):
    message = refused(sign_text(f'{{"sub":"1","exp":{FAR}}}', header=header))
    assert len(message) < 200  # the reason is a short line, not the attacker's input echoed


# the fuzz: JSON text of every type and size, including what json.dumps cannot write

# digit counts around the edges that matter: 64-bit ids, float range, int()'s 4,300-digit limit
_digits = st.one_of(
    st.sampled_from([0, 1, 17, 18, 19, 20, 307, 308, 309, 400, 4_299, 4_300, 4_301, 5_000]),
    st.integers(0, 6_000),
).map(lambda n: "9" * n)
_number_text = st.one_of(
    st.integers().map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    st.tuples(st.sampled_from(["", "-"]), _digits).map(lambda t: f"{t[0]}1{t[1]}"),
    st.sampled_from(["1e400", "-1e400", "1e-400", "0", "-0", "0.5", str(MAX_EXP), str(FAR)]),
)
_digit_string_text = st.one_of(
    _digits.map(lambda digits: f'"1{digits}"'),
    _digits.map(lambda digits: f'"{digits}1"'.replace("9", "0")),
    st.integers(0, 2**64).map(lambda n: f'"{n}"'),
)
_string_text = st.one_of(st.text(max_size=50).map(json.dumps), _digit_string_text)
_scalar_text = st.one_of(_number_text, _string_text, st.sampled_from(["true", "false", "null"]))
_json_text = st.recursive(
    _scalar_text,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(lambda items: "[" + ",".join(items) + "]"),
        st.dictionaries(st.text(max_size=8), inner, max_size=4).map(
            lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=20,
)
_deep_text = st.integers(0, 3_000).map(lambda n: "[" * n + "1" + "]" * n)
_any_text = st.one_of(_json_text, _deep_text)
# per claim: its valid value, or a hostile one of the right type, or anything at all
_claim_choices = {
    "sub": st.one_of(st.just('"42"'), _digit_string_text, _any_text),
    "exp": st.one_of(st.just(str(FAR)), _number_text, _any_text),
    "channels": st.one_of(
        st.just("[1,2]"),
        st.lists(st.one_of(_number_text, _any_text), max_size=5).map(
            lambda items: "[" + ",".join(items) + "]"
        ),
        _any_text,
    ),
}
_aud_text = st.one_of(
    st.just('"ucc"'),
    st.lists(st.one_of(st.just('"ucc"'), _any_text), max_size=4).map(
        lambda items: "[" + ",".join(items) + "]"
    ),
    _any_text,
)
_claim_choices["aud"] = _aud_text
_claim_choices["iss"] = st.one_of(st.just('"https://auth.example.com"'), _any_text)
_extra_name = st.one_of(st.sampled_from(["iat", "nbf", "jti"]), st.text(max_size=8))


@st.composite
def _claim_sets(draw: st.DrawFn) -> str:
    """JSON text: usually a claim set whose claims are each valid, hostile or random (so the
    fuzz reaches the checks after the signature), sometimes random JSON text of any kind."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_any_text)
    claims: dict[str, str] = {}
    for name, choices in _claim_choices.items():
        if draw(st.integers(0, 5)) > 0:  # now and then a claim is missing
            claims[name] = draw(choices)
    claims.update(draw(st.dictionaries(_extra_name, _any_text, max_size=3)))
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in claims.items()) + "}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=_claim_sets(),
    now=st.sampled_from([None, NOW]),
    bound=st.booleans(),
    leeway=st.sampled_from([0.0, 30.0]),
    max_channels=st.sampled_from([1, MAX_TOKEN_CHANNELS]),
)
def test_fuzz_signed_claims_give_claims_or_token_error(payload, now, bound, leeway, max_channels):
    """Whatever a correctly signed token holds, verify() returns Claims or raises TokenError:
    the acceptor turns the one into a hand-off and the other into a 401, so anything else
    would escape as a traceback (and a reset connection). With ``bound``, the token must carry
    aud "ucc" and iss "https://auth.example.com" (claims of random types in the fuzz)."""
    token = sign_text(payload)
    checks: dict[str, object] = {"leeway": leeway, "max_channels": max_channels}
    if bound:
        checks.update(audience="ucc", issuer="https://auth.example.com")
    try:
        claims = verify(SECRET, token, now=now, **checks)  # type: ignore[arg-type]
    except TokenError as exc:
        assert str(exc)
        return
    if bound:
        decoded = json.loads(payload)
        assert decoded["iss"] == "https://auth.example.com"
        assert decoded["aud"] == "ucc" or "ucc" in decoded["aud"]
    assert len(claims.channels) <= max_channels
    assert 0 < claims.user <= MAX_ID
    assert math.isfinite(claims.exp)
    assert claims.exp <= MAX_EXP
    assert all(type(c) is int and 0 < c <= MAX_ID for c in claims.channels)


@settings(max_examples=200, deadline=None)
@given(header=_claim_sets())
def test_fuzz_headers_give_token_error(header):
    """A random header: only exactly ``alg: HS256`` (with harmless extras) may pass."""
    token = sign_text(f'{{"sub":"1","exp":{FAR}}}', header=header)
    try:
        claims = verify(SECRET, token, now=NOW)
    except TokenError as exc:
        assert str(exc)
        return
    assert claims.user == 1
    assert json.loads(header)["alg"] == "HS256"
