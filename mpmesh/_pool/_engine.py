"""The pool's engine: which chunk runs where, what came back, what died, what timed out.

Theory of operation
-------------------
Work arrives as *sources*, in submission order: an ``apply`` is a source of one chunk,
a ``map`` a list cut into ``chunksize`` chunks (cut lazily, as they are sent), an
``imap`` a lazy source the feeder thread fills (``_feeder.py``). A *chunk* is the unit
the stdlib calls a task: one call, or ``chunksize`` items of a map; it succeeds or fails
as a whole.

Chunks travel to workers in *batches*, many chunks per message, whatever the chunksize;
results come back one frame per chunk, the moment each chunk is done::

    caller threads ──► sources (FIFO) ─┐
    feeder thread  ──► lazy sources  ──┤  _dispatch (any thread, under the lock):
    retries, orphans ► requeue (first) ┘  top up each READY worker to its target
                                            │  BATCH [ids][pickle((fns, tasks))]
                                            ▼
                                 worker (main thread): run chunk, RESULT, run chunk, RESULT...
                                            │
    I/O thread (selector): recv ◄───────────┘  decode outside the lock, then under it:
      inflight[worker].popleft() → result._set → done? → waiter woken / callback thread

Each worker runs its chunks in the order it got them, so the chunks it holds form a
queue whose head is the one running. That gives the three failure rules exactly:

- a worker dies (SIGKILL, ``os._exit``, segfault, OOM): its head chunk fails with
  ``WorkerLost`` naming the signal (or is retried, with ``retries=``); the chunks behind
  it never started and go back to the front of the queue; a new worker replaces it;
- the head has run longer than ``task_timeout``: it fails with ``RequestTimeout`` (or is
  retried), the worker is killed and replaced, the rest are requeued;
- a result, an exception or an argument that cannot cross: that chunk alone fails.

How much a worker holds is sized from the seconds per chunk it reports: enough queued
work (``QUEUE_TARGET_S``) that it never waits for the next batch, few enough chunks that
the tail of a map spreads evenly and a slow chunk delays little else. Chunks of 50 ms
or more are sent one at a time, like the stdlib's shared queue. A caller submitting
short tasks hands them straight to an idle worker (latency), but leaves a busy one to
the I/O thread, which tops it up with everything queued meanwhile in one batch when its
next results arrive (batching under load: ``apply_async`` in a loop is not one message
per task).

Why a direct channel, not broker requests
-----------------------------------------
The workers are started, watched and stopped by a supervisor (a standalone pool's own,
with no broker at all; or a Master's, whose mesh they then join as a group: see
``_processes.py``), and tasks never take a broker's request path, for two measured
reasons:

- *Cost per message.* A broker request costs ~2-3 us to encode and ~3 us to decode per
  hop, plus routing, on top of the syscalls; one request per task caps a pool near
  30-40k tasks/s on the master's one GIL, below the standard Pool's ~35-55k at chunksize
  1. So tasks must travel many to a message whatever the chunksize.
- *Knowing which task a dead worker ran.* A batch sent as one request gets one reply:
  results of its finished chunks would die with the worker, so a crash could not fail
  exactly the task that caused it without re-running finished ones. Streaming one result
  frame per chunk needs more than one reply per request, which the broker's
  request/reply model (rightly) does not offer.

The channel is the same kind of hop as the broker's (a Unix socket from the worker to
a thread of the pool's process), without routing in between; the supervisor owns the
processes' lifecycle. Measured here, unpinned, against ``multiprocessing.Pool(2)`` in the
same run (``python -m benchmarks pool``): map of trivial tasks at chunksize 1 ~240k
tasks/s (6x), at 16 ~1.3-2M/s (3-4x), at 256 ~4.7M/s (1.5-2.5x); apply_async ~34k/s
(1.2x); imap_unordered ~100k/s (3-4x); one ``apply`` ~150 us (0.5x); a CPU-bound map
within noise of it; start-up to the first result ~1.4x.

This module is longer than most: dispatch, results and the failure rules share one lock
and one set of tables, and read best side by side. The I/O thread's mechanics live in
``_io.py``, chunks, sources and batch pickling in ``_tasks.py``.

Locking: one lock guards all of it. Callers dispatch under it and write with non-blocking
sends; what the kernel does not take is flushed by the I/O thread. User code never runs
on the I/O thread: callbacks and progress bars run on a callback thread, lazy inputs on
the feeder thread.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final

from .._errors import MeshClosed, RequestTimeout, WorkerLost
from .._supervisor import describe_exit
from . import _protocol as P
from ._feeder import Feeder, LazySource
from ._io import ChannelIO
from ._tasks import Chunk, FnBlobs, PoolWorker, Source, WState, decode_result, encode_batch

__all__ = ["Engine", "Source", "State"]

log = logging.getLogger("mpmesh.pool")

# Queued work a worker should hold, in seconds of its measured time per chunk: enough to
# cover the round trip to refill it (~0.1-0.5 ms) twice over; more only unbalances the tail.
QUEUE_TARGET_S: Final = 0.004
# Chunks longer than this are sent one at a time (perfect balance; the refill gap is <1%).
PREFETCH_MAX_S: Final = 0.05
# Chunks shorter than this are worth gathering into batches rather than sent one by one.
BATCH_BELOW_S: Final = 0.001
# Upper bound on chunks held by one worker (trivial tasks at ~2 us each).
MAX_INFLIGHT: Final = 2048
# After a worker's connection drops, how long to wait for its exit status before failing
# its running chunk without it (and killing the process, should it still run).
LOST_GRACE_S: Final = 0.5
# Workers that die before they are ready, in a row, before the pool gives up (a worker
# that cannot even start would otherwise be replaced forever while tasks wait).
MAX_STARTUP_FAILURES: Final = 3
EMA_ALPHA: Final = 0.3


class State(enum.Enum):
    RUN = "RUN"
    CLOSE = "CLOSE"
    TERMINATE = "TERMINATE"


class Engine(ChannelIO):
    """Owns the workers, the sources and the in-flight chunks of one pool."""

    def __init__(self, *, maxtasks: int | None, task_timeout: float | None, retries: int,
                 channel: tuple[str | bytes, socket.socket] | None = None, token: bytes | None = None,
                 workers: Iterable[str] = ()) -> None:
        """``channel``: the listening socket workers connect to (made here if None);
        ``token``: what they prove; ``workers``: the names of the first ones."""
        self.lock = threading.Lock()
        self.state = State.RUN
        self.maxtasks = maxtasks
        self.task_timeout = task_timeout
        self.retries = retries
        self.token = token or os.urandom(P.TOKEN_BYTES)
        self.sources: collections.deque[Source] = collections.deque()
        self.requeue: collections.deque[Chunk] = collections.deque()
        self.n_ready = 0
        self.workers: dict[str, PoolWorker] = {}
        self.ready: list[PoolWorker] = []
        self.jobs_open = 0
        self.broken: Callable[[], BaseException] | None = None
        self.startup_failures = 0
        self.stop_sent = False
        self.all_gone = threading.Condition(self.lock)
        self._cids = itertools.count(1)
        self._fns_by_value: weakref.WeakSet[Any] = weakref.WeakSet()  # functions workers cannot import
        self._fn_blobs = FnBlobs()
        self._rr = 0
        self._timers: list[tuple[float, int, PoolWorker]] = []        # task_timeout
        self._lost_timers: list[tuple[float, int, PoolWorker]] = []   # LOST_GRACE_S
        self._seq = itertools.count()
        self._closed = False
        self._callbacks: queue.SimpleQueue[Callable[[], object] | None] | None = None
        self._callback_thread: threading.Thread | None = None
        self.feeder = Feeder(self)
        # Set by the Pool: how to name, start and kill worker processes (see _processes.py).
        self.next_name: Callable[[], str] = lambda: ""
        self.request_spawn: Callable[[str], None] = lambda name: None
        self.kill: Callable[[str], None] = lambda name: None
        for name in workers:
            self.workers[name] = PoolWorker(name)
        self._start_io(channel)

    # -- submitting (caller threads) ----------------------------------------------------------

    def submit(self, source: Source) -> None:
        """Queue a job's chunks (lock not held)."""
        with self.lock:
            self._check_accepting()
            self.jobs_open += 1
            if self.broken is not None:
                self._fail_job(source.job, self.broken())
                return
            self.sources.append(source)
            self.n_ready += source.available()
            self._dispatch(caller=True)

    def add_lazy(self, lazy: LazySource, first: int, items: list[Any], error: BaseException | None,
                 ended: bool) -> None:
        """The feeder pulled ``items`` (chunks ``first``...) from an imap input."""
        job = lazy.job
        with self.lock:
            src = lazy.source
            if src is None or self.state is State.TERMINATE or job._done:
                return
            for i, data in enumerate(items, first):
                src.ready.append((i, data))
            self.n_ready += len(items)
            complete = False
            if error is not None:
                complete = job._set(first + len(items), False, error)
            if ended:
                complete = job._set_length(lazy.pulled) or complete
            if complete:
                self._complete(job)
            self._dispatch(caller=True)

    def _check_accepting(self) -> None:
        if self.state is not State.RUN:
            raise ValueError("Pool not running")

    # -- dispatching (lock held) -----------------------------------------------------------------

    def _room(self, w: PoolWorker, caller: bool) -> int:
        """How many chunks to send ``w`` now (0: not worth a message yet)."""
        held = len(w.inflight)
        ema = w.ema
        if ema is None or ema >= PREFETCH_MAX_S:
            target = 1
        else:
            target = min(MAX_INFLIGHT, max(2, int(QUEUE_TARGET_S / max(ema, 1e-7))))
        if caller and held and (ema is None or ema < BATCH_BELOW_S):
            # A busy worker with short chunks is topped up by the I/O thread when its next
            # results arrive, with everything queued by then in one batch: a caller looping
            # over apply_async must not cost one message per task.
            return 0
        if held > target // 2:
            return 0
        room = target - held
        if self.maxtasks is not None:
            room = min(room, self.maxtasks - w.assigned)
        return room

    def _dispatch(self, caller: bool = False) -> None:
        """Send queued chunks to READY workers with room (lock held; ``caller``: not the I/O thread)."""
        if not self.n_ready or self.state is State.TERMINATE:
            return
        workers = list(self.ready)  # a failure settled while sending may change the list
        n = len(workers)
        if not n:
            return
        start = self._rr % n
        for k in range(n):
            w = workers[(start + k) % n]
            while w.state is WState.READY and not w.stopping:
                room = self._room(w, caller)
                if room <= 0:
                    break
                chunks = self._take(min(room, -(-self.n_ready // n)))
                if not chunks:
                    return
                self._rr = (start + k + 1) % n
                if self._send_batch(w, chunks):
                    break
                # Every chunk taken failed to pickle (each is settled): nothing went to
                # ``w``, so no result of it will come to dispatch again. Its room is
                # still free: fill it now, or the chunks behind would wait forever.
            if not self.n_ready:
                break

    def _take(self, n: int) -> list[Chunk]:
        out: list[Chunk] = []
        requeue = self.requeue
        while requeue and len(out) < n:
            if requeue[0].isolate:  # travels alone (see _on_nack)
                if not out:
                    out.append(requeue.popleft())
                self.n_ready -= len(out)
                return out
            out.append(requeue.popleft())
        sources = self.sources
        i = 0
        while len(out) < n and i < len(sources):
            src = sources[i]
            if src.available():
                out += src.take(n - len(out), self._cids)
            if src.drained():
                del sources[i]
            else:
                i += 1
        self.n_ready -= len(out)
        return out

    def _send_batch(self, w: PoolWorker, chunks: list[Chunk]) -> bool:
        """Send ``w`` what of ``chunks`` can be pickled (the rest fail); False: none could."""
        isolated = len(chunks) == 1 and chunks[0].isolate
        body, sent, flags = encode_batch(chunks, isolated, self._known_by_value,
                                         lambda c, exc: self._resolve(c, False, exc), self._fn_blobs.dump)
        if not sent:
            return False
        idle = not w.inflight
        w.inflight.extend(sent)
        if idle:
            self._head_started(w)
        w.assigned += len(sent)
        self._write(w, P.frame(P.BATCH, bytes([flags]) + P.pack_ids([c.cid for c in sent]) + body))
        return True

    def _known_by_value(self, fn: object) -> bool:
        try:
            return fn in self._fns_by_value
        except TypeError:
            return False

    def _head_started(self, w: PoolWorker) -> None:
        """The first chunk ``w`` holds has (about) just started running (lock held).

        One timer entry per worker at most: a result only moves ``w.deadline``; the I/O
        thread re-queues the entry when it finds the deadline moved.
        """
        if self.task_timeout is None:
            return
        if not w.inflight:
            w.deadline = None
            return
        w.deadline = time.monotonic() + self.task_timeout
        if not w.armed:
            w.armed = True
            heapq.heappush(self._timers, (w.deadline, next(self._seq), w))
            if threading.current_thread() is not self._thread:
                self._wake()

    # -- results (I/O thread) ------------------------------------------------------------------

    def _on_frames(self, w: PoolWorker, frames: list[tuple[int, bytes]]) -> None:
        decoded: list[tuple[int, int, bool, Any, float]] = []
        for kind, body in frames:
            if kind == P.RESULT:
                cid, status, elapsed = P.RESULT_HEAD.unpack_from(body)
                ok, value = decode_result(status, memoryview(body)[P.RESULT_HEAD.size:])
                decoded.append((kind, cid, ok, value, elapsed))
            elif kind == P.NACK:
                decoded.append((kind, body[0], False, P.unpack_ids(memoryview(body)[1:])[0], 0.0))
            elif kind == P.INIT_FAILED:
                decoded.append((kind, 0, False, decode_result(body[0], memoryview(body)[1:])[1], 0.0))
            elif kind == P.READY:
                decoded.append((kind, 0, True, None, 0.0))
            else:
                log.warning("%s sent an unexpected frame (kind %d); dropping it", w.describe(), kind)
                self._drop_conn(w)
                return
        with self.lock:
            for kind, cid, ok, value, elapsed in decoded:
                if kind == P.RESULT:
                    self._on_result(w, cid, ok, value, elapsed)
                elif kind == P.READY:
                    self._on_ready(w)
                elif kind == P.NACK:
                    self._on_nack(w, cid, value)
                else:
                    self._on_init_failed(w, value)
            self._dispatch()

    def _on_result(self, w: PoolWorker, cid: int, ok: bool, value: Any, elapsed: float) -> None:
        if w.state is not WState.READY:
            return  # a late answer from a worker we already gave up on
        inflight = w.inflight
        if not inflight or inflight[0].cid != cid:
            chunk = next((c for c in inflight if c.cid == cid), None)
            if chunk is None:
                return
            inflight.remove(chunk)
        else:
            chunk = inflight.popleft()
        w.ema = elapsed if w.ema is None else w.ema + EMA_ALPHA * (elapsed - w.ema)
        self._head_started(w)
        self._resolve(chunk, ok, value)

    def _on_ready(self, w: PoolWorker) -> None:
        if w.state is not WState.STARTING:
            return
        w.state = WState.READY
        w.ready_seen = True
        self.startup_failures = 0
        if self.stop_sent or self.state is State.TERMINATE:
            self._stop_worker(w)
            return
        self.ready.append(w)

    def _on_nack(self, w: PoolWorker, reason: int, ids: list[int]) -> None:
        """The worker could not unpickle a batch: resend it with more pickled by value.

        A function it could not import (defined in ``__main__`` after the worker started,
        say) is sent with dill from then on; data it could not unpickle is resent one
        chunk at a time, by value, so that only what truly cannot cross fails.
        """
        wanted = set(ids)
        chunks = [c for c in w.inflight if c.cid in wanted]
        for c in chunks:
            w.inflight.remove(c)
            if reason == P.NACK_FN:
                c.source.fn_by_value = True
                try:
                    self._fns_by_value.add(c.source.fn)
                except TypeError:
                    pass
            else:
                c.isolate = True
        w.assigned -= len(chunks)
        self.requeue.extendleft(reversed(chunks))
        self.n_ready += len(chunks)
        self._head_started(w)

    def _on_init_failed(self, w: PoolWorker, exc: BaseException) -> None:
        message = f"the pool's initializer raised in {w.describe()}: {type(exc).__name__}: {exc}"
        log.error("%s; the pool cannot run tasks", message)

        def broken() -> BaseException:
            err = WorkerLost(message)
            err.__cause__ = exc
            return err

        self._break(broken)

    def _resolve(self, chunk: Chunk, ok: bool, value: Any) -> None:
        """Chunk done, for good (lock held)."""
        job = chunk.source.job
        if job._done:
            return
        if job._bar is not None:
            size = len(chunk.data) if chunk.source.kind in (P.MAP, P.STARMAP) else 1  # type: ignore[arg-type]
            self._to_callbacks(lambda: job._progress(size))
        if job._set(chunk.index, ok, value):
            self._complete(job)

    def _complete(self, job: Any) -> None:
        job._done = True
        self.jobs_open -= 1
        if job._has_callbacks:
            self._to_callbacks(job._finish)
        else:
            job._finish()
        if self.state is State.CLOSE and self.jobs_open == 0:
            self._stop_workers()

    def _fail_job(self, job: Any, exc: BaseException) -> None:
        if job._fail_all(exc):
            self._complete(job)

    def _to_callbacks(self, fn: Callable[[], object]) -> None:
        if self._callbacks is None:
            self._callbacks = queue.SimpleQueue()
            self._callback_thread = threading.Thread(target=self._run_callbacks, args=(self._callbacks,),
                                                     name="mpmesh-pool-callbacks", daemon=True)
            self._callback_thread.start()
        self._callbacks.put(fn)

    @staticmethod
    def _run_callbacks(q: queue.SimpleQueue[Callable[[], object] | None]) -> None:
        while (fn := q.get()) is not None:
            try:
                fn()
            except Exception:
                log.exception("a pool callback raised")
            # Held while waiting for the next one, the last callback would keep its result
            # alive (its value, an exception's traceback, and through it the pool).
            del fn

    # -- failures (lock held) -------------------------------------------------------------------

    def _retry_or_fail(self, chunk: Chunk, make_error: Callable[[str], BaseException]) -> None:
        attempts = self.retries + 1
        if chunk.attempt < attempts and self.broken is None and self.state is not State.TERMINATE:
            log.info("retrying %s (attempt %d of %d)", chunk.describe(), chunk.attempt + 1, attempts)
            chunk.attempt += 1
            self.requeue.appendleft(chunk)
            self.n_ready += 1
            return
        self._resolve(chunk, False, make_error(f"(attempt {chunk.attempt} of {attempts})"))

    def _orphan(self, w: PoolWorker) -> Chunk | None:
        """Take a lost worker's chunks: the head is returned, the rest go back in front."""
        if w in self.ready:
            self.ready.remove(w)
        chunks = list(w.inflight)
        w.inflight.clear()
        if not chunks:
            return None
        rest = chunks[1:]
        self.requeue.extendleft(reversed(rest))
        self.n_ready += len(rest)
        return chunks[0]

    def _on_timeout(self, w: PoolWorker) -> None:
        """``w``'s running chunk passed ``task_timeout``: fail it, kill and replace ``w``."""
        w.state = WState.DEAD
        head = self._orphan(w)
        if head is None:
            return
        who, limit = w.describe(), self.task_timeout
        log.warning("%s ran longer than task_timeout=%g s on %s; killing the worker", head.describe(), limit, who)
        self.kill(w.name)
        self._retry_or_fail(head, lambda attempt: RequestTimeout(
            f"{head.describe()} ran longer than task_timeout={limit:g} s on {who}; "
            f"the worker was killed and replaced {attempt}"))
        self._dispatch()

    def _disconnected(self, w: PoolWorker) -> None:
        """The worker's channel closed: it exited, crashed, or was stopped (lock held).

        Its results up to that point have been read (they come before the EOF); the
        chunks it held but did not answer are settled now if its exit status is known,
        else once it is (see ``on_exit``), or after ``LOST_GRACE_S`` without it.
        """
        if w.state in (WState.READY, WState.STARTING):
            w.state = WState.LOST
            w.lost_head = self._orphan(w)
        if w.exit_how is not None:
            self._finish_worker(w)
        elif w.state is WState.LOST:
            heapq.heappush(self._lost_timers, (time.monotonic() + LOST_GRACE_S, next(self._seq), w))
        self._dispatch()

    def _settle(self, w: PoolWorker) -> None:
        """Fail (or retry) the chunk a lost worker was running, now that we know how it ended."""
        w.state = WState.DEAD
        head, w.lost_head = w.lost_head, None
        if head is None:
            return
        how = w.exit_how or "closed its connection"
        who = w.describe()
        self._retry_or_fail(head, lambda attempt: WorkerLost(f"{who} {how} while running {head.describe()} {attempt}"))

    def on_exit(self, name: str, pid: int, exitcode: int) -> None:
        """A worker process ended (the lifecycle thread).

        The exit can be learnt before the I/O thread has read the worker's last results:
        while its channel is open, those are still on their way, so the worker is
        finished only at EOF (or after ``LOST_GRACE_S``, should a child of the worker
        hold the channel open).
        """
        with self.lock:
            w = self.workers.get(name)
            if w is None or self._closed:
                return
            w.pid = w.pid or pid
            w.exit_how = describe_exit(exitcode)
            if w.sock is None:
                self._finish_worker(w)
            else:
                heapq.heappush(self._lost_timers, (time.monotonic() + LOST_GRACE_S, next(self._seq), w))
                self._wake()

    def _finish_worker(self, w: PoolWorker) -> None:
        """``w``'s process is gone and its channel read to the end: settle, forget, replace."""
        if w.state in (WState.READY, WState.STARTING):
            w.state = WState.LOST
            w.lost_head = self._orphan(w)
        self._settle(w)
        if self.workers.get(w.name) is not w:
            return
        del self.workers[w.name]
        self._close_sock(w)
        if not w.ready_seen and not w.stopping and self.state is not State.TERMINATE:
            self.startup_failures += 1
        if (self.startup_failures >= MAX_STARTUP_FAILURES and self.broken is None
                and self.state is not State.TERMINATE):
            message = (f"{MAX_STARTUP_FAILURES} workers in a row ended before they were ready "
                       f"(the last, {w.describe()}, {w.exit_how})")
            log.error("%s; the pool cannot run tasks", message)
            self._break(lambda: WorkerLost(message))
        elif self._needs_replacement():
            self._request_spawn()
        self._dispatch()
        self.all_gone.notify_all()

    def _needs_replacement(self) -> bool:
        if self.broken is not None or self.state is State.TERMINATE:
            return False
        return self.state is State.RUN or self.jobs_open > 0

    # -- replacing workers ------------------------------------------------------------------------

    def _request_spawn(self) -> None:
        """Have a new worker started (lock held; the lifecycle thread does the blocking part)."""
        name = self.next_name()
        self.workers[name] = PoolWorker(name)
        self.request_spawn(name)

    def spawn_failed(self, name: str, exc: BaseException) -> None:
        with self.lock:
            self.workers.pop(name, None)
            if self.state is not State.TERMINATE and self.broken is None:
                log.error("could not start pool worker %r: %s", name, exc)
                if not any(w.state in (WState.STARTING, WState.READY) for w in self.workers.values()):
                    message = f"the pool cannot start workers: {exc}"
                    closed = isinstance(exc, MeshClosed)
                    self._break(lambda: MeshClosed(message) if closed else WorkerLost(message))
            self.all_gone.notify_all()

    # -- the pool cannot go on ----------------------------------------------------------------------

    def _break(self, make_error: Callable[[], BaseException]) -> None:
        """Nothing can run any more: fail every job that is not done (lock held)."""
        self.broken = make_error
        self._fail_everything(make_error)

    def _fail_everything(self, make_error: Callable[[], BaseException]) -> None:
        jobs: dict[int, Any] = {}
        for c in self.requeue:
            jobs[id(c.source.job)] = c.source.job
        for s in self.sources:
            jobs[id(s.job)] = s.job
        for w in self.workers.values():
            for c in w.inflight:
                jobs[id(c.source.job)] = c.source.job
            if w.lost_head is not None:
                jobs[id(w.lost_head.source.job)] = w.lost_head.source.job
        with self.feeder.cond:
            lazies = list(self.feeder.sources)
        for lazy in lazies:
            jobs[id(lazy.job)] = lazy.job
        self.requeue.clear()
        self.sources.clear()
        self.n_ready = 0
        for job in jobs.values():
            feeding: LazySource | None = getattr(job, "_source", None)
            if feeding is not None and job._length is None:
                with self.feeder.cond:
                    feeding.exhausted = True
                    pulled = feeding.pulled
                job._set_length(pulled)
            self._fail_job(job, make_error())

    # -- stopping ---------------------------------------------------------------------------------

    def close(self) -> None:
        with self.lock:
            if self.state is State.RUN:
                self.state = State.CLOSE
                if self.jobs_open == 0:
                    self._stop_workers()
        self.feeder.lift_bounds()

    def _stop_workers(self) -> None:
        """Every job is done after close(): ask each worker to exit (lock held)."""
        if self.stop_sent:
            return
        self.stop_sent = True
        for w in self.workers.values():
            if w.state is WState.READY:
                self._stop_worker(w)

    def _stop_worker(self, w: PoolWorker) -> None:
        if w in self.ready:
            self.ready.remove(w)
        w.stopping = True
        self._write(w, P.frame(P.STOP))

    def wait_workers_gone(self, timeout: float | None = None) -> bool:
        with self.lock:
            return self.all_gone.wait_for(lambda: not self.workers, timeout)

    def terminate(self) -> list[str]:
        """Fail what is not done; return the names of the workers to stop."""
        with self.lock:
            self.state = State.TERMINATE
            self._fail_everything(lambda: MeshClosed("the pool was terminated before this task finished"))
            for w in self.workers.values():
                w.inflight.clear()
                w.lost_head = None
                w.stopping = True
            self.ready.clear()
            return list(self.workers)

    def on_own_thread(self) -> bool:
        """Whether the caller is one of the engine's threads (I/O, feeder, callbacks)."""
        return threading.current_thread() in (self._thread, self.feeder._thread, self._callback_thread)

    def shutdown_threads(self) -> None:
        """Stop the I/O, feeder and callback threads and close every descriptor."""
        with self.lock:
            self._closed = True
            for w in self.workers.values():
                if w.sock is not None:
                    self._orphans.append(w.sock)  # closed by the I/O thread on its way out
                    w.sock = None
            self.workers.clear()
            self.all_gone.notify_all()
        self.feeder.stop()
        me = threading.current_thread()
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not me:
            self._thread.join(10.0)
        q, thread = self._callbacks, self._callback_thread
        if q is not None and thread is not None:
            q.put(None)
            if thread is not me:
                thread.join(30.0)

    # -- the I/O thread ------------------------------------------------------------------------

