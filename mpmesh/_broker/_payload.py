"""Op payloads of the shared-state components: a small pickled head, then opaque blobs.

    payload = <u32 length of head> <head: pickle of built-in values> <blob> <blob> ...

The head carries what the broker must compute on (cache name, key, TTL, blob lengths);
the blobs are user values pickled by the caller, which the broker stores or forwards
untouched. Heads are read with ``safe_loads``: only built-in types (no ``find_class``
beyond a short allowlist), so nothing a peer sends can run user code, or import a user
module, on the broker's loop (which serves everyone).

Nothing here does I/O.
"""

from __future__ import annotations

import struct
from typing import Final

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Reply

__all__ = ["MISSING", "Missing", "fail", "pack", "reply", "safe_loads", "split", "value_reply"]

_LEN: Final = struct.Struct("!I")


def safe_loads(data: bytes | memoryview) -> object:
    """Unpickle built-in values only; TypeError for anything else (or for garbage)."""
    return _codec.loads_builtin(data)


class Missing:
    """The value of a key that is not there; travels as a reference to ``MISSING``."""

    _instance: Missing | None = None

    def __new__(cls) -> Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self) -> str:
        return "MISSING"

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = Missing()
MISSING_BYTES: Final = _codec.dumps(MISSING)


def pack(head: object, *blobs: bytes) -> bytes:
    """Caller side: the payload for ``head`` (built-in values) and pickled ``blobs``."""
    data = _codec.dumps(head)
    return b"".join((_LEN.pack(len(data)), data, *blobs))


def split(payload: bytes) -> tuple[object, bytes]:
    """Broker side: ``(head, the blobs' bytes)``; TypeError when malformed."""
    try:
        (n,) = _LEN.unpack_from(payload)
    except struct.error:
        raise TypeError("malformed shared-state payload") from None
    end = 4 + n
    if end > len(payload):
        raise TypeError("malformed shared-state payload")
    return safe_loads(payload[4:end]), payload[end:]


def reply(rid: int, value: object) -> Reply:
    """A Reply carrying ``value`` (built-in values the broker made itself)."""
    return Reply(rid, _codec.dumps(value))


def value_reply(rid: int, blob: bytes | None) -> Reply:
    """A Reply carrying a stored value's pickled bytes as they are (MISSING for None)."""
    return Reply(rid, MISSING_BYTES if blob is None else blob)


def fail(rid: int, exc: BaseException) -> Failure:
    """A Failure the caller re-raises as ``exc``'s own type."""
    if isinstance(exc, SerializationError):
        return Failure(rid, ErrorCode.SERIALIZATION, str(exc), b"")
    data, text = _codec.pack_exception(exc)
    if data is None:
        return Failure(rid, ErrorCode.REMOTE_TEXT, text, b"")
    return Failure(rid, ErrorCode.REMOTE, f"{type(exc).__name__}: {exc}", data)
