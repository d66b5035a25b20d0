"""Property-based fuzzing of the sans-IO wire: frame decoder, handshake, messages.

Whatever bytes arrive, however the socket cuts them, a ``Connection`` either waits for
more, yields valid messages (only once the peer proved the authkey), or raises one of
the two errors the broker's loop handles (``AuthenticationError``,
``RemoteProtocolError``): never another exception type, never an unbounded buffer,
never an unpickling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import os
import pickle
import tracemalloc
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mpmesh._errors import AuthenticationError, RemoteProtocolError
from mpmesh._wire import _codec
from mpmesh._wire._connection import Connection, Phase, Side, _digest
from mpmesh._wire._frames import HEADER, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES
from mpmesh._wire._messages import (
    HANDSHAKE_KINDS, KINDS, Answer, Challenge, Message, Op, Rejected, Reply, Welcome, decode, encode,
)

pytestmark = pytest.mark.timeout(120)

# Few examples each: the whole module runs in a few seconds. No example database: the
# tests must not write a .hypothesis directory into the repository.
FAST = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

WIRE_ERRORS = (AuthenticationError, RemoteProtocolError)
# What a connection may hold before the peer is authenticated: at most one incomplete frame.
PRE_AUTH_BUFFER_MAX = HEADER.size + MAX_HANDSHAKE_FRAME_BYTES
APP_CLASSES: list[type[Message]] = [l.cls for k, l in KINDS.items() if k not in HANDSHAKE_KINDS]
HANDSHAKE_CLASSES: list[type[Message]] = [KINDS[k].cls for k in sorted(HANDSHAKE_KINDS)]


class Unpickled(BaseException):
    """Raised by the patched unpicklers; a BaseException so no ``except Exception`` hides it."""


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """Make every way of unpickling raise ``Unpickled`` for the duration."""

    def refuse(*args: object, **kwargs: object) -> Any:
        raise Unpickled("the wire unpickled something")

    with contextlib.ExitStack() as stack:
        for target, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                             (_codec, "loads"), (_codec, "loads_builtin"), (_codec, "unpack_exception")):
            stack.enter_context(mock.patch.object(target, name, refuse))
        yield


# -- strategies -----------------------------------------------------------------------------

_FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=False),
    "str": st.text(max_size=40),
    "bytes": st.binary(max_size=300),
}


def message_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Any valid instance of ``cls``, built from its field types."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return st.builds(cls, *(_FIELD_STRATEGIES[str(f.type)] for f in fields))


app_messages = st.one_of([message_of(cls) for cls in APP_CLASSES])
handshake_messages = st.one_of([message_of(cls) for cls in HANDSHAKE_CLASSES])
keys = st.binary(min_size=1, max_size=80)


@st.composite
def raw_frames(draw: st.DrawFn, max_body: int = 700) -> bytes:
    """A frame whose header is plausible: a known or random kind, a length that may lie."""
    kind = draw(st.one_of(st.sampled_from(sorted(KINDS)), st.integers(0, 255)))
    body = draw(st.binary(max_size=max_body))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 8), st.integers(0, 2**32 - 1)))
    return HEADER.pack(length, kind) + body


def streams(messages: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Garbage with some structure: random bytes, raw frames, encoded messages, mixed."""
    piece = st.one_of(st.binary(max_size=64), raw_frames(), messages.map(encode))
    return st.one_of(st.binary(max_size=2000), st.lists(piece, max_size=6).map(b"".join))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes | bytearray | memoryview]:
    """``data`` cut at arbitrary points, each piece as bytes, bytearray or a memoryview."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    kinds = draw(st.lists(st.sampled_from([bytes, bytearray, memoryview]),
                          min_size=len(pieces), max_size=len(pieces)))
    return [kind(p) for kind, p in zip(kinds, pieces)]


# -- helpers --------------------------------------------------------------------------------

def feed(conn: Connection, chunks: list[bytes | bytearray | memoryview]) -> tuple[bytes, list[Message]]:
    """Feed every chunk; return what the connection wants sent back and its events."""
    out = b""
    events: list[Message] = []
    for chunk in chunks:
        out += conn.receive_data(chunk)
        events += conn.events()
    return out, events


def feed_expecting_wire_errors(conn: Connection, chunks: list[bytes | bytearray | memoryview],
                               allowed: tuple[type[BaseException], ...]) -> tuple[BaseException | None, list[Message]]:
    """Feed ``chunks``; only ``allowed`` may be raised, and the connection is CLOSED after it."""
    events: list[Message] = []
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except allowed as exc:
            assert conn.phase is Phase.CLOSED
            events += conn.events()
            assert conn.receive_data(b"\x00" * 8) == b"" and conn.events() == []
            return exc, events
        events += conn.events()
    return None, events


def _split(frame: bytes) -> tuple[int, bytes]:
    """A whole frame as (kind, body)."""
    length, kind = HEADER.unpack_from(frame, 0)
    assert len(frame) == HEADER.size + length
    return kind, frame[HEADER.size :]


def equivalent_hmac_keys(a: bytes, b: bytes) -> bool:
    """Whether HMAC-SHA256 cannot tell ``a`` from ``b`` (it zero-pads keys to 64 bytes
    and hashes longer ones first)."""
    def norm(k: bytes) -> bytes:
        return (hashlib.sha256(k).digest() if len(k) > 64 else k).ljust(64, b"\x00")
    return norm(a) == norm(b)


def handshake(broker: Connection, peer: Connection, draw: st.DrawFn | None = None) -> None:
    """Run the three-leg handshake, each leg cut by ``draw`` (or whole)."""
    def legs(data: bytes) -> list[bytes | bytearray | memoryview]:
        return draw(chunked(data)) if draw is not None else [data]

    answer, _ = feed(peer, legs(broker.initiate()))
    welcome, _ = feed(broker, legs(answer))
    rest, _ = feed(peer, legs(welcome))
    assert rest == b""


def ready_pair(key: bytes = b"k" * 32) -> tuple[Connection, Connection]:
    broker = Connection(Side.BROKER, key, os.urandom)
    peer = Connection(Side.PEER, key, os.urandom)
    handshake(broker, peer)
    assert broker.phase is Phase.READY and peer.phase is Phase.READY
    return broker, peer


# -- before authentication ------------------------------------------------------------------

@FAST
@given(data=st.data(), stream=streams(st.one_of(handshake_messages, app_messages)),
       side=st.sampled_from([Side.BROKER, Side.PEER]), challenged=st.booleans())
def test_garbage_before_auth_raises_only_wire_errors(data: st.DataObject, stream: bytes, side: Side,
                                                     challenged: bool) -> None:
    """Pre-auth bytes either wait (in a bounded buffer) or raise a wire error; nothing is
    unpickled, no message surfaces, and the connection never becomes READY."""
    conn = Connection(side, b"the-key", os.urandom)
    if side is Side.BROKER and challenged:
        conn.initiate()
    with no_unpickling():
        exc, events = feed_expecting_wire_errors(conn, data.draw(chunked(stream)), WIRE_ERRORS)
    assert events == []
    assert conn.phase is not Phase.READY
    if exc is None:
        assert conn.phase is Phase.HANDSHAKE
        assert conn._decoder.buffered < PRE_AUTH_BUFFER_MAX


@FAST
@given(data=st.data(), length=st.integers(MAX_HANDSHAKE_FRAME_BYTES + 1, 2**32 - 1),
       kind=st.integers(0, 255), tail=st.binary(max_size=64), side=st.sampled_from([Side.BROKER, Side.PEER]))
def test_pre_auth_frame_limit_refuses_a_huge_length_without_allocating(
        data: st.DataObject, length: int, kind: int, tail: bytes, side: Side) -> None:
    """A declared length over the handshake limit is refused from its header alone."""
    conn = Connection(side, b"the-key", os.urandom)
    if side is Side.BROKER:
        conn.initiate()
    chunks = data.draw(chunked(HEADER.pack(length, kind) + tail))
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="exceeds"):
            for chunk in chunks:
                conn.receive_data(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"refusing a {length}-byte frame allocated {peak} bytes"
    assert conn.phase is Phase.CLOSED
    assert conn._decoder.buffered == 0


@FAST
@given(length=st.integers(1, MAX_HANDSHAKE_FRAME_BYTES), kind=st.sampled_from(sorted(HANDSHAKE_KINDS)),
       side=st.sampled_from([Side.BROKER, Side.PEER]))
def test_pre_auth_frame_within_the_limit_waits_for_its_body(length: int, kind: int, side: Side) -> None:
    conn = Connection(side, b"the-key", os.urandom)
    if side is Side.BROKER:
        conn.initiate()
    body = b"\x00" * (length - 1)  # one byte short of complete
    assert conn.receive_data(HEADER.pack(length, kind) + body) == b""
    assert conn.phase is Phase.HANDSHAKE
    assert conn._decoder.buffered == HEADER.size + len(body)


@FAST
@given(data=st.data(), key=keys)
def test_handshake_completes_for_any_chunking(data: st.DataObject, key: bytes) -> None:
    broker = Connection(Side.BROKER, key, os.urandom)
    peer = Connection(Side.PEER, key, os.urandom)
    with no_unpickling():
        handshake(broker, peer, data.draw)
    assert broker.phase is Phase.READY and peer.phase is Phase.READY
    assert broker.events() == [] and peer.events() == []


@FAST
@given(data=st.data(), key=keys, msgs=st.lists(app_messages, max_size=5))
def test_messages_pipelined_behind_the_welcome_arrive_for_any_chunking(
        data: st.DataObject, key: bytes, msgs: list[Message]) -> None:
    """The broker's first messages may share a read with its Welcome: the peer gets them
    all, whatever their size (the frame limit grows mid-read)."""
    broker = Connection(Side.BROKER, key, os.urandom)
    peer = Connection(Side.PEER, key, os.urandom)
    answer = peer.receive_data(broker.initiate())
    stream = broker.receive_data(answer) + b"".join(broker.send(m) for m in msgs)
    out, events = feed(peer, data.draw(chunked(stream)))
    assert out == b"" and peer.phase is Phase.READY
    assert events == msgs


@FAST
@given(data=st.data(), broker_key=keys, peer_key=keys)
def test_a_wrong_authkey_always_ends_in_authentication_error(
        data: st.DataObject, broker_key: bytes, peer_key: bytes) -> None:
    """The broker refuses the peer's Answer; the peer then reads the Rejected frame."""
    assume(not equivalent_hmac_keys(broker_key, peer_key))
    broker = Connection(Side.BROKER, broker_key, os.urandom)
    peer = Connection(Side.PEER, peer_key, os.urandom)
    answer, _ = feed(peer, data.draw(chunked(broker.initiate())))
    exc, events = feed_expecting_wire_errors(broker, data.draw(chunked(answer)), WIRE_ERRORS)
    assert isinstance(exc, AuthenticationError) and events == []
    exc, events = feed_expecting_wire_errors(peer, data.draw(chunked(broker.rejection())), WIRE_ERRORS)
    assert isinstance(exc, AuthenticationError) and events == []
    assert broker.phase is Phase.CLOSED and peer.phase is Phase.CLOSED


@FAST
@given(data=st.data(), real_key=keys, forged_key=keys, tail=st.lists(app_messages, max_size=3))
def test_a_broker_without_the_key_cannot_forge_the_welcome(
        data: st.DataObject, real_key: bytes, forged_key: bytes, tail: list[Message]) -> None:
    """The peer checks the broker's proof too; messages behind a forged Welcome never surface."""
    assume(not equivalent_hmac_keys(real_key, forged_key))
    peer = Connection(Side.PEER, real_key, os.urandom)
    answer = decode(*_split(peer.receive_data(encode(Challenge(os.urandom(32))))))
    assert isinstance(answer, Answer)
    stream = encode(Welcome(_digest(forged_key, b"broker", answer.nonce))) + b"".join(map(encode, tail))
    exc, events = feed_expecting_wire_errors(peer, data.draw(chunked(stream)), WIRE_ERRORS)
    assert isinstance(exc, AuthenticationError) and events == []


def test_an_authkey_with_a_trailing_nul_is_a_wrong_key() -> None:
    broker = Connection(Side.BROKER, b"mesh-key", os.urandom)
    peer = Connection(Side.PEER, b"mesh-key\x00", os.urandom)
    answer = peer.receive_data(broker.initiate())
    with pytest.raises(AuthenticationError):
        broker.receive_data(answer)


# -- after authentication -------------------------------------------------------------------

@FAST
@given(msg=st.one_of(app_messages, handshake_messages))
def test_encode_decode_round_trip(msg: Message) -> None:
    frame = encode(msg)
    kind, body = _split(frame)
    assert kind == msg.KIND
    assert decode(kind, body) == msg


@FAST
@given(data=st.data(), msgs=st.lists(app_messages, max_size=8), to_broker=st.booleans())
def test_messages_round_trip_after_auth_for_any_chunking(
        data: st.DataObject, msgs: list[Message], to_broker: bool) -> None:
    broker, peer = ready_pair()
    sender, receiver = (peer, broker) if to_broker else (broker, peer)
    stream = b"".join(sender.send(m) for m in msgs)
    with no_unpickling():
        out, events = feed(receiver, data.draw(chunked(stream)))
    assert out == b""
    assert events == msgs
    assert receiver._decoder.buffered == 0


@FAST
@given(data=st.data(), stream=streams(st.one_of(app_messages, handshake_messages)),
       to_broker=st.booleans())
def test_garbage_after_auth_raises_only_remote_protocol_error(
        data: st.DataObject, stream: bytes, to_broker: bool) -> None:
    """After the handshake, bytes decode to valid messages or raise RemoteProtocolError.

    Every message that does decode re-encodes to the very bytes it came from (one
    encoding per message: nothing is read that a sender did not write)."""
    broker, peer = ready_pair()
    receiver = broker if to_broker else peer
    with no_unpickling():
        exc, events = feed_expecting_wire_errors(receiver, data.draw(chunked(stream)), (RemoteProtocolError,))
    assert all(type(m).KIND not in HANDSHAKE_KINDS for m in events)
    assert b"".join(map(encode, events)) == stream[: sum(len(encode(m)) for m in events)]
    if exc is None:
        assert receiver.phase is Phase.READY


@FAST
@given(data=st.data(), length=st.integers(MAX_FRAME_BYTES + 1, 2**32 - 1), kind=st.integers(0, 255))
def test_post_auth_frame_limit_refuses_an_oversized_length(data: st.DataObject, length: int, kind: int) -> None:
    broker, _ = ready_pair()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        feed(broker, data.draw(chunked(HEADER.pack(length, kind) + b"x" * 16)))
    assert broker.phase is Phase.CLOSED and broker._decoder.buffered == 0


@FAST
@given(length=st.integers(MAX_HANDSHAKE_FRAME_BYTES + 1, MAX_FRAME_BYTES), kind=st.sampled_from(sorted(KINDS)))
def test_post_auth_large_declared_length_buffers_only_what_arrived(length: int, kind: int) -> None:
    """A large frame still in flight costs the bytes received so far, not its declared size."""
    broker, _ = ready_pair()
    sent = HEADER.pack(length, kind) + b"y" * 100
    tracemalloc.start()
    try:
        assert broker.receive_data(sent) == b""
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and broker._decoder.buffered == len(sent)
    assert broker.phase is Phase.READY and broker.events() == []


def test_equivalent_hmac_keys_helper() -> None:
    """The helper the properties use to skip keys HMAC cannot tell apart."""
    long = b"z" * 100
    assert equivalent_hmac_keys(b"a", b"a\x00") and equivalent_hmac_keys(long, hashlib.sha256(long).digest())
    assert not equivalent_hmac_keys(b"a", b"b")
    same = hmac.new(b"a", b"m", hashlib.sha256).digest() == hmac.new(b"a\x00", b"m", hashlib.sha256).digest()
    assert same


def test_handshake_classes_are_the_handshake_kinds() -> None:
    assert {cls.KIND for cls in HANDSHAKE_CLASSES} == set(HANDSHAKE_KINDS)
    assert Rejected in HANDSHAKE_CLASSES and len(APP_CLASSES) + len(HANDSHAKE_CLASSES) == len(KINDS)


# -- the short paths must agree with receive_data ---------------------------------------------

def _twin(receiver: Connection) -> Connection:
    """A READY connection of the same side, to replay bytes through ``receive_data``."""
    broker, peer = ready_pair()
    return broker if receiver.side is Side.BROKER else peer


@FAST
@given(data=st.one_of(streams(app_messages), message_of(Op).map(encode)), split=st.integers(0, 64))
def test_take_op_agrees_with_receive_data(data: bytes, split: int) -> None:
    """The broker's short path takes exactly one whole Op frame, equal to what
    ``receive_data`` would decode, and otherwise takes nothing and raises nothing."""
    broker, _ = ready_pair()
    with no_unpickling():
        op = broker.take_op(memoryview(data))
    if op is None:
        assert broker.phase is Phase.READY and broker._decoder.buffered == 0
        return
    twin = _twin(broker)
    twin.receive_data(data)
    assert [encode(m) for m in twin.events()] == [encode(op)] == [data]
    # With bytes of an earlier read still buffered, the short path stands aside.
    if split:
        broker.receive_data(data[: min(split, len(data) - 1)])
        assert broker.take_op(data) is None


@FAST
@given(data=st.one_of(streams(app_messages), message_of(Reply).map(encode)), rid=st.integers(-(2**63), 2**63 - 1),
       use_own_rid=st.booleans())
def test_take_reply_agrees_with_receive_data(data: bytes, rid: int, use_own_rid: bool) -> None:
    """The caller's short path returns a payload only for one whole Reply to its rid."""
    _, peer = ready_pair()
    twin = _twin(peer)
    try:
        twin.receive_data(data)
        events: list[Message] | None = twin.events()
    except RemoteProtocolError:
        events = None
    if use_own_rid and events and isinstance(events[0], Reply):
        rid = events[0].rid
    with no_unpickling():
        payload = peer.take_reply(memoryview(data), rid)
    if payload is None:
        assert peer.phase is Phase.READY and peer._decoder.buffered == 0
        return
    assert events is not None and len(events) == 1 and encode(events[0]) == data
    assert isinstance(events[0], Reply) and events[0].rid == rid and events[0].payload == payload
