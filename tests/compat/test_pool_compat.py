"""Pool parity: each test body runs against ``multiprocessing.Pool`` and ``mpmesh.Pool``.

The ``impl`` fixture (``conftest.py``) names the implementation; ``make_pool`` (also
there) builds a pool of it (the stdlib's from the forkserver, which the conftest starts
once per session: forking the multi-threaded test process would warn on 3.12+) and
terminates it after the test. Tests that only mpmesh can pass (lambdas, no hang after ``terminate()``,
bounded ``imap`` read-ahead, ``m.Pool``, start methods, progress) come last.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import pickle
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from mpmesh._io._paths import runtime_dir
from tests.integration import pool_workers as W

from .conftest import FORK_WARNING, Impl

LONG = 60.0


@pytest.fixture
def pool(make_pool: Callable[..., Any]) -> Any:
    return make_pool(2)


# -- apply -------------------------------------------------------------------------------------


def test_apply_returns_the_result(pool: Any) -> None:
    assert pool.apply(W.square, (7,)) == 49
    assert pool.apply(W.power, (3,), {"exp": 3}) == 27


def test_tasks_run_in_other_processes(pool: Any) -> None:
    assert pool.apply(W.getpid) != os.getpid()


def test_apply_async_result_object(pool: Any) -> None:
    result = pool.apply_async(W.add, (2, 3))
    assert result.get(LONG) == 5
    assert result.ready() and result.successful()
    result.wait()  # already done: returns at once


def test_not_ready_result(pool: Any, tmp_path: Path) -> None:
    marker, release = tmp_path / "running", tmp_path / "release"
    result = pool.apply_async(W.mark_and_block, (str(marker), str(release)))
    assert W.wait_for_file(str(marker))
    assert not result.ready()
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    result.wait(0.01)
    release.touch()
    assert isinstance(result.get(LONG), int)


def test_every_waiter_wakes_when_the_result_arrives(pool: Any, tmp_path: Path) -> None:
    marker, release = tmp_path / "running", tmp_path / "release"
    result = pool.apply_async(W.mark_and_block, (str(marker), str(release)))
    assert W.wait_for_file(str(marker))
    seen: list[object] = []
    waiters = [threading.Thread(target=lambda: seen.append(result.get(LONG))) for _ in range(4)]
    for t in waiters:
        t.start()
    release.touch()
    for t in waiters:
        t.join(LONG)
    assert len(seen) == 4 and len(set(seen)) == 1 and result.ready()


def test_exception_keeps_its_type_and_remote_traceback(pool: Any) -> None:
    result = pool.apply_async(W.fail_on, (3,))
    with pytest.raises(ValueError, match="bad value 3") as info:
        result.get(LONG)
    assert not result.successful()
    assert "fail_on" in str(info.value.__cause__)  # the worker's traceback text
    with pytest.raises(KeyError):
        pool.apply(W.raise_key_error, ("k",))


def test_callback_runs_before_get_returns(pool: Any) -> None:
    seen: list[Any] = []
    errors: list[BaseException] = []
    ok = pool.apply_async(W.square, (4,), callback=seen.append)
    bad = pool.apply_async(W.fail_on, (3,), error_callback=errors.append)
    assert ok.get(LONG) == 16
    assert seen == [16]
    bad.wait(LONG)
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


# -- map and friends ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 3, 100])
def test_map(pool: Any, chunksize: int | None) -> None:
    assert pool.map(W.square, range(20), chunksize=chunksize) == [x * x for x in range(20)]


def test_map_of_a_generator_and_of_nothing(pool: Any) -> None:
    assert pool.map(W.square, (x for x in range(5))) == [0, 1, 4, 9, 16]
    assert pool.map(W.square, []) == []
    assert pool.map(W.square, {3: "a", 4: "b"}) == [9, 16]  # iterates keys, like the builtin


def test_map_raises_the_error_of_a_failed_chunk(pool: Any) -> None:
    with pytest.raises(ValueError, match="bad value 3"):
        pool.map(W.fail_on, range(10))


def test_map_async_callbacks(pool: Any) -> None:
    got: list[Any] = []
    errors: list[BaseException] = []
    result = pool.map_async(W.square, range(6), chunksize=2, callback=got.append)
    assert result.get(LONG) == [0, 1, 4, 9, 16, 25]
    assert got == [[0, 1, 4, 9, 16, 25]]
    failed = pool.map_async(W.fail_on, range(6), error_callback=errors.append)
    failed.wait(LONG)
    assert not failed.successful()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


def test_empty_map_async_is_ready_without_callback(pool: Any) -> None:
    got: list[Any] = []
    result = pool.map_async(W.square, [], callback=got.append)
    assert result.ready() and result.get() == [] and got == []


def test_starmap(pool: Any) -> None:
    pairs = [(1, 2), (3, 4), (5, 6)]
    assert pool.starmap(W.add, pairs) == [3, 7, 11]
    assert pool.starmap(W.add, pairs, chunksize=2) == [3, 7, 11]
    assert pool.starmap_async(W.power, [(2, 3), (3, 2)]).get(LONG) == [8, 9]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_in_order(pool: Any, chunksize: int) -> None:
    assert list(pool.imap(W.square, range(25), chunksize=chunksize)) == [x * x for x in range(25)]


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_unordered_has_everything(pool: Any, chunksize: int) -> None:
    assert sorted(pool.imap_unordered(W.square, range(25), chunksize=chunksize)) == [x * x for x in range(25)]


def test_imap_of_nothing(pool: Any) -> None:
    assert list(pool.imap(W.square, [])) == []
    assert list(pool.imap_unordered(W.square, iter([]))) == []


def test_imap_raises_at_the_failed_item_and_goes_on(pool: Any) -> None:
    it = pool.imap(W.fail_on, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad value 3"):
        next(it)
    assert list(it) == [4, 5]


def test_imap_next_with_timeout(pool: Any, tmp_path: Path) -> None:
    release = tmp_path / "release"
    it = pool.imap(W.wait_for_file, [str(release)])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.05)
    release.touch()
    assert it.next(timeout=LONG) is True
    with pytest.raises(StopIteration):
        it.next(timeout=LONG)


def test_imap_input_that_raises(pool: Any) -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("input broke")

    it = pool.imap(W.square, items())
    assert next(it) == 1 and next(it) == 4
    with pytest.raises(OSError, match="input broke"):
        next(it)
    assert list(it) == []


def test_bad_chunksize(pool: Any) -> None:
    with pytest.raises(ValueError, match="Chunksize"):
        pool.imap(W.square, range(3), chunksize=0)


# -- what cannot be pickled ---------------------------------------------------------------------


def test_unpicklable_result_fails_its_task(pool: Any) -> None:
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="Error sending result"):
        pool.apply(W.return_unpicklable)
    assert pool.apply(W.square, (5,)) == 25


# -- lifecycle ------------------------------------------------------------------------------------


def test_use_after_close_raises_value_error(pool: Any) -> None:
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(W.square, (1,))
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(W.square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        pool.imap(W.square, [1])
    pool.join()


def test_close_then_join_finishes_submitted_work(pool: Any) -> None:
    results = [pool.apply_async(W.square, (i,)) for i in range(10)]
    lazy = pool.imap(W.square, range(10))
    pool.close()
    pool.join()
    assert all(r.ready() for r in results)
    assert [r.get() for r in results] == [i * i for i in range(10)]
    assert list(lazy) == [i * i for i in range(10)]


def test_context_manager_terminates(make_pool: Callable[..., Any]) -> None:
    with make_pool(2) as pool:
        assert pool.map(W.square, range(3)) == [0, 1, 4]
    with pytest.raises(ValueError):
        pool.apply(W.square, (1,))


def test_closed_pool_cannot_be_entered(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(1)
    pool.close()
    with pytest.raises(ValueError):
        with pool:
            pass


def test_terminate_twice_and_join(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(1)
    pool.terminate()
    pool.terminate()
    pool.join()


def test_pool_cannot_be_pickled(pool: Any) -> None:
    with pytest.raises(NotImplementedError):
        pickle.dumps(pool)


def test_initializer_runs_in_every_worker(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(2, initializer=W.init_state, initargs=("ready",))
    assert pool.map(W.read_state, range(8), chunksize=1) == ["ready"] * 8


def test_maxtasksperchild_recycles_workers(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(2, maxtasksperchild=1)
    pids = pool.map(W.getpid, range(6), chunksize=1)
    assert len(set(pids)) == 6


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"processes": 0}, ValueError),
    ({"processes": 1, "maxtasksperchild": 0}, ValueError),
    ({"processes": 1, "maxtasksperchild": 1.5}, ValueError),
    ({"processes": 1, "initializer": 42}, TypeError),
])
def test_bad_arguments(make_pool: Callable[..., Any], kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        make_pool(**kwargs)


def test_async_result_is_generic(impl: Impl) -> None:
    cls = mpmesh._pool._results.AsyncResult if impl.is_mpmesh else multiprocessing.pool.AsyncResult
    assert isinstance(cls[int], types.GenericAlias)


# -- beyond the standard library ----------------------------------------------------------------


@pytest.fixture
def mesh_pool() -> Iterator[mpmesh.Pool]:
    with mpmesh.Pool(2) as pool:
        yield pool


def test_lambdas_and_closures(mesh_pool: mpmesh.Pool) -> None:
    offset = 10
    assert mesh_pool.map(lambda x: x + offset, range(4)) == [10, 11, 12, 13]
    assert mesh_pool.apply(lambda: "λ") == "λ"

    def local_square(x: int) -> int:
        return x * x
    assert list(mesh_pool.imap(local_square, range(4))) == [0, 1, 4, 9]


class CountingPickles:
    """A callable that counts how often this process pickles it."""

    pickled = 0

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> tuple[type[CountingPickles], tuple[()]]:
        type(self).pickled += 1
        return (CountingPickles, ())


def test_a_function_is_pickled_once_per_pool_not_once_per_batch(mesh_pool: mpmesh.Pool) -> None:
    fn = CountingPickles()
    CountingPickles.pickled = 0
    results = [mesh_pool.apply_async(fn, (i,)) for i in range(200)]
    assert [r.get(10) for r in results] == list(range(200))
    assert mesh_pool.map(fn, range(50), chunksize=1) == list(range(50))
    assert CountingPickles.pickled == 1
    assert mesh_pool.apply(lambda x: x + 1, (1,)) == 2  # a lambda (dill, by value) still works


class Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __call__(self, x: int) -> int:
        return -x


def test_an_unhashable_callable_still_runs(mesh_pool: mpmesh.Pool) -> None:
    assert mesh_pool.map(Unhashable(), range(3)) == [0, -1, -2]


def test_terminate_fails_what_is_not_done(tmp_path: Path) -> None:
    pool = mpmesh.Pool(1)
    marker, release = tmp_path / "running", tmp_path / "release"
    running = pool.apply_async(W.mark_and_block, (str(marker), str(release)))
    queued = pool.apply_async(W.square, (3,))
    assert W.wait_for_file(str(marker))
    pool.terminate()
    for result in (running, queued):
        with pytest.raises(mpmesh.MeshClosed):
            result.get(LONG)


def test_imap_reads_ahead_a_bounded_amount(mesh_pool: mpmesh.Pool) -> None:
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield i

    it = mesh_pool.imap(W.square, items())
    assert [next(it) for _ in range(100)] == [x * x for x in range(100)]
    assert pulled < 20_000  # the stdlib would read all 1,000,000 items at once
    del it


def test_unpicklable_exception_and_argument(mesh_pool: mpmesh.Pool) -> None:
    with pytest.raises(mpmesh.RemoteError, match="carries a generator"):
        mesh_pool.apply(W.raise_unpicklable)
    # The argument's own error, as the stdlib raises it (test_pool_corners.py); a note names the task.
    with pytest.raises(TypeError, match="refuse to be pickled") as info:
        mesh_pool.apply(W.identity, (W.Unpicklable(),))
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["mpmesh: cannot send apply(identity) to a worker"]
    with pytest.raises(TypeError, match="refuse to be pickled") as info:
        mesh_pool.map(W.identity, [1, W.Unpicklable(), 3], chunksize=1)
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["mpmesh: cannot send map(identity) item 1 to a worker"]
    assert mesh_pool.apply(W.square, (6,)) == 36


def test_pool_on_a_master() -> None:
    with mpmesh.Master() as m:
        pool = m.Pool(2)
        try:
            assert pool.map(W.square, range(5)) == [0, 1, 4, 9, 16]
            group = m.children()[0].rsplit("-", 1)[0]
            assert sorted(m.children()) == [f"{group}-0", f"{group}-1"]
            assert m.group_stats(group).members == m.children()
        finally:
            pool.close()
            pool.join()
        assert m.children() == []


def test_standalone_pool_runs_no_broker() -> None:
    # Its workers talk only to the pool: no mesh socket or key file appears.
    before = set(os.listdir(runtime_dir()))
    with mpmesh.Pool(2) as pool:
        assert pool.map(W.square, range(4)) == [0, 1, 4, 9]
        assert set(os.listdir(runtime_dir())) == before


FORKED_POOL = """
import os, mpmesh
from tests.integration import pool_workers as W

with mpmesh.Pool(2, maxtasksperchild=1) as pool:
    pids = pool.map(W.getpid, range(6), chunksize=1)
    forked = bool(pool._procs._sup._zygote_pid)
    print(len(set(pids)), os.getpid() not in pids, "forked" if forked else "exec'd")
    assert pool.map(lambda x: x * 2, [1, 2]) == [2, 4]
"""


def test_standalone_pool_in_a_single_threaded_process_forks_its_zygote() -> None:
    # The production path (the suite's own processes run threads, so their pools exec
    # their zygote): workers forked by a forked zygote, replaced as they retire.
    done = subprocess.run([sys.executable, "-c", FORKED_POOL], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "True", "forked"]


def test_recycled_workers_leave_no_records_behind() -> None:
    with mpmesh.Pool(2, maxtasksperchild=1) as pool:
        assert len(set(pool.map(W.getpid, range(30), chunksize=1))) == 30
        # Each replacement forgets the workers that exited before it.
        assert len(pool._procs._sup._procs) < 10


@pytest.mark.parametrize("method", ["spawn", "forkserver", pytest.param("fork", marks=pytest.mark.filterwarnings(FORK_WARNING))])
def test_start_methods(method: str) -> None:
    with mpmesh.Pool(2, context=multiprocessing.get_context(method)) as pool:
        assert pool.map(W.square, range(6)) == [0, 1, 4, 9, 16, 25]
        assert pool.apply(W.getpid) != os.getpid()


class _FakeBar:
    bars: list[_FakeBar] = []

    def __init__(self, total: int | None = None, **kwargs: Any) -> None:
        self.total, self.n, self.closed = total, 0, False
        _FakeBar.bars.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch: pytest.MonkeyPatch) -> type[_FakeBar]:
    module = types.ModuleType("tqdm")
    module.tqdm = _FakeBar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm", module)
    _FakeBar.bars = []
    return _FakeBar


def test_progress_bar(fake_tqdm: type[_FakeBar]) -> None:
    with mpmesh.Pool(2, progress="force") as pool:
        assert pool.map(W.square, range(10), chunksize=3) == [x * x for x in range(10)]
        assert list(pool.imap_unordered(W.square, range(5))) is not None
    (mapped, unordered) = fake_tqdm.bars
    assert (mapped.total, mapped.n, mapped.closed) == (10, 10, True)
    assert (unordered.total, unordered.n, unordered.closed) == (5, 5, True)


def test_progress_is_off_without_a_terminal(fake_tqdm: type[_FakeBar]) -> None:
    with mpmesh.Pool(1, progress=True) as pool:  # pytest captures stderr: not a terminal
        assert pool.map(W.square, range(3)) == [0, 1, 4]
    assert fake_tqdm.bars == []


def test_progress_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails
    with mpmesh.Pool(1, progress="force") as pool:
        assert pool.map(W.square, range(3)) == [0, 1, 4]
    with pytest.raises(ValueError, match="progress"):
        mpmesh.Pool(1, progress="sometimes")


def test_callbacks_do_not_run_on_the_io_thread(mesh_pool: mpmesh.Pool) -> None:
    names: list[str] = []
    mesh_pool.apply_async(W.square, (2,), callback=lambda _: names.append(threading.current_thread().name)).get(LONG)
    assert names == ["mpmesh-pool-callbacks"]
