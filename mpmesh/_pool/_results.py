"""What ``apply_async``, ``map_async`` and ``imap*`` return: the stdlib's result objects.

Behaviour follows ``multiprocessing.pool`` (3.11): ``get(timeout)`` raises
``multiprocessing.TimeoutError``; a result with a callback becomes ready only after the
callback ran; a map is ready once every chunk is done and re-raises the first error to
arrive; ``imap`` yields in order, ``imap_unordered`` in completion order, each raising a
failed chunk's exception at its place.

Threading: ``_set`` is called by the engine with its lock held (so a result is completed
exactly once); ``_finish`` runs the callbacks (on the pool's callback thread when there
are any) and then wakes the waiters.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import threading
import types
from collections.abc import Callable, Iterator
from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]
from typing import Any, ClassVar, Protocol

from .._client._futures import Latch
from .._errors import RemoteError, SerializationError

__all__ = ["ApplyResult", "AsyncResult", "IMapIterator", "IMapUnorderedIterator", "Lazy", "MapResult",
           "UnpicklableException", "UnpicklableResult"]

log = logging.getLogger("mpmesh.pool")


class Lazy(Protocol):
    """A lazy ``imap`` input (``_feeder.LazySource``), as the layers below the feeder see
    it: told when the caller consumed a result (the feeder may read one more ahead), and
    marked ``exhausted`` when its job failed (the feeder reads no more of it)."""

    exhausted: bool

    def consumed(self, n: int) -> None: ...


class UnpicklableResult(SerializationError, MaybeEncodingError):  # type: ignore[misc]
    """A task's return value could not be pickled back: the stdlib's ``MaybeEncodingError``,
    with its ``exc`` and ``value`` (the reprs of what pickling raised and of the value) and
    its message."""

    def __init__(self, exc: str, value: str) -> None:
        Exception.__init__(self, exc, value)
        self.exc, self.value = exc, value

    __str__ = MaybeEncodingError.__str__
    __repr__ = MaybeEncodingError.__repr__


class UnpicklableException(RemoteError, MaybeEncodingError):  # type: ignore[misc]
    """A task raised an exception that could not be pickled; ``str()`` is its traceback."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.exc = self.value = message

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self}>"


class ApplyResult:
    """The result of ``apply_async`` (``multiprocessing.pool.AsyncResult``)."""

    def __init__(self, callback: Callable[[Any], object] | None = None,
                 error_callback: Callable[[BaseException], object] | None = None) -> None:
        self._latch = Latch()  # most results are in before anyone waits
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None
        self._bar: Any = None
        self._done = False  # the engine settled it (callbacks may still be running)
        self._pool: object = None  # keeps an unreferenced pool alive until this is done (bpo-34172)

    def ready(self) -> bool:
        return self._latch.done

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._latch.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The result, or the task's exception raised here.

        Raises:
            multiprocessing.TimeoutError: not ready within ``timeout`` seconds.
        """
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    __class_getitem__: ClassVar[Any] = classmethod(types.GenericAlias)

    # -- engine side ---------------------------------------------------------------------

    @property
    def _has_callbacks(self) -> bool:
        return self._callback is not None or self._error_callback is not None or self._bar is not None

    def _set(self, index: int, ok: bool, value: Any) -> bool:
        """Record chunk ``index``; True when the whole result is complete."""
        self._success, self._value = ok, value
        return True

    def _fail_all(self, exc: BaseException) -> bool:
        """Fail what is not done yet (pool terminated or broken); True if now complete."""
        if self._done:
            return False
        return self._set(0, False, exc)

    def _finish(self) -> None:
        """Run the callbacks (never while the engine's lock is held), then wake waiters."""
        try:
            if self._success:
                if self._callback is not None:
                    self._callback(self._value)
            elif self._error_callback is not None:
                self._error_callback(self._value)
        except Exception:
            log.exception("a pool callback raised")
        finally:
            if self._bar is not None:
                self._bar.close()
            self._pool = None
            self._latch.open()

    def _progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async`` / ``starmap_async``: a list once every chunk is done."""

    def __init__(self, n_chunks: int, chunksize: int, length: int,
                 callback: Callable[[Any], object] | None = None,
                 error_callback: Callable[[BaseException], object] | None = None) -> None:
        super().__init__(callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._left = n_chunks
        self._error: BaseException | None = None

    def _set(self, index: int, ok: bool, value: Any) -> bool:
        self._left -= 1
        if ok:
            if self._success:
                cs = self._chunksize
                if cs == 1:
                    self._value[index] = value
                else:
                    self._value[index * cs:(index + 1) * cs] = value
        elif self._success:
            self._success = False
            self._value = value  # the first error to arrive, as the stdlib does
        return self._left == 0

    def _fail_all(self, exc: BaseException) -> bool:
        if self._done:
            return False
        if self._success:
            self._success = False
            self._value = exc
        self._left = 0
        return True


class IMapIterator:
    """``imap``'s iterator: results in input order; ``next(timeout)`` as in the stdlib."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[tuple[bool, Any]] = collections.deque()
        self._unsorted: dict[int, tuple[bool, Any]] = {}
        self._index = 0          # results handed to _items so far (ordered)
        self._length: int | None = None
        self._received = 0
        self._closed = False
        self._source: Lazy | None = None
        self._bar: Any = None
        self._done = False
        self._pool: object = None

    def __iter__(self) -> Iterator[Any]:
        return self

    def next(self, timeout: float | None = None) -> Any:
        with self._cond:
            if not self._items:
                if self._done_locked():
                    raise StopIteration
                if not self._cond.wait_for(lambda: self._items or self._done_locked(), timeout):
                    raise multiprocessing.TimeoutError
                if not self._items:
                    raise StopIteration
            ok, value = self._items.popleft()
        source = self._source
        if source is not None:
            source.consumed(1)
        if ok:
            return value
        raise value

    __next__ = next

    def _done_locked(self) -> bool:
        return self._length is not None and self._taken() >= self._length

    def _taken(self) -> int:
        return self._index - len(self._items)

    # -- engine side ---------------------------------------------------------------------

    @property
    def _has_callbacks(self) -> bool:
        return self._bar is not None

    def _set(self, index: int, ok: bool, value: Any) -> bool:
        with self._cond:
            self._received += 1
            if index == self._index:
                self._items.append((ok, value))
                self._index += 1
                while self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
                self._cond.notify_all()
            else:
                self._unsorted[index] = (ok, value)
            return self._length is not None and self._received >= self._length

    def _set_length(self, length: int) -> bool:
        """The input ended after ``length`` chunks; True if every result is already in."""
        with self._cond:
            self._length = length
            self._cond.notify_all()
            return self._received >= length

    def _fail_all(self, exc: BaseException) -> bool:
        with self._cond:
            if self._done:
                return False
            if self._length is None:
                self._length = max([self._index, *self._unsorted]) + 1
            # Everything still missing is failed with ``exc``, in order.
            target = self._length
            self._received = target
            while self._index < target:
                item = self._unsorted.pop(self._index, (False, exc))
                self._items.append(item)
                self._index += 1
            self._cond.notify_all()
            return True

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._pool = None
        with self._cond:
            self._cond.notify_all()

    def _progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)


class IMapUnorderedIterator(IMapIterator):
    """``imap_unordered``'s iterator: results in the order they complete."""

    def _set(self, index: int, ok: bool, value: Any) -> bool:
        with self._cond:
            self._received += 1
            self._index += 1
            self._items.append((ok, value))
            self._cond.notify_all()
            return self._length is not None and self._received >= self._length

    def _fail_all(self, exc: BaseException) -> bool:
        with self._cond:
            if self._done:
                return False
            if self._length is None:
                self._length = self._received + 1
            while self._received < self._length:
                self._items.append((False, exc))
                self._received += 1
                self._index += 1
            self._cond.notify_all()
            return True
