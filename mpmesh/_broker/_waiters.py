"""The broker's parking lot: blocking calls waiting for a state change or their deadline.

A blocking call (``Lock.acquire``, ``Queue.get``, ``Event.wait``, ...) that cannot finish
at once is *parked*: a ``Waiter`` records who asked (peer, request id, calling thread)
and until when. The object waited on keeps the waiter in its own queue and answers it
when its state allows; ``ParkingLot`` only indexes the parked waiters, by deadline (so
``on_tick`` finds the expired ones without scanning every object) and by (peer, request
id) (so a cancel or a lost peer finds its own). Nothing here blocks, sleeps or reads a
clock: time arrives as ``now``.

Answers are collected in an ``Effects`` value while an object changes state; the
``objects`` component turns them into messages afterwards (state changes stay pure; I/O
is the loop's). ``Native`` is the base of the objects that park (``_sync``, ``_queues``).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Protocol

from ._limits import FOREVER

__all__ = [
    "PARKED", "Effects", "Native", "ObjectGone", "Parkable", "ParkingLot", "Waiter", "deadline_for",
    "remove",
]


class _Parked:
    """The value a blocking method returns when it parked its caller instead of answering."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PARKED"


PARKED: Final = _Parked()


class Parkable(Protocol):
    """An object that can hold waiters (a lock, a queue, an event, ...)."""

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        """``w``'s deadline passed: answer it (or move it on, as a Condition does)."""

    def discard(self, w: Waiter, fx: Effects) -> None:
        """Forget ``w`` without answering it (cancelled, or its peer is gone)."""


@dataclass(eq=False, slots=True)
class Waiter:
    """One parked call. ``data`` belongs to the object it waits on."""

    peer: int
    rid: int
    tid: int                           # the caller's thread: RLock/Condition ownership
    deadline: float = FOREVER
    owner: Parkable | None = None      # what it waits on now
    data: object = None
    seq: int = 0                       # bumped whenever the deadline entry is replaced
    done: bool = False

    @property
    def me(self) -> tuple[int, int]:
        """The identity that owns a lock: (peer, thread)."""
        return (self.peer, self.tid)


@dataclass(slots=True)
class Effects:
    """What state changes produced: answers for waiters, and user code to run off-loop."""

    wakes: list[tuple[Waiter, object, BaseException | None]] = field(default_factory=list)
    jobs: list[tuple[Callable[[], object], Callable[[object, Effects], object]]] = field(default_factory=list)

    def wake(self, w: Waiter, value: object) -> None:
        self.wakes.append((w, value, None))

    def fail(self, w: Waiter, exc: BaseException) -> None:
        self.wakes.append((w, None, exc))

    def offload(self, job: Callable[[], object], done: Callable[[object, Effects], object]) -> None:
        """Run ``job()`` on a worker thread, then ``done(outcome, fx)`` back in the core."""
        self.jobs.append((job, done))


def deadline_for(now: float, timeout: float | None) -> float:
    """The absolute deadline of a call that waits ``timeout`` seconds (None: forever)."""
    if timeout is None:
        return FOREVER
    return now + max(0.0, float(timeout))


class ParkingLot:
    """Parked waiters by deadline (a heap with lazy deletion) and by (peer, rid)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Waiter]] = []
        self._order = itertools.count()
        self._by_key: dict[tuple[int, int], Waiter] = {}
        self._per_peer: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def count(self, peer: int) -> int:
        """How many waiters of ``peer`` are parked."""
        return self._per_peer.get(peer, 0)

    def park(self, w: Waiter) -> None:
        """Index ``w`` (its owner already holds it in its own queue)."""
        w.done = False
        key = (w.peer, w.rid)
        if key not in self._by_key:
            self._per_peer[w.peer] = self._per_peer.get(w.peer, 0) + 1
        self._by_key[key] = w
        self.reschedule(w, w.deadline)

    def reschedule(self, w: Waiter, deadline: float) -> None:
        """Replace ``w``'s deadline (a notified Condition waiter waits for the lock forever)."""
        w.seq += 1
        w.deadline = deadline
        if deadline != FOREVER:
            heapq.heappush(self._heap, (deadline, next(self._order), w.seq, w))

    def unpark(self, w: Waiter) -> None:
        w.done = True
        if self._by_key.get((w.peer, w.rid)) is w:
            del self._by_key[(w.peer, w.rid)]
            left = self._per_peer.pop(w.peer, 1) - 1
            if left:
                self._per_peer[w.peer] = left

    def get(self, peer: int, rid: int) -> Waiter | None:
        return self._by_key.get((peer, rid))

    def of_peer(self, peer: int) -> list[Waiter]:
        return [w for (p, _), w in self._by_key.items() if p == peer]

    def expired(self, now: float) -> list[Waiter]:
        """Waiters whose deadline is ``now`` or earlier, in deadline order."""
        heap = self._heap
        out: list[Waiter] = []
        while heap and heap[0][0] <= now:
            _, _, seq, w = heapq.heappop(heap)
            if not w.done and seq == w.seq:
                out.append(w)
        return out

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and (heap[0][3].done or heap[0][2] != heap[0][3].seq):
            heapq.heappop(heap)
        return heap[0][0] if heap else None


# -- the objects that park ----------------------------------------------------------------

class ObjectGone(ReferenceError):
    """The object a parked call waited on was freed."""


class Native:
    """Base of the broker-native objects that park callers."""

    KIND: ClassVar[str] = ""

    def call(self, method: str, w: Waiter, args: tuple[object, ...], kwargs: dict[str, object],
             now: float, fx: Effects) -> object:
        fn: Callable[..., object] | None = getattr(self, "op_" + method, None)
        if fn is None:
            raise AttributeError(f"{self.KIND} object has no method {method!r}")
        return fn(w, now, fx, *args, **kwargs)

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        raise NotImplementedError

    def discard(self, w: Waiter, fx: Effects) -> None:
        raise NotImplementedError

    def drop_peer(self, peer: int, fx: Effects) -> bool:
        """``peer`` died: give back whatever it held (its waiters are discarded apart);
        whether it held anything."""
        return False

    def close(self, fx: Effects) -> None:
        """The object is freed: fail whoever still waits on it."""


def remove(queue: deque[Waiter] | list[Waiter], w: Waiter) -> None:
    """Take ``w`` out of an object's queue of waiters, if it is there."""
    try:
        queue.remove(w)
    except ValueError:
        pass
