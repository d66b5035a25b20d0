"""How the object table answers a call: a value pickled for its caller, an exception packed
as the caller re-raises it, and the standard library's texts for a freed object, a method
not exposed or a failed create. Shared by the calls run on the loop and those run off it.
"""

from __future__ import annotations

from typing import Final

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Reply
from ._entries import Entry
from ._plain import Blob
from ._refs import TypeSpec, public_methods

__all__ = [
    "FALLBACKS", "PICKLED_NONE", "PICKLED_TRUE", "create_failed", "exposed_of", "gone", "not_exposed",
    "to_failure", "to_reply",
]

# Methods every shared object answers, exposed or not: a copy of it, its repr, its str.
FALLBACKS: Final = frozenset({"#GETVALUE", "__repr__", "__str__"})
PICKLED_NONE: Final = _codec.dumps(None)
PICKLED_TRUE: Final = _codec.dumps(True)
_VIEWS: Final[tuple[type, ...]] = (type({}.keys()), type({}.values()), type({}.items()))


def to_reply(rid: int, value: object) -> Reply | Failure:
    """The Reply carrying ``value`` to its caller (a Failure if it cannot be pickled)."""
    if value is None:  # what every write returns
        return Reply(rid, PICKLED_NONE)
    if value is True:  # what an acquire returns
        return Reply(rid, PICKLED_TRUE)
    if type(value) is Blob:
        return value.reply(rid)
    if type(value) in _VIEWS:
        value = list(value)  # type: ignore[call-overload]
    try:
        return Reply(rid, _codec.dumps(value))
    except SerializationError as exc:
        return Failure(rid, ErrorCode.SERIALIZATION, f"the result cannot be sent back: {exc}", b"")


def to_failure(rid: int, exc: BaseException, *, keep_traceback: bool = False) -> Failure:
    """The Failure its caller re-raises as ``exc`` (the broker's frames dropped unless
    ``keep_traceback``: a registered type's own code keeps its traceback)."""
    if isinstance(exc, SerializationError):
        return Failure(rid, ErrorCode.SERIALIZATION, str(exc), b"")
    if not keep_traceback:
        exc.__traceback__ = None  # the broker's own frames are not the caller's business
    payload, text = _codec.pack_exception(exc)
    if payload is None:
        return Failure(rid, ErrorCode.REMOTE_TEXT, text, b"")
    return Failure(rid, ErrorCode.REMOTE, f"{type(exc).__name__}: {exc}", payload)


def create_failed(rid: int, exc: BaseException) -> Failure:
    """A failed create is a RemoteError carrying the traceback text, as in the stdlib."""
    _, text = _codec.pack_exception(exc)
    return Failure(rid, ErrorCode.REMOTE_TEXT, "\n" + "-" * 75 + "\n" + text + "-" * 75, b"")


def exposed_of(spec: TypeSpec | None, obj: object) -> tuple[str, ...]:
    """The methods a registered type's new object exposes (its spec's, or its public ones)."""
    exposed = spec.exposed if spec is not None and spec.exposed else public_methods(obj)
    if spec is not None and spec.method_to_typeid:
        exposed = tuple(exposed) + tuple(m for m in spec.method_to_typeid if m not in exposed)
    return tuple(exposed)


def gone(rid: int, oid: int) -> Failure:
    """The answer to a call on an object that was freed."""
    return Failure(rid, ErrorCode.NOT_FOUND, f"shared object {oid} does not exist (any more)", b"")


def not_exposed(rid: int, entry: Entry, method: str) -> Failure:
    """A RemoteError (with this text) in the caller, as in the standard library."""
    return Failure(rid, ErrorCode.REMOTE_TEXT,
                   f"AttributeError: method {method!r} of {type(entry.obj)!r} object "
                   f"is not in exposed={tuple(sorted(entry.exposed))!r}", b"")
