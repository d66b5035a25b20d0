"""The Pool's engine, pure: dispatch and chunking, lost and retiring workers, timeouts,
close/terminate, and what a worker may send. A fake clock and fake workers drive it.

A fake worker decodes the BATCH frames the engine sends it, holds their chunks in order,
and answers with the RESULT frames a real worker would send; those go through the same
decoding as the pool's I/O thread's (``read_frames``). Nothing here opens a socket,
starts a thread or reads a clock.
"""

from __future__ import annotations

import ast
import collections
import gc
import itertools
import multiprocessing
import pickle
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from .test_layering import FORBIDDEN
from mpmesh._broker import _routing
from mpmesh._errors import MeshClosed, RequestTimeout, WorkerLost
from mpmesh._pool import _engine
from mpmesh._pool._actions import (
    Action, Complete, Deadline, Gone, Hangup, Kill, Log, Progress, Send, Spawn, StopFeeding,
)
from mpmesh._pool._engine import Engine, State
from mpmesh._pool._feeder import LazySource
from mpmesh._pool._results import ApplyResult, IMapIterator, MapResult
from mpmesh._pool._tasks import Source, read_frames
from mpmesh._wire import _pool as P
from mpmesh._wire import _codec
from mpmesh._wire._frames import HEADER, FrameDecoder

FAST = 1e-4  # seconds a trivial chunk reports: a worker then holds ~QUEUE_TARGET_S / FAST


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


# -- fake workers ------------------------------------------------------------------------------

@dataclass
class Task:
    cid: int
    kind: int
    fn: Callable[..., Any]
    data: Any
    flags: int


class FakeWorker:
    """A worker process as the engine sees it through its channel."""

    def __init__(self, name: str, pid: int) -> None:
        self.name, self.pid = name, pid
        self.decoder = FrameDecoder(P.MAX_FRAME_BYTES)
        self.held: collections.deque[Task] = collections.deque()  # in the order it runs them
        self.batches: list[list[Task]] = []
        self.ran = 0
        self.stopped = False

    def receive(self, data: bytes) -> None:
        self.decoder.feed(data)
        for kind, body in self.decoder.frames():
            if kind == P.STOP:
                self.stopped = True
                continue
            assert kind == P.BATCH, kind
            flags = body[0]
            ids, offset = P.unpack_ids(memoryview(body)[1:])
            fns, tasks = pickle.loads(memoryview(body)[1 + offset:])
            batch = []
            for cid, task_kind, fi, data in tasks:
                if isinstance(data, P.Blob):
                    data = pickle.loads(data.data)
                batch.append(Task(cid, task_kind, pickle.loads(fns[fi].data), data, flags))
            assert [t.cid for t in batch] == ids
            self.batches.append(batch)
            self.held.extend(batch)

    def run(self, n: int = 1, elapsed: float = FAST) -> bytes:
        """Run the next ``n`` chunks it holds: their RESULT frames."""
        out = b""
        for _ in range(n):
            task = self.held.popleft()
            self.ran += 1
            try:
                value = _call(task)
            except Exception as exc:
                status, payload = P.error_payload(*_codec.pack_exception(exc))
            else:
                status, payload = P.OK, pickle.dumps(value)
            out += P.result_frame(task.cid, status, elapsed, payload)
        return out


def _call(task: Task) -> Any:
    fn, data = task.fn, task.data
    if task.kind == P.CALL:
        return fn(*data[0], **data[1])
    if task.kind == P.MAP1:
        return fn(data)
    if task.kind == P.MAP:
        return [fn(x) for x in data]
    if task.kind == P.STAR1:
        return fn(*data)
    return [fn(*args) for args in data]


class Harness:
    """An Engine, its fake workers and a fake clock; ``actions`` is everything it asked."""

    def __init__(self, size: int = 1, *, maxtasks: int | None = None, task_timeout: float | None = None,
                 retries: int = 0) -> None:
        self.now = 0.0
        names = itertools.count(size)
        self.engine = Engine(maxtasks=maxtasks, task_timeout=task_timeout, retries=retries,
                             workers=[f"pool-{i}" for i in range(size)],
                             next_name=lambda: f"pool-{next(names)}")
        self.workers: dict[str, FakeWorker] = {}
        self.inboxes: dict[str, FrameDecoder] = {}  # the pool's end of each channel
        self.connected: set[str] = set()
        self.actions: list[Action] = []
        self._pids = itertools.count(1000)

    def perform(self, actions: list[Action]) -> list[Action]:
        """What the driver does with the actions that matter here: frames reach their
        worker while it is connected, a completed job wakes its waiters."""
        for a in actions:
            if isinstance(a, Send) and a.worker in self.connected:
                self.workers[a.worker].receive(a.data)
            elif isinstance(a, (Hangup, Gone)):
                self.connected.discard(a.worker)
            elif isinstance(a, Complete):
                a.job._finish()
        self.actions += actions
        return actions

    # -- workers --------------------------------------------------------------------------

    def connect(self, name: str) -> bool:
        pid = next(self._pids)
        if not self.engine.on_connect(name, pid):
            return False
        self.workers[name] = FakeWorker(name, pid)
        self.inboxes[name] = FrameDecoder(P.MAX_FRAME_BYTES)
        self.connected.add(name)
        return True

    def start(self, *names: str) -> list[Action]:
        """Connect each worker and have it say READY."""
        out: list[Action] = []
        for name in names:
            assert self.connect(name)
            out += self.feed(name, P.frame(P.READY))
        return out

    def worker(self, name: str) -> FakeWorker:
        return self.workers[name]

    def feed(self, name: str, data: bytes) -> list[Action]:
        """``name`` sent ``data`` (decoded as the I/O thread does, then given to the engine)."""
        events = read_frames(self.inboxes[name], data)
        return self.perform(self.engine.on_frames(name, events, self.now))

    def run(self, name: str, n: int = 1, elapsed: float = FAST) -> list[Action]:
        return self.feed(name, self.worker(name).run(n, elapsed))

    def hang_up(self, name: str) -> list[Action]:
        """``name``'s channel reached EOF."""
        self.connected.discard(name)
        return self.perform(self.engine.on_disconnect(name, self.now))

    def exit(self, name: str, how: str = "died with SIGKILL", pid: int | None = None) -> list[Action]:
        """``name``'s process exited (reported with its pid, as the supervisor does)."""
        if pid is None:
            pid = self.workers[name].pid if name in self.workers else next(self._pids)
        return self.perform(self.engine.on_exit(name, pid, how, self.now))

    def die(self, name: str, how: str = "died with SIGKILL") -> list[Action]:
        """EOF on its channel, then its exit."""
        return self.hang_up(name) + self.exit(name, how)

    def tick(self, at: float) -> list[Action]:
        self.now = at
        return self.perform(self.engine.on_tick(at))

    # -- work -------------------------------------------------------------------------------

    def submit(self, source: Source) -> list[Action]:
        return self.perform(self.engine.submit(source, self.now))

    def apply(self, fn: Callable[..., Any], *args: Any) -> ApplyResult:
        result = ApplyResult()
        self.submit(Source(result, fn, P.CALL, [(args, {})], 1, 1))
        return result

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int = 1, *, star: bool = False,
            bar: Any = None) -> MapResult:
        n_chunks = -(-len(items) // chunksize)
        result = MapResult(n_chunks, chunksize, len(items))
        result._bar = bar
        if chunksize == 1:
            kind = P.STAR1 if star else P.MAP1
        else:
            kind = P.STARMAP if star else P.MAP
        self.submit(Source(result, fn, kind, list(items), chunksize, n_chunks))
        return result

    def imap(self, fn: Callable[..., Any]) -> tuple[IMapIterator, Source]:
        """An imap whose input the test hands over with ``engine.add_lazy``."""
        result = IMapIterator()
        lazy = LazySource(None, result, fn, P.MAP1, iter(()), None)  # type: ignore[arg-type]
        source = Source(result, fn, P.MAP1, None, 1, 0, lazy=lazy)
        lazy.source = source
        self.submit(source)
        return result, source

    def add_lazy(self, source: Source, first: int, items: list[Any], ended: bool = False,
                 error: BaseException | None = None) -> list[Action]:
        return self.perform(self.engine.add_lazy(source, first, items, error, ended, self.now))


def held(h: Harness, name: str) -> list[Any]:
    return [t.data for t in h.worker(name).held]


def sent(actions: list[Action], name: str | None = None) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and (name is None or a.worker == name)]


def of(kind: type, actions: list[Action]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def logged(actions: list[Action], level: int) -> list[str]:
    return [a.message % a.args for a in of(Log, actions) if a.level == level]


def error_of(result: Any) -> BaseException:
    """The exception ``result.get()`` raises (it must be ready)."""
    with pytest.raises(BaseException) as info:
        result.get(0)
    return info.value


# -- dispatch and chunking ---------------------------------------------------------------------

def test_a_map_is_cut_into_chunks_sent_in_order() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.map(square, list(range(10)), chunksize=3)
    # Nothing is known of the worker's speed yet: one chunk, as the stdlib's queue would.
    assert held(h, "pool-0") == [[0, 1, 2]]
    h.run("pool-0")
    # Its first result says chunks are fast: everything left travels in one batch.
    assert held(h, "pool-0") == [[3, 4, 5], [6, 7, 8], [9]]
    assert len(h.worker("pool-0").batches) == 2
    assert not result.ready()
    h.run("pool-0", 3)
    assert result.get(0) == [x * x for x in range(10)]
    assert of(Complete, h.actions) == [Complete(result)]


def test_first_chunks_go_one_to_each_worker_then_to_whoever_answers() -> None:
    h = Harness(2)
    h.start("pool-0", "pool-1")
    result = h.map(square, list(range(8)))
    assert (held(h, "pool-0"), held(h, "pool-1")) == ([0], [1])
    h.run("pool-1")
    # The one that answered takes its share of what is queued (a slow chunk elsewhere
    # must not leave the tail to one worker); the rest waits for the other.
    assert held(h, "pool-0") == [0]
    assert held(h, "pool-1") == [2, 3, 4]
    h.run("pool-0")
    assert held(h, "pool-0") == [5, 6]
    assert held(h, "pool-1") == [2, 3, 4, 7]
    h.run("pool-0", 2)
    h.run("pool-1", 4)
    assert result.get(0) == [x * x for x in range(8)]


def test_queued_work_is_shared_between_idle_workers() -> None:
    """Each idle worker takes its share of what is still queued, however much it could hold."""
    h = Harness(2)
    h.start("pool-0", "pool-1")
    for name in ("pool-0", "pool-1"):  # both have reported a fast chunk
        h.apply(square, 1)
        h.run(name)
    assert h.engine.workers["pool-1"].ema == FAST
    result = h.map(square, list(range(10)))
    assert sorted([held(h, "pool-0"), held(h, "pool-1")]) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert h.engine.n_ready == 2, "the last two wait for whoever answers first"
    for name in ("pool-0", "pool-1", "pool-0", "pool-1"):
        h.run(name, len(held(h, name)))
    assert result.get(0) == [x * x for x in range(10)]


def test_a_caller_leaves_a_busy_worker_to_be_topped_up_with_one_batch() -> None:
    """``apply_async`` in a loop: one message for everything queued meanwhile."""
    h = Harness(1)
    h.start("pool-0")
    h.apply(square, 0)
    h.run("pool-0")
    results = [h.apply(square, i) for i in range(1, 11)]
    w = h.worker("pool-0")
    assert held(h, "pool-0") == [((1,), {})], "an idle worker gets the first at once"
    assert len(w.batches) == 2
    h.run("pool-0")
    assert len(w.batches) == 3, "the other nine in one batch"
    assert [t.data[0][0] for t in w.held] == list(range(2, 11))
    h.run("pool-0", 9)
    assert [r.get(0) for r in results] == [i * i for i in range(1, 11)]


def test_long_chunks_are_sent_one_at_a_time() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.map(square, list(range(4)))
    for i in range(4):
        assert held(h, "pool-0") == [i]
        h.run("pool-0", elapsed=_engine.PREFETCH_MAX_S)
    assert result.get(0) == [0, 1, 4, 9]


def test_a_worker_holds_enough_chunks_for_its_measured_speed() -> None:
    """Seconds per chunk is a moving average with the broker's weight (``EMA_ALPHA``)."""
    h = Harness(1)
    h.start("pool-0")
    h.map(square, list(range(5000)))
    h.run("pool-0", elapsed=2e-4)
    w = h.engine.workers["pool-0"]
    assert w.ema == 2e-4
    assert len(held(h, "pool-0")) == int(_engine.QUEUE_TARGET_S / 2e-4)
    h.run("pool-0", len(held(h, "pool-0")), elapsed=1e-4)
    expected = 2e-4
    for _ in range(20):
        expected += _routing.EMA_ALPHA * (1e-4 - expected)
    assert w.ema == pytest.approx(expected)
    assert len(held(h, "pool-0")) == int(_engine.QUEUE_TARGET_S / expected)


def test_a_chunk_that_cannot_be_pickled_fails_alone_and_its_room_is_refilled() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.map(square, [threading.Lock(), 2, 3])
    assert held(h, "pool-0") == [2], "the next chunk took the refused one's place"
    h.run("pool-0")
    h.run("pool-0")
    exc = error_of(result)
    assert type(exc) is TypeError and "pickle" in str(exc)


def test_results_land_in_input_order_whatever_order_they_come_in() -> None:
    h = Harness(2)
    h.start("pool-0", "pool-1")
    result = h.map(add, [(i, 1) for i in range(4)], chunksize=2, star=True)
    h.run("pool-1")
    h.run("pool-0")
    assert result.get(0) == [1, 2, 3, 4]


def test_a_failed_chunk_fails_its_map_with_the_workers_exception() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.map(boom, [1, 2])
    h.run("pool-0")
    assert not result.ready(), "the map completes when every chunk is settled"
    h.run("pool-0")
    exc = error_of(result)
    assert type(exc) is ValueError and str(exc) == "boom 1"


def test_progress_is_reported_per_chunk_then_the_job_completes() -> None:
    class Bar:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    h = Harness(1)
    h.start("pool-0")
    bar = Bar()
    result = h.map(square, list(range(5)), chunksize=2, bar=bar)
    h.run("pool-0")
    h.run("pool-0", 2)
    tail = [a for a in h.actions if isinstance(a, (Progress, Complete))]
    assert tail == [Progress(result, 2), Progress(result, 2), Progress(result, 1), Complete(result)]


def test_the_engine_keeps_nothing_of_a_finished_job() -> None:
    """A job's results can be large: once it is complete and its actions carried out,
    nothing in the engine may keep it alive (the actions it returned included)."""
    h = Harness(1)
    h.start("pool-0")
    result = h.map(square, [1, 2])
    h.run("pool-0")
    h.run("pool-0")
    assert result.get(0) == [1, 4]
    ref = weakref.ref(result)
    h.actions.clear()  # the harness's own record of them
    del result
    gc.collect()
    assert ref() is None


def test_get_with_a_timeout_is_the_results_own_business() -> None:
    """``AsyncResult.get(timeout)`` expiring neither times the task nor cancels it."""
    h = Harness(1)
    h.start("pool-0")
    result = h.apply(square, 7)
    assert h.engine.next_deadline() is None, "no task_timeout: nothing is timed"
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0)
    assert held(h, "pool-0") == [((7,), {})]
    h.run("pool-0")
    assert result.get(timeout=0) == 49


# -- a worker dies ------------------------------------------------------------------------------

def test_a_worker_that_dies_fails_the_chunk_it_ran_and_the_rest_run_elsewhere_in_order() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.map(square, list(range(6)))
    h.run("pool-0")
    assert held(h, "pool-0") == [1, 2, 3, 4, 5]
    out = h.hang_up("pool-0")
    assert of(Deadline, out) == [Deadline(_routing.LOST_GRACE_S)], "waits to learn how it ended"
    assert not of(Spawn, out) and not result.ready()
    out = h.exit("pool-0", "died with SIGKILL")
    assert of(Spawn, out) == [Spawn("pool-1")]
    assert of(Gone, out) == [Gone("pool-0")]
    assert "pool-0" not in h.engine.workers
    h.start("pool-1")
    assert held(h, "pool-1") == [2], "the chunks it never started, in their order"
    h.run("pool-1")
    assert held(h, "pool-1") == [3, 4, 5]
    h.run("pool-1", 3)
    exc = error_of(result)
    assert type(exc) is WorkerLost
    assert str(exc) == ("worker 'pool-0' (pid 1000) died with SIGKILL while running map(square) item 1 "
                        "(attempt 1 of 1)")


def test_an_exit_heard_before_the_channel_closes_waits_for_the_last_results() -> None:
    h = Harness(1)
    h.start("pool-0")
    h.apply(square, 0)
    h.run("pool-0")
    a, b = h.apply(square, 1), h.apply(square, 2)
    h.run("pool-0")
    assert held(h, "pool-0") == [((2,), {})]
    c = h.apply(square, 3)
    last = h.worker("pool-0").run()  # written just before it died
    out = h.exit("pool-0")
    assert of(Deadline, out) == [Deadline(_routing.LOST_GRACE_S)]
    assert not of(Spawn, out)
    h.feed("pool-0", last)
    out = h.hang_up("pool-0")
    assert of(Spawn, out) == [Spawn("pool-1")]
    assert (a.get(0), b.get(0)) == (1, 4)
    assert type(error_of(c)) is WorkerLost and "apply(square)" in str(error_of(c))


def test_a_worker_that_hangs_up_without_exiting_is_killed_after_the_grace() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.apply(square, 3)
    h.hang_up("pool-0")
    assert h.tick(_routing.LOST_GRACE_S - 0.01) == []
    out = h.tick(_routing.LOST_GRACE_S)
    assert of(Kill, out) == [Kill("pool-0")]
    assert logged(out, WARNING) == [
        "worker 'pool-0' (pid 1000) closed its connection but has not exited; killing it"]
    assert str(error_of(result)) == ("worker 'pool-0' (pid 1000) closed its connection while running "
                                     "apply(square) (attempt 1 of 1)")
    assert not of(Spawn, out), "replaced once it has exited"
    assert of(Spawn, h.exit("pool-0")) == [Spawn("pool-1")]


def test_retries_rerun_a_lost_chunk_first_then_run_out() -> None:
    h = Harness(2, retries=1)
    h.start("pool-0", "pool-1")
    result = h.apply(square, 5)
    other = h.map(square, [1, 2])
    assert held(h, "pool-0") == [((5,), {})]
    out = h.die("pool-0")
    assert logged(out, INFO) == ["retrying apply(square) (attempt 2 of 2)"]
    assert not result.ready()
    h.start("pool-2")
    assert held(h, "pool-2") == [((5,), {})], "the retry goes before the map's next chunk"
    h.die("pool-2")
    exc = error_of(result)
    assert type(exc) is WorkerLost and str(exc).endswith("(attempt 2 of 2)")
    h.run("pool-1")
    h.run("pool-1")
    assert other.get(0) == [1, 4]


def test_workers_that_end_before_they_are_ready_break_the_pool_at_the_third() -> None:
    h = Harness(1)
    result = h.apply(square, 2)
    assert of(Spawn, h.exit("pool-0", "exited with code 1")) == [Spawn("pool-1")]
    h.start("pool-1")
    h.run("pool-1")  # a worker that became ready resets the count
    later = h.apply(square, 3)
    h.die("pool-1")
    assert of(Spawn, h.exit("pool-2", "exited with code 1")) == [Spawn("pool-3")]
    assert of(Spawn, h.exit("pool-3", "exited with code 1")) == [Spawn("pool-4")]
    out = h.exit("pool-4", "exited with code 1", pid=4444)
    assert not of(Spawn, out)
    message = ("3 workers in a row ended before they were ready (the last, worker 'pool-4' (pid 4444), "
               "exited with code 1)")
    assert logged(out, ERROR) == [f"{message}; the pool cannot run tasks"]
    assert result.get(0) == 4
    assert str(error_of(later)).startswith("worker 'pool-1'"), "it was lost with its worker"
    late = h.apply(square, 4)
    assert str(error_of(late)) == message, "a broken pool fails new work at once"


def test_an_initializer_that_raises_breaks_the_pool() -> None:
    h = Harness(2)
    result = h.apply(square, 2)
    assert h.connect("pool-0")
    status, payload = P.error_payload(*_codec.pack_exception(ValueError("no config")))
    out = h.feed("pool-0", P.frame(P.INIT_FAILED, bytes([status]) + payload))
    message = "the pool's initializer raised in worker 'pool-0' (pid 1000): ValueError: no config"
    assert logged(out, ERROR) == [f"{message}; the pool cannot run tasks"]
    exc = error_of(result)
    assert type(exc) is WorkerLost and str(exc) == message
    assert type(exc.__cause__) is ValueError


@pytest.mark.parametrize(("error", "raised"), [(OSError("out of memory"), WorkerLost),
                                                (MeshClosed("the mesh is closed"), MeshClosed)])
def test_no_worker_left_to_start_breaks_the_pool(error: BaseException, raised: type) -> None:
    h = Harness(1)
    h.start("pool-0")
    first, second = h.apply(square, 1), h.apply(square, 2)
    assert of(Spawn, h.die("pool-0")) == [Spawn("pool-1")]
    assert type(error_of(first)) is WorkerLost
    out = h.perform(h.engine.spawn_failed("pool-1", error))
    assert of(Gone, out) == [Gone("pool-1")]
    assert logged(out, ERROR) == [f"could not start pool worker 'pool-1': {error}"]
    exc = error_of(second)
    assert type(exc) is raised and str(exc) == f"the pool cannot start workers: {error}"


# -- maxtasksperchild ---------------------------------------------------------------------------

def test_maxtasks_caps_what_a_worker_is_sent_and_a_retiring_worker_is_replaced() -> None:
    h = Harness(1, maxtasks=2)
    h.start("pool-0")
    result = h.map(square, list(range(5)))
    h.run("pool-0")
    assert held(h, "pool-0") == [1], "one more, not the ~40 its speed allows"
    h.run("pool-0")
    assert held(h, "pool-0") == []
    out = h.die("pool-0", "exited with code 0")  # its second chunk done, it retires
    assert of(Spawn, out) == [Spawn("pool-1")]
    assert not logged(out, WARNING) and not result.ready()
    for name, nxt in (("pool-1", "pool-2"), ("pool-2", "pool-3")):
        h.start(name)
        h.run(name, len(held(h, name)))
        h.run(name, len(held(h, name)))
        assert of(Spawn, h.die(name, "exited with code 0")) == [Spawn(nxt)]
    assert result.get(0) == [0, 1, 4, 9, 16]
    assert [h.worker(f"pool-{i}").ran for i in range(3)] == [2, 2, 1]
    assert h.engine.startup_failures == 0, "a retiring worker is no start-up failure"


# -- task_timeout --------------------------------------------------------------------------------

def test_task_timeout_fails_the_running_chunk_and_kills_its_worker() -> None:
    h = Harness(1, task_timeout=2.0)
    h.start("pool-0")
    result = h.apply(square, 3)
    queued = h.apply(square, 4)
    assert of(Deadline, h.actions) == [Deadline(2.0)]
    assert h.engine.next_deadline() == 2.0
    assert h.tick(1.99) == []
    out = h.tick(2.0)
    assert of(Kill, out) == [Kill("pool-0")]
    exc = error_of(result)
    assert type(exc) is RequestTimeout and isinstance(exc, multiprocessing.TimeoutError)
    assert str(exc) == ("apply(square) ran longer than task_timeout=2 s on worker 'pool-0' (pid 1000); "
                        "the worker was killed and replaced (attempt 1 of 1)")
    assert not queued.ready()
    h.feed("pool-0", h.worker("pool-0").run())  # too late: dropped
    assert type(error_of(result)) is RequestTimeout
    out = h.die("pool-0")
    assert of(Spawn, out) == [Spawn("pool-1")]
    h.start("pool-1")
    h.run("pool-1")
    assert queued.get(0) == 16


def test_task_timeout_runs_per_chunk_not_per_batch() -> None:
    h = Harness(1, task_timeout=2.0)
    h.start("pool-0")
    h.apply(square, 0)
    h.run("pool-0")
    result = h.map(square, [1, 2, 3])
    assert held(h, "pool-0") == [1, 2, 3]
    h.now = 1.5
    h.run("pool-0")
    assert h.tick(2.0) == [], "the chunk now running started at 1.5"
    assert h.engine.next_deadline() == 3.5
    out = h.tick(3.5)
    assert of(Kill, out) == [Kill("pool-0")]
    h.die("pool-0")
    h.start("pool-1")
    h.run("pool-1")
    assert "map(square) item 1 ran longer" in str(error_of(result))


# -- close, terminate, join ---------------------------------------------------------------------

def test_close_lets_open_jobs_finish_then_stops_every_ready_worker() -> None:
    h = Harness(2)
    h.start("pool-0", "pool-1")
    result = h.apply(square, 2)
    assert not sent(h.perform(h.engine.close()))
    with pytest.raises(ValueError, match="Pool not running"):
        h.engine.submit(Source(ApplyResult(), square, P.CALL, [((1,), {})], 1, 1), h.now)
    out = h.run("pool-0")
    assert out.index(Complete(result)) < out.index(Send("pool-0", P.frame(P.STOP)))
    assert sent(out) == [Send("pool-0", P.frame(P.STOP)), Send("pool-1", P.frame(P.STOP))]
    for name in ("pool-0", "pool-1"):
        assert h.worker(name).stopped
        out = h.die(name, "exited with code 0")
        assert not of(Spawn, out) and of(Gone, out) == [Gone(name)]
    assert h.engine.workers == {}, "what join() waits for"


def test_after_close_a_lost_worker_is_replaced_only_while_jobs_are_open() -> None:
    h = Harness(1)
    h.start("pool-0")
    lost, waiting = h.apply(square, 2), h.apply(square, 3)
    h.perform(h.engine.close())
    assert of(Spawn, h.die("pool-0")) == [Spawn("pool-1")], "a job still needs a worker"
    assert type(error_of(lost)) is WorkerLost
    out = h.start("pool-1")
    assert not sent(out, "pool-1")[0].data.startswith(P.frame(P.STOP))
    out = h.run("pool-1")
    assert waiting.get(0) == 9
    assert sent(out) == [Send("pool-1", P.frame(P.STOP))]
    assert not of(Spawn, h.die("pool-1", "exited with code 0"))
    assert h.engine.workers == {}

    h = Harness(1)
    h.start("pool-0")
    lost = h.apply(square, 2)
    h.perform(h.engine.close())
    out = h.die("pool-0")
    assert type(error_of(lost)) is WorkerLost
    assert not of(Spawn, out), "its loss settled the last job"


def test_a_worker_ready_after_close_is_stopped_at_once() -> None:
    h = Harness(2)
    h.start("pool-0")
    out = h.perform(h.engine.close())
    assert sent(out) == [Send("pool-0", P.frame(P.STOP))]
    out = h.start("pool-1")
    assert sent(out) == [Send("pool-1", P.frame(P.STOP))]


def test_terminate_fails_what_is_not_done_and_replaces_nobody() -> None:
    h = Harness(2)
    h.start("pool-0", "pool-1")
    done = h.apply(square, 3)
    h.run("pool-0")
    assert done.get(0) == 9
    running, queued = h.apply(square, 1), h.map(square, list(range(10)))
    h.perform(h.engine.terminate())
    assert h.engine.state is State.TERMINATE
    for result in (running, queued):
        exc = error_of(result)
        assert type(exc) is MeshClosed and str(exc) == "the pool was terminated before this task finished"
    assert sorted(h.engine.workers) == ["pool-0", "pool-1"], "the driver stops these"
    assert h.run("pool-0") == [], "a result after terminate is dropped"
    for name in ("pool-0", "pool-1"):
        assert not of(Spawn, h.die(name, "died with SIGTERM"))
    assert h.engine.workers == {}
    with pytest.raises(ValueError):
        h.apply(square, 1)


def test_terminate_ends_an_imap_where_its_input_was_and_stops_reading_it() -> None:
    h = Harness(1)
    h.start("pool-0")
    it, source = h.imap(square)
    h.add_lazy(source, 0, [1, 2, 3])
    h.run("pool-0")
    assert next(it) == 1
    out = h.perform(h.engine.terminate())
    assert source.lazy is not None
    assert of(StopFeeding, out) == [StopFeeding(source.lazy)]
    for _ in range(2):
        with pytest.raises(MeshClosed):
            next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_an_imap_input_ends_when_the_engine_is_told_not_when_the_feeder_knows() -> None:
    """The feeder marks its input exhausted before it hands over the last items: work
    dispatched in between must not take that for the end of the imap's chunks."""
    h = Harness(1)
    h.start("pool-0")
    it, source = h.imap(square)
    assert source.lazy is not None
    source.lazy.exhausted = True  # the feeder's own flag, on its thread
    other = h.map(square, [5])
    h.add_lazy(source, 0, [1, 2], ended=True)
    for _ in range(3):
        h.run("pool-0")
    assert other.get(0) == [25]
    assert list(it) == [1, 4]


def test_an_imap_completes_once_its_input_ended_and_every_result_is_in() -> None:
    h = Harness(1)
    h.start("pool-0")
    it, source = h.imap(square)
    h.add_lazy(source, 0, [1, 2])
    h.run("pool-0", 1)
    h.run("pool-0", 1)
    assert not of(Complete, h.actions), "more input may come"
    out = h.add_lazy(source, 2, [3], ended=True, error=RuntimeError("input broke"))
    assert not of(Complete, out)
    out = h.run("pool-0")
    assert of(Complete, out) == [Complete(it)]
    assert [next(it), next(it), next(it)] == [1, 4, 9]
    with pytest.raises(RuntimeError, match="input broke"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


# -- what a worker may send ---------------------------------------------------------------------

@pytest.mark.parametrize(("data", "what"), [
    (P.frame(99, b"?"), "an unexpected frame (kind 99)"),
    (P.frame(P.BATCH, b"\0"), f"an unexpected frame (kind {P.BATCH})"),
    (HEADER.pack(P.MAX_FRAME_BYTES + 1, P.RESULT), "a malformed frame"),
])
def test_garbage_from_a_worker_drops_its_channel_and_what_came_with_it(data: bytes, what: str) -> None:
    h = Harness(1)
    h.start("pool-0")
    h.apply(square, 0)
    h.run("pool-0")
    first, second = h.apply(square, 1), h.apply(square, 2)
    h.run("pool-0")
    result = h.worker("pool-0").run()
    out = h.feed("pool-0", result + data)
    assert logged(out, WARNING) == [f"worker 'pool-0' (pid 1000) sent {what}; dropping it"]
    assert of(Hangup, out) == [Hangup("pool-0")]
    assert not second.ready(), "the result read with the garbage is not trusted"
    assert first.get(0) == 1
    out = h.exit("pool-0")
    assert of(Spawn, out) == [Spawn("pool-1")]
    assert type(error_of(second)) is WorkerLost


def test_a_frame_split_across_reads_counts_once_whole() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.apply(square, 6)
    frame = h.worker("pool-0").run()
    assert h.feed("pool-0", frame[:7]) == []
    assert not result.ready()
    h.feed("pool-0", frame[7:])
    assert result.get(0) == 36


def test_a_result_for_no_chunk_it_holds_is_ignored() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.apply(square, 6)
    (task,) = h.worker("pool-0").held
    assert h.feed("pool-0", P.result_frame(task.cid + 99, P.OK, FAST, pickle.dumps(1))) == []
    assert h.feed("pool-0", P.frame(P.READY)) == [], "READY twice changes nothing"
    h.run("pool-0")
    assert result.get(0) == 36


def test_a_channel_is_taken_only_for_a_worker_that_is_starting() -> None:
    h = Harness(1)
    assert not h.connect("pool-9"), "no such worker"
    assert h.connect("pool-0")
    assert not h.connect("pool-0"), "a second connection for it"
    h.feed("pool-0", P.frame(P.READY))
    h.die("pool-0")
    assert not h.connect("pool-0"), "gone"


def test_a_function_a_worker_cannot_import_is_resent_by_value() -> None:
    h = Harness(1)
    h.start("pool-0")
    result = h.apply(square, 4)
    w = h.worker("pool-0")
    (task,) = w.held
    assert not task.flags & P.FNS_BY_VALUE
    w.held.clear()
    h.feed("pool-0", P.frame(P.NACK, bytes([P.NACK_FN]) + P.pack_ids([task.cid])))
    (again,) = w.held
    assert again.cid == task.cid and again.flags & P.FNS_BY_VALUE
    h.run("pool-0")
    assert result.get(0) == 16
    h.apply(square, 5)
    assert w.held[0].flags & P.FNS_BY_VALUE, "and from then on"


def test_data_a_worker_cannot_unpickle_is_resent_one_chunk_at_a_time_by_value() -> None:
    h = Harness(1)
    h.start("pool-0")
    h.apply(square, 0)
    h.run("pool-0")
    result = h.map(square, [1, 2, 3])
    w = h.worker("pool-0")
    ids = [t.cid for t in w.held]
    w.held.clear()
    h.feed("pool-0", P.frame(P.NACK, bytes([P.NACK_DATA]) + P.pack_ids(ids)))
    for expected in (1, 2, 3):
        (task,) = w.batches[-1]
        assert task.data == expected and task.flags & P.DATA_BY_VALUE
        h.run("pool-0")
    assert result.get(0) == [1, 4, 9]


# -- the engine stays pure ------------------------------------------------------------------------

PURE_MODULES = ("_engine.py", "_actions.py", "_tasks.py")
# The engine's own modules, the wire (whose ``_pool`` names the frames), the broker core and
# the errors; ``_results`` holds the result objects the engine fills, ``_local`` the types
# that never travel.
ALLOWED_INTERNAL = ("mpmesh._wire", "mpmesh._broker", "mpmesh._errors", "mpmesh._pool._engine",
                    "mpmesh._pool._actions", "mpmesh._pool._tasks", "mpmesh._pool._local",
                    "mpmesh._pool._results")


def runtime_imports(source: str, package: str) -> list[str]:
    """Absolute names of the modules ``source`` imports, except under ``if TYPE_CHECKING``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
                found.extend([f"{prefix}.{a.name}" for a in node.names] if not node.module else [prefix])
            else:
                found.append(node.module or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


@pytest.mark.parametrize("module", PURE_MODULES)
def test_the_engine_does_no_io(module: str) -> None:
    path = Path(mpmesh.__file__).parent / "_pool" / module
    names = runtime_imports(path.read_text(), "mpmesh._pool")
    bad = [n for n in names if n.split(".")[0] in FORBIDDEN
           or (n.startswith("mpmesh") and not n.startswith(ALLOWED_INTERNAL))]
    assert not bad, f"_pool/{module} imports {bad}: the engine must stay sans-IO"


def test_the_purity_check_can_fail() -> None:
    assert runtime_imports("import time\nfrom .._io import _loop", "mpmesh._pool") == ["time", "mpmesh._io"]
    assert runtime_imports("from . import _io", "mpmesh._pool") == ["mpmesh._pool._io"]
    assert runtime_imports("if TYPE_CHECKING:\n    import socket", "mpmesh._pool") == []
