"""The Pool's message set: the frames of the direct channel between a pool and each worker.

Nothing here does I/O or pickles (the pool and the worker do; the codec helps them). Both
ends are ours: a worker proves the pool's token with the broker's handshake
(``_connection``, keyed with the token; the pool proves it back) and then says HELLO,
before the pool unpickles anything it sends. A frame is the wire's
(``_wire._frames``: a 5-byte header, body length and kind, then the body, read with its
``FrameDecoder``), with kinds of its own::

    pool ──► worker   BATCH  u8 flags, u32 n, n × u64 chunk ids, pickle((functions, tasks))
                      STOP   (empty): finish the current task, then exit
    worker ──► pool   HELLO  u32 pid, child name (UTF-8)
                      READY  (empty): the initializer ran; send work
                      INIT_FAILED  an ERROR/ERROR_TEXT payload (the initializer raised)
                      RESULT u64 chunk id, u8 status, f64 seconds it took, payload
                      NACK   u8 what, u32 n, n × u64 chunk ids: that batch could not be
                             unpickled here (``what``: a function, or the tasks' data)

The chunk ids of a batch travel outside its pickle, so a worker that cannot unpickle a
batch can still say which chunks it did not run.
"""

from __future__ import annotations

import struct
from typing import Final

from ._connection import Connection, Side
from ._frames import HEADER
from ._messages import Challenge, encode

__all__ = [
    "BATCH",
    "CALL",
    "DATA_BY_VALUE",
    "ERROR",
    "ERROR_TEXT",
    "FNS_BY_VALUE",
    "HELLO",
    "INIT_FAILED",
    "MAP",
    "MAP1",
    "MAX_FRAME_BYTES",
    "MAX_HELLO_FRAME_BYTES",
    "NACK",
    "NACK_DATA",
    "NACK_FN",
    "OK",
    "READY",
    "RESULT",
    "STAR1",
    "STARMAP",
    "STOP",
    "UNREADABLE",
    "UNSENDABLE",
    "Blob",
    "HEADER",
    "error_payload",
    "frame",
    "handshake_for_workers",
    "pack_ids",
    "pack_pair",
    "result_frame",
    "split_error_payload",
    "split_pair",
    "unpack_ids",
]

RESULT_HEAD: Final = struct.Struct("!QBd")
HELLO_HEAD: Final = struct.Struct("!I")
_COUNT: Final = struct.Struct("!I")
TOKEN_BYTES: Final = 32
# A frame larger than this is a bug or an attack; the other side closes the channel. (A
# pool's frames carry results, which may be larger than a broker's messages.)
MAX_FRAME_BYTES: Final = 1 << 31
# Until a connection has said HELLO the pool reads only that: 4 bytes and a worker's
# short name. Anything bigger is not one of our workers.
MAX_HELLO_FRAME_BYTES: Final = 4096

# Frame kinds.
HELLO: Final = 1
READY: Final = 2
INIT_FAILED: Final = 3
RESULT: Final = 4
NACK: Final = 5
BATCH: Final = 10
STOP: Final = 11

# BATCH flags: what was pickled by value already (a failure to unpickle it is final).
FNS_BY_VALUE: Final = 1
DATA_BY_VALUE: Final = 2

# NACK reasons.
NACK_FN: Final = 1    # a function: the pool resends the batch with functions by value
NACK_DATA: Final = 2  # the tasks' data: the pool resends each chunk alone, by value

# Task kinds: how a worker calls the function on a chunk's data.
CALL: Final = 0      # data = (args, kwds)         -> fn(*args, **kwds)
MAP1: Final = 1      # data = item                 -> fn(item)
MAP: Final = 2       # data = [items]              -> [fn(x) for x in items]
STAR1: Final = 3     # data = args                 -> fn(*args)
STARMAP: Final = 4   # data = [args]               -> [fn(*a) for a in items]

# Result statuses.
OK: Final = 0          # payload: the pickled result
ERROR: Final = 1       # payload: u32 n, n bytes of pickled (exception, traceback text), the text
ERROR_TEXT: Final = 2  # payload: the traceback text (the exception could not be pickled)
UNSENDABLE: Final = 3  # payload: a pair (pack_pair): repr of why the result could not be pickled, repr of the result (UTF-8)
UNREADABLE: Final = 4  # payload: why the task could not be unpickled (UTF-8)


def handshake_for_workers(token: bytes, challenge: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """A worker's half of the handshake, done by the pool, which knows the token and both
    nonces: the answer a worker sends to ``challenge``, and the proof the pool sends back.
    A fresh worker then sends and compares bytes: no hashing in a process whose every
    first touch of an object copies a page."""
    worker = Connection(Side.PEER, token, lambda n: nonce)
    answer = worker.receive_handshake(encode(Challenge(challenge)))
    pool = Connection(Side.BROKER, token, lambda n: challenge)
    pool.initiate()
    return answer, pool.receive_handshake(answer)


class Blob:
    """Bytes pickled on their own inside a batch, unpickled by the worker one at a time.

    A batch that pickle refuses as a whole is rebuilt with each function and each task's
    data as a Blob, so one bad item fails only its own task.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[type[Blob], tuple[bytes]]:
        return (Blob, (self.data,))


def frame(kind: int, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind) + body


def pack_ids(ids: list[int]) -> bytes:
    return _COUNT.pack(len(ids)) + struct.pack(f"!{len(ids)}Q", *ids)


def unpack_ids(body: memoryview | bytes) -> tuple[list[int], int]:
    """Return the ids at the start of ``body`` and the offset just past them."""
    (n,) = _COUNT.unpack_from(body)
    end = 4 + 8 * n
    return list(struct.unpack_from(f"!{n}Q", body, 4)), end


def result_frame(cid: int, status: int, elapsed: float, payload: bytes) -> bytes:
    return HEADER.pack(RESULT_HEAD.size + len(payload), RESULT) + RESULT_HEAD.pack(cid, status, elapsed) + payload


def pack_pair(head: bytes, tail: bytes) -> bytes:
    """Two byte strings in one payload: u32 n, the n bytes of ``head``, then ``tail``."""
    return _COUNT.pack(len(head)) + head + tail


def split_pair(payload: bytes) -> tuple[bytes, bytes]:
    (n,) = _COUNT.unpack_from(payload)
    return payload[4:4 + n], payload[4 + n:]


def error_payload(packed: bytes | None, text: str) -> tuple[int, bytes]:
    """``(status, payload)`` for an exception packed by ``_codec.pack_exception``."""
    raw = text.encode("utf-8", "replace")
    if packed is None:
        return ERROR_TEXT, raw
    return ERROR, pack_pair(packed, raw)


def split_error_payload(payload: bytes) -> tuple[bytes, str]:
    packed, raw = split_pair(payload)
    return packed, raw.decode("utf-8", "replace")

