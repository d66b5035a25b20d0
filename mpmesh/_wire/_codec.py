"""User payloads: pickle protocol 5 first, dill when pickle refuses.

Lambdas, closures and functions defined in ``__main__`` or interactively cross processes
through dill. Plain ``pickle.loads`` reads both (dill's output only refers to importable
helpers in ``dill``), so the reader never needs to know which one wrote the bytes.
"""

from __future__ import annotations

import functools
import io
import pickle
import traceback
from typing import Any, Final

from .._errors import RemoteError, RemoteTraceback, SerializationError

__all__ = ["dumps", "dumps_by_value", "loads", "loads_builtin", "pack_exception", "unpack_exception"]

PROTOCOL: Final = 5
# Types pickle has refused once; their instances go straight to dill afterwards.
_DILL_TYPES: set[type] = set()


def _dill_dumps(obj: object, refuse: tuple[type, ...] = ()) -> bytes:
    import dill  # imported lazily: ~30 ms, and most payloads never need it

    if not refuse:
        return dill.dumps(obj, protocol=PROTOCOL, recurse=True)  # type: ignore[no-any-return]
    sink = _Sink()
    _refusing_dill_pickler(refuse)(sink, PROTOCOL, recurse=True).dump(obj)
    return b"".join(sink)


@functools.cache
def _refusing_dill_pickler(refuse: tuple[type, ...]) -> type[Any]:
    """dill's Pickler, except that instances of ``refuse`` are reduced the way plain pickle
    reduces them (which, for a lock or an open file, raises pickle's own error) instead of
    being rebuilt by dill as a look-alike (a new, unrelated lock; the file opened again by
    name on the other side)."""
    import dill

    class RefusingPickler(dill.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: object) -> Any:  # a reduce value, or NotImplemented
            if isinstance(obj, refuse):
                return obj.__reduce_ex__(self.proto)
            return NotImplemented

    return RefusingPickler


def dumps(obj: object, *, refuse: tuple[type, ...] = ()) -> bytes:
    """Serialize ``obj``; raise SerializationError naming its type if nothing can.

    ``refuse``: types dill must not rebuild (see ``_refusing_dill_pickler``): pickle's
    refusal of them stands. The SerializationError's ``__cause__`` is what the last
    serializer tried raised.
    """
    cls = type(obj)
    if cls not in _DILL_TYPES:
        try:
            return pickle.dumps(obj, PROTOCOL)
        except Exception as exc:
            first: BaseException = exc
        else:  # pragma: no cover - unreachable
            pass
    else:
        first = TypeError("pickle refused this type before")
    try:
        data = _dill_dumps(obj, refuse)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize object of type {cls.__module__}.{cls.__qualname__}: "
            f"pickle: {first}; dill: {exc}"
        ) from exc
    # Remember user types only: one dict holding a lambda says nothing about other dicts.
    if cls.__module__ != "builtins":
        _DILL_TYPES.add(cls)
    return data


class _MainRefused(Exception):
    pass


class _Sink(list):  # type: ignore[type-arg]
    """A write-only file for Pickler, without importing io into the wire layer."""

    write = list.append


class _ByReferencePickler(pickle.Pickler):
    """Plain pickle, except that nothing defined in ``__main__`` may go by reference."""

    def reducer_override(self, obj: object) -> Any:  # a reduce value, or NotImplemented
        if getattr(obj, "__module__", None) == "__main__":
            raise _MainRefused
        return NotImplemented


def dumps_by_value(obj: object, *, refuse: tuple[type, ...] = ()) -> bytes:
    """Serialize a spawn target so a fresh process can rebuild it.

    Importable functions and classes go by reference with plain pickle (the child then
    needs no dill); anything from ``__main__``, lambdas and closures go by value with
    dill, since a child's ``__main__`` is not the parent's. ``refuse``: as for ``dumps``.
    """
    sink = _Sink()
    try:
        _ByReferencePickler(sink, PROTOCOL).dump(obj)
        return b"".join(sink)
    except Exception:
        pass
    try:
        return _dill_dumps(obj, refuse)
    except Exception as exc:
        cls = type(obj)
        raise SerializationError(
            f"cannot serialize object of type {cls.__module__}.{cls.__qualname__}: {exc}"
        ) from exc


def loads(data: bytes) -> object:
    """Deserialize what ``dumps`` produced; SerializationError if that fails."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"cannot deserialize payload ({len(data)} bytes): {exc!r}") from exc


def pack_exception(exc: BaseException) -> tuple[bytes | None, str]:
    """Return ``(pickled (exc, traceback text) or None, traceback text)``.

    The exception is checked to survive a round trip here, in the process that raised
    it, so the caller never receives bytes it cannot rebuild.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cause, context = exc.__cause__, exc.__context__
    tb = exc.__traceback__
    try:
        exc.__cause__ = exc.__context__ = None
        exc.__traceback__ = None
        data = pickle.dumps((exc, text), PROTOCOL)
        pickle.loads(data)
    except Exception:
        try:
            data = _dill_dumps((exc, text))
            pickle.loads(data)
        except Exception:
            return None, text
    finally:
        exc.__cause__, exc.__context__, exc.__traceback__ = cause, context, tb
    return data, text


def unpack_exception(payload: bytes | None, text: str) -> BaseException:
    """Rebuild a remote exception with its traceback chained as ``__cause__``."""
    if payload:
        try:
            exc, tb_text = pickle.loads(payload)
        except Exception:
            pass
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(tb_text)
                return exc
    return RemoteError(text)


# -- built-in values only (what the broker may compute on) ---------------------------------

# Built-in callables a pickle of plain data may name (sets, complex numbers...).
_BUILTIN_NAMES: Final = frozenset({"complex", "set", "frozenset", "bytearray", "slice", "range"})


class _BuiltinUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module in ("builtins", "__builtin__") and name in _BUILTIN_NAMES:  # the second: protocols < 3
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a built-in value; the broker only computes on "
            "built-in types (str, bytes, int, float, bool, None, tuple, list, dict, set...)")


def loads_builtin(data: bytes | memoryview) -> object:
    """Unpickle built-in values only, so no user code runs and no user module is imported
    (the broker reads cache keys and ``incr``/``cas`` operands with it); TypeError else."""
    try:
        # Every pickle goes through ``find_class``, whatever its protocol or opcodes
        # (GLOBAL, INST, STACK_GLOBAL, EXT...): no scan for opcodes decides it.
        return _BuiltinUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise TypeError(f"cannot read this argument on the broker: {exc}") from None
