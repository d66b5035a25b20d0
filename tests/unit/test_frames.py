"""FrameDecoder: whole frames out of arbitrary chunks, and the max-frame-size guard."""

from __future__ import annotations

import random

import pytest

from mpmesh._errors import RemoteProtocolError
from mpmesh._wire._frames import (
    HEADER,
    MAX_FRAME_BYTES,
    MAX_HANDSHAKE_FRAME_BYTES,
    FrameDecoder,
)


def frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), kind) + body


FRAMES: list[tuple[int, bytes]] = [
    (20, b"hello"),
    (21, b""),
    (22, bytes(range(256)) * 3),
    (255, b"\x00"),
    (0, b"x" * 1000),
]
STREAM = b"".join(frame(k, b) for k, b in FRAMES)


def feed_in_chunks(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> list[tuple[int, bytes]]:
    """Feed ``data`` cut at ``sizes`` (cycled), collecting every frame produced."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        i += 1
        decoder.feed(data[pos : pos + step])
        pos += step
        out += decoder.frames()
    return out


def test_header_layout_is_length_then_kind() -> None:
    assert HEADER.format == "!IB"
    assert HEADER.size == 5
    assert frame(7, b"abc") == b"\x00\x00\x00\x03\x07abc"


def test_empty_decoder_yields_nothing() -> None:
    decoder = FrameDecoder()
    assert decoder.frames() == []
    assert decoder.buffered == 0


def test_one_whole_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame(9, b"payload"))
    assert decoder.frames() == [(9, b"payload")]
    assert decoder.buffered == 0
    assert decoder.frames() == []


def test_many_frames_in_one_chunk_come_out_in_order() -> None:
    decoder = FrameDecoder()
    decoder.feed(STREAM)
    assert decoder.frames() == FRAMES
    assert decoder.buffered == 0


def test_byte_by_byte_feeding() -> None:
    decoder = FrameDecoder()
    got = feed_in_chunks(decoder, STREAM, [1])
    assert got == FRAMES
    assert decoder.buffered == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_chunking_never_changes_the_frames(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 700) for _ in range(50)]
    decoder = FrameDecoder()
    assert feed_in_chunks(decoder, STREAM, sizes) == FRAMES
    assert decoder.buffered == 0


def test_partial_header_waits_for_more() -> None:
    decoder = FrameDecoder()
    data = frame(3, b"abcdef")
    decoder.feed(data[:3])
    assert decoder.frames() == []
    assert decoder.buffered == 3
    decoder.feed(data[3:])
    assert decoder.frames() == [(3, b"abcdef")]


def test_partial_body_waits_for_more_and_keeps_later_bytes() -> None:
    decoder = FrameDecoder()
    first, second = frame(1, b"0123456789"), frame(2, b"xyz")
    decoder.feed(first + second[:4])
    assert decoder.frames() == [(1, b"0123456789")]
    assert decoder.buffered == 4
    decoder.feed(second[4:-1])
    assert decoder.frames() == []
    decoder.feed(second[-1:])
    assert decoder.frames() == [(2, b"xyz")]
    assert decoder.buffered == 0


def test_frames_returns_bytes_not_views_of_the_buffer() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame(1, b"abc"))
    (kind, body), = decoder.frames()
    decoder.feed(frame(1, b"zzz"))
    decoder.frames()
    assert type(body) is bytes and body == b"abc"


def test_accepts_bytearray_and_memoryview() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytearray(frame(1, b"a")))
    decoder.feed(memoryview(frame(2, b"b")))
    assert decoder.frames() == [(1, b"a"), (2, b"b")]


def test_frame_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame=16)
    decoder.feed(frame(1, b"x" * 16))
    assert decoder.frames() == [(1, b"x" * 16)]


def test_oversize_frame_refused_from_its_header_alone() -> None:
    """The header is enough: the decoder must not wait for (or buffer) the body."""
    decoder = FrameDecoder(max_frame=16)
    decoder.feed(HEADER.pack(17, 1))
    with pytest.raises(RemoteProtocolError, match="17"):
        decoder.frames()
    assert decoder.buffered == 0


def test_garbage_length_is_refused_without_allocating() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff\x01")  # claims a ~4 GiB body
    with pytest.raises(RemoteProtocolError):
        decoder.frames()
    assert decoder.buffered == 0


def test_oversize_frame_after_good_ones_still_raises() -> None:
    decoder = FrameDecoder(max_frame=8)
    decoder.feed(frame(1, b"ok") + HEADER.pack(9, 2) + b"123456789")
    with pytest.raises(RemoteProtocolError):
        decoder.frames()


def test_limit_can_be_raised_later() -> None:
    decoder = FrameDecoder(max_frame=MAX_HANDSHAKE_FRAME_BYTES)
    body = b"y" * (MAX_HANDSHAKE_FRAME_BYTES + 1)
    decoder.max_frame = MAX_FRAME_BYTES
    decoder.feed(frame(5, body))
    assert decoder.frames() == [(5, body)]


def test_default_limit_is_max_frame_bytes() -> None:
    assert FrameDecoder().max_frame == MAX_FRAME_BYTES
    assert MAX_HANDSHAKE_FRAME_BYTES < MAX_FRAME_BYTES
