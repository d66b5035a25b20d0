"""Lazy input for ``imap`` / ``imap_unordered``: a feeder thread with bounded read-ahead.

The standard Pool reads an ``imap`` input to the end at once, whatever its size. Here a
single feeder thread per pool pulls at most ``bound`` chunks ahead of what the caller
has consumed from the iterator; consuming a result makes room for one more. The user's
generator therefore runs on the feeder thread, never on the pool's I/O thread.

A source blocked on its bound never holds up other work: the engine dispatches from
whichever sources have chunks ready. ``close()`` lifts every bound, so that ``join()``
waits for the whole input to be processed, as the stdlib's does.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Final, Protocol

from ._results import IMapIterator
from ._tasks import Source

__all__ = ["Feeder", "LazySource", "chunked"]

# Chunks pulled from an input per visit, before the feeder hands them to the engine.
PULL_BATCH: Final = 256


def chunked(iterable: Iterable[Any], size: int) -> Iterator[Any]:
    """Items one by one for ``size == 1``, else tuples of ``size`` (the stdlib's ``_get_tasks``)."""
    it = iter(iterable)
    if size == 1:
        return it

    def gen() -> Iterator[tuple[Any, ...]]:
        while True:
            chunk = tuple(itertools.islice(it, size))
            if not chunk:
                return
            yield chunk
    return gen()


class LazySource:
    """One ``imap`` input: where its chunks come from and how far ahead it may run."""

    def __init__(self, feeder: Feeder, job: IMapIterator, fn: Any, kind: int,
                 items: Iterator[Any], bound: int | None) -> None:
        self.feeder = feeder
        self.job = job
        self.fn = fn
        self.kind = kind
        self.items = items
        self.bound = bound
        self.pulled = 0       # chunks taken from the input so far
        self.taken = 0        # results the caller has consumed
        self.exhausted = False
        self.source: Source | None = None  # the engine's Source for it (set by the Pool)
        # Pull again only once this much room has freed up: one wake-up per ``low``
        # results consumed, not one per result.
        self.low = 1 if bound is None else max(1, min(bound // 4, PULL_BATCH))

    def room(self) -> int:
        """Chunks the feeder may pull now (0 while fewer than ``low`` would fit)."""
        if self.exhausted:
            return 0
        if self.bound is None:
            return PULL_BATCH
        room = self.bound - (self.pulled - self.taken)
        return min(PULL_BATCH, room) if room >= self.low else 0

    def consumed(self, n: int) -> None:
        """The caller took ``n`` results from the iterator (its thread)."""
        with self.feeder.cond:
            self.taken += n
            if self.bound is not None and not self.exhausted:
                room = self.bound - (self.pulled - self.taken)
                if room >= self.low > room - n:
                    self.feeder.cond.notify()


class Sink(Protocol):
    """Where the feeder hands what it pulled (the pool's driver, ``ChannelIO``)."""

    def add_lazy(self, lazy: LazySource, first: int, items: list[Any], error: BaseException | None,
                 ended: bool) -> None: ...


class Feeder:
    """The thread that pulls lazy inputs and hands their chunks to the engine."""

    def __init__(self, pool: Sink) -> None:
        self.pool = pool
        self.cond = threading.Condition(threading.Lock())
        self.sources: list[LazySource] = []
        self.unbounded = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def add(self, source: LazySource) -> None:
        with self.cond:
            if self.unbounded:
                source.bound = None
            self.sources.append(source)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mpmesh-pool-feeder", daemon=True)
                self._thread.start()
            self.cond.notify()

    def lift_bounds(self) -> None:
        """After ``close()``: read every input to its end."""
        with self.cond:
            self.unbounded = True
            for source in self.sources:
                source.bound = None
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.sources.clear()
            self.cond.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _next_source(self) -> tuple[LazySource, int] | None:
        for source in self.sources:
            room = source.room()
            if room > 0:
                return source, room
        return None

    def _run(self) -> None:
        while True:
            with self.cond:
                picked = self._next_source()
                while picked is None and not self._stopping:
                    self.cond.wait()
                    picked = self._next_source()
                if self._stopping or picked is None:
                    return
            source, room = picked
            items: list[Any] = []
            error: BaseException | None = None
            ended = False
            it = source.items
            try:
                for _ in range(room):
                    items.append(next(it))
            except StopIteration:
                ended = True
            except Exception as exc:  # the stdlib fails the result at that position
                error = exc
            with self.cond:
                first = source.pulled
                source.pulled += len(items) + (error is not None)
                if ended or error is not None:
                    source.exhausted = True
                    if source in self.sources:
                        self.sources.remove(source)
            self.pool.add_lazy(source, first, items, error, ended or error is not None)
