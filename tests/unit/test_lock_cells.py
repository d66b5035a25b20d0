"""Manager Locks in shared memory (``_broker/_lockcells``, ``_sync.SharedLock``), driven
without processes: a client's take and drop, the broker's queue, grants, a busy cell,
a dead holder and a Condition taking the lock over."""

from __future__ import annotations

import threading

import pytest

from mpmesh._broker._lockcells import BROKER, CELLS, PROBES, SEGMENT_BYTES, WAITING, LockCells
from mpmesh._broker._sync import PARKED, SharedLock
from mpmesh._broker._waiters import Effects, Waiter

pytestmark = pytest.mark.timeout(30)


class Mutex:
    """A stand-in for a cell's shared mutex; ``busy`` makes every try fail."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = False

    def acquire(self, wait: float = 0.05) -> object:
        if self.busy:
            return None
        ok = self.lock.acquire(timeout=wait) if wait > 0 else self.lock.acquire(False)
        return self.lock if ok else None

    def release(self, held: object) -> None:
        self.lock.release()

    def close(self) -> None:
        pass


class Harness:
    def __init__(self) -> None:
        self.memory = memoryview(bytearray(SEGMENT_BYTES))
        self.mutexes: dict[int, Mutex] = {}
        self.broker = LockCells(self.memory, self.mutex_at)
        self.client = LockCells(self.memory, self.mutex_at)
        self.retries: list[SharedLock] = []
        self.pids = {1: 101, 2: 102, 3: 103}

    def mutex_at(self, offset: int, new: bool) -> Mutex:
        if new or offset not in self.mutexes:
            self.mutexes[offset] = Mutex()
        return self.mutexes[offset]

    def lock(self, oid: int = 7) -> SharedLock:
        cell = self.broker.allocate(oid)
        assert cell >= 0
        return SharedLock(self.broker, cell, lambda peer: self.pids.get(peer, 0), self.retries.append)

    def busy(self, on: bool) -> None:
        for mutex in self.mutexes.values():
            mutex.busy = on


def acquire(lock: SharedLock, peer: int, fx: Effects, **kw: object) -> tuple[Waiter, object]:
    w = Waiter(peer, rid=peer, tid=0)
    return w, lock.op_acquire(w, 0.0, fx, **kw)  # type: ignore[arg-type]


def test_a_client_takes_a_free_lock_and_releases_it_in_its_cell() -> None:
    h = Harness()
    lock = h.lock()
    cell = h.client.find(7)
    assert cell == lock.cell
    assert h.client.take(cell, 7, 555, fair=True) is True
    assert h.broker.owner(cell) == 555 and repr(lock).startswith("<locked")
    assert h.client.take(cell, 7, 556, fair=False) is False
    assert h.client.drop(cell, 7) is False  # nobody waits in the broker
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        h.client.drop(cell, 7)
    assert h.client.take(cell, 8, 555, fair=True) is None  # not this lock's cell


def test_callers_wait_in_the_broker_in_order_and_a_release_grants_the_first() -> None:
    h = Harness()
    lock = h.lock()
    cell = lock.cell
    assert h.client.take(cell, 7, 999, fair=True)
    fx = Effects()
    w1, r1 = acquire(lock, 1, fx)
    w2, r2 = acquire(lock, 2, fx)
    assert r1 is PARKED and r2 is PARKED and not fx.wakes
    assert h.client.take(cell, 7, 555, fair=True) is False  # queued behind the waiters
    assert h.client.drop(cell, 7) is True  # tell the broker
    fx = Effects()
    lock.grant_next(fx)
    assert [(w, v) for w, v, _ in fx.wakes] == [(w1, True)] and h.broker.owner(cell) == 101
    lock.op_release(Waiter(1, 9, 0), 0.0, (fx := Effects()))
    assert [(w, v) for w, v, _ in fx.wakes] == [(w2, True)] and h.broker.owner(cell) == 102
    assert h.broker._words[cell * 8 + 7] & WAITING == 0  # nobody waits now


def test_a_free_lock_asked_of_the_broker_is_granted_at_once_and_timeouts_expire() -> None:
    h = Harness()
    lock = h.lock()
    fx = Effects()
    _, got = acquire(lock, 1, fx)
    assert got is True and h.broker.owner(lock.cell) == 101
    _, got = acquire(lock, 2, fx, blocking=False)
    assert got is False
    w, got = acquire(lock, 2, fx, timeout=1.0)
    assert got is PARKED
    lock.expire(w, 1.0, fx)
    assert fx.wakes[-1][:2] == (w, False) and not lock.waiters
    assert h.broker._words[lock.cell * 8 + 7] & WAITING == 0
    with pytest.raises(ValueError):
        acquire(lock, 2, fx, blocking=False, timeout=1)


def test_a_busy_cell_is_retried_not_waited_for() -> None:
    h = Harness()
    lock = h.lock()
    assert h.client.take(lock.cell, 7, 999, fair=True)
    fx = Effects()
    w, _ = acquire(lock, 1, fx)
    h.client.drop(lock.cell, 7)
    h.busy(True)
    lock.grant_next(fx)
    assert h.retries == [lock] and not fx.wakes  # the table comes back later
    h.busy(False)
    lock.grant_next(fx)
    assert [x[0] for x in fx.wakes] == [w]


def test_a_holder_that_died_is_released_and_the_next_waiter_granted() -> None:
    h = Harness()
    lock = h.lock()
    fx = Effects()
    acquire(lock, 1, fx)  # pid 101 holds it
    w, _ = acquire(lock, 2, fx)
    assert lock.drop_peer(3, fx) is False  # pid 103 holds nothing
    assert lock.drop_peer(1, fx) is True
    assert [x[0] for x in fx.wakes] == [w] and h.broker.owner(lock.cell) == 102


def test_a_condition_takes_the_lock_over_and_clients_then_ask_the_broker() -> None:
    h = Harness()
    lock = h.lock()
    assert h.client.take(lock.cell, 7, 555, fair=True)
    lock.to_broker()
    assert h.broker._words[lock.cell * 8 + 7] & BROKER
    assert h.client.drop(lock.cell, 7) is None and h.client.take(lock.cell, 7, 1, fair=False) is None
    fx = Effects()
    assert lock.op_release(Waiter(1, 1, 0), 0.0, fx) is None  # its holder releases it here
    _, got = acquire(lock, 2, fx)
    assert got is True and lock.count == 1


def test_cells_are_found_by_probing_and_freed_cells_are_reused() -> None:
    h = Harness()
    oids = [5 + k * CELLS for k in range(PROBES)]  # all want the same cell
    cells = [h.broker.allocate(oid) for oid in oids]
    assert sorted(cells) == [(5 + p) % CELLS for p in range(PROBES)]
    assert h.broker.allocate(5 + PROBES * CELLS) == -1  # none free near it
    assert [h.client.find(oid) for oid in oids] == cells
    h.broker.free(cells[0])
    assert h.client.find(oids[1]) == cells[1]  # probing goes on past a freed cell
    assert h.client.find(oids[0]) == -1
    assert h.broker.allocate(5 + PROBES * CELLS) == cells[0]
