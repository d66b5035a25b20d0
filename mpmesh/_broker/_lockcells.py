"""Lock cells: the state of a Manager ``Lock`` in shared memory, so that taking a free
lock and releasing one cost no round trip.

A ``Manager().Lock()`` made by a broker with a segment gets a cell there (while cells
last). The cell holds its own process-shared, robust mutex (``_io/_mutex``), which
guards its words for the few instructions a change takes; it is never held while the
*lock* is held. Its words:

    oid     the lock's object id (0: a free cell; ``_TOMB``: freed, keep probing)
    owner   the pid of the process holding the lock (0: free)
    flags   written by the broker only: ``BROKER`` (the broker holds the lock's state
            from now on: a Condition uses it) and ``WAITING`` (callers wait in the broker)

A process takes a free lock by writing its pid into ``owner`` under the cell's mutex,
and releases it by writing 0; a release that finds ``WAITING`` tells the broker, which
grants the lock to its first waiter under the same mutex. A process that finds the lock
held spins briefly, then waits in the broker, in order: while anyone waits there, new
takers queue behind them. The broker parks a caller by setting ``WAITING`` *before* it
looks at ``owner`` under the mutex, so a release either is seen by that look or sees
the flag. A holder that dies abnormally is known to the broker by its connection; it
frees the lock if ``owner`` is that process's pid, as it does for a lock it holds itself.

A cell is found from the oid: it is at ``oid % CELLS`` or one of the next ``PROBES``
(the broker takes the first free one; a lock that finds none keeps its state in the
broker, as any other). Nothing here does I/O; the mutexes come from the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from ._ring import RING_END

__all__ = ["BROKER", "CELLS", "CELL_BYTES", "LockCells", "SEGMENT_BYTES", "WAITING", "fast"]

CELLS: Final = 1024
CELL_BYTES: Final = 64
CELLS_AT: Final = RING_END
SEGMENT_BYTES: Final = CELLS_AT + CELLS * CELL_BYTES
PROBES: Final = 8

BROKER: Final = 1
WAITING: Final = 2

# Locks this process took or released through a cell (not through the broker).
fast = [0]

_OID: Final = 5    # word indexes within a cell (the mutex takes words 0-4)
_OWNER: Final = 6
_FLAGS: Final = 7
_TOMB: Final = (1 << 64) - 1


class Mutex(Protocol):
    def acquire(self, wait: float = ...) -> object: ...  # None: not had
    def release(self, held: object) -> None: ...
    def close(self) -> None: ...


class LockCells:
    """A process's view of the cells: the broker's (``create``) or a client's.

    ``mutex_at(offset, new)``: the mutex at ``offset`` of the segment, set up anew if
    ``new`` (the broker, as it hands a cell out).
    """

    __slots__ = ("_words", "_mutex_at", "_mutexes")

    def __init__(self, buffer: memoryview, mutex_at: Callable[[int, bool], Mutex]) -> None:
        self._words = memoryview(buffer).cast("B")[CELLS_AT:SEGMENT_BYTES].cast("Q")
        self._mutex_at = mutex_at
        self._mutexes: dict[int, Mutex] = {}

    def close(self) -> None:
        for mutex in self._mutexes.values():
            mutex.close()
        self._mutexes = {}
        try:
            self._words.release()
        except BufferError:  # pragma: no cover - a racing call holds a slice
            pass

    def _mutex(self, cell: int, new: bool = False) -> Mutex:
        mutex = None if new else self._mutexes.get(cell)
        if mutex is None:
            mutex = self._mutexes[cell] = self._mutex_at(CELLS_AT + cell * CELL_BYTES, new)
        return mutex

    # -- the broker's side ----------------------------------------------------------------

    def allocate(self, oid: int) -> int:
        """A cell for lock ``oid`` (its state: free), or -1 if none is free near it."""
        words = self._words
        for probe in range(PROBES):
            cell = (oid + probe) % CELLS
            if words[cell * 8 + _OID] in (0, _TOMB):
                base = cell * 8
                try:
                    self._mutex(cell, new=True)
                except OSError:
                    return -1
                words[base + _OWNER] = 0
                words[base + _FLAGS] = 0
                words[base + _OID] = oid
                return cell
        return -1

    def free(self, cell: int) -> None:
        base = cell * 8
        self._words[base + _FLAGS] = 0
        self._words[base + _OWNER] = 0
        self._words[base + _OID] = _TOMB

    def owner(self, cell: int) -> int:
        return int(self._words[cell * 8 + _OWNER])

    def waiting(self, cell: int) -> bool:
        """Whether callers wait for the lock in the broker."""
        return bool(self._words[cell * 8 + _FLAGS] & WAITING)

    def set_flag(self, cell: int, flag: int, on: bool) -> None:
        """Set or clear a flag (the broker alone writes them)."""
        i = cell * 8 + _FLAGS
        self._words[i] = (self._words[i] | flag) if on else (self._words[i] & ~flag)

    def hold(self, cell: int, wait: float) -> object:
        """The cell's mutex, waited for at most ``wait`` (None: not had): the broker
        changes ``owner`` only while holding it (``put``, then ``let_go``)."""
        return self._mutex(cell).acquire(wait)

    def put(self, cell: int, owner: int) -> None:
        self._words[cell * 8 + _OWNER] = owner

    def let_go(self, cell: int, held: object) -> None:
        self._mutex(cell).release(held)

    # -- a client's side --------------------------------------------------------------------

    def find(self, oid: int) -> int:
        """The cell of lock ``oid``, or -1 (its state is the broker's alone)."""
        words = self._words
        for probe in range(PROBES):
            cell = (oid + probe) % CELLS
            found = words[cell * 8 + _OID]
            if found == oid:
                return cell
            if found == 0:
                return -1
        return -1

    def take(self, cell: int, oid: int, pid: int, fair: bool) -> bool | None:
        """Take the lock for ``pid`` if it is free (and, if ``fair``, nobody waits in
        the broker); None if this must go to the broker (the broker holds its state, or
        the cell's mutex was not had in time)."""
        return self._change(cell, oid, pid, fair)

    def drop(self, cell: int, oid: int) -> bool | None:
        """Release the lock: whether the broker must be told (someone waits there); None
        if this must go to the broker. Raises RuntimeError if it is not held."""
        return self._change(cell, oid, 0, False)

    def _change(self, cell: int, oid: int, pid: int, fair: bool) -> bool | None:
        """``take`` (``pid``) or ``drop`` (0), under the cell's mutex."""
        mutex = self._mutex(cell)
        held = mutex.acquire()
        if held is None:
            return None
        try:
            words, base = self._words, cell * 8
            flags = words[base + _FLAGS]
            if words[base + _OID] != oid or flags & BROKER:
                return None
            owner = words[base + _OWNER]
            if pid:
                if owner or (fair and flags & WAITING):
                    return False
            elif not owner:
                raise RuntimeError("release unlocked lock")
            words[base + _OWNER] = pid
            fast[0] += 1
            return True if pid else bool(flags & WAITING)
        except ValueError:  # closed meanwhile
            return None
        finally:
            mutex.release(held)
