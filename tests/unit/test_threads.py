"""WorkerThreads: the one pool of worker threads, on real threads."""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator

import pytest

from mpmesh._io._threads import WorkerThreads
from tests.conftest import wait_for

LONG = 10.0
log = logging.getLogger("mpmesh.test-threads")
_names = itertools.count()
Maker = Callable[..., "tuple[WorkerThreads, str]"]


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture
def make() -> Iterator[Maker]:
    """A pool with a name of its own (its threads' names start with it); closed afterwards."""
    pools: list[WorkerThreads] = []

    def new(max_threads: int = 1, numbered: bool = False, **kwargs: object) -> tuple[WorkerThreads, str]:
        prefix = f"test-pool-{next(_names)}"
        kwargs.setdefault("failed", "job %r raised")
        name: str | Callable[[int], str] = (lambda n: f"{prefix}-{n}") if numbered else prefix
        pool = WorkerThreads(name, max_threads, logger=log, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool, prefix

    yield new
    for pool in pools:
        pool.close(timeout=LONG, cancel=True)


def test_no_thread_until_the_first_job(make: Maker) -> None:
    pool, prefix = make(max_threads=4)
    assert threads_named(prefix) == []
    ran_on: list[str] = []
    done = threading.Event()
    pool.submit(lambda: (ran_on.append(threading.current_thread().name), done.set()))
    assert done.wait(LONG) and ran_on == [prefix] and len(threads_named(prefix)) == 1


def test_an_idle_thread_takes_the_next_job_before_another_starts(make: Maker) -> None:
    pool, prefix = make(max_threads=4, numbered=True)
    ran_on: list[str] = []
    for _ in range(3):
        done = threading.Event()
        pool.submit(lambda d=done: (ran_on.append(threading.current_thread().name), d.set()))
        assert done.wait(LONG) and wait_for(lambda: pool.pending() == 0, LONG)
    assert ran_on == [f"{prefix}-0"] * 3 and len(threads_named(prefix)) == 1


def test_a_finished_job_is_not_kept_alive_while_the_thread_waits(make: Maker) -> None:
    class Payload:
        pass

    pool, _ = make()
    payload = Payload()
    gone = weakref.ref(payload)
    done = threading.Event()
    pool.submit(lambda p: done.set(), payload)
    assert done.wait(LONG) and wait_for(lambda: pool.pending() == 0, LONG)
    del payload
    gc.collect()
    assert gone() is None


def test_threads_start_only_while_all_are_busy_and_never_past_the_maximum(make: Maker) -> None:
    pool, prefix = make(max_threads=3, numbered=True)
    release = threading.Event()
    started: list[int] = []
    three = threading.Event()
    lock = threading.Lock()

    def job(i: int) -> None:
        with lock:
            started.append(i)
            if len(started) == 3:
                three.set()
        release.wait(LONG)

    for i in range(5):
        pool.submit(job, i)
    assert three.wait(LONG)
    assert sorted(t.name for t in threads_named(prefix)) == [f"{prefix}-{n}" for n in range(3)]
    assert len(started) == 3 and pool.queued() == 2
    release.set()
    pool.close(timeout=LONG)
    assert sorted(started) == list(range(5)) and threads_named(prefix) == []


def test_one_thread_runs_jobs_in_the_order_they_came(make: Maker) -> None:
    pool, _ = make()
    release, done = threading.Event(), threading.Event()
    order: list[int] = []
    pool.submit(release.wait, LONG)  # the rest queue up behind it
    for i in range(200):
        pool.submit(order.append, i)
    pool.submit(done.set)
    release.set()
    assert done.wait(LONG) and order == list(range(200))


def test_a_raising_job_is_logged_with_the_callers_message_and_the_thread_lives_on(
        make: Maker, caplog: pytest.LogCaptureFixture) -> None:
    pool, _ = make(failed="the job %r raised")
    plain, _ = make(failed="a job failed")
    ran_on: list[threading.Thread] = []
    done = threading.Event()

    def boom() -> None:
        ran_on.append(threading.current_thread())
        raise ValueError("boom")

    def leave() -> None:
        ran_on.append(threading.current_thread())
        raise SystemExit(3)

    with caplog.at_level(logging.ERROR, logger=log.name):
        pool.submit(boom)
        pool.submit(leave)
        pool.submit(lambda: (ran_on.append(threading.current_thread()), done.set()))
        assert done.wait(LONG)
        plain_done = threading.Event()
        plain.submit(boom)
        plain.submit(plain_done.set)
        assert plain_done.wait(LONG)
    assert len(set(ran_on[:3])) == 1  # one thread ran all three
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [f"the job {boom!r} raised", f"the job {leave!r} raised"]
    assert messages[2] == "a job failed"
    assert [type(r.exc_info[1]) for r in caplog.records if r.exc_info] == [ValueError, SystemExit, ValueError]


def test_retire_ends_an_idle_pool_and_the_next_job_starts_a_thread_again(make: Maker) -> None:
    pool, prefix = make(max_threads=2)
    assert pool.retire() is True  # no thread: nothing to do
    done = threading.Event()
    pool.submit(done.set)
    assert done.wait(LONG)
    [thread] = threads_named(prefix)
    assert pool.retire(LONG) is True and not thread.is_alive() and threads_named(prefix) == []
    again = threading.Event()
    pool.submit(again.set)
    assert again.wait(LONG) and len(threads_named(prefix)) == 1


def test_retire_refuses_while_jobs_wait_and_waits_out_a_running_one(make: Maker) -> None:
    pool, prefix = make()
    release, running, finished = threading.Event(), threading.Event(), threading.Event()
    pool.submit(lambda: (running.set(), release.wait(LONG)))
    pool.submit(finished.set)
    assert running.wait(LONG)
    assert pool.retire(LONG) is False  # a job is queued: at once, whatever the timeout
    release.set()
    assert finished.wait(LONG)
    [thread] = threads_named(prefix)
    release.clear()
    running.clear()
    pool.submit(lambda: (running.set(), release.wait(LONG)))
    assert running.wait(LONG)
    assert pool.retire(0.05) is False and thread.is_alive()  # still running when the time is up
    # Released once retire() below waits for it.
    threading.Thread(target=lambda: wait_for(lambda: pool._waiters == 1, LONG) and release.set()).start()
    assert pool.retire(LONG) is True and not thread.is_alive() and release.is_set()


def test_retire_from_a_pool_thread_refuses(make: Maker) -> None:
    pool, _ = make()
    answers: list[bool] = []
    done = threading.Event()
    pool.submit(lambda: (answers.append(pool.retire()), done.set()))
    assert done.wait(LONG) and answers == [False]


def test_an_idle_thread_leaves_after_idle_exit(make: Maker) -> None:
    pool, prefix = make(max_threads=2, idle_exit=0.0)
    ran_on: list[threading.Thread] = []
    done = threading.Event()
    pool.submit(lambda: (ran_on.append(threading.current_thread()), done.set()))
    assert done.wait(LONG)
    ran_on[0].join(LONG)
    assert not ran_on[0].is_alive() and threads_named(prefix) == []
    again = threading.Event()
    pool.submit(again.set)
    assert again.wait(LONG)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_no_thread_and_none_of_the_parents_jobs(make: Maker) -> None:
    pool, prefix = make()
    release, running = threading.Event(), threading.Event()
    ran: list[str] = []
    pool.submit(lambda: (running.set(), release.wait(LONG)))
    pool.submit(ran.append, "parent's")
    assert running.wait(LONG)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            fresh = threads_named(prefix) == [] and pool.queued() == 0
            done = threading.Event()
            pool.submit(ran.append, "child's")
            pool.submit(done.set)
            if fresh and done.wait(LONG) and ran == ["child's"] and len(threads_named(prefix)) == 1:
                code = 0
        finally:
            os._exit(code)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pool.close(timeout=LONG)
    assert ran == ["parent's"]


def test_close_runs_what_is_queued_then_ends_the_threads_and_takes_no_more(make: Maker) -> None:
    pool, prefix = make(max_threads=2)
    release = threading.Event()
    ran: list[int] = []
    pool.submit(release.wait, LONG)
    pool.submit(release.wait, LONG)
    for i in range(3):
        pool.submit(ran.append, i)
    assert len(threads_named(prefix)) == 2 and pool.queued() >= 1
    release.set()
    pool.close(timeout=LONG)
    assert sorted(ran) == [0, 1, 2] and threads_named(prefix) == []
    pool.submit(ran.append, 3)
    assert threads_named(prefix) == [] and pool.queued() == 0


def test_close_with_cancel_drops_queued_jobs_and_lets_the_running_one_finish(make: Maker) -> None:
    pool, prefix = make()
    release, running = threading.Event(), threading.Event()
    ran: list[str] = []
    pool.submit(lambda: (running.set(), release.wait(LONG), ran.append("running")))
    pool.submit(ran.append, "queued")
    assert running.wait(LONG)
    pool.close(wait=False, cancel=True)
    assert pool.queued() == 0 and pool.pending() == 1 and len(threads_named(prefix)) == 1
    release.set()
    pool.close(timeout=LONG)
    assert ran == ["running"] and threads_named(prefix) == []


def test_close_from_a_pool_thread_does_not_wait_for_itself(make: Maker) -> None:
    pool, prefix = make()
    ran_on: list[threading.Thread] = []
    done = threading.Event()
    pool.submit(lambda: (ran_on.append(threading.current_thread()), pool.close(), done.set()))
    assert done.wait(LONG)
    ran_on[0].join(LONG)
    assert not ran_on[0].is_alive() and threads_named(prefix) == []


def test_is_worker_tells_pool_threads_from_others(make: Maker) -> None:
    pool, _ = make()
    answers: list[bool] = []
    done = threading.Event()
    pool.submit(lambda: (answers.append(pool.is_worker()), done.set()))
    assert done.wait(LONG) and answers == [True] and not pool.is_worker()


def test_at_least_one_thread() -> None:
    with pytest.raises(ValueError):
        WorkerThreads("x", 0, logger=log, failed="x")
