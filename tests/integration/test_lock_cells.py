"""Manager Locks in shared memory: taken free and released with no round trip, mutually
exclusive across processes, waited for in the broker when held, released when their
holder is killed, and still a plain Lock to a Condition."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

import mpmesh
from mpmesh._broker import _lockcells
from mpmesh._io import _mutex
from mpmesh._managers._proxy_types import SPIN_S
from tests.conftest import wait_for
from tests.integration import near_workers

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not _mutex.available(), reason="no process-shared robust mutex here (x86-64 Linux only)"),
]
WAIT_S = 30.0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_lock_excludes_across_processes_through_its_cell(method: str) -> None:
    ctx = mp.get_context(method)
    with mpmesh.Manager() as m:
        lock, d = m.Lock(), m.dict(n=0)
        out = ctx.Queue()
        procs = [ctx.Process(target=near_workers.count_under_lock, args=(lock, d, 300, out)) for _ in range(3)]
        for p in procs:
            p.start()
        with lock:  # this process too, meanwhile
            d["n"] = d["n"] + 1
        fast = [out.get(timeout=WAIT_S) for _ in procs]
        for p in procs:
            p.join(WAIT_S)
            assert p.exitcode == 0
        assert d["n"] == 3 * 300 + 1  # no increment lost: mutual exclusion held
        assert sum(fast) > 3 * 300  # most takes and releases went through the cell
        out.close()
        out.join_thread()


def test_a_lock_behaves_as_threading_lock() -> None:
    with mpmesh.Manager() as m:
        lock = m.Lock()
        before = _lockcells.fast[0]
        assert lock.acquire() is True
        assert lock.acquire(False) is False
        start = time.monotonic()
        assert lock.acquire(timeout=0.2) is False
        assert 0.15 < time.monotonic() - start < 2.0
        released = []
        t = threading.Thread(target=lambda: released.append(lock.release()))  # anyone may
        t.start()
        t.join(WAIT_S)
        assert released == [None]
        with pytest.raises(RuntimeError, match="release unlocked lock"):
            lock.release()
        with pytest.raises(ValueError):
            lock.acquire(False, 1)
        with lock:
            assert lock.acquire(False) is False
        assert lock.acquire(False) is True
        lock.release()
        assert _lockcells.fast[0] - before >= 6


def test_a_held_lock_is_waited_for_in_the_broker_and_handed_over() -> None:
    ctx = mp.get_context("fork")
    with mpmesh.Manager() as m:
        lock = m.Lock()
        out = ctx.Queue()
        lock.acquire()
        p = ctx.Process(target=near_workers.wait_for_lock, args=(lock, out))
        p.start()
        assert out.get(timeout=WAIT_S) == "waiting"
        found = lock._cells()
        assert found is not None
        _, cells, cell = found
        assert wait_for(lambda: cells.waiting(cell), WAIT_S)  # it spun, then queued in the broker
        lock.release()
        got, waited = out.get(timeout=WAIT_S)
        assert got is True and waited >= SPIN_S
        assert not cells.waiting(cell)
        p.join(WAIT_S)
        assert p.exitcode == 0
        assert lock.acquire(timeout=5)  # it released it
        lock.release()
        out.close()
        out.join_thread()


def test_a_holder_killed_holding_the_lock_releases_it_and_one_that_exits_cleanly_does_not() -> None:
    ctx = mp.get_context("fork")
    with mpmesh.Manager() as m:
        lock = m.Lock()
        here, there = ctx.Pipe()
        p = ctx.Process(target=near_workers.hold_and_die, args=(lock, there))
        p.start()
        assert here.poll(WAIT_S) and here.recv() == "holding"
        here.close()
        there.close()
        p.join(WAIT_S)
        assert p.exitcode == -9
        assert lock.acquire(timeout=10)  # the broker released it when the holder died
        lock.release()
        out = ctx.Queue()
        p = ctx.Process(target=near_workers.hold_and_exit, args=(lock, out))
        p.start()
        assert out.get(timeout=WAIT_S) == "holding"
        p.join(WAIT_S)
        assert p.exitcode == 0
        assert lock.acquire(timeout=0.5) is False  # kept held, as the standard library does
        lock.release()  # a hand-off: another process may release a plain Lock
        assert lock.acquire(timeout=5)
        lock.release()
        out.close()
        out.join_thread()


def test_a_condition_over_a_lock_works_and_the_lock_goes_on_working() -> None:
    ctx = mp.get_context("fork")
    with mpmesh.Manager() as m:
        lock, d = m.Lock(), m.dict()
        lock.acquire()
        cond = m.Condition(lock)  # it takes the lock's state over while the lock is held
        lock.release()
        out = ctx.Queue()
        p = ctx.Process(target=near_workers.notify_under, args=(cond, d, out))
        p.start()
        assert out.get(timeout=WAIT_S) == "waiting"
        with cond:
            d["go"] = True
            cond.notify_all()
        assert out.get(timeout=WAIT_S) is True
        p.join(WAIT_S)
        assert p.exitcode == 0
        with lock:
            assert lock.acquire(False) is False
        assert lock.acquire(timeout=1)
        lock.release()
        out.close()
        out.join_thread()


def test_locks_beyond_the_cells_keep_their_state_in_the_broker() -> None:
    with mpmesh.Manager() as m:
        locks = [m.Lock() for _ in range(_lockcells.CELLS + 50)]
        for lock in locks[-60:]:
            with lock:
                assert lock.acquire(False) is False
        assert sum(lock._cell < 0 for lock in locks) >= 50
        del locks
        lock = m.Lock()  # cells of freed locks are taken again
        before = _lockcells.fast[0]
        with lock:
            pass
        assert _lockcells.fast[0] == before + 2
