"""Message classes: struct/UTF-8 encoding round-trips, and garbage fails at decode time."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest

from mpmesh._errors import RemoteProtocolError
from mpmesh._wire._frames import HEADER, FrameDecoder
from mpmesh._wire._messages import (
    HANDSHAKE_KINDS,
    KINDS,
    Answer,
    Challenge,
    Goodbye,
    Hello,
    Message,
    Rejected,
    Reply,
    Request,
    Welcome,
    decode,
    encode,
)

ALL_CLASSES: list[type[Message]] = [layout.cls for layout in KINDS.values()]


def field_kinds(cls: type[Message]) -> list[tuple[str, str]]:
    """``(name, type name)`` of each field; annotations are strings (PEP 563)."""
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        out.append((f.name, f.type if isinstance(f.type, str) else f.type.__name__))
    return out


SAMPLES: dict[str, list[object]] = {
    "int": [0, 1, -1, 2**63 - 1, -(2**63), 123456789],
    "float": [0.0, -1.0, 1.5, 1e300, float("inf"), -0.25],
    "str": ["", "a", "héllo wörld", "名前", "🐍 snake", "x" * 1000, "nul\0inside"],
    "bytes": [b"", b"\x00", bytes(range(256)), b"\xff" * 4096],
}


def make(cls: type[Message], variant: int) -> Message:
    """An instance of ``cls`` with the ``variant``-th sample value in every field."""
    values = {}
    for i, (name, kind) in enumerate(field_kinds(cls)):
        pool = SAMPLES[kind]
        values[name] = pool[(variant + i) % len(pool)]
    return cls(**values)


def split(frame: bytes) -> tuple[int, bytes]:
    length, kind = HEADER.unpack_from(frame, 0)
    body = frame[HEADER.size :]
    assert len(body) == length, "the header's length must be the body's length"
    return kind, body


def test_kinds_table_is_consistent() -> None:
    assert len(KINDS) == len(set(ALL_CLASSES)), "one class per kind byte"
    for kind, layout in KINDS.items():
        assert layout.cls.KIND == kind
        assert 0 <= kind <= 255
    assert HANDSHAKE_KINDS == {Challenge.KIND, Answer.KIND, Welcome.KIND, Rejected.KIND}


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_message_is_a_slotted_record(cls: type[Message]) -> None:
    # Immutability is mypy's to enforce (``record`` reads as a frozen dataclass); at run
    # time a message is a slotted dataclass: no stray attribute, equality by value.
    assert dataclasses.is_dataclass(cls)
    assert "__slots__" in cls.__dict__
    msg = make(cls, 0)
    with pytest.raises(AttributeError):
        msg.stray = 1
    assert make(cls, 0) == msg


@pytest.mark.parametrize("variant", range(4))
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[Message], variant: int) -> None:
    msg = make(cls, variant)
    frame = encode(msg)
    kind, body = split(frame)
    assert kind == cls.KIND
    back = decode(kind, body)
    assert type(back) is cls
    assert back == msg


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_round_trip_through_the_frame_decoder(cls: type[Message]) -> None:
    msgs = [make(cls, v) for v in range(3)]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode(m) for m in msgs))
    assert [decode(k, b) for k, b in decoder.frames()] == msgs


def layout_encoding(msg: Message) -> bytes:
    """The documented layout, written independently of ``encode`` (and of its fast paths):
    ``!IB`` header, then numbers, then a u32 length per variable field, then the fields."""
    fmt, nums, var = "!", [], []
    for name, kind in field_kinds(type(msg)):
        value = getattr(msg, name)
        if kind in ("int", "float"):
            fmt += "q" if kind == "int" else "d"
            nums.append(value)
        else:
            var.append(value.encode("utf-8") if kind == "str" else value)
    body = struct.pack(fmt + "I" * len(var), *nums, *map(len, var)) + b"".join(var)
    return HEADER.pack(len(body), msg.KIND) + body


@pytest.mark.parametrize("variant", range(3))
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_encoding_follows_the_documented_layout(cls: type[Message], variant: int) -> None:
    msg = make(cls, variant)
    assert encode(msg) == layout_encoding(msg)


def test_unicode_strings_are_utf8_on_the_wire() -> None:
    msg = Rejected("clé 🔑 refusée")
    kind, body = split(encode(msg))
    assert "clé 🔑 refusée".encode() in body
    assert decode(kind, body) == msg


def test_empty_bytes_and_strings() -> None:
    msg = Request(1, 0, -1, 0, -1.0, 0.0, "", "", b"")
    assert decode(*split(encode(msg))) == msg
    assert decode(*split(encode(Reply(5, b"")))) == Reply(5, b"")


def test_message_without_fields() -> None:
    kind, body = split(encode(Goodbye()))
    assert (kind, body) == (Goodbye.KIND, b"")
    assert decode(kind, body) == Goodbye()


def test_payload_is_carried_verbatim() -> None:
    """The payload is opaque bytes: the wire never looks inside (no unpickling)."""
    payload = b"\x80\x05not really a pickle\x00\xff"
    assert decode(*split(encode(Reply(1, payload)))).payload == payload  # type: ignore[attr-defined]


def test_unknown_kind() -> None:
    unused = next(k for k in range(256) if k not in KINDS)
    with pytest.raises(RemoteProtocolError, match="unknown message kind"):
        decode(unused, b"")


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_truncated_body(cls: type[Message]) -> None:
    kind, body = split(encode(make(cls, 1)))
    for cut in range(len(body)):
        with pytest.raises(RemoteProtocolError):
            decode(kind, body[:cut])


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_trailing_bytes(cls: type[Message]) -> None:
    kind, body = split(encode(make(cls, 1)))
    with pytest.raises(RemoteProtocolError):
        decode(kind, body + b"\x00")


def test_length_field_larger_than_body() -> None:
    kind, body = split(encode(Rejected("abc")))
    forged = struct.pack("!I", 1 << 31) + body[4:]
    with pytest.raises(RemoteProtocolError):
        decode(kind, forged)


def test_invalid_utf8_in_a_string_field() -> None:
    kind, body = split(encode(Rejected("ab")))
    with pytest.raises(RemoteProtocolError):
        decode(kind, body[:-2] + b"\xff\xfe")


def test_error_names_the_message_class() -> None:
    kind, body = split(encode(Hello(1, 1, 1, "n", "g", "h")))
    with pytest.raises(RemoteProtocolError, match="Hello"):
        decode(kind, body[:3])


def _garbage_cases(rng: random.Random) -> list[tuple[int, bytes]]:
    cases: list[tuple[int, bytes]] = []
    kinds = list(KINDS)
    for _ in range(3000):
        kind = rng.choice(kinds) if rng.random() < 0.9 else rng.randrange(256)
        size = rng.choice([0, 1, 4, 8, 16, 40, rng.randrange(200)])
        cases.append((kind, rng.randbytes(size)))
    # Mutations of valid bodies: flip bytes, cut, extend.
    for _ in range(3000):
        cls = rng.choice(ALL_CLASSES)
        kind, body = split(encode(make(cls, rng.randrange(7))))
        buf = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            if buf and rng.random() < 0.6:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            elif buf and rng.random() < 0.5:
                del buf[rng.randrange(len(buf)) :]
            else:
                buf += rng.randbytes(rng.randint(1, 8))
        cases.append((kind, bytes(buf)))
    return cases


def test_decode_of_random_garbage_raises_only_remote_protocol_error() -> None:
    rng = random.Random(20240611)
    decoded = 0
    for kind, body in _garbage_cases(rng):
        try:
            msg = decode(kind, body)
        except RemoteProtocolError:
            continue
        # Whatever decodes must re-encode to the very same bytes.
        assert split(encode(msg)) == (kind, body)
        decoded += 1
    assert decoded > 0, "the fuzzer should also produce some valid frames"
