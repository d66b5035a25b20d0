"""One immutable record (``_record.record``) per message kind, and their byte encoding.

Routing metadata is encoded with ``struct`` and UTF-8, never pickle: the broker routes
a request without unpickling anything, and garbage fails here, at decode time. User data
travels in ``payload`` fields as opaque bytes (see ``_codec``).

Field order rule: numeric fields (int, float) first, then ``str`` and ``bytes`` fields.
Each class's layout is compiled once into a ``struct.Struct``:
``<numbers...><u32 length of each variable field...><variable fields...>``.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import struct
from typing import Any, ClassVar, Final

from .._errors import MessageTooLarge, RemoteProtocolError
from ._frames import HEADER, MAX_FRAME_BYTES
from ._record import record

__all__ = [
    "Answer", "Cancel", "Challenge", "ErrorCode", "Failure", "Goodbye", "Heartbeat",
    "Hello", "KINDS", "Message", "Op", "Push", "Ready", "Rejected", "Reply", "Request",
    "MAX_MESSAGE_BYTES", "Role", "Serve", "Shutdown", "Welcome", "check_size", "decode", "encode",
    "encode_op", "op_frame", "reply_payload", "HANDSHAKE_KINDS",
]

_FORMATS: Final = {"int": "q", "float": "d", "bool": "?"}
# The largest message (frame body: fields and payload) a peer may send: the frame limit
# every receiver enforces. ``encode`` refuses a larger one (MessageTooLarge), so the
# sender learns of it before a byte goes out, instead of the receiver dropping it.
MAX_MESSAGE_BYTES: Final = MAX_FRAME_BYTES


class Role(enum.IntEnum):
    """What kind of process a peer is; decides what the broker lets it do."""

    CLIENT = 0  # joined with connect(), a Manager client, a proxy user
    CHILD = 1   # a worker the master spawned
    MASTER = 2  # the in-process host of a Master


class ErrorCode(enum.IntEnum):
    """Why a request failed; each maps to one exception class on the caller's side."""

    REMOTE = 1          # payload: pickled (exception, traceback text)
    REMOTE_TEXT = 2     # an exception that could not be pickled; message holds the text
    NOT_FOUND = 3
    NO_HANDLER = 4
    TIMEOUT = 5
    WORKER_LOST = 6
    SERIALIZATION = 7
    CLOSED = 8
    CANCELLED = 9       # child -> broker only: a cancelled request never ran
    UNAVAILABLE = 10    # the target is down for good
    BAD_REQUEST = 11    # ValueError-like misuse detected by the broker


class Message:
    """Base of every message. ``KIND`` is the frame's kind byte."""

    __slots__ = ()
    KIND: ClassVar[int]


@record
class Challenge(Message):
    KIND: ClassVar[int] = 1
    nonce: bytes


@record
class Answer(Message):
    KIND: ClassVar[int] = 2
    digest: bytes
    nonce: bytes


@record
class Welcome(Message):
    KIND: ClassVar[int] = 3
    digest: bytes


@record
class Rejected(Message):
    KIND: ClassVar[int] = 4
    reason: str


@record
class Hello(Message):
    """First message after the handshake: who this peer is."""

    KIND: ClassVar[int] = 10
    pid: int
    role: int
    capacity: int       # requests it accepts at once (1 = sequential)
    name: str           # "" for an anonymous client
    group: str
    hostname: str


@record
class Ready(Message):
    KIND: ClassVar[int] = 11
    instance_id: int
    name: str


@record
class Request(Message):
    """Ask ``target`` (a name, or ``target_id`` >= 0) to run ``action``."""

    KIND: ClassVar[int] = 20
    rid: int
    priority: int
    target_id: int      # an instance id, or -1 to route by ``target``
    retries: int        # further attempts after WorkerLost / RequestTimeout
    timeout: float      # seconds for each attempt, < 0 for none
    retry_delay: float
    action: str
    target: str         # child or group name; "" = the mesh's host (the master)
    payload: bytes


@record
class Reply(Message):
    KIND: ClassVar[int] = 21
    rid: int
    payload: bytes


@record
class Failure(Message):
    KIND: ClassVar[int] = 22
    rid: int
    code: int
    message: str
    payload: bytes


@record
class Cancel(Message):
    """Broker -> worker: the caller gave up on this request; skip it if not started."""

    KIND: ClassVar[int] = 23
    rid: int


@record
class Op(Message):
    """An operation on broker-held state (cache, locks, pub/sub, objects, admin)."""

    KIND: ClassVar[int] = 30
    rid: int
    timeout: float
    component: str
    op: str
    payload: bytes


@record
class Push(Message):
    """Broker -> peer, outside any request: a pub/sub delivery or a notice."""

    KIND: ClassVar[int] = 31
    stream: int
    key: str
    payload: bytes


@record
class Heartbeat(Message):
    KIND: ClassVar[int] = 40
    busy: int


@record
class Shutdown(Message):
    """Broker -> child: finish what you hold, take nothing new, exit."""

    KIND: ClassVar[int] = 41
    timeout: float


@record
class Serve(Message):
    """Peer -> broker: send me up to ``capacity`` requests at once (0: none).

    A child says Hello with capacity 0 and sends Serve from ``run()``, so no request
    reaches it before its handlers are registered.
    """

    KIND: ClassVar[int] = 43
    capacity: int


@record
class Goodbye(Message):
    """Peer -> broker: I am leaving on purpose (not a crash)."""

    KIND: ClassVar[int] = 42


class _Layout:
    __slots__ = ("cls", "fixed", "get", "n_num", "var_kinds")

    def __init__(self, cls: type[Message]) -> None:
        fmt = "!"
        var_kinds: list[str] = []
        seen_var = False
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            if kind in _FORMATS:
                if seen_var:
                    raise TypeError(f"{cls.__name__}: numeric field after a variable one")
                fmt += _FORMATS[kind]
            elif kind in ("str", "bytes"):
                seen_var = True
                var_kinds.append(kind)
            else:
                raise TypeError(f"{cls.__name__}.{field.name}: unsupported type {kind}")
        self.cls = cls
        names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
        getter = operator.attrgetter(*names) if names else (lambda _msg: ())
        self.get = (lambda msg: (getter(msg),)) if len(names) == 1 else getter
        self.n_num = len(fmt) - 1
        self.var_kinds = tuple(var_kinds)
        self.fixed = struct.Struct(fmt + "I" * len(var_kinds))


KINDS: Final[dict[int, _Layout]] = {
    cls.KIND: _Layout(cls)
    for cls in (Challenge, Answer, Welcome, Rejected, Hello, Ready, Request, Reply,
                Failure, Cancel, Op, Push, Heartbeat, Shutdown, Serve, Goodbye)
}
HANDSHAKE_KINDS: Final = frozenset({Challenge.KIND, Answer.KIND, Welcome.KIND, Rejected.KIND})
_BY_CLASS: Final = {layout.cls: layout for layout in KINDS.values()}
_pack_header = HEADER.pack


_REQUEST_HEAD: Final = struct.Struct("!IBqqqqddIII")  # frame header + Request's fixed part
_REPLY_HEAD: Final = struct.Struct("!IBqI")
_OP_HEAD: Final = struct.Struct("!IBqdIII")
_REQUEST_FIXED: Final = KINDS[Request.KIND].fixed
_REPLY_FIXED: Final = KINDS[Reply.KIND].fixed
_OP_FIXED: Final = KINDS[Op.KIND].fixed


def encode(msg: Message) -> bytes:
    """Return the whole frame (header included) for ``msg``."""
    cls = type(msg)
    # Hand-written paths for the messages on every request's and operation's path (~3x faster).
    if cls is Reply:
        payload: bytes = msg.payload  # type: ignore[attr-defined]
        if len(payload) > MAX_MESSAGE_BYTES - 12:
            raise _too_large(12 + len(payload))
        return _REPLY_HEAD.pack(12 + len(payload), 21, msg.rid, len(payload)) + payload  # type: ignore[attr-defined]
    if cls is Request:
        action = msg.action.encode()  # type: ignore[attr-defined]
        target = msg.target.encode()  # type: ignore[attr-defined]
        payload = msg.payload  # type: ignore[attr-defined]
        size = 60 + len(action) + len(target) + len(payload)
        if size > MAX_MESSAGE_BYTES:
            raise _too_large(size)
        return b"".join((_REQUEST_HEAD.pack(
            size, 20, msg.rid, msg.priority, msg.target_id, msg.retries,  # type: ignore[attr-defined]
            msg.timeout, msg.retry_delay, len(action), len(target), len(payload)),  # type: ignore[attr-defined]
            action, target, payload))
    if cls is Op:
        return encode_op(msg.rid, msg.timeout, msg.component.encode(), msg.op.encode(),  # type: ignore[attr-defined]
                         msg.payload)  # type: ignore[attr-defined]
    layout = _BY_CLASS[cls]
    values = layout.get(msg)
    nums = values[: layout.n_num]
    var: list[bytes] = [v.encode() if isinstance(v, str) else v for v in values[layout.n_num :]]
    body_len = layout.fixed.size + sum(map(len, var))
    if body_len > MAX_MESSAGE_BYTES:
        raise _too_large(body_len)
    fixed = layout.fixed.pack(*nums, *map(len, var))
    return b"".join((_pack_header(body_len, msg.KIND), fixed, *var))


def encode_op(rid: int, timeout: float, component: bytes, op: bytes, payload: bytes) -> bytes:
    """The frame of ``Op(rid, timeout, component, op, payload)``, names already encoded."""
    size = 28 + len(component) + len(op) + len(payload)
    if size > MAX_MESSAGE_BYTES:
        raise _too_large(size)
    return b"".join((_OP_HEAD.pack(size, 30, rid, timeout, len(component), len(op), len(payload)),
                     component, op, payload))


def _too_large(size: int) -> MessageTooLarge:
    return MessageTooLarge(f"a message of {size} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit "
                           f"(mpmesh.MAX_MESSAGE_BYTES); nothing was sent: keep data this large in "
                           f"shared memory or a file and send its name")


def check_size(msg: Message) -> None:
    """Raise MessageTooLarge if ``msg`` could not be sent as one frame, for a transport
    that hands messages over without encoding them (a Master's own client)."""
    payload = getattr(msg, "payload", b"")
    if len(payload) > MAX_MESSAGE_BYTES - _NAMES_ROOM:  # only then can it be: encode to know
        encode(msg)


# Room left for a message's fixed fields and names by ``check_size``'s first look.
_NAMES_ROOM: Final = 1 << 16


def reply_payload(frame: bytes | bytearray | memoryview, rid: int) -> bytes | None:
    """The payload if ``frame`` is exactly one whole Reply frame to ``rid``, else None."""
    n = len(frame)
    if n < 17:
        return None
    length, kind, r, size = _REPLY_HEAD.unpack_from(frame)
    if kind != 21 or r != rid or length != n - 5 or size != n - 17:
        return None
    return bytes(frame[17:])


def op_frame(frame: bytes | bytearray | memoryview) -> Op | None:
    """The Op if ``frame`` is exactly one whole, well-formed Op frame, else None."""
    n = len(frame)
    if n < 33:
        return None
    length, kind, rid, timeout, n_c, n_o, n_p = _OP_HEAD.unpack_from(frame)
    if kind != 30 or length != n - 5 or 33 + n_c + n_o + n_p != n:
        return None
    data = bytes(frame)  # one copy; slices of it are cheaper than of a memoryview
    o = 33 + n_c
    try:
        return Op(rid, timeout, data[33:o].decode(), data[o : o + n_o].decode(), data[o + n_o :])
    except UnicodeDecodeError:
        return None


def decode(kind: int, body: bytes) -> Message:
    """Build the message of ``kind`` from its body; RemoteProtocolError on garbage."""
    if kind == 21 and len(body) >= 12:
        rid, size = _REPLY_FIXED.unpack_from(body)
        if size == len(body) - 12:
            return Reply(rid, body[12:])
    elif kind == 20 and len(body) >= 60:
        rid, prio, tid, retries, timeout, delay, n_a, n_t, n_p = _REQUEST_FIXED.unpack_from(body)
        if 60 + n_a + n_t + n_p == len(body):
            try:
                return Request(rid, prio, tid, retries, timeout, delay, body[60 : 60 + n_a].decode(),
                               body[60 + n_a : 60 + n_a + n_t].decode(), body[60 + n_a + n_t :])
            except UnicodeDecodeError:
                pass  # the general path below reports it
    elif kind == 30 and len(body) >= 28:
        rid, timeout, n_c, n_o, n_p = _OP_FIXED.unpack_from(body)
        if 28 + n_c + n_o + n_p == len(body):
            try:
                return Op(rid, timeout, body[28 : 28 + n_c].decode(), body[28 + n_c : 28 + n_c + n_o].decode(),
                          body[28 + n_c + n_o :])
            except UnicodeDecodeError:
                pass
    layout = KINDS.get(kind)
    if layout is None:
        raise RemoteProtocolError(f"unknown message kind {kind}")
    fixed = layout.fixed
    try:
        head = fixed.unpack_from(body, 0)
        n_num = layout.n_num
        values: list[Any] = list(head[:n_num])
        pos = fixed.size
        for size, vkind in zip(head[n_num:], layout.var_kinds):
            chunk = body[pos : pos + size]
            if len(chunk) != size:
                raise ValueError("truncated field")
            pos += size
            values.append(chunk.decode() if vkind == "str" else chunk)
        if pos != len(body):
            raise ValueError(f"{len(body) - pos} trailing bytes")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(
            f"malformed {layout.cls.__name__} frame ({len(body)} bytes): {exc}"
        ) from None
    return layout.cls(*values)
