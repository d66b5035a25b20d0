"""The proxy types of the built-in typeids: explicit classes with typed methods, each a
thin call of ``BaseProxy._callmethod`` (no ``exec``-generated methods, unlike the
standard library's ``MakeProxyType``).

Iterating a dict, list or array proxy is live, as in the standard library: one call per
item, each reading the shared object as it is then (a dict's iterator lives in the
broker, so changing the dict meanwhile raises RuntimeError there, as iterating a dict
does). Differences from the standard library, all deliberate and compatible:
``Queue``/``JoinableQueue`` get ``QueueProxy`` instead of an ``AutoProxy[Queue]``;
``BarrierProxy.wait`` raises ``threading.BrokenBarrierError``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, Generic, TypeVar

from .._broker._lockcells import LockCells
from .._broker._sync import BrokenBarrier
from .._client._near import immutable
from .._wire import _codec
from ._ops import pack, post
from ._proxies import BaseProxy

__all__ = [
    "AcquirerProxy", "ArrayProxy", "BarrierProxy", "ConditionProxy", "DictProxy", "EventProxy",
    "IteratorProxy", "ListProxy", "NamespaceProxy", "PoolProxy", "QueueProxy", "ValueProxy",
]

# How long a Manager Lock's caller spins on its cell before it waits in the broker.
SPIN_S: Final = 0.002
_TIMES: Final = frozenset({int, float})  # other timeouts go to the broker, which judges them
_getpid = os.getpid
_yield = os.sched_yield

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


def _by_index(proxy: BaseProxy) -> Iterator[Any]:
    """Iterate a sequence proxy as Python iterates a sequence without ``__iter__`` (the
    standard library's list and array proxies have none): item 0, 1, ..., each read when
    it is asked for, until IndexError. No batching: a batch read ahead would miss changes
    made between two ``next`` calls."""
    i = 0
    read = proxy._near_read
    while True:
        try:
            item = read("__getitem__", (i,))
        except IndexError:
            return
        yield item
        i += 1


class IteratorProxy(BaseProxy):
    _exposed_ = ("__next__", "send", "throw", "close")

    def __iter__(self) -> IteratorProxy:
        return self

    def __next__(self, *args: Any) -> Any:
        return self._callmethod("__next__", args)

    def send(self, *args: Any) -> Any:
        return self._callmethod("send", args)

    def throw(self, *args: Any) -> Any:
        return self._callmethod("throw", args)

    def close(self, *args: Any) -> Any:
        return self._callmethod("close", args)


class AcquirerProxy(BaseProxy):
    """Lock, RLock, Semaphore, BoundedSemaphore.

    A ``Lock`` whose broker gave it a cell in shared memory is taken there when free and
    released there, with no round trip; a caller that finds it held spins for up to
    ``SPIN_S``, then waits in the broker (see ``_broker/_lockcells``).
    """

    _exposed_: ClassVar[tuple[str, ...] | None] = ("acquire", "release")
    _cell = -2  # its cell in the broker's segment (-1: none; -2: not looked up yet)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if self._token.typeid == "Lock" and (timeout is None or (
                type(timeout) in _TIMES and (timeout == -1 or (blocking and timeout >= 0)))):
            got = self._take(blocking, timeout)
            if type(got) is bool:
                return got
            if got is not None:
                timeout = got  # what is left of it after spinning
        if timeout is None:
            return self._callmethod("acquire", (blocking,))  # type: ignore[no-any-return]
        return self._callmethod_timeout("acquire", (blocking, timeout), timeout)  # type: ignore[no-any-return]

    def release(self) -> None:
        if self._token.typeid == "Lock" and self._drop():
            return
        self._callmethod("release")

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _cells(self) -> tuple[Any, LockCells, int] | None:
        """This process's client, the lock cells and this lock's cell, if usable now."""
        client = self._client if self._pid == _getpid() else self._rebind()
        cells = client.cells
        if cells is None or not client.segment_usable():
            return None
        cell = self._cell
        if cell == -2:
            cell = self._cell = cells.find(self._id)
        return None if cell < 0 else (client, cells, cell)

    def _take(self, blocking: bool, timeout: float | None) -> bool | float | None:
        """Take the lock through its cell: True/False, or None (ask the broker), or the
        timeout left to wait in the broker after spinning."""
        found = self._cells()
        if found is None:
            return None
        client, cells, cell = found
        oid, pid = self._id, client._pid
        got = cells.take(cell, oid, pid, fair=blocking)
        if got is not False or not blocking or timeout == 0:
            return got
        start = time.monotonic()
        spin = SPIN_S if timeout is None or timeout < 0 else min(SPIN_S, timeout)
        while time.monotonic() - start < spin:
            _yield()
            got = cells.take(cell, oid, pid, fair=True)
            if got is not False:
                return got
        if timeout is None or timeout < 0:
            return None
        return max(0.0, timeout - (time.monotonic() - start))

    def _drop(self) -> bool:
        """Release the lock through its cell (telling the broker if someone waits there);
        False if the broker must do it. Raises RuntimeError if it is not held."""
        found = self._cells()
        if found is None:
            return False
        client, cells, cell = found
        tell = cells.drop(cell, self._id)
        if tell is None:
            return False
        if tell:
            post(client, "wake", (self._id,))
        return True


class ConditionProxy(AcquirerProxy):
    _exposed_ = ("acquire", "release", "wait", "notify", "notify_all")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod_timeout("wait", (timeout,), timeout)  # type: ignore[no-any-return]

    def notify(self, n: int = 1) -> None:
        self._callmethod("notify", (n,))

    def notify_all(self) -> None:
        self._callmethod("notify_all")

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        """Wait until ``predicate()`` (evaluated here, in the caller) is true."""
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class EventProxy(BaseProxy):
    _exposed_ = ("is_set", "set", "clear", "wait")

    def is_set(self) -> bool:
        return self._callmethod("is_set")  # type: ignore[no-any-return]

    def set(self) -> None:
        self._callmethod("set")

    def clear(self) -> None:
        self._callmethod("clear")

    def wait(self, timeout: float | None = None) -> bool:
        return self._callmethod_timeout("wait", (timeout,), timeout)  # type: ignore[no-any-return]


class BarrierProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "wait", "abort", "reset")

    def wait(self, timeout: float | None = None) -> int:
        try:
            if timeout is not None:
                return self._callmethod_timeout("wait", (timeout,), timeout)  # type: ignore[no-any-return]
            return self._callmethod_waking("wait", (None,))  # type: ignore[no-any-return]
        except BrokenBarrier:
            raise threading.BrokenBarrierError from None

    def abort(self) -> None:
        self._callmethod("abort")

    def reset(self) -> None:
        self._callmethod("reset")

    @property
    def parties(self) -> int:
        return self._callmethod("__getattribute__", ("parties",))  # type: ignore[no-any-return]

    @property
    def n_waiting(self) -> int:
        return self._callmethod("__getattribute__", ("n_waiting",))  # type: ignore[no-any-return]

    @property
    def broken(self) -> bool:
        return self._callmethod("__getattribute__", ("broken",))  # type: ignore[no-any-return]


class NamespaceProxy(BaseProxy):
    _exposed_ = ("__getattribute__", "__setattr__", "__delattr__")

    def __getattr__(self, key: str) -> Any:
        if key[0] == "_":
            return object.__getattribute__(self, key)
        read = object.__getattribute__(self, "_near_read")
        return read("__getattribute__", (key,), key)

    def __setattr__(self, key: str, value: Any) -> None:
        if key[0] == "_":
            object.__setattr__(self, key, value)
            return
        write = object.__getattribute__(self, "_write")
        write("__setattr__", (key, value), key, ("__getattribute__", (key,), value))

    def __delattr__(self, key: str) -> None:
        if key[0] == "_":
            object.__delattr__(self, key)
            return
        callmethod = object.__getattribute__(self, "_callmethod")
        callmethod("__delattr__", (key,))


class ValueProxy(BaseProxy, Generic[T]):
    _exposed_ = ("get", "set")

    def get(self) -> T:
        return self._near_read("get")  # type: ignore[no-any-return]

    def set(self, value: T) -> None:
        self._write("set", (value,), reads=("get", (), value))

    value = property(get, set)

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]


class ListProxy(BaseProxy, Generic[T]):
    """A shared list. Iteration is live: one call per item (``_by_index``)."""

    _exposed_ = ("__add__", "__contains__", "__delitem__", "__getitem__", "__len__", "__mul__",
                 "__reversed__", "__rmul__", "__setitem__", "append", "count", "extend",
                 "index", "insert", "pop", "remove", "reverse", "sort", "__imul__")

    def __add__(self, other: Any) -> list[T]:
        return self._callmethod("__add__", (other,))  # type: ignore[no-any-return]

    def __contains__(self, value: object) -> bool:
        return self._near_read("__contains__", (value,))  # type: ignore[no-any-return]

    def __delitem__(self, index: Any) -> None:
        self._callmethod("__delitem__", (index,))

    def __getitem__(self, index: Any) -> Any:
        return self._near_read("__getitem__", (index,))

    def __len__(self) -> int:
        return self._near_read("__len__")  # type: ignore[no-any-return]

    def __mul__(self, n: int) -> list[T]:
        return self._callmethod("__mul__", (n,))  # type: ignore[no-any-return]

    def __rmul__(self, n: int) -> list[T]:
        return self._callmethod("__rmul__", (n,))  # type: ignore[no-any-return]

    def __reversed__(self) -> Iterator[T]:
        return self._callmethod("__reversed__")  # type: ignore[no-any-return]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._callmethod("__setitem__", (index, value))

    def __iter__(self) -> Iterator[T]:
        return _by_index(self)

    def __iadd__(self, value: Any) -> ListProxy[T]:
        self._callmethod("extend", (value,))
        return self

    def __imul__(self, value: int) -> ListProxy[T]:
        self._callmethod("__imul__", (value,))
        return self

    def append(self, value: T) -> None:
        self._write("append", (value,))

    def count(self, value: T) -> int:
        return self._near_read("count", (value,))  # type: ignore[no-any-return]

    def extend(self, values: Any) -> None:
        self._callmethod("extend", (values,))

    def index(self, *args: Any) -> int:
        return self._near_read("index", args)  # type: ignore[no-any-return]

    def insert(self, index: int, value: T) -> None:
        self._callmethod("insert", (index, value))

    def pop(self, *args: Any) -> T:
        return self._callmethod("pop", args)  # type: ignore[no-any-return]

    def remove(self, value: T) -> None:
        self._callmethod("remove", (value,))

    def reverse(self) -> None:
        self._callmethod("reverse")

    def sort(self, **kwargs: Any) -> None:
        self._callmethod("sort", (), kwargs)

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]


class DictProxy(BaseProxy, Generic[K, V]):
    """A shared dict. Iterating it is live: ``iter()`` makes an iterator over the real
    dict in the broker, and each ``next`` is a call. ``keys()``, ``values()`` and
    ``items()`` return lists, as the standard library's do."""

    _exposed_ = ("__contains__", "__delitem__", "__getitem__", "__iter__", "__len__",
                 "__setitem__", "clear", "copy", "get", "items", "keys", "pop", "popitem",
                 "setdefault", "update", "values")

    def __contains__(self, key: object) -> bool:
        return self._near_read("__contains__", (key,), key)  # type: ignore[no-any-return]

    def __delitem__(self, key: K) -> None:
        self._callmethod("__delitem__", (key,))

    def __getitem__(self, key: K) -> V:
        return self._near_read("__getitem__", (key,), key)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[K]:
        version = self._whole_version()
        if version is None:
            return self._callmethod("__iter__")  # type: ignore[no-any-return]
        return self._iter_copy(version, self.keys())

    def _iter_copy(self, version: int, keys: list[K]) -> Iterator[K]:
        """Iterate the keys as they were when iteration began (read from this process's
        copy while the dict is unchanged); a change of the keys meanwhile raises
        RuntimeError at the next step, as iterating a dict does."""
        for key in keys:
            now = self._whole_version()
            if now is not None and now != version:
                version = now
                current = self.keys()
                if len(current) != len(keys):
                    raise RuntimeError("dictionary changed size during iteration")
                if current != keys:
                    raise RuntimeError("dictionary keys changed during iteration")
            yield key

    def __len__(self) -> int:
        return self._near_read("__len__")  # type: ignore[no-any-return]

    def __setitem__(self, key: K, value: V) -> None:
        self._write("__setitem__", (key, value), key, ("__getitem__", (key,), value))

    def clear(self) -> None:
        self._callmethod("clear")

    def copy(self) -> dict[K, V]:
        return self._near_read("copy")  # type: ignore[no-any-return]

    def get(self, *args: Any) -> V | None:
        if len(args) not in (1, 2):
            return self._callmethod("get", args)  # type: ignore[no-any-return]
        if self._token.typeid == "dict":
            # A built-in dict's get is its [] with a default: one copy serves both. The
            # default comes back as a copy, as the broker's answer would be.
            default: Any = args[1] if len(args) == 2 else None
            blob = None if immutable(default) else pack(default)  # raises as a sent call would
            try:
                return self._near_read("__getitem__", args[:1], args[0])  # type: ignore[no-any-return]
            except KeyError:
                if blob is not None:
                    default = _codec.loads(blob)
                return default  # type: ignore[no-any-return]
        return self._near_read("get", args, args[0])  # type: ignore[no-any-return]

    def items(self) -> list[tuple[K, V]]:
        return self._near_read("items")  # type: ignore[no-any-return]

    def keys(self) -> list[K]:
        return self._near_read("keys")  # type: ignore[no-any-return]

    def pop(self, *args: Any) -> V:
        return self._callmethod("pop", args)  # type: ignore[no-any-return]

    def popitem(self) -> tuple[K, V]:
        return self._callmethod("popitem")  # type: ignore[no-any-return]

    def setdefault(self, *args: Any) -> V:
        return self._callmethod("setdefault", args)  # type: ignore[no-any-return]

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._callmethod("update", args, kwargs)

    def values(self) -> list[V]:
        return self._near_read("values")  # type: ignore[no-any-return]

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]


class ArrayProxy(BaseProxy):
    _exposed_ = ("__len__", "__getitem__", "__setitem__")

    def __len__(self) -> int:
        return self._near_read("__len__")  # type: ignore[no-any-return]

    def __getitem__(self, index: Any) -> Any:
        return self._near_read("__getitem__", (index,))

    def __setitem__(self, index: Any, value: Any) -> None:
        self._callmethod("__setitem__", (index, value))

    def __iter__(self) -> Iterator[Any]:
        return _by_index(self)


class QueueProxy(BaseProxy):
    """``Queue`` and ``JoinableQueue`` (the standard library gives an ``AutoProxy[Queue]``)."""

    _exposed_ = ("empty", "full", "get", "get_nowait", "join", "put", "put_nowait", "qsize",
                 "task_done") + (("shutdown",) if hasattr(queue, "ShutDown") else ())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._callmethod_timeout("put", (item, block, timeout), timeout if block else None)

    def put_nowait(self, item: Any) -> None:
        self._callmethod("put_nowait", (item,))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._callmethod_timeout("get", (block, timeout), timeout if block else None)

    def get_nowait(self) -> Any:
        return self._callmethod("get_nowait")

    def qsize(self) -> int:
        return self._callmethod("qsize")  # type: ignore[no-any-return]

    def empty(self) -> bool:
        return self._callmethod("empty")  # type: ignore[no-any-return]

    def full(self) -> bool:
        return self._callmethod("full")  # type: ignore[no-any-return]

    def task_done(self) -> None:
        self._callmethod("task_done")

    def join(self) -> None:
        self._callmethod("join")

    def shutdown(self, immediate: bool = False) -> None:
        """Python 3.13+: refuse new items; ``immediate`` also drops the queued ones."""
        self._callmethod("shutdown", (immediate,))


class PoolProxy(BaseProxy):
    _exposed_ = ("apply", "apply_async", "close", "imap", "imap_unordered", "join", "map",
                 "map_async", "starmap", "starmap_async", "terminate")
    _method_to_typeid_ = {"apply_async": "AsyncResult", "map_async": "AsyncResult",
                          "starmap_async": "AsyncResult", "imap": "Iterator",
                          "imap_unordered": "Iterator"}

    def apply(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("apply", args, kwds)

    def apply_async(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("apply_async", args, kwds)

    def map(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("map", args, kwds)

    def map_async(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("map_async", args, kwds)

    def starmap(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("starmap", args, kwds)

    def starmap_async(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("starmap_async", args, kwds)

    def imap(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("imap", args, kwds)

    def imap_unordered(self, *args: Any, **kwds: Any) -> Any:
        return self._callmethod("imap_unordered", args, kwds)

    def close(self) -> None:
        self._callmethod("close")

    def join(self) -> None:
        self._callmethod("join")

    def terminate(self) -> None:
        self._callmethod("terminate")

    def __enter__(self) -> PoolProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
