"""Broker-native synchronization objects of a Manager: Lock, RLock, Semaphore,
BoundedSemaphore, Condition, Event, Barrier.

They keep the standard library's semantics and error messages (``threading``), with
two differences that only the broker can offer:

- **Owners are (peer, thread) pairs.** A process that dies abnormally (killed, or ended
  by an error: its connection closed without a Goodbye) releases every lock and
  semaphore unit it holds (``drop_peer``), and the next waiter is granted it; the
  standard library's manager keeps such a lock held forever. One that
  exits cleanly keeps them held, as in the standard library: another process may
  release a plain Lock or a semaphore it left behind (a hand-off).
- **Waiting never blocks anything.** A call that must wait returns ``PARKED`` and is
  answered later through ``Effects``, when the state allows or its deadline passes.

Every ``op_<name>(w, now, fx, *args, **kwargs)`` method serves the proxy method
``<name>``; ``w`` identifies the caller. Their base (``Native``), shared with ``_queues``,
is in ``_waiters``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import ClassVar

from ._limits import FOREVER
from ._lockcells import BROKER, WAITING, LockCells
from ._waiters import PARKED, Effects, Native, ObjectGone, Waiter, deadline_for, remove

__all__ = [
    "Barrier", "BoundedSemaphore", "BrokenBarrier", "Condition", "Event", "Lock", "RLock",
    "Semaphore", "SharedLock",
]


class BrokenBarrier(RuntimeError):
    """The broker's name for ``threading.BrokenBarrierError`` (the proxy raises that one:
    the broker may not import ``threading``)."""


def _wait_forever(w: Waiter) -> None:
    """Drop ``w``'s deadline (its heap entry goes stale: see ``ParkingLot``)."""
    w.seq += 1
    w.deadline = FOREVER


# -- locks ---------------------------------------------------------------------------------

def _lock_timeout(blocking: bool, timeout: float | None) -> float:
    """``threading.Lock.acquire``'s checks of its arguments; the timeout (-1: none)."""
    if timeout is None:
        timeout = -1
    if not blocking and timeout != -1:
        raise ValueError("can't specify a timeout for a non-blocking call")
    if timeout < 0 and timeout != -1:
        raise ValueError("timeout value must be a non-negative number")
    return timeout

class Lock(Native):
    """``threading.Lock``: anyone may release it; its last acquirer owns it for
    ``drop_peer``."""

    KIND = "Lock"
    reentrant = False

    def __init__(self) -> None:
        self.owner: tuple[int, int] | None = None
        self.count = 0
        self.waiters: deque[Waiter] = deque()

    def __repr__(self) -> str:
        state = "locked" if self.count else "unlocked"
        return f"<{state} _thread.lock object at {id(self):#x}>"

    def op_acquire(self, w: Waiter, now: float, fx: Effects, blocking: bool = True,
                   timeout: float | None = -1) -> object:
        timeout = _lock_timeout(blocking, timeout)
        if self.count == 0:
            self.owner, self.count = w.me, 1
            return True
        if self.reentrant and self.owner == w.me:
            self.count += 1
            return True
        if not blocking or timeout == 0:
            return False
        return self.park(w, deadline_for(now, None if timeout == -1 else timeout), True, 1)

    def op_release(self, w: Waiter, now: float, fx: Effects) -> object:
        if self.count == 0:
            raise RuntimeError("release unlocked lock")
        self.count = 0
        self.owner = None
        self.grant_next(fx)
        return None

    def op_locked(self, w: Waiter, now: float, fx: Effects) -> object:
        return self.count > 0

    # -- used by Condition, and by the table --------------------------------------------

    def park(self, w: Waiter, deadline: float, value: object, count: int) -> object:
        """Queue ``w``; when granted it owns the lock ``count`` times and gets ``value``."""
        w.deadline, w.owner, w.data = deadline, self, (value, count)
        self.waiters.append(w)
        return PARKED

    def owned_by(self, me: tuple[int, int]) -> bool:
        return self.count > 0  # a plain lock has no owner threading could check

    def release_all(self, fx: Effects) -> int:
        """Release completely (Condition.wait); return the count to restore later."""
        count, self.count, self.owner = self.count, 0, None
        self.grant_next(fx)
        return count

    def reacquire(self, w: Waiter, value: object, count: int, fx: Effects) -> None:
        """``w`` must own the lock again before it gets ``value`` (no deadline)."""
        _wait_forever(w)
        if self.count == 0 and not self.waiters:
            self.owner, self.count = w.me, count
            fx.wake(w, value)
        else:
            self.park(w, FOREVER, value, count)

    def grant_next(self, fx: Effects) -> None:
        while self.count == 0 and self.waiters:
            w = self.waiters.popleft()
            data: tuple[object, int] = w.data  # type: ignore[assignment]
            self.owner, self.count = w.me, data[1]
            fx.wake(w, data[0])

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        remove(self.waiters, w)
        fx.wake(w, False)

    def discard(self, w: Waiter, fx: Effects) -> None:
        remove(self.waiters, w)

    def drop_peer(self, peer: int, fx: Effects) -> bool:
        if self.count and self.owner is not None and self.owner[0] == peer:
            # The holder died: the standard library would keep this lock held forever.
            self.count, self.owner = 0, None
            self.grant_next(fx)
            return True
        return False

    def close(self, fx: Effects) -> None:
        while self.waiters:
            fx.fail(self.waiters.popleft(), ObjectGone("the lock was freed while waiting"))


class SharedLock(Lock):
    """A ``Lock`` whose state is a cell in shared memory (``_lockcells``): processes take
    it free and release it there, with no round trip; here are only those who wait for it
    (in order), a holder that died, and the cell's end. A Condition that uses it takes
    its state back here for good (``to_broker``): from then on it is a ``Lock``.

    The cell's mutex is only ever tried here, never waited for: a process inside its few
    instructions (or stopped there) is left alone, and ``retry`` asks the table to come
    back (``on_retry``) for what could not be done at once.
    """

    KIND = "Lock"
    RELEASE_WAIT_S: ClassVar[float] = 0.5  # a release sent here waits this long for the cell

    def __init__(self, cells: LockCells, cell: int, pid_of: Callable[[int], int],
                 on_retry: Callable[[SharedLock], None]) -> None:
        super().__init__()
        self.cells, self.cell = cells, cell
        self.pid_of = pid_of
        self.on_retry = on_retry
        self.shared = True
        self.dead: set[int] = set()  # pids that died holding it, while the cell was busy

    def __repr__(self) -> str:
        if not self.shared:
            return super().__repr__()
        state = "locked" if self.cells.owner(self.cell) else "unlocked"
        return f"<{state} _thread.lock object at {id(self):#x}>"

    def op_acquire(self, w: Waiter, now: float, fx: Effects, blocking: bool = True,
                   timeout: float | None = -1) -> object:
        if not self.shared:
            return super().op_acquire(w, now, fx, blocking, timeout)
        timeout = _lock_timeout(blocking, timeout)
        if not self.waiters:
            held = self.cells.hold(self.cell, 0)
            if held is not None:
                try:
                    if not self.cells.owner(self.cell):
                        self.cells.put(self.cell, self.pid_of(w.peer))
                        return True
                finally:
                    self.cells.let_go(self.cell, held)
        if not blocking or timeout == 0:
            return False
        self.park(w, deadline_for(now, None if timeout == -1 else timeout), True, 1)
        self.cells.set_flag(self.cell, WAITING, True)  # before the look at the owner (see _lockcells)
        self.grant_next(fx)
        return PARKED

    def op_release(self, w: Waiter, now: float, fx: Effects) -> object:
        if not self.shared:
            return super().op_release(w, now, fx)
        held = self.cells.hold(self.cell, self.RELEASE_WAIT_S)
        if held is None:
            raise RuntimeError("the lock's shared memory is held by a stopped process; try again")
        try:
            if not self.cells.owner(self.cell):
                raise RuntimeError("release unlocked lock")
            self.cells.put(self.cell, 0)
            self._grant(fx)
        finally:
            self.cells.let_go(self.cell, held)
        return None

    def op_locked(self, w: Waiter, now: float, fx: Effects) -> object:
        if not self.shared:
            return super().op_locked(w, now, fx)
        return self.cells.owner(self.cell) != 0

    def grant_next(self, fx: Effects) -> None:
        """Give the lock to the first waiter if it is free (a release told us, or a
        caller just parked); come back later if the cell is busy."""
        if not self.shared:
            super().grant_next(fx)
            return
        held = self.cells.hold(self.cell, 0)
        if held is None:
            self.on_retry(self)
            return
        try:
            self._grant(fx)
        finally:
            self.cells.let_go(self.cell, held)

    def _grant(self, fx: Effects) -> None:
        """``grant_next`` with the cell's mutex held."""
        cells, cell = self.cells, self.cell
        if self.dead and cells.owner(cell) in self.dead:
            cells.put(cell, 0)
        self.dead.clear()
        if self.waiters and not cells.owner(cell):
            w = self.waiters.popleft()
            cells.put(cell, self.pid_of(w.peer))
            fx.wake(w, True)
        if not self.waiters:
            cells.set_flag(cell, WAITING, False)

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        super().expire(w, now, fx)
        if self.shared and not self.waiters:
            self.cells.set_flag(self.cell, WAITING, False)

    def discard(self, w: Waiter, fx: Effects) -> None:
        super().discard(w, fx)
        if self.shared and not self.waiters:
            self.cells.set_flag(self.cell, WAITING, False)

    def drop_peer(self, peer: int, fx: Effects) -> bool:
        if not self.shared:
            return super().drop_peer(peer, fx)
        pid = self.pid_of(peer)
        if not pid or self.cells.owner(self.cell) != pid:
            return False
        # The holder died (the standard library would keep this lock held forever).
        self.dead.add(pid)
        self.grant_next(fx)
        return True

    def close(self, fx: Effects) -> None:
        super().close(fx)
        if self.shared:
            self.shared = False
            self.cells.free(self.cell)

    def to_broker(self) -> None:
        """Keep the lock's state here from now on (a Condition uses it)."""
        if not self.shared:
            return
        held = self.cells.hold(self.cell, self.RELEASE_WAIT_S)
        if held is None:
            raise RuntimeError("the lock's shared memory is held by a stopped process; try again")
        try:
            self.cells.set_flag(self.cell, BROKER, True)
            if self.cells.owner(self.cell):
                self.count, self.owner = 1, None  # its holder releases it here
            self.shared = False
        finally:
            self.cells.let_go(self.cell, held)


class RLock(Lock):
    """``threading.RLock``: owned by one (peer, thread); only the owner may release."""

    KIND = "RLock"
    reentrant = True

    def __repr__(self) -> str:
        state = "locked" if self.count else "unlocked"
        owner = self.owner[1] if self.owner else 0
        return f"<{state} _thread.RLock object owner={owner} count={self.count} at {id(self):#x}>"

    def op_release(self, w: Waiter, now: float, fx: Effects) -> object:
        if self.count == 0 or self.owner != w.me:
            raise RuntimeError("cannot release un-acquired lock")
        self.count -= 1
        if self.count == 0:
            self.owner = None
            self.grant_next(fx)
        return None

    def owned_by(self, me: tuple[int, int]) -> bool:
        return self.count > 0 and self.owner == me


# -- semaphores --------------------------------------------------------------------------

class Semaphore(Native):
    """``threading.Semaphore``. It has no owner, but ``held`` counts the units each peer
    acquired and has not given back, so a peer that dies returns its own. A release by a
    peer that holds none (a hand-off) is counted against the earliest holder's units."""

    KIND = "Semaphore"

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self.value = value
        self.waiters: deque[Waiter] = deque()
        self.held: dict[int, int] = {}  # peer -> units it acquired and did not release

    def __repr__(self) -> str:
        return f"<threading.{type(self).__name__} at {id(self):#x}: value={self.value}>"

    def op_acquire(self, w: Waiter, now: float, fx: Effects, blocking: bool = True,
                   timeout: float | None = None) -> object:
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        if self.value > 0 and not self.waiters:
            self.value -= 1
            self._take(w.peer)
            return True
        if not blocking or (timeout is not None and timeout <= 0):
            return False
        w.deadline, w.owner = deadline_for(now, timeout), self
        self.waiters.append(w)
        return PARKED

    def op_release(self, w: Waiter, now: float, fx: Effects, n: int = 1) -> object:
        if n < 1:
            raise ValueError("n must be one or more")
        self._check_release(n)
        for _ in range(n):
            self._give_back(w.peer)
        self._add(n, fx)
        return None

    def _add(self, n: int, fx: Effects) -> None:
        """``n`` units come back: grant waiters in order."""
        self.value += n
        while self.value > 0 and self.waiters:
            self.value -= 1
            granted = self.waiters.popleft()
            self._take(granted.peer)
            fx.wake(granted, True)

    def _take(self, peer: int) -> None:
        self.held[peer] = self.held.get(peer, 0) + 1

    def _give_back(self, peer: int) -> None:
        holder = peer if peer in self.held else next(iter(self.held), None)
        if holder is None:
            return  # released beyond what anyone acquired: allowed for a plain Semaphore
        if self.held[holder] == 1:
            del self.held[holder]
        else:
            self.held[holder] -= 1

    def drop_peer(self, peer: int, fx: Effects) -> bool:
        n = self.held.pop(peer, 0)
        if n:
            self._add(n, fx)
        return n > 0

    def _check_release(self, n: int) -> None:
        pass

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        remove(self.waiters, w)
        fx.wake(w, False)

    def discard(self, w: Waiter, fx: Effects) -> None:
        remove(self.waiters, w)

    def close(self, fx: Effects) -> None:
        while self.waiters:
            fx.fail(self.waiters.popleft(), ObjectGone("the semaphore was freed while waiting"))


class BoundedSemaphore(Semaphore):
    KIND = "BoundedSemaphore"

    def __init__(self, value: int = 1) -> None:
        super().__init__(value)
        self.initial = value

    def _check_release(self, n: int) -> None:
        if self.value + n > self.initial:
            raise ValueError("Semaphore released too many times")


# -- condition ---------------------------------------------------------------------------

class Condition(Native):
    """``threading.Condition`` over a native Lock or RLock (its own, or a shared one).

    ``wait`` releases the lock completely and parks; ``notify`` (or the deadline) moves
    the waiter to the lock's queue, and it is answered once it owns the lock again with
    its old recursion count, exactly as ``threading.Condition`` re-acquires.
    """

    KIND = "Condition"

    def __init__(self, lock: Lock | None = None, *, keep: object = None) -> None:
        self.lock = lock if lock is not None else RLock()
        self.own_lock = lock is None
        self.keep = keep  # the reference that keeps a shared lock alive
        self.waiters: deque[Waiter] = deque()

    def __repr__(self) -> str:
        return f"<Condition({self.lock!r}, {len(self.waiters)})>"

    def op_acquire(self, w: Waiter, now: float, fx: Effects, *args: object, **kwargs: object) -> object:
        return self.lock.op_acquire(w, now, fx, *args, **kwargs)  # type: ignore[arg-type]

    def op_release(self, w: Waiter, now: float, fx: Effects) -> object:
        return self.lock.op_release(w, now, fx)

    def op_wait(self, w: Waiter, now: float, fx: Effects, timeout: float | None = None) -> object:
        if not self.lock.owned_by(w.me):
            raise RuntimeError("cannot wait on un-acquired lock")
        count = self.lock.release_all(fx)
        if timeout is not None and timeout <= 0:
            # threading: wait(0) releases, fails to be notified, then re-acquires.
            self.lock.reacquire(w, False, count, fx)
            return PARKED  # answered through fx at once when the lock is free
        w.deadline, w.owner, w.data = deadline_for(now, timeout), self, count
        self.waiters.append(w)
        return PARKED

    def op_wait_for(self, w: Waiter, now: float, fx: Effects, *args: object) -> object:
        raise TypeError("wait_for runs in the caller's process (its predicate is local)")

    def op_notify(self, w: Waiter, now: float, fx: Effects, n: int = 1) -> object:
        if not self.lock.owned_by(w.me):
            raise RuntimeError("cannot notify on un-acquired lock")
        while n > 0 and self.waiters:
            waiter = self.waiters.popleft()
            self.lock.reacquire(waiter, True, waiter.data, fx)  # type: ignore[arg-type]
            n -= 1
        return None

    def op_notify_all(self, w: Waiter, now: float, fx: Effects) -> object:
        return self.op_notify(w, now, fx, len(self.waiters))

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        remove(self.waiters, w)
        self.lock.reacquire(w, False, w.data, fx)  # type: ignore[arg-type]

    def discard(self, w: Waiter, fx: Effects) -> None:
        remove(self.waiters, w)

    def drop_peer(self, peer: int, fx: Effects) -> bool:
        return self.own_lock and self.lock.drop_peer(peer, fx)

    def close(self, fx: Effects) -> None:
        while self.waiters:
            fx.fail(self.waiters.popleft(), ObjectGone("the condition was freed while waiting"))
        if self.own_lock:
            self.lock.close(fx)


# -- event -------------------------------------------------------------------------------

class Event(Native):
    KIND = "Event"

    def __init__(self) -> None:
        self.flag = False
        self.waiters: deque[Waiter] = deque()

    def __repr__(self) -> str:
        return f"<threading.Event at {id(self):#x}: {'set' if self.flag else 'unset'}>"

    def op_is_set(self, w: Waiter, now: float, fx: Effects) -> object:
        return self.flag

    def op_set(self, w: Waiter, now: float, fx: Effects) -> object:
        self.flag = True
        while self.waiters:
            fx.wake(self.waiters.popleft(), True)
        return None

    def op_clear(self, w: Waiter, now: float, fx: Effects) -> object:
        self.flag = False
        return None

    def op_wait(self, w: Waiter, now: float, fx: Effects, timeout: float | None = None) -> object:
        if self.flag:
            return True
        if timeout is not None and timeout <= 0:
            return False
        w.deadline, w.owner = deadline_for(now, timeout), self
        self.waiters.append(w)
        return PARKED

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        remove(self.waiters, w)
        fx.wake(w, self.flag)

    def discard(self, w: Waiter, fx: Effects) -> None:
        remove(self.waiters, w)

    def close(self, fx: Effects) -> None:
        while self.waiters:
            fx.fail(self.waiters.popleft(), ObjectGone("the event was freed while waiting"))


# -- barrier -------------------------------------------------------------------------------

class Barrier(Native):
    """``threading.Barrier``. ``action`` is user code: it runs off the loop (``fx.offload``)
    before the waiters are released; if it raises, the barrier breaks."""

    KIND = "Barrier"
    ATTRIBUTES = frozenset({"parties", "n_waiting", "broken"})

    def __init__(self, parties: int, action: Callable[[], object] | None = None,
                 timeout: float | None = None) -> None:
        if parties < 1:
            raise ValueError("parties must be >= 1")
        self.parties = parties
        self.action = action
        self.timeout = timeout
        self.waiters: list[Waiter] = []
        self.broken = False

    @property
    def n_waiting(self) -> int:
        return len(self.waiters)

    def __repr__(self) -> str:
        if self.broken:
            return f"<threading.Barrier at {id(self):#x}: broken>"
        return f"<threading.Barrier at {id(self):#x}: waiters={self.n_waiting}/{self.parties}>"

    def op___getattribute__(self, w: Waiter, now: float, fx: Effects, name: str) -> object:
        if name not in self.ATTRIBUTES:
            raise AttributeError(f"'Barrier' object has no attribute {name!r}")
        return getattr(self, name)

    def op_wait(self, w: Waiter, now: float, fx: Effects, timeout: float | None = None) -> object:
        if self.broken:
            raise BrokenBarrier()
        if timeout is None:
            timeout = self.timeout
        index = len(self.waiters)
        if index + 1 < self.parties:
            if timeout is not None and timeout <= 0:
                self._break(fx)
                raise BrokenBarrier()
            w.deadline, w.owner = deadline_for(now, timeout), self
            self.waiters.append(w)
            return PARKED
        waiting, self.waiters = self.waiters, []
        if self.action is None:
            self._release(waiting, fx)
            return index
        action = self.action

        def run() -> object:
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - it goes back to the last waiter
                return exc
            return None

        def done(outcome: object, fx: Effects) -> None:
            if isinstance(outcome, BaseException):
                self.broken = True
                for other in waiting:
                    fx.fail(other, BrokenBarrier())
                fx.fail(w, outcome)
            else:
                self._release(waiting, fx)
                fx.wake(w, index)

        w.owner = self
        fx.offload(run, done)
        return PARKED

    @staticmethod
    def _release(waiting: list[Waiter], fx: Effects) -> None:
        for i, other in enumerate(waiting):
            fx.wake(other, i)

    def _break(self, fx: Effects) -> None:
        self.broken = True
        waiting, self.waiters = self.waiters, []
        for other in waiting:
            fx.fail(other, BrokenBarrier())

    def op_abort(self, w: Waiter, now: float, fx: Effects) -> object:
        self._break(fx)
        return None

    def op_reset(self, w: Waiter, now: float, fx: Effects) -> object:
        self._break(fx)
        self.broken = False
        return None

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        self._break(fx)  # threading: a timed-out wait breaks the barrier for everyone

    def discard(self, w: Waiter, fx: Effects) -> None:
        remove(self.waiters, w)

    def close(self, fx: Effects) -> None:
        self._break(fx)
