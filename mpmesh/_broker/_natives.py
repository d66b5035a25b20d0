"""The built-in typeids of a Manager, implemented in the broker: data types
(``dict``, ``list``, ``Namespace``, ``Value``, ``Array``) and the parking ones
(``_sync``, ``_queues``).

``NATIVE`` maps each typeid to its constructor, its kind and the methods its proxy may
call (the standard library's exposed lists). Data types are plain Python objects whose
methods are called directly; parking types get the caller's identity (``Native.call``).
A method listed in ``makes`` returns a new shared object instead of a copy: a dict's
``__iter__`` an ``Iterator`` over the real dict, so iterating its proxy is live, as in
the standard library (each ``next`` a call; changing the dict meanwhile raises there).
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from . import _queues, _sync

__all__ = [
    "CUSTOM", "DATA", "ITERATOR", "KEYED", "KEYED_WRITES", "NATIVE", "READS", "SYNC", "Array", "Namespace",
    "NativeType", "Value",
]

DATA: Final = 1   # called directly: obj.method(*args, **kwargs)
SYNC: Final = 2   # a Native: obj.call(method, waiter, ...) may park
CUSTOM: Final = 3  # a registered type's: user code, run off the loop (``_offload``)


class Namespace:
    """What ``Manager().Namespace()`` holds: attributes, shown sorted in its repr."""

    def __init__(self, /, **kwds: object) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        items = sorted(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({', '.join(items)})"


class Value:
    """What ``Manager().Value(typecode, value)`` holds (no type check, as in the stdlib)."""

    def __init__(self, typecode: str, value: object, lock: bool = True) -> None:
        self._typecode = typecode
        self._value = value

    def get(self) -> object:
        return self._value

    def set(self, value: object) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._typecode!r}, {self._value!r})"

    value = property(get, set)


def Array(typecode: str, sequence: Iterable[Any], lock: bool = True) -> array.array[Any]:  # noqa: N802
    """What ``Manager().Array(typecode, sequence)`` holds: an ``array.array``."""
    return array.array(typecode, sequence)


@dataclass(frozen=True, slots=True)
class NativeType:
    make: Callable[..., object]
    kind: int
    exposed: tuple[str, ...]
    # method -> (typeid, exposed) of the shared object its result becomes
    makes: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)


# What an ``Iterator`` made by a native method exposes (the standard library's IteratorProxy).
ITERATOR: Final = ("__next__", "send", "throw", "close")


_ACQUIRER: Final = ("acquire", "release")
_QUEUE: Final = ("empty", "full", "get", "get_nowait", "join", "put", "put_nowait", "qsize",
                 "task_done") + (("shutdown",) if _queues.ShutDown is not None else ())

NATIVE: Final[dict[str, NativeType]] = {
    "dict": NativeType(dict, DATA, (
        "__contains__", "__delitem__", "__getitem__", "__iter__", "__len__", "__setitem__",
        "clear", "copy", "get", "items", "keys", "pop", "popitem", "setdefault", "update",
        "values"), {"__iter__": ("Iterator", ITERATOR)}),
    "list": NativeType(list, DATA, (
        "__add__", "__contains__", "__delitem__", "__getitem__", "__len__", "__mul__",
        "__reversed__", "__rmul__", "__setitem__", "append", "count", "extend", "index",
        "insert", "pop", "remove", "reverse", "sort", "__imul__")),
    "Namespace": NativeType(Namespace, DATA, ("__getattribute__", "__setattr__", "__delattr__")),
    "Value": NativeType(Value, DATA, ("get", "set")),
    "Array": NativeType(Array, DATA, ("__len__", "__getitem__", "__setitem__")),
    "Lock": NativeType(_sync.Lock, SYNC, _ACQUIRER),
    "RLock": NativeType(_sync.RLock, SYNC, _ACQUIRER),
    "Semaphore": NativeType(_sync.Semaphore, SYNC, _ACQUIRER),
    "BoundedSemaphore": NativeType(_sync.BoundedSemaphore, SYNC, _ACQUIRER),
    "Condition": NativeType(_sync.Condition, SYNC, ("acquire", "release", "wait", "notify", "notify_all")),
    "Event": NativeType(_sync.Event, SYNC, ("is_set", "set", "clear", "wait")),
    "Barrier": NativeType(_sync.Barrier, SYNC, ("__getattribute__", "wait", "abort", "reset")),
    "Queue": NativeType(_queues.Queue, SYNC, _QUEUE),
    "JoinableQueue": NativeType(_queues.Queue, SYNC, _QUEUE),
}

# The methods of each data type that only read: a process may keep what they return
# (``_near``). Every other method is a write, and bumps the object's versions
# (``_versions``): by one key for KEYED_WRITES of a KEYED type, else the whole object.
READS: Final[dict[str, frozenset[str]]] = {
    "dict": frozenset({"__contains__", "__getitem__", "__iter__", "__len__", "copy", "get",
                       "items", "keys", "values"}),
    "list": frozenset({"__add__", "__contains__", "__getitem__", "__len__", "__mul__",
                       "__reversed__", "__rmul__", "count", "index"}),
    "Namespace": frozenset({"__getattribute__"}),
    "Value": frozenset({"get"}),
    "Array": frozenset({"__len__", "__getitem__"}),
}
KEYED: Final = frozenset({"dict", "Namespace"})
KEYED_WRITES: Final = frozenset({"__setitem__", "__delitem__", "pop", "setdefault",
                                 "__setattr__", "__delattr__"})
