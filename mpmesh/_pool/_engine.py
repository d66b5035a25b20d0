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
the tail of a map spreads evenly and a slow chunk delays little else. Chunks of a second
or more are sent one at a time, like the stdlib's shared queue.

Locking: one lock guards all of it. Callers dispatch under it and write with non-blocking
sends; what the kernel does not take is flushed by the I/O thread. User code never runs
on the I/O thread: callbacks and progress bars run on a callback thread, lazy inputs on
the feeder thread.
"""

from __future__ import annotations

import collections
import enum
import heapq
import hmac
import itertools
import logging
import os
import pickle
import queue
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final

from .._errors import MeshClosed, RemoteError, RequestTimeout, SerializationError, WorkerLost
from .._supervisor import describe_exit
from .._wire import _codec
from . import _protocol as P
from ._feeder import Feeder, LazySource
from ._results import UnpicklableException, UnpicklableResult

__all__ = ["Chunk", "Engine", "Source", "State"]

log = logging.getLogger("mpmesh.pool")

RECV_BYTES: Final = 256 * 1024
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
HELLO_TIMEOUT_S: Final = 30.0
EMA_ALPHA: Final = 0.3

_KIND_NAMES: Final = {P.CALL: "apply", P.MAP1: "map", P.MAP: "map", P.STAR1: "starmap", P.STARMAP: "starmap"}


class State(enum.Enum):
    RUN = "RUN"
    CLOSE = "CLOSE"
    TERMINATE = "TERMINATE"


class WState(enum.Enum):
    STARTING = "starting"   # spawned; not connected or not ready yet
    READY = "ready"         # takes work
    LOST = "lost"           # connection gone, waiting for its exit status
    DEAD = "dead"           # its work is settled; waiting for (or past) its exit


class Chunk:
    """One stdlib task: a call, or ``chunksize`` items of a map."""

    __slots__ = ("cid", "source", "index", "data", "attempt", "isolate")

    def __init__(self, cid: int, source: Source, index: int, data: object) -> None:
        self.cid = cid
        self.source = source
        self.index = index
        self.data = data
        self.attempt = 1
        self.isolate = False

    def describe(self) -> str:
        src = self.source
        name = getattr(src.fn, "__qualname__", None) or type(src.fn).__name__
        label = f"{_KIND_NAMES[src.kind]}({name})"
        if src.kind == P.CALL:
            return label
        return f"{label} {'item' if src.kind in (P.MAP1, P.STAR1) else 'chunk'} {self.index}"


class Source:
    """A job's chunks not sent yet: cut from a list on demand, or filled by the feeder."""

    __slots__ = ("job", "fn", "kind", "items", "chunksize", "next", "end", "lazy", "ready", "fn_by_value")

    def __init__(self, job: Any, fn: Any, kind: int, items: list[Any] | None, chunksize: int,
                 n_chunks: int, lazy: LazySource | None = None) -> None:
        self.job = job
        self.fn = fn
        self.kind = kind
        self.items = items
        self.chunksize = chunksize
        self.next = 0
        self.end = n_chunks
        self.lazy = lazy
        self.ready: collections.deque[tuple[int, Any]] = collections.deque()
        self.fn_by_value = False  # a worker could not import ``fn``: send it with dill

    def available(self) -> int:
        return len(self.ready) if self.lazy is not None else self.end - self.next

    def drained(self) -> bool:
        if self.lazy is not None:
            return self.lazy.exhausted and not self.ready
        return self.next >= self.end

    def take(self, n: int, cids: itertools.count[int]) -> list[Chunk]:
        out: list[Chunk] = []
        if self.lazy is not None:
            ready = self.ready
            while ready and len(out) < n:
                index, data = ready.popleft()
                out.append(Chunk(next(cids), self, index, data))
            return out
        items, cs, start = self.items, self.chunksize, self.next
        stop = min(self.end, start + n)
        assert items is not None
        if cs == 1 or self.kind == P.CALL:
            out = [Chunk(next(cids), self, i, items[i]) for i in range(start, stop)]
        else:
            out = [Chunk(next(cids), self, i, items[i * cs:(i + 1) * cs]) for i in range(start, stop)]
        self.next = stop
        return out


class PoolWorker:
    """One worker process as the engine sees it."""

    __slots__ = ("name", "pid", "sock", "reader", "out", "state", "inflight", "assigned", "ema",
                 "lost_head", "exit_how", "ready_seen", "stopping", "writing", "deadline", "armed")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid = 0
        self.sock: socket.socket | None = None
        self.reader = P.FrameReader()
        self.out = bytearray()
        self.state = WState.STARTING
        self.inflight: collections.deque[Chunk] = collections.deque()
        self.assigned = 0
        self.ema: float | None = None
        self.lost_head: Chunk | None = None
        self.exit_how: str | None = None
        self.ready_seen = False
        self.stopping = False
        self.writing = False
        self.deadline: float | None = None   # when the running chunk passes task_timeout
        self.armed = False                    # a timer entry for it is in the heap

    def describe(self) -> str:
        return f"worker {self.name!r} (pid {self.pid or '?'})"


class _Pending:
    """A connection that has not proved the token yet."""

    __slots__ = ("sock", "reader", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.reader = P.FrameReader()
        self.deadline = deadline


_WAKE = object()
_LISTENER = object()


class Engine:
    """Owns the workers, the sources and the in-flight chunks of one pool."""

    def __init__(self, *, maxtasks: int | None, task_timeout: float | None, retries: int) -> None:
        self.lock = threading.Lock()
        self.state = State.RUN
        self.maxtasks = maxtasks
        self.task_timeout = task_timeout
        self.retries = retries
        self.token = os.urandom(P.TOKEN_BYTES)
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
        # I/O
        self.address, self._listener = _listen()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._buf = bytearray(RECV_BYTES)
        self._view = memoryview(self._buf)
        self._pending: dict[socket.socket, _Pending] = {}
        self._want_write: set[PoolWorker] = set()
        self._orphans: list[socket.socket] = []
        self._stopping = False
        self._woken = False
        self._thread = threading.Thread(target=self._run, name="mpmesh-pool-io", daemon=True)
        self._thread.start()

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
        workers = self.ready
        n = len(workers)
        if not n:
            return
        start = self._rr
        for k in range(n):
            w = workers[(start + k) % n]
            room = self._room(w, caller)
            if room <= 0:
                continue
            share = -(-self.n_ready // n)
            chunks = self._take(min(room, share))
            if not chunks:
                break
            self._rr = (start + k + 1) % n
            self._send_batch(w, chunks)
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

    def _send_batch(self, w: PoolWorker, chunks: list[Chunk]) -> None:
        isolated = len(chunks) == 1 and chunks[0].isolate
        body, sent, flags = self._encode(chunks, isolated)
        if not sent:
            return
        idle = not w.inflight
        w.inflight.extend(sent)
        if idle:
            self._head_started(w)
        w.assigned += len(sent)
        self._write(w, P.frame(P.BATCH, bytes([flags]) + P.pack_ids([c.cid for c in sent]) + body))

    def _encode(self, chunks: list[Chunk], isolated: bool) -> tuple[bytes, list[Chunk], int]:
        """Pickle a batch; chunks whose function or data cannot be pickled fail here.

        Functions go by reference (plain pickle) unless a worker could not import one
        (``NACK_FN``) or pickle refuses it (lambdas, closures): then by value, with dill.
        """
        fns: list[object] = []
        blobs: dict[int, int] = {}
        bad_fns: dict[int, BaseException] = {}
        tasks: list[tuple[int, int, int, object]] = []
        sent: list[Chunk] = []
        fns_by_value = True
        for c in chunks:
            src = c.source
            fn = src.fn
            key = id(src)
            fi = blobs.get(key)
            if fi is None and key not in bad_fns:
                by_value = isolated or src.fn_by_value or self._known_by_value(fn)
                fns_by_value = fns_by_value and by_value
                try:
                    fns.append(P.Blob(_dump_fn(fn, by_value)))
                    fi = blobs[key] = len(fns) - 1
                except SerializationError as exc:
                    bad_fns[key] = exc
            if fi is None:
                exc = bad_fns[key]
                self._resolve(c, False, SerializationError(f"cannot send {c.describe()} to a worker: {exc}"))
                continue
            data = c.data
            if isolated:
                try:
                    data = P.Blob(_codec.dumps_by_value(data))
                except SerializationError as exc:
                    self._resolve(c, False, SerializationError(f"cannot send {c.describe()} to a worker: {exc}"))
                    continue
            tasks.append((c.cid, src.kind, fi, data))
            sent.append(c)
        if not sent:
            return b"", [], 0
        flags = (P.FNS_BY_VALUE if fns_by_value else 0) | (P.DATA_BY_VALUE if isolated else 0)
        try:
            return pickle.dumps((fns, tasks), 5), sent, flags
        except Exception:
            pass
        # Something in there needs dill or cannot be pickled at all: one task at a time.
        slow: list[tuple[int, int, int, object]] = []
        kept: list[Chunk] = []
        for c, (cid, kind, fi, data) in zip(sent, tasks):
            try:
                slow.append((cid, kind, fi, P.Blob(_codec.dumps(data))))
            except SerializationError as exc:
                self._resolve(c, False, SerializationError(f"cannot send {c.describe()} to a worker: {exc}"))
                continue
            kept.append(c)
        if not kept:
            return b"", [], 0
        return pickle.dumps((fns, slow), 5), kept, flags

    def _known_by_value(self, fn: object) -> bool:
        try:
            return fn in self._fns_by_value
        except TypeError:
            return False

    def _write(self, w: PoolWorker, data: bytes) -> None:
        sock = w.sock
        if sock is None:
            return
        if w.out:
            w.out += data
            return
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return  # the reader sees the connection drop and settles this worker
        if n < len(data):
            w.out += data[n:]
            self._want_write.add(w)
            self._wake()

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
                ok, value = _decode(status, memoryview(body)[P.RESULT_HEAD.size:])
                decoded.append((kind, cid, ok, value, elapsed))
            elif kind == P.NACK:
                decoded.append((kind, body[0], False, P.unpack_ids(memoryview(body)[1:])[0], 0.0))
            elif kind == P.INIT_FAILED:
                decoded.append((kind, 0, False, _decode(body[0], memoryview(body)[1:])[1], 0.0))
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
        while True:
            fn = q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                log.exception("a pool callback raised")

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
        """The worker's channel closed: it exited, crashed, or was stopped (lock held)."""
        if w.state in (WState.LOST, WState.DEAD):
            return
        w.state = WState.LOST
        w.lost_head = self._orphan(w)
        if w.exit_how is not None:
            self._settle(w)
        elif w.lost_head is not None:
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
        """A worker process ended (the master's event thread)."""
        with self.lock:
            w = self.workers.get(name)
            if w is None or self._closed:
                return
            w.pid = w.pid or pid
            w.exit_how = describe_exit(exitcode)
            if not w.ready_seen and self.state is not State.TERMINATE and not w.stopping:
                self.startup_failures += 1
            if w.state in (WState.READY, WState.STARTING):
                w.state = WState.LOST
                w.lost_head = self._orphan(w)
            if w.state is WState.LOST:
                self._settle(w)
            del self.workers[name]
            self._close_sock(w)
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
            lazy = job._source if hasattr(job, "_source") else None
            if lazy is not None and job._length is None:
                with self.feeder.cond:
                    lazy.exhausted = True
                    pulled = lazy.pulled
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

    def shutdown_threads(self) -> None:
        """Stop the I/O, feeder and callback threads and close every descriptor."""
        with self.lock:
            self._closed = True
            self.workers.clear()
            self.all_gone.notify_all()
        self.feeder.stop()
        me = threading.current_thread()
        self._stopping = True
        self._wake()
        if self._thread is not me:
            self._thread.join(10.0)
        q, thread = self._callbacks, self._callback_thread
        if q is not None and thread is not None:
            q.put(None)
            if thread is not me:
                thread.join(30.0)

    # -- the I/O thread ------------------------------------------------------------------------

    def add_worker(self, name: str) -> None:
        with self.lock:
            self.workers[name] = PoolWorker(name)

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._sel_once()
        except Exception:  # pragma: no cover - a bug: fail loudly rather than hang
            log.exception("the pool's I/O thread failed")
            with self.lock:
                self._break(lambda: MeshClosed("the pool's I/O thread failed; see the log"))
        finally:
            self._close_all()

    def _sel_once(self) -> None:
        timeout = None
        heads = [h[0][0] for h in (self._timers, self._lost_timers) if h]
        heads += [p.deadline for p in self._pending.values()]
        if heads:
            timeout = max(0.0, min(heads) - time.monotonic())
        for key, mask in self._sel.select(timeout):
            data = key.data
            if data is _WAKE:
                self._drain_wake()
            elif data is _LISTENER:
                self._accept()
            elif type(data) is _Pending:
                self._read_pending(data)
            else:
                if mask & selectors.EVENT_WRITE:
                    self._flush(data)
                if mask & selectors.EVENT_READ:
                    self._read(data)
        if self._timers or self._lost_timers or self._pending:
            self._run_timers()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self.lock:
            want, self._want_write = self._want_write, set()
            orphans, self._orphans = self._orphans, []
        for sock in orphans:
            self._unregister_and_close(sock)
        for w in want:
            if w.sock is not None and w.out and not w.writing:
                w.writing = True
                self._sel.modify(w.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, w)

    def _unregister_and_close(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _flush(self, w: PoolWorker) -> None:
        with self.lock:
            sock = w.sock
            if sock is None:
                return
            try:
                n = sock.send(w.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(w.out)
            del w.out[:n]
            if not w.out and w.writing:
                w.writing = False
                self._sel.modify(sock, selectors.EVENT_READ, w)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            pending = _Pending(sock, time.monotonic() + HELLO_TIMEOUT_S)
            self._pending[sock] = pending
            self._sel.register(sock, selectors.EVENT_READ, pending)

    def _read_pending(self, p: _Pending) -> None:
        try:
            data = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            frames = p.reader.feed(data) if data else []
        except ValueError:
            frames, data = [], b""
        if not data:
            self._reject(p)
            return
        if not frames:
            return
        kind, body = frames[0]
        if kind != P.HELLO or len(body) < P.HELLO_HEAD.size:
            self._reject(p)
            return
        token, pid = P.HELLO_HEAD.unpack_from(body)
        name = body[P.HELLO_HEAD.size:].decode("utf-8", "replace")
        if not hmac.compare_digest(token, self.token):
            log.warning("a process (pid %d) tried to join the pool without its token", pid)
            self._reject(p)
            return
        with self.lock:
            w = self.workers.get(name)
            if w is not None and w.sock is None and w.state is WState.STARTING:
                w.sock, w.pid, w.reader = p.sock, pid, p.reader
            else:
                w = None
        if w is None:
            self._reject(p)
            return
        del self._pending[p.sock]
        self._sel.modify(p.sock, selectors.EVENT_READ, w)
        if frames[1:]:
            self._on_frames(w, frames[1:])

    def _reject(self, p: _Pending) -> None:
        self._pending.pop(p.sock, None)
        self._unregister_and_close(p.sock)

    def _read(self, w: PoolWorker) -> None:
        sock = w.sock
        if sock is None:
            return
        try:
            n = sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop_conn(w)
            return
        try:
            frames = w.reader.feed(self._view[:n])
        except ValueError:
            log.warning("%s sent a malformed frame; dropping it", w.describe())
            self._drop_conn(w)
            return
        if frames:
            self._on_frames(w, frames)

    def _drop_conn(self, w: PoolWorker) -> None:
        with self.lock:
            self._close_sock(w)
            self._disconnected(w)

    def _close_sock(self, w: PoolWorker) -> None:
        """Close ``w``'s channel (lock held); only the I/O thread touches the selector."""
        sock, w.sock = w.sock, None
        if sock is None:
            return
        if threading.current_thread() is self._thread:
            self._unregister_and_close(sock)
        else:
            self._orphans.append(sock)
            self._wake()

    def _run_timers(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            self._reject(p)
        timers, lost = self._timers, self._lost_timers
        if not ((timers and timers[0][0] <= now) or (lost and lost[0][0] <= now)):
            return
        with self.lock:
            while timers and timers[0][0] <= now:
                w = heapq.heappop(timers)[2]
                w.armed = False
                if w.state is not WState.READY or not w.inflight or w.deadline is None:
                    continue
                if w.deadline > now:  # the chunk it was armed for finished; re-arm for the next
                    w.armed = True
                    heapq.heappush(timers, (w.deadline, next(self._seq), w))
                    continue
                self._on_timeout(w)
            while lost and lost[0][0] <= now:
                w = heapq.heappop(lost)[2]
                if w.state is WState.LOST:
                    log.warning("%s closed its connection but has not exited; killing it", w.describe())
                    self.kill(w.name)
                    self._settle(w)
            self._dispatch()

    def _close_all(self) -> None:
        with self.lock:
            socks = [w.sock for w in self.workers.values() if w.sock is not None]
            for w in self.workers.values():
                w.sock = None
            socks += self._orphans
            self._orphans = []
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
        socks += list(self._pending)
        self._pending.clear()
        for sock in socks:
            sock.close()
        self._sel.close()
        self._listener.close()
        os.close(wake_r)
        os.close(wake_w)


def _listen() -> tuple[str | bytes, socket.socket]:
    """A listening Unix socket: abstract on Linux (no file to leak), else in the runtime dir."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"mpmesh-pool-{os.getpid()}-{os.urandom(8).hex()}"
    try:
        if hasattr(socket, "SO_PEERCRED"):  # Linux
            address: str | bytes = "\0" + name
        else:  # pragma: no cover - macOS
            from .._io import _paths

            address = str(_paths.runtime_dir() / f"{name}.sock")
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return address, sock


def _dump_fn(fn: object, by_value: bool) -> bytes:
    """A function for a worker: by reference when pickle can, else (or when asked) by value."""
    if by_value:
        return _codec.dumps_by_value(fn)
    return _codec.dumps(fn)


def _decode(status: int, payload: memoryview) -> tuple[bool, Any]:
    if status == P.OK:
        try:
            return True, pickle.loads(payload)
        except Exception as exc:
            return False, SerializationError(f"cannot unpickle a task's result here: {exc!r}")
    if status == P.ERROR:
        data, text = P.split_error_payload(bytes(payload))
        return False, _codec.unpack_exception(data, text)
    text = bytes(payload).decode("utf-8", "replace")
    if status == P.ERROR_TEXT:
        return False, UnpicklableException(text)
    if status == P.UNSENDABLE:
        return False, UnpicklableResult(text)
    if status == P.UNREADABLE:
        return False, SerializationError(text)
    return False, RemoteError(f"unknown result status {status}: {text}")
