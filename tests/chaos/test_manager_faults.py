"""Manager faults the standard library cannot survive, and its costs it does not avoid:
a lock holder SIGKILLed, a waiter SIGKILLed, a peer's references after it dies, a proxy
in transit, one connection per process."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import signal
import threading
from typing import Any

import pytest

import mpmesh

from ..conftest import wait_for
from . import _manager_workers as workers

LONG = 60.0
CTX = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module", autouse=True)
def _helpers_running() -> None:
    """multiprocessing's resource tracker and forkserver live for the session: start them
    before any test's leak guard takes its snapshot."""
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()


@pytest.fixture
def manager() -> Any:
    """A manager whose broker runs on a thread here, so tests can read its tables; the
    rules under test are the broker core's, wherever it runs."""
    m = mpmesh.Manager(broker="thread")
    try:
        yield m
    finally:
        m.shutdown()


def _kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(LONG)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("impl", ["mpmesh", "multiprocessing"])
def test_lock_of_a_sigkilled_holder(impl: str) -> None:
    """mpmesh releases it; the standard library keeps it held forever (cpython#88304)."""
    m = mpmesh.Manager() if impl == "mpmesh" else multiprocessing.get_context("forkserver").Manager()
    try:
        lock, ready, never = m.Lock(), m.Queue(), m.Event()
        proc = CTX.Process(target=workers.hold_lock_forever, args=(lock, ready, never))
        proc.start()
        assert ready.get(timeout=LONG) == "held"
        assert lock.acquire(False) is False
        _kill(proc)
        if impl == "mpmesh":
            assert lock.acquire(timeout=LONG) is True
            lock.release()
        else:
            assert lock.acquire(timeout=0.5) is False
        del lock, ready, never
        gc.collect()
    finally:
        m.shutdown()
        m.join()


def test_rlock_and_condition_of_a_sigkilled_holder(manager: Any) -> None:
    for lock in (manager.RLock(), manager.Condition()):
        ready, never = manager.Queue(), manager.Event()
        proc = CTX.Process(target=workers.hold_lock_forever, args=(lock, ready, never))
        proc.start()
        assert ready.get(timeout=LONG) == "held"
        _kill(proc)
        assert lock.acquire(timeout=LONG) is True
        lock.release()


def test_a_parked_waiter_that_dies_takes_nothing(manager: Any) -> None:
    q, ready = manager.Queue(), manager.Queue()
    proc = CTX.Process(target=workers.block_on_get, args=(q, ready))
    proc.start()
    assert ready.get(timeout=LONG) == "waiting"
    table = manager._host.core.components["objects"]
    assert wait_for(lambda: len(table.lot) == 1, LONG)  # the child's get() is parked
    _kill(proc)
    assert wait_for(lambda: len(table.lot) == 0, LONG)
    q.put("item")
    assert q.get(timeout=LONG) == "item"  # not lost to the dead waiter


def test_a_dead_peers_references_are_dropped(manager: Any) -> None:
    passed, ready, never = manager.dict(), manager.Queue(), manager.Event()
    base = manager._number_of_objects()
    proc = CTX.Process(target=workers.create_objects,
                       args=(manager.address, manager._authkey, passed, ready, never, 5))
    proc.start()
    assert ready.get(timeout=LONG) == "created"
    assert passed["child"] == 5
    assert manager._number_of_objects() == base + 5
    _kill(proc)
    assert wait_for(lambda: manager._number_of_objects() == base, LONG)


def test_dropped_proxies_free_their_objects(manager: Any) -> None:
    base = manager._number_of_objects()
    objects = [manager.dict(), manager.list(), manager.Lock(), manager.Queue()]
    assert manager._number_of_objects() == base + 4
    del objects
    assert manager._number_of_objects() == base


def test_a_proxy_in_transit_keeps_its_object(manager: Any) -> None:
    out = manager.Queue()
    base = manager._number_of_objects()
    d = manager.dict(sender=os.getpid())
    blob = pickle.dumps(d)
    del d  # the sender drops its proxy before anyone unpickled the token
    assert manager._number_of_objects() == base + 1  # the grace keeps the dict
    proc = CTX.Process(target=workers.use_pickled, args=(blob, out))
    proc.start()
    assert out.get(timeout=LONG) == os.getpid()
    proc.join(LONG)
    assert proc.exitcode == 0
    # The receiver took the grace over; when it exited, the dict had no holder left.
    assert wait_for(lambda: manager._number_of_objects() == base, LONG)


def test_an_unpickled_proxy_is_counted_on_its_own(manager: Any) -> None:
    base = manager._number_of_objects()
    d = manager.dict(a=1)
    again = pickle.loads(pickle.dumps(d))
    del d
    assert again["a"] == 1 and manager._number_of_objects() == base + 1
    del again
    assert manager._number_of_objects() == base


def test_one_connection_per_process(manager: Any) -> None:
    loop = manager._host.loop
    accepted = lambda: loop._next_id - 1  # noqa: E731 - connections the broker accepted
    before = accepted()
    d, lock = manager.dict(), manager.Lock()
    for i in range(50):
        d[i] = i
    assert accepted() == before  # the host process never uses a socket
    proc = CTX.Process(target=workers.hammer, args=(d, lock, 4, 50))
    proc.start()
    proc.join(LONG)
    assert proc.exitcode == 0
    assert len(d) == 50 + 4 * 50
    assert accepted() == before + 1  # 4 threads, 200 lock round trips, 200 writes: 1 connection


def test_parked_calls_do_not_block_others(manager: Any) -> None:
    lock, d = manager.Lock(), manager.dict()
    lock.acquire()
    threads = [threading.Thread(target=lambda: lock.acquire(timeout=LONG) and lock.release())
               for _ in range(8)]
    for t in threads:
        t.start()
    table = manager._host.core.components["objects"]
    assert wait_for(lambda: len(table.lot) == 8, LONG)
    for i in range(100):
        d[i] = i  # served while 8 calls are parked
    assert len(d) == 100
    lock.release()
    for t in threads:
        t.join(LONG)
        assert not t.is_alive()
