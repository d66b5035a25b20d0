"""The Pool's crash matrix: what breaks, where, and what the caller sees. Never a hang.

The standard Pool waits forever for a task whose worker died (bpo-22393, cpython#96062);
here that task fails with ``WorkerLost`` naming how the worker ended (or is retried),
the worker is replaced, and every other task completes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpmesh
from tests.integration import pool_workers as W

LONG = 60.0

CRASHES = [  # how the worker ends, what the error says
    ("sigkill", "died with SIGKILL"),
    ("exit", "exited with code 7"),
    ("segfault", "died with SIGSEGV"),
]


@pytest.fixture
def pool() -> Iterator[mpmesh.Pool]:
    with mpmesh.Pool(2) as p:
        yield p


@pytest.mark.parametrize(("how", "said"), CRASHES)
def test_worker_death_fails_that_task_and_the_pool_goes_on(pool: mpmesh.Pool, how: str, said: str) -> None:
    result = pool.apply_async(W.die, (how,))
    with pytest.raises(mpmesh.WorkerLost, match=said) as info:
        result.get(LONG)
    assert "apply(die)" in str(info.value) and "attempt 1 of 1" in str(info.value)
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]
    assert len(set(pool.map(W.getpid, range(8), chunksize=1))) >= 1


@pytest.mark.parametrize(("how", "said"), CRASHES)
def test_death_inside_a_map_fails_only_that_item(how: str, said: str) -> None:
    with mpmesh.Pool(1) as pool:  # one worker: the items behind the crash were queued on it
        results = [pool.apply_async(W.die_if, (i, 3, how)) for i in range(8)]
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.get(LONG))
            except mpmesh.WorkerLost as exc:
                assert said in str(exc)
                outcomes.append("lost")
        assert outcomes == [0, 1, 2, "lost", 4, 5, 6, 7]
        with pytest.raises(mpmesh.WorkerLost, match=r"map\(die_if\) item 3"):
            pool.map(W.die_if, range(8), chunksize=1)


def test_imap_reports_the_lost_item_in_place(pool: mpmesh.Pool) -> None:
    it = pool.imap(W.die_if, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(mpmesh.WorkerLost):
        next(it)
    assert list(it) == [4, 5]


def test_external_sigkill_mid_task(pool: mpmesh.Pool, tmp_path: Path) -> None:
    marker, release = tmp_path / "running", tmp_path / "release"
    victim = pool.apply_async(W.mark_and_block, (str(marker), str(release)))
    assert W.wait_for_file(str(marker))
    bystander = pool.apply_async(W.square, (9,))
    assert bystander.get(LONG) == 81
    pids = {w.pid for w in pool._engine.workers.values() if w.inflight}
    assert len(pids) == 1
    os.kill(pids.pop(), signal.SIGKILL)
    with pytest.raises(mpmesh.WorkerLost, match="SIGKILL"):
        victim.get(LONG)
    release.touch()
    assert pool.apply(W.square, (3,)) == 9


def test_retries_rerun_a_task_whose_worker_died(tmp_path: Path) -> None:
    with mpmesh.Pool(2, retries=1) as pool:
        assert pool.apply(W.die_once, (str(tmp_path),)) == "second attempt"


def test_retries_run_out(tmp_path: Path) -> None:
    with mpmesh.Pool(2, retries=2) as pool:
        with pytest.raises(mpmesh.WorkerLost, match="attempt 3 of 3"):
            pool.apply(W.die, ("exit",))
        assert pool.apply(W.square, (4,)) == 16


def test_task_timeout_kills_and_replaces_the_worker() -> None:
    with mpmesh.Pool(1, task_timeout=0.3) as pool:
        first_pid = pool.apply(W.getpid)
        with pytest.raises(mpmesh.RequestTimeout, match=r"apply\(hang\) ran longer than task_timeout=0.3 s") as info:
            pool.apply(W.hang)
        assert isinstance(info.value, multiprocessing.TimeoutError)
        assert pool.apply(W.getpid) != first_pid
        assert pool.map(W.square, range(5)) == [0, 1, 4, 9, 16]


def test_task_timeout_is_per_task_not_per_batch() -> None:
    with mpmesh.Pool(1, task_timeout=2.0) as pool:
        # 200 tasks of ~10 ms each take longer than task_timeout together, not one by one.
        assert pool.map(W.sleep_for, [0.01] * 200) == [0.01] * 200


def test_task_timeout_with_retries_and_a_worker_ignoring_sigterm() -> None:
    with mpmesh.Pool(1, task_timeout=0.2, retries=1) as pool:
        with pytest.raises(mpmesh.RequestTimeout, match="attempt 2 of 2"):
            pool.apply(W.block_sigterm_then_hang)
        assert pool.apply(W.square, (5,)) == 25


CANNOT_CROSS = [  # what cannot be pickled, where, what the caller sees
    ("result", W.return_unpicklable, (), mpmesh.SerializationError, "Error sending result"),
    ("exception", W.raise_unpicklable, (), mpmesh.RemoteError, "carries a generator"),
    ("argument", W.identity, (W.Unpicklable(),), TypeError, "refuse to be pickled"),  # its own error, as in the stdlib
]


@pytest.mark.parametrize(("what", "fn", "args", "error", "said"), CANNOT_CROSS, ids=[c[0] for c in CANNOT_CROSS])
def test_what_cannot_cross_fails_its_task(pool: mpmesh.Pool, what: str, fn: object, args: tuple[object, ...],
                                          error: type[Exception], said: str) -> None:
    with pytest.raises(error, match=said):
        pool.apply(fn, args)  # type: ignore[arg-type]
    assert pool.map(W.square, range(4)) == [0, 1, 4, 9]


def test_initializer_that_raises_breaks_the_pool_instead_of_looping() -> None:
    with mpmesh.Pool(2, initializer=W.init_fail, initargs=("no database",)) as pool:
        with pytest.raises(mpmesh.WorkerLost, match="initializer raised") as info:
            pool.apply(W.square, (2,))
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(mpmesh.WorkerLost):
            pool.map(W.square, range(3))


def test_workers_that_die_while_starting_break_the_pool() -> None:
    with mpmesh.Pool(1, initializer=W.init_exit) as pool:
        with pytest.raises(mpmesh.WorkerLost, match="before they were ready"):
            pool.apply(W.square, (2,))


def test_maxtasksperchild_with_a_crash() -> None:
    with mpmesh.Pool(2, maxtasksperchild=2) as pool:
        results = [pool.apply_async(W.die_if, (i, 5)) for i in range(12)]
        values = []
        for r in results:
            try:
                values.append(r.get(LONG))
            except mpmesh.WorkerLost:
                values.append(None)
        assert values == [0, 1, 2, 3, 4, None, 6, 7, 8, 9, 10, 11]


def test_mesh_shutdown_under_a_pool_fails_its_tasks(tmp_path: Path) -> None:
    m = mpmesh.Master()
    pool = m.Pool(1)
    marker, release = tmp_path / "running", tmp_path / "release"
    running = pool.apply_async(W.mark_and_block, (str(marker), str(release)))
    queued = pool.apply_async(W.square, (2,))
    assert W.wait_for_file(str(marker))
    m.shutdown(timeout=0.5)
    for result in (running, queued):
        with pytest.raises(mpmesh.MeshError):
            result.get(LONG)
    with pytest.raises(ValueError):
        pool.close()
        pool.apply(W.square, (1,))
    pool.terminate()


def test_terminate_with_work_outstanding(tmp_path: Path) -> None:
    pool = mpmesh.Pool(2)
    marker, release = tmp_path / "running", tmp_path / "release"
    results = [pool.apply_async(W.mark_and_block, (str(marker), str(release))) for _ in range(4)]
    assert W.wait_for_file(str(marker))
    pool.terminate()
    for r in results:
        with pytest.raises(mpmesh.MeshClosed):
            r.get(LONG)
    pool.join()
