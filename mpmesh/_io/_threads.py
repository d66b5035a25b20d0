"""``WorkerThreads``: the one pool of daemon threads every layer runs background jobs on.

Lighter than ``concurrent.futures.ThreadPoolExecutor``: no Future per job (a caller that
wants one wraps its job), one lock and one queue put per ``submit``, and a thread starts
only when every running one is busy. With one thread, jobs run one at a time in the
order they were submitted (callbacks need that). Threads may leave when idle
(``idle_exit``), all at once (``retire``: only a single-threaded process forks cheaply),
or for good (``close``); a forked child's copy of a pool starts with no thread and none
of its parent's jobs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

__all__ = ["WorkerThreads"]

_Job = tuple[Callable[..., object], tuple[object, ...]]

# Bumped in a forked child: a pool whose generation is older holds its parent's threads
# and jobs, and starts afresh on its next use. (Resetting every pool in the hook would cost
# each fork, a pool's workers' among them, time in proportion to the pools ever made.)
_generation = 0
_fresh_lock = threading.Lock()


def _forked() -> None:
    global _generation, _fresh_lock
    _generation += 1
    _fresh_lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


class WorkerThreads:
    """Up to ``max_threads`` daemon threads running ``submit``-ted calls from one queue.

    ``name``: every thread's name, or a function of the thread's number (0, 1, ...).
    ``failed``: what ``logger`` logs when a call raises (the thread lives on); a ``%r`` in
    it stands for the call. ``idle_exit``: seconds a thread waits for a job before it
    leaves (None: it stays; another starts when needed).
    """

    def __init__(self, name: str | Callable[[int], str], max_threads: int = 1, *,
                 logger: logging.Logger, failed: str, idle_exit: float | None = None) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, not {max_threads!r}")
        self._name = name
        self._max = max_threads
        self._logger = logger
        self._failed = failed
        self._names_call = "%" in failed
        self._idle_exit = idle_exit
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        """No thread and no job: a new pool, or a forked child's copy of one."""
        self._gen = _generation
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when the last job finishes
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: a thread's cue to end
        self._threads: set[threading.Thread] = set()
        self._numbered = 0  # threads started so far: the next one's number
        self._outstanding = 0  # jobs submitted and not finished (queued or running)
        self._waiters = 0  # retire() calls waiting for ``_idle``
        self._stops = 0  # cues to end in the current queue

    def _own(self) -> None:
        """In a forked child, on first use: the parent's threads and jobs are not ours."""
        if self._gen != _generation:
            with _fresh_lock:
                if self._gen != _generation:
                    self._reset()

    def submit(self, fn: Callable[..., object], /, *args: object) -> None:
        """Run ``fn(*args)`` on a pool thread; ignored once the pool is closed."""
        if self._gen != _generation:  # checked inline: the hot path
            self._own()
        with self._lock:
            if self._closed:
                return
            self._outstanding += 1
            running = len(self._threads)
            if self._outstanding > running and running < self._max:
                self._start_locked()
            jobs = self._queue
        # Put after the lock: a woken thread must not find it held. Counted already, the job
        # keeps retire() waiting and an idle thread from leaving until it is in the queue.
        jobs.put((fn, args))

    def start(self) -> None:
        """Start a thread now if none runs, for a caller that wants it before the first job."""
        self._own()
        with self._lock:
            if not self._threads and not self._closed:
                self._start_locked()

    def _start_locked(self) -> None:
        name = self._name if isinstance(self._name, str) else self._name(self._numbered)
        self._numbered += 1
        thread = threading.Thread(target=self._work, args=(self._queue,), name=name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def pending(self) -> int:
        """Jobs submitted and not finished: queued or running."""
        self._own()
        return self._outstanding

    def queued(self) -> int:
        """Jobs waiting for a thread."""
        self._own()
        return max(0, self._queue.qsize() - self._stops)

    def is_worker(self) -> bool:
        """Whether the calling thread is one of this pool's."""
        self._own()
        return threading.current_thread() in self._threads

    def retire(self, timeout: float = 1.0) -> bool:
        """End every thread once idle (the next ``submit`` starts another); whether none is
        left. Refuses while jobs are queued, and waits up to ``timeout`` for a running one."""
        self._own()
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._threads:
                return True
            if threading.current_thread() in self._threads:
                return False
            while self._outstanding:
                remaining = deadline - time.monotonic()
                if not self._queue.empty() or remaining <= 0:
                    return False
                self._waiters += 1
                try:
                    self._idle.wait(remaining)
                finally:
                    self._waiters -= 1
            threads, self._threads = self._threads, set()
            old, self._queue, self._stops = self._queue, queue.SimpleQueue(), 0
            for _ in threads:
                old.put(None)
        return _join(threads, deadline)

    def close(self, wait: bool = True, timeout: float | None = None, cancel: bool = False) -> None:
        """Take no more jobs; the threads end once the queue is empty (``cancel``: queued
        jobs are dropped, running ones finish). ``wait``: join them (all but the calling
        one) for up to ``timeout`` in all."""
        self._own()
        with self._lock:
            self._closed = True
            if cancel:
                while True:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._outstanding -= 1
            threads = set(self._threads)
            for _ in threads:
                self._queue.put(None)
            self._stops += len(threads)
        if wait:
            threads.discard(threading.current_thread())
            _join(threads, None if timeout is None else time.monotonic() + timeout)

    def _work(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        get, idle_exit = jobs.get, self._idle_exit
        while True:
            try:
                job = get(timeout=idle_exit)
            except queue.Empty:
                if self._leave_if_spare():
                    return
                continue
            if job is None:
                return
            fn, args = job
            del job
            try:
                fn(*args)
            except BaseException:
                self._logger.exception(self._failed, *((fn,) if self._names_call else ()))
            # Held while waiting for the next job, the last one would keep alive what it
            # references (a result, an exception's traceback, and through it its owner).
            del fn, args
            with self._lock:
                self._outstanding -= 1
                if self._waiters and not self._outstanding:
                    self._idle.notify_all()

    def _leave_if_spare(self) -> bool:
        """An idle thread leaves unless a job submitted meanwhile still needs it."""
        with self._lock:
            if self._outstanding >= len(self._threads):
                return False
            self._threads.discard(threading.current_thread())
            return True

    def __repr__(self) -> str:
        name = self._name if isinstance(self._name, str) else self._name(0)
        return (f"<WorkerThreads {name!r} {len(self._threads)}/{self._max} threads"
                f"{' closed' if self._closed else ''}>")


def _join(threads: set[threading.Thread], deadline: float | None) -> bool:
    """Join ``threads`` until ``deadline`` (None: for as long as it takes); whether all ended."""
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)
