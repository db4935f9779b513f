"""actors.wire.stream: multipart messages over a byte stream (the router ↔ shard framing)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.wire.stream import MAX_FRAMES, Decoder, StreamError, encode

frames_st = st.lists(st.binary(max_size=300), min_size=1, max_size=6)


def decode_all(decoder: Decoder) -> list[list[bytes]]:
    out = []
    while (message := decoder.next()) is not None:
        out.append(message)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(frames_st, max_size=8), st.lists(st.integers(1, 50), max_size=20))
def test_messages_come_back_whole_and_in_order_however_the_stream_is_cut(messages, cuts):
    stream = b"".join(encode(m) for m in messages)
    decoder = Decoder()
    out: list[list[bytes]] = []
    position = 0
    for cut in [*cuts, len(stream)]:  # pieces of the given sizes, then the rest
        decoder.feed(stream[position : position + cut])
        position += cut
        out += decode_all(decoder)
    assert out == messages
    assert decoder.buffered == 0


def test_a_partial_message_waits_for_the_rest():
    data = encode([b"C", b"12345678", b"payload"])
    decoder = Decoder()
    decoder.feed(data[:-1])
    assert decoder.next() is None
    assert decoder.buffered == len(data) - 1
    decoder.feed(data[-1:])
    assert decoder.next() == [b"C", b"12345678", b"payload"]
    assert decoder.next() is None


def test_empty_frames_and_a_message_of_one_frame():
    decoder = Decoder()
    decoder.feed(encode([b""]) + encode([b"", b"x", b""]))
    assert decode_all(decoder) == [[b""], [b"", b"x", b""]]


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<II", 4 * (MAX_FRAMES + 1), MAX_FRAMES + 1),  # too many frames
        struct.pack("<II", 2, 1),  # a body too short for its lengths
        struct.pack("<II", 0xFFFFFFFF, 1),  # a body of 4 GiB
        struct.pack("<II", 0, 0),  # no frame
    ],
)
def test_an_impossible_header_is_a_stream_error(header):
    decoder = Decoder()
    decoder.feed(header + b"\0" * 16)
    with pytest.raises(StreamError):
        decoder.next()


def test_lengths_that_do_not_add_up_to_the_body_are_a_stream_error():
    body = struct.pack("<I", 10) + b"abc"  # one frame said to be 10 bytes, 3 there
    decoder = Decoder()
    decoder.feed(struct.pack("<II", len(body), 1) + body)
    with pytest.raises(StreamError):
        decoder.next()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_give_messages_none_or_a_stream_error_never_anything_else(raw):
    decoder = Decoder()
    decoder.feed(raw)
    try:
        for _ in range(len(raw) + 1):
            message = decoder.next()
            if message is None:
                break
            assert all(isinstance(frame, bytes) for frame in message)
            assert 1 <= len(message) <= MAX_FRAMES
    except StreamError:
        pass
