"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and Barrier proxies:
blocking semantics, timeouts and errors, the same in both implementations.

Threads stand in for other clients (each has its own connection in the standard library);
they are coordinated with events, never sleeps.
"""

from __future__ import annotations

import multiprocessing.managers
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

TIMEOUT = 0.2  # for calls that must time out
LONG = 30.0    # for calls that must not


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def join(t: threading.Thread) -> None:
    t.join(LONG)
    assert not t.is_alive()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


# -- Lock -------------------------------------------------------------------------------------

def test_lock_acquire_release(manager: Any) -> None:
    lock = manager.Lock()
    assert lock.acquire() is True
    assert lock.acquire(False) is False
    assert lock.acquire(blocking=False) is False
    result, took = timed(lambda: lock.acquire(timeout=TIMEOUT))
    assert result is False and took >= TIMEOUT * 0.9
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    with lock:
        assert lock.acquire(False) is False
    assert lock.acquire(timeout=TIMEOUT) is True
    lock.release()
    assert str(lock).startswith("<unlocked _thread.lock object")


def test_lock_blocks_until_released_by_another_thread(manager: Any) -> None:
    lock = manager.Lock()
    lock.acquire()
    t, out = in_thread(lambda: lock.acquire(timeout=LONG))
    assert not out
    lock.release()  # a plain Lock may be released by anyone
    join(t)
    assert out == [True]
    t, out = in_thread(lock.release)
    join(t)
    assert out == [None]


def test_lock_bad_arguments(manager: Any) -> None:
    lock = manager.Lock()
    with pytest.raises(ValueError):
        lock.acquire(False, 1)
    with pytest.raises(ValueError):
        lock.acquire(True, -5)


# -- RLock ------------------------------------------------------------------------------------

def test_rlock_is_reentrant_and_owned(manager: Any) -> None:
    rlock = manager.RLock()
    assert rlock.acquire() and rlock.acquire()
    t, out = in_thread(lambda: rlock.acquire(timeout=TIMEOUT))
    join(t)
    assert out == [False]
    t, out = in_thread(rlock.release)  # not the owner
    join(t)
    assert isinstance(out[0], RuntimeError)
    rlock.release()
    rlock.release()
    with pytest.raises(RuntimeError):
        rlock.release()
    t, out = in_thread(lambda: rlock.acquire(timeout=LONG))
    join(t)
    assert out == [True]


# -- semaphores --------------------------------------------------------------------------------

def test_semaphore(manager: Any) -> None:
    sem = manager.Semaphore(2)
    assert sem.acquire() and sem.acquire()
    assert sem.acquire(False) is False
    result, took = timed(lambda: sem.acquire(timeout=TIMEOUT))
    assert result is False and took >= TIMEOUT * 0.9
    t, out = in_thread(lambda: sem.acquire(timeout=LONG))
    sem.release()
    join(t)
    assert out == [True]
    sem.release()
    sem.release()
    sem.release()  # an unbounded semaphore may go above its start value
    assert sem.acquire(False) and sem.acquire(False) and sem.acquire(False)
    assert sem.acquire(False) is False


def test_bounded_semaphore(manager: Any) -> None:
    sem = manager.BoundedSemaphore(1)
    with pytest.raises(ValueError, match="released too many times"):
        sem.release()
    with sem:
        assert sem.acquire(False) is False
    with pytest.raises(multiprocessing.managers.RemoteError, match="initial value must be >= 0"):
        manager.Semaphore(-1)  # errors while creating come back as RemoteError


# -- Condition ----------------------------------------------------------------------------------

def test_condition_wait_notify(manager: Any) -> None:
    cond = manager.Condition()
    state = manager.list()
    waiting = threading.Event()

    def waiter() -> Any:
        with cond:
            state.append("waiting")
            waiting.set()
            return cond.wait(LONG)

    t, out = in_thread(waiter)
    assert waiting.wait(LONG)
    with cond:  # the waiter released the lock inside wait()
        cond.notify()
    join(t)
    assert out == [True]


def test_condition_wait_timeout_and_wait_for(manager: Any) -> None:
    cond = manager.Condition()
    with cond:
        result, took = timed(lambda: cond.wait(TIMEOUT))
        assert result is False and took >= TIMEOUT * 0.9
        assert cond.wait(0) is False
        assert cond.wait_for(lambda: 42) == 42
        result, took = timed(lambda: cond.wait_for(lambda: False, timeout=TIMEOUT))
        assert result is False and took >= TIMEOUT * 0.9
    flag = manager.Value("i", 0)

    def setter() -> None:
        with cond:
            flag.value = 1
            cond.notify_all()

    with cond:
        t, _ = in_thread(setter)
        assert cond.wait_for(lambda: flag.value == 1, timeout=LONG) is True
    join(t)


def test_condition_requires_the_lock(manager: Any) -> None:
    cond = manager.Condition()
    with pytest.raises(RuntimeError):
        cond.wait(0.01)
    with pytest.raises(RuntimeError):
        cond.notify()
    with pytest.raises(RuntimeError):
        cond.notify_all()


def test_condition_notify_all_wakes_every_waiter(manager: Any) -> None:
    cond = manager.Condition()
    ready = manager.Semaphore(0)

    def waiter() -> Any:
        with cond:
            ready.release()
            return cond.wait(LONG)

    threads = [in_thread(waiter) for _ in range(3)]
    for _ in threads:
        assert ready.acquire(timeout=LONG)
    with cond:
        cond.notify_all()
    for t, out in threads:
        join(t)
        assert out == [True]


def test_condition_over_a_shared_lock(manager: Any) -> None:
    lock = manager.Lock()
    cond = manager.Condition(lock)
    with cond:
        assert lock.acquire(False) is False  # the condition holds the shared lock
        assert cond.wait(0.01) is False
    assert lock.acquire(False) is True
    lock.release()


def test_condition_rlock_keeps_its_recursion_across_wait(manager: Any) -> None:
    cond = manager.Condition()
    cond.acquire()
    cond.acquire()
    assert cond.wait(0.01) is False
    cond.release()
    cond.release()
    with pytest.raises(RuntimeError):
        cond.release()


# -- Event ------------------------------------------------------------------------------------

def test_event(manager: Any) -> None:
    ev = manager.Event()
    assert ev.is_set() is False
    result, took = timed(lambda: ev.wait(TIMEOUT))
    assert result is False and took >= TIMEOUT * 0.9
    assert ev.wait(0) is False
    t, out = in_thread(lambda: ev.wait(LONG))
    ev.set()
    join(t)
    assert out == [True]
    assert ev.is_set() and ev.wait() is True and ev.wait(0) is True
    ev.clear()
    assert ev.is_set() is False
    assert "unset" in str(ev)


# -- Barrier ----------------------------------------------------------------------------------

def test_barrier_releases_all_parties(manager: Any) -> None:
    barrier = manager.Barrier(3)
    assert barrier.parties == 3 and barrier.n_waiting == 0 and barrier.broken is False
    threads = [in_thread(lambda: barrier.wait(LONG)) for _ in range(2)]
    index = barrier.wait(LONG)
    results = [index]
    for t, out in threads:
        join(t)
        results += out
    assert sorted(results) == [0, 1, 2]
    assert barrier.n_waiting == 0 and barrier.broken is False


def test_barrier_timeout_breaks_it(manager: Any) -> None:
    barrier = manager.Barrier(2)
    _, took = timed(lambda: pytest.raises(threading.BrokenBarrierError, barrier.wait, TIMEOUT))
    assert took >= TIMEOUT * 0.9
    assert barrier.broken is True
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(LONG)
    barrier.reset()
    assert barrier.broken is False


def test_barrier_default_timeout(manager: Any) -> None:
    barrier = manager.Barrier(2, None, TIMEOUT)
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()


def test_barrier_abort_and_reset_fail_the_waiters(manager: Any) -> None:
    barrier = manager.Barrier(3)
    t, out = in_thread(lambda: barrier.wait(LONG))
    while barrier.n_waiting < 1:  # the state only the broker knows; each read is a round trip
        pass
    barrier.abort()
    join(t)
    assert isinstance(out[0], threading.BrokenBarrierError)
    assert barrier.broken
    barrier.reset()
    t, out = in_thread(lambda: barrier.wait(LONG))
    while barrier.n_waiting < 1:
        pass
    barrier.reset()
    join(t)
    assert isinstance(out[0], threading.BrokenBarrierError)
    assert not barrier.broken


def test_barrier_repr(manager: Any) -> None:
    assert "waiters=0/2" in str(manager.Barrier(2))
