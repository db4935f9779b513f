"""actors.origins: parsing --allowed-origin patterns and matching Origin headers against them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.origins import Origins, parse_origin, parse_pattern


@pytest.mark.parametrize(
    ("pattern", "origin"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("https://app.example.com", "HTTPS://APP.Example.COM"),  # case-insensitive
        ("https://app.example.com", "https://app.example.com:443"),  # the default port
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com", "http://app.example.com:80"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("http://[::1]:3000", "http://[0:0::1]:3000"),
        ("https://*.example.com", "https://a.example.com"),
        ("https://*.example.com", "https://A-1.EXAMPLE.com:443"),
        ("https://*.*.example.com", "https://a.b.example.com"),
        ("https://app.*.example.com", "https://app.eu.example.com"),
        ("chrome-extension://abcdef", "chrome-extension://abcdef"),
    ],
)
def test_allowed(pattern, origin):
    assert Origins([pattern]).allows(origin)


@pytest.mark.parametrize(
    ("pattern", "origin"),
    [
        ("https://app.example.com", "http://app.example.com"),  # another scheme
        ("https://app.example.com", "https://app.example.com:8443"),  # another port
        ("http://localhost:8080", "http://localhost"),
        ("https://app.example.com", "https://app.example.com.evil.example"),
        ("https://app.example.com", "https://evilapp.example.com"),
        ("https://*.example.com", "https://example.com"),  # * is one label, not none
        ("https://*.example.com", "https://a.b.example.com"),  # ...nor two
        ("https://*.example.com", "https://a.example.com.evil.example"),
        ("https://*.example.com", "https://aexample.com"),
        ("https://*.example.com", "http://a.example.com"),
        ("https://app.example.com", "null"),  # a sandboxed frame, a file: page
        ("https://app.example.com", "NULL"),
        ("https://app.example.com", ""),
        ("https://app.example.com", "https://app.example.com/"),  # not an origin
        ("https://app.example.com", "https://user@app.example.com"),
        ("https://app.example.com", "https://app.example.com, https://evil.example"),
        ("https://app.example.com", "https://app.example.com:0443x"),
        ("https://app.example.com", "https://app.example.com:99999"),
        ("https://app.example.com", "https://*.example.com"),  # a header is no pattern
        ("https://app.example.com", "https://app.ex\u00e4mple.com"),
    ],
)
def test_refused(pattern, origin):
    assert not Origins([pattern]).allows(origin)


def test_no_origin_header_is_allowed():
    """A request without Origin is not from a browser's page: nothing to protect against."""
    assert Origins(["https://app.example.com"]).allows(None)


def test_no_patterns_allow_anything_but_say_so():
    origins = Origins([])
    assert origins.any
    assert origins.allows("https://evil.example")
    assert origins.allows("null")
    assert not Origins(["https://app.example.com"]).any


def test_several_patterns():
    origins = Origins(["https://app.example.com", "https://*.example.org", "http://localhost:3000"])
    assert origins.allows("https://app.example.com")
    assert origins.allows("https://x.example.org")
    assert origins.allows("http://localhost:3000")
    assert not origins.allows("https://example.org")
    assert not origins.allows("https://evil.example")


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("app.example.com", "no scheme://"),
        ("https://", "no path"),  # nothing after the scheme
        ("https://app.example.com/", "no path"),
        ("https://app.example.com/path", "no path"),
        ("https://app.example.com?x=1", "no path"),
        ("https://user@app.example.com", "no path"),
        ("https://*", "top-level domain"),
        ("https://example.*", "top-level domain"),
        ("https://*.1.2.3", "IP address"),
        ("https://a*.example.com", "not a DNS label"),
        ("https://**.example.com", "not a DNS label"),
        ("https://a..example.com", "not a DNS label"),
        ("https://-a.example.com", "not a DNS label"),
        ("https://app.example.com:0", "port"),
        ("https://app.example.com:65536", "port"),
        ("https://app.example.com:http", "port"),
        ("https://app.example.com:", "port"),
        ("https://[::1", "unclosed"),
        ("https://[zz::1]", "IPv6"),
        ("https://app.ex\u00e4mple.com", "xn--"),
        ("1https://app.example.com", "no scheme://"),
        ("", "no scheme://"),
    ],
)
def test_invalid_patterns_are_a_configuration_error(pattern, why):
    with pytest.raises(ValueError, match="--allowed-origin") as info:
        Origins(["https://fine.example", pattern])
    assert why in str(info.value)
    assert "scheme://host[:port]" in str(info.value)


def test_parse_pattern():
    pattern = parse_pattern("HTTPS://*.Example.com")
    assert (pattern.scheme, pattern.labels, pattern.port) == ("https", ("*", "example", "com"), 443)
    assert pattern.wildcard
    assert parse_pattern("foo://bar").port is None  # no default port for an unknown scheme


def test_parse_origin():
    assert parse_origin("https://A.b:443") == ("https", ("a", "b"), 443)
    assert parse_origin("null") is None
    assert parse_origin("https://" + "a." * 300 + "com") is None  # longer than an origin


_ORIGINISH = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda scheme, host, port: f"{scheme}://{host}{port}",
        st.sampled_from(["http", "https", "HTTPS", "ws", "x-y", "", "1a"]),
        st.lists(
            st.one_of(st.sampled_from(["*", "a", "example", "com", "", "-", "[::1]", "xn--p"])),
            min_size=0,
            max_size=5,
        ).map(".".join),
        st.one_of(st.just(""), st.integers(-5, 70_000).map(lambda n: f":{n}"), st.text(max_size=6)),
    ),
)


@settings(max_examples=500, deadline=None)
@given(text=_ORIGINISH)
def test_fuzz_patterns_parse_or_raise_value_error(text):
    try:
        pattern = parse_pattern(text)
    except ValueError as exc:
        assert str(exc).startswith("--allowed-origin ")
        return
    assert pattern.labels and pattern.labels[-1] != "*"
    if not pattern.wildcard:  # a valid exact pattern is an origin, and matches itself
        assert Origins([text]).allows(text)


@settings(max_examples=500, deadline=None)
@given(header=_ORIGINISH)
def test_fuzz_the_matcher_never_raises(header):
    origins = Origins(["https://app.example.com", "https://*.example.com", "http://[::1]:80"])
    assert origins.allows(header) in (True, False)
    assert parse_origin(header) is None or "*" not in parse_origin(header)[1]
