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

    submit ─────────► sources (FIFO) ─┐
    add_lazy ───────► lazy sources  ──┤  _dispatch: top up each READY worker to its target
    retries, orphans ► requeue (first) ┘     │  Send(BATCH [ids][pickle((fns, tasks))])
                                             ▼
                                  worker (main thread): run chunk, RESULT, run chunk, RESULT...
                                             │
    on_frames(worker, decoded results) ◄─────┘
      inflight[worker].popleft() → result._set → all in? → Complete(job)

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

Pure: no sockets, threads or clock
----------------------------------
The engine is the broker core's counterpart (``_broker/_core.py``): every entry point
takes what happened (work submitted, frames a worker sent, its channel closed, its
process exited, a tick at ``now``) and returns the actions it calls for (``_actions.py``:
send this frame to that worker, start or kill a worker, complete a job, wake me at this
deadline). ``_io.py`` owns the sockets, the clock and the threads; it calls the engine
under one lock and carries out its actions. Each chunk's outcome is written straight
into its job's result object (``_set``: bookkeeping only, and for an ``imap`` the
iterator's own condition); a job's callbacks and its waiters run only from a
``Complete`` action. The unit tests drive the engine with a fake clock and fake
workers (``tests/unit/test_pool_engine.py``).

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

Chunks, sources and batch pickling live in ``_tasks.py``.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import weakref
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING
from typing import Any, Final

# Shared with the broker, which has the same two rules for its workers: how long a worker
# whose channel dropped keeps its running chunk while we wait to learn how its process
# ended (then it fails anyway, and a process still running is killed), and the weight of
# a new measurement in a worker's moving average of seconds per chunk.
from .._broker._routing import EMA_ALPHA, LOST_GRACE_S
from .._errors import MeshClosed, RequestTimeout, WorkerLost
from .._wire import _pool as P
from ._actions import Action, Complete, Deadline, Gone, Hangup, Kill, Log, Progress, Send, Spawn, StopFeeding
from ._tasks import GARBAGE, Chunk, Event, FnBlobs, PoolWorker, Source, WState, encode_batch

__all__ = ["Engine", "Source", "State"]

# Queued work a worker should hold, in seconds of its measured time per chunk: enough to
# cover the round trip to refill it (~0.1-0.5 ms) twice over; more only unbalances the tail.
QUEUE_TARGET_S: Final = 0.004
# Chunks longer than this are sent one at a time (perfect balance; the refill gap is <1%).
PREFETCH_MAX_S: Final = 0.05
# Chunks shorter than this are worth gathering into batches rather than sent one by one.
BATCH_BELOW_S: Final = 0.001
# Upper bound on chunks held by one worker (trivial tasks at ~2 us each).
MAX_INFLIGHT: Final = 2048
# Workers that die before they are ready, in a row, before the pool gives up (a worker
# that cannot even start would otherwise be replaced forever while tasks wait).
MAX_STARTUP_FAILURES: Final = 3


class State(enum.Enum):
    RUN = "RUN"
    CLOSE = "CLOSE"
    TERMINATE = "TERMINATE"


class Engine:
    """The workers, the sources and the in-flight chunks of one pool; pure: no I/O, no
    threads, no clock. Not thread-safe: its driver calls it under one lock."""

    def __init__(self, *, maxtasks: int | None, task_timeout: float | None, retries: int,
                 workers: Iterable[str] = (), next_name: Callable[[], str]) -> None:
        """``workers``: the names of the first workers, already being started;
        ``next_name()``: a name for each replacement."""
        self.state = State.RUN
        self.maxtasks = maxtasks
        self.task_timeout = task_timeout
        self.retries = retries
        self.next_name = next_name
        self.sources: collections.deque[Source] = collections.deque()
        self.requeue: collections.deque[Chunk] = collections.deque()
        self.n_ready = 0
        self.workers: dict[str, PoolWorker] = {name: PoolWorker(name) for name in workers}
        self.ready: list[PoolWorker] = []
        self.jobs_open = 0
        self.broken: Callable[[], BaseException] | None = None
        self.startup_failures = 0
        self.stop_sent = False
        self._cids = itertools.count(1)
        self._fns_by_value: weakref.WeakSet[Any] = weakref.WeakSet()  # functions workers cannot import
        self._fn_blobs = FnBlobs()
        self._rr = 0
        self._timers: list[tuple[float, int, PoolWorker]] = []        # task_timeout
        self._lost_timers: list[tuple[float, int, PoolWorker]] = []   # LOST_GRACE_S
        self._seq = itertools.count()
        self._out: list[Action] = []  # what the current entry point asks for

    def _actions(self) -> list[Action]:
        """Hand over the actions gathered so far (the end of every entry point)."""
        out = self._out
        self._out = []
        return out

    # -- work submitted ----------------------------------------------------------------------

    def submit(self, source: Source, now: float) -> list[Action]:
        """Queue a job's chunks, and send what idle workers have room for.

        Raises:
            ValueError: the pool is closed or terminated.
        """
        if self.state is not State.RUN:
            raise ValueError("Pool not running")
        self.jobs_open += 1
        if self.broken is not None:
            self._fail_job(source.job, self.broken())
            return self._actions()
        self.sources.append(source)
        self.n_ready += source.available()
        self._dispatch(now, caller=True)
        return self._actions()

    def add_lazy(self, source: Source, first: int, items: list[Any], error: BaseException | None,
                 ended: bool, now: float) -> list[Action]:
        """The feeder pulled ``items`` (chunks ``first``...) from an imap input; ``error``:
        what the input raised after them; ``ended``: it has nothing more."""
        job = source.job
        if self.state is State.TERMINATE or job._done:
            return []
        for i, data in enumerate(items, first):
            source.ready.append((i, data))
        self.n_ready += len(items)
        source.pulled = first + len(items) + (error is not None)
        complete = False
        if error is not None:
            complete = job._set(first + len(items), False, error)
        if ended:
            source.ended = True
            complete = job._set_length(source.pulled) or complete
        if complete:
            self._complete(job)
        self._dispatch(now, caller=True)
        return self._actions()

    # -- dispatching -------------------------------------------------------------------------

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

    def _dispatch(self, now: float, caller: bool = False) -> None:
        """Send queued chunks to READY workers with room (``caller``: work was just
        submitted, rather than results received)."""
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
                if self._send_batch(w, chunks, now):
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

    def _send_batch(self, w: PoolWorker, chunks: list[Chunk], now: float) -> bool:
        """Send ``w`` what of ``chunks`` can be pickled (the rest fail); False: none could."""
        isolated = len(chunks) == 1 and chunks[0].isolate
        body, sent, flags = encode_batch(chunks, isolated, self._known_by_value,
                                         lambda c, exc: self._resolve(c, False, exc), self._fn_blobs.dump)
        if not sent:
            return False
        idle = not w.inflight
        w.inflight.extend(sent)
        if idle:
            self._head_started(w, now)
        w.assigned += len(sent)
        self._out.append(Send(w.name, P.frame(P.BATCH, bytes([flags]) + P.pack_ids([c.cid for c in sent]) + body)))
        return True

    def _known_by_value(self, fn: object) -> bool:
        try:
            return fn in self._fns_by_value
        except TypeError:
            return False

    def _head_started(self, w: PoolWorker, now: float) -> None:
        """The first chunk ``w`` holds has (about) just started running.

        One timer entry per worker at most: a result only moves ``w.deadline``; ``on_tick``
        re-queues the entry when it finds the deadline moved.
        """
        if self.task_timeout is None:
            return
        if not w.inflight:
            w.deadline = None
            return
        w.deadline = now + self.task_timeout
        if not w.armed:
            w.armed = True
            heapq.heappush(self._timers, (w.deadline, next(self._seq), w))
            self._out.append(Deadline(w.deadline))

    # -- what workers say --------------------------------------------------------------------

    def on_connect(self, name: str, pid: int) -> bool:
        """A connection proved the pool's token and says it is worker ``name``, process
        ``pid``: whether to take it as that worker's channel (only a worker still starting,
        and only its first connection)."""
        w = self.workers.get(name)
        if w is None or w.connected or w.state is not WState.STARTING:
            return False
        w.connected, w.pid = True, pid
        return True

    def on_frames(self, name: str, events: list[Event], now: float) -> list[Action]:
        """Worker ``name`` sent these frames (decoded by ``_tasks.read_frames``)."""
        w = self.workers.get(name)
        if w is None or not events:
            return []
        if events[0][0] == GARBAGE:
            self._out.append(Log(WARNING, "%s sent %s; dropping it", (w.describe(), events[0][3])))
            self._hang_up(w)
            self._disconnected(w, now)
            return self._actions()
        for kind, cid, ok, value, elapsed in events:
            if kind == P.RESULT:
                self._on_result(w, cid, ok, value, elapsed, now)
            elif kind == P.READY:
                self._on_ready(w)
            elif kind == P.NACK:
                self._on_nack(w, cid, value, now)
            else:
                self._on_init_failed(w, value)
        self._dispatch(now)
        return self._actions()

    def _on_result(self, w: PoolWorker, cid: int, ok: bool, value: Any, elapsed: float, now: float) -> None:
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
        self._head_started(w, now)
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

    def _on_nack(self, w: PoolWorker, reason: int, ids: list[int], now: float) -> None:
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
        self._head_started(w, now)

    def _on_init_failed(self, w: PoolWorker, exc: BaseException) -> None:
        message = f"the pool's initializer raised in {w.describe()}: {type(exc).__name__}: {exc}"
        self._out.append(Log(ERROR, "%s; the pool cannot run tasks", (message,)))

        def broken() -> BaseException:
            err = WorkerLost(message)
            err.__cause__ = exc
            return err

        self._break(broken)

    # -- results ---------------------------------------------------------------------------------

    def _resolve(self, chunk: Chunk, ok: bool, value: Any) -> None:
        """Chunk done, for good."""
        job = chunk.source.job
        if job._done:
            return
        if job._bar is not None:
            size = len(chunk.data) if chunk.source.kind in (P.MAP, P.STARMAP) else 1  # type: ignore[arg-type]
            self._out.append(Progress(job, size))
        if job._set(chunk.index, ok, value):
            self._complete(job)

    def _complete(self, job: Any) -> None:
        job._done = True
        self.jobs_open -= 1
        self._out.append(Complete(job))
        if self.state is State.CLOSE and self.jobs_open == 0:
            self._stop_workers()

    def _fail_job(self, job: Any, exc: BaseException) -> None:
        if job._fail_all(exc):
            self._complete(job)

    # -- failures --------------------------------------------------------------------------------

    def _retry_or_fail(self, chunk: Chunk, make_error: Callable[[str], BaseException]) -> None:
        attempts = self.retries + 1
        if chunk.attempt < attempts and self.broken is None and self.state is not State.TERMINATE:
            self._out.append(Log(INFO, "retrying %s (attempt %d of %d)",
                                 (chunk.describe(), chunk.attempt + 1, attempts)))
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

    def _on_timeout(self, w: PoolWorker, now: float) -> None:
        """``w``'s running chunk passed ``task_timeout``: fail it, kill and replace ``w``."""
        w.state = WState.DEAD
        head = self._orphan(w)
        if head is None:
            return
        who, limit = w.describe(), self.task_timeout
        self._out.append(Log(WARNING, "%s ran longer than task_timeout=%g s on %s; killing the worker",
                             (head.describe(), limit, who)))
        self._out.append(Kill(w.name))
        self._retry_or_fail(head, lambda attempt: RequestTimeout(
            f"{head.describe()} ran longer than task_timeout={limit:g} s on {who}; "
            f"the worker was killed and replaced {attempt}"))
        self._dispatch(now)

    def on_disconnect(self, name: str, now: float) -> list[Action]:
        """Worker ``name``'s channel closed (the driver has closed its end): it exited,
        crashed, or was stopped."""
        w = self.workers.get(name)
        if w is None:
            return []
        w.connected = False
        self._disconnected(w, now)
        return self._actions()

    def _hang_up(self, w: PoolWorker) -> None:
        if w.connected:
            w.connected = False
            self._out.append(Hangup(w.name))

    def _disconnected(self, w: PoolWorker, now: float) -> None:
        """``w``'s channel is closed.

        Its results up to that point have been read (they come before the EOF); the
        chunks it held but did not answer are settled now if its exit status is known,
        else once it is (see ``on_exit``), or after ``LOST_GRACE_S`` without it.
        """
        if w.state in (WState.READY, WState.STARTING):
            w.state = WState.LOST
            w.lost_head = self._orphan(w)
        if w.exit_how is not None:
            self._finish_worker(w, now)
        elif w.state is WState.LOST:
            self._lost_timer(w, now)
        self._dispatch(now)

    def _lost_timer(self, w: PoolWorker, now: float) -> None:
        at = now + LOST_GRACE_S
        heapq.heappush(self._lost_timers, (at, next(self._seq), w))
        self._out.append(Deadline(at))

    def _settle(self, w: PoolWorker) -> None:
        """Fail (or retry) the chunk a lost worker was running, now that we know how it ended."""
        w.state = WState.DEAD
        head, w.lost_head = w.lost_head, None
        if head is None:
            return
        how = w.exit_how or "closed its connection"
        who = w.describe()
        self._retry_or_fail(head, lambda attempt: WorkerLost(f"{who} {how} while running {head.describe()} {attempt}"))

    def on_exit(self, name: str, pid: int, how: str, now: float) -> list[Action]:
        """Worker ``name``'s process ``pid`` ended; ``how``: in words ("died with SIGKILL").

        The exit can be learnt before the worker's last results have been read: while
        its channel is open, those are still on their way, so the worker is finished only
        at EOF (or after ``LOST_GRACE_S``, should a child of the worker hold the channel
        open).
        """
        w = self.workers.get(name)
        if w is None:
            return []
        w.pid = w.pid or pid
        w.exit_how = how
        if not w.connected:
            self._finish_worker(w, now)
        else:
            self._lost_timer(w, now)
        return self._actions()

    def _finish_worker(self, w: PoolWorker, now: float) -> None:
        """``w``'s process is gone and its channel read to the end: settle, forget, replace."""
        if w.state in (WState.READY, WState.STARTING):
            w.state = WState.LOST
            w.lost_head = self._orphan(w)
        self._settle(w)
        if self.workers.get(w.name) is not w:
            return
        del self.workers[w.name]
        w.connected = False
        if not w.ready_seen and not w.stopping and self.state is not State.TERMINATE:
            self.startup_failures += 1
        if (self.startup_failures >= MAX_STARTUP_FAILURES and self.broken is None
                and self.state is not State.TERMINATE):
            message = (f"{MAX_STARTUP_FAILURES} workers in a row ended before they were ready "
                       f"(the last, {w.describe()}, {w.exit_how})")
            self._out.append(Log(ERROR, "%s; the pool cannot run tasks", (message,)))
            self._break(lambda: WorkerLost(message))
        elif self._needs_replacement():
            self._request_spawn()
        self._dispatch(now)
        self._out.append(Gone(w.name))

    def _needs_replacement(self) -> bool:
        if self.broken is not None or self.state is State.TERMINATE:
            return False
        return self.state is State.RUN or self.jobs_open > 0

    # -- timers ----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``on_tick`` next has something to do (None: nothing is timed)."""
        timers, lost = self._timers, self._lost_timers
        if timers:
            return min(timers[0][0], lost[0][0]) if lost else timers[0][0]
        return lost[0][0] if lost else None

    def on_tick(self, now: float) -> list[Action]:
        """Fire the timers due by ``now``: ``task_timeout`` and ``LOST_GRACE_S``."""
        timers, lost = self._timers, self._lost_timers
        if not ((timers and timers[0][0] <= now) or (lost and lost[0][0] <= now)):
            return []
        while timers and timers[0][0] <= now:
            w = heapq.heappop(timers)[2]
            w.armed = False
            if w.state is not WState.READY or not w.inflight or w.deadline is None:
                continue
            if w.deadline > now:  # the chunk it was armed for finished; re-arm for the next
                w.armed = True
                heapq.heappush(timers, (w.deadline, next(self._seq), w))
                continue
            self._on_timeout(w, now)
        while lost and lost[0][0] <= now:
            w = heapq.heappop(lost)[2]
            if self.workers.get(w.name) is not w:
                continue
            if w.exit_how is not None:  # exited, yet its channel stays open (inherited?)
                self._finish_worker(w, now)
            elif w.state is WState.LOST and w.lost_head is not None:
                self._out.append(Log(WARNING, "%s closed its connection but has not exited; killing it",
                                     (w.describe(),)))
                self._out.append(Kill(w.name))
                self._settle(w)
        self._dispatch(now)
        return self._actions()

    # -- replacing workers ------------------------------------------------------------------------

    def _request_spawn(self) -> None:
        name = self.next_name()
        self.workers[name] = PoolWorker(name)
        self._out.append(Spawn(name))

    def spawn_failed(self, name: str, exc: BaseException) -> list[Action]:
        """Worker ``name`` could not be started."""
        self.workers.pop(name, None)
        if self.state is not State.TERMINATE and self.broken is None:
            self._out.append(Log(ERROR, "could not start pool worker %r: %s", (name, exc)))
            if not any(w.state in (WState.STARTING, WState.READY) for w in self.workers.values()):
                message = f"the pool cannot start workers: {exc}"
                closed = isinstance(exc, MeshClosed)
                self._break(lambda: MeshClosed(message) if closed else WorkerLost(message))
        self._out.append(Gone(name))
        return self._actions()

    # -- the pool cannot go on ----------------------------------------------------------------------

    def break_pool(self, make_error: Callable[[], BaseException]) -> list[Action]:
        """Nothing can run any more (the driver failed): fail every job that is not done."""
        self._break(make_error)
        return self._actions()

    def _break(self, make_error: Callable[[], BaseException]) -> None:
        self.broken = make_error
        self._fail_everything(make_error)

    def _fail_everything(self, make_error: Callable[[], BaseException]) -> None:
        jobs: dict[int, Any] = {}
        for c in self.requeue:
            jobs[id(c.source.job)] = c.source.job
        # A lazy source stays listed until its input has ended and every chunk is taken.
        feeding = {id(s.job): s for s in self.sources if s.lazy is not None and not s.ended}
        for s in self.sources:
            jobs[id(s.job)] = s.job
        for w in self.workers.values():
            for c in w.inflight:
                jobs[id(c.source.job)] = c.source.job
            if w.lost_head is not None:
                jobs[id(w.lost_head.source.job)] = w.lost_head.source.job
        self.requeue.clear()
        self.sources.clear()
        self.n_ready = 0
        for key, job in jobs.items():
            src = feeding.get(key)
            if src is not None and src.lazy is not None:
                # The input has not ended: read no more of it; the job ends where it was.
                src.ended = True
                self._out.append(StopFeeding(src.lazy))
                job._set_length(src.pulled)
            self._fail_job(job, make_error())

    # -- stopping ---------------------------------------------------------------------------------

    def close(self) -> list[Action]:
        """Accept no more work; each worker is told to exit once every job is done."""
        if self.state is State.RUN:
            self.state = State.CLOSE
            if self.jobs_open == 0:
                self._stop_workers()
        return self._actions()

    def _stop_workers(self) -> None:
        """Every job is done after close(): ask each worker to exit."""
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
        self._out.append(Send(w.name, P.frame(P.STOP)))

    def terminate(self) -> list[Action]:
        """Fail every job not done (``MeshClosed``) and give up on the workers: the driver
        stops their processes (``self.workers`` names them) and nothing replaces them."""
        self.state = State.TERMINATE
        self._fail_everything(lambda: MeshClosed("the pool was terminated before this task finished"))
        for w in self.workers.values():
            w.inflight.clear()
            w.lost_head = None
            w.stopping = True
        self.ready.clear()
        return self._actions()

    def forget_workers(self) -> None:
        """The pool is shutting down: whatever its workers still report is not heard."""
        self.workers.clear()
