"""pool: ``mpmesh.Pool(2)`` against ``multiprocessing.Pool(2)`` and
``concurrent.futures.ProcessPoolExecutor(2)``, side by side in one process, alternating.

Scenarios (bars are against ``multiprocessing.Pool``; the executor is shown for reference):

1. **map**: ``pool.map(_echo, range(N))`` of trivial tasks at chunksize 1, 16 and 256
   (the executor: ``list(ex.map(..., chunksize=...))``). Bar: tasks/s >= 1.00x.
2. **apply_async**: N ``apply_async(_echo, (i,))``, then ``get()`` each (the executor:
   ``submit`` / ``result``). Bar: tasks/s >= 1.00x.
3. **imap_unordered**: ``list(pool.imap_unordered(_echo, range(N)))`` (the executor:
   ``as_completed`` over N submits). Bar: tasks/s >= 1.00x.
4. **apply**: one ``pool.apply(_echo, (PAYLOAD,))`` round trip. Bar: time <= 1.00x.
5. **start-up**: from ``Pool(2)`` to its first ``apply`` result, then ``terminate()``.
   Bar: time <= 1.50x.
6. **CPU-bound map**: ``pool.map(_burn, [n] * 200)``, each task ~5 ms of CPU (calibrated
   here). Bar: time <= 1.05x: with real work the overhead must vanish.

Set-up order: the stdlib's pools are created before mpmesh's, so nothing forks after a
Master's threads exist; start-up runs first, while the process is single-threaded, so
the Master forks its zygote the fast way, as in a user's program.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import mpmesh

from ._harness import (
    Config,
    Row,
    alternate,
    bar_check,
    guarded,
    loop_time,
    relate,
    wait_single_threaded,
)

__all__ = ["TITLE", "budget", "run"]

TITLE: Final = "Pool drop-in: map, apply_async, imap_unordered, apply, start-up, CPU-bound map"
PAYLOAD: Final = {"id": 12345, "op": "echo", "args": (1, 2.5, "x")}
RESULT_TIMEOUT_S: Final = 120.0
CPU_TASK_S: Final = 0.005

MESH, POOL, EXEC = "mpmesh.Pool(2)", "multiprocessing.Pool(2)", "ProcessPoolExecutor(2)"


def budget(cfg: Config) -> float:
    return 120.0 if cfg.quick and not cfg.repeat else 600.0 + 60.0 * (cfg.repeat or 0)


# -- what the workers run (module level: they cross processes by reference) ----------------------

def _echo(x: object) -> object:
    return x


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def _calibrate(seconds: float) -> int:
    n = 10_000
    while True:
        start = time.perf_counter()
        _burn(n)
        took = time.perf_counter() - start
        if took > 0.02:
            return max(1, int(n * seconds / took))
        n *= 2


@contextlib.contextmanager
def _three_pools() -> Iterator[tuple[Any, Any, Any]]:
    """The stdlib's pool and executor first, then mpmesh's; all closed at the end."""
    pool = multiprocessing.get_context().Pool(2)
    ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context())
    mesh: mpmesh.Pool | None = None
    try:
        ex.submit(_echo, 0).result(RESULT_TIMEOUT_S)  # the executor starts its workers lazily
        mesh = mpmesh.Pool(2)
        yield mesh, pool, ex
    finally:
        if mesh is not None:
            mesh.terminate()
        pool.terminate()
        pool.join()
        ex.shutdown(wait=True, cancel_futures=True)


def _rows(scenario: str, samples: dict[str, list[float]], ops: int, kind: str,
          op: str, limit: float, *, show_rate: bool = True) -> list[Row]:
    rows = [Row(scenario, impl, samples[impl], ops, show_rate=show_rate) for impl in (MESH, POOL, EXEC)]
    relate(rows, POOL, kind=kind)
    bar_check(rows[0], op, limit)
    return rows


def _per_op(n: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n


# -- scenarios ---------------------------------------------------------------------------------------

def maps(cfg: Config) -> list[Row]:
    n, reps = cfg.size(100_000, 20_000), cfg.reps(5, 3)
    rows: list[Row] = []
    with _three_pools() as (mesh, pool, ex):
        for cs in (1, 16, 256):
            name = f"1 map, chunksize {cs}"
            cfg.log(f"  {name}: {n} tasks x {reps} repetitions")
            items = range(n)
            batches: list[tuple[str, Callable[[], float]]] = [
                (MESH, lambda cs=cs: _per_op(n, lambda: mesh.map(_echo, items, chunksize=cs))),
                (POOL, lambda cs=cs: _per_op(n, lambda: pool.map(_echo, items, chunksize=cs))),
                (EXEC, lambda cs=cs: _per_op(n, lambda: list(ex.map(_echo, items, chunksize=cs)))),
            ]
            for _, batch in batches:  # warm-up
                batch()
            rows += _rows(name, alternate(batches, reps, log=cfg.log, label=name), n, "rate", ">=", 1.0)
    return rows


def apply_async(cfg: Config) -> list[Row]:
    n, reps = cfg.size(10_000, 2_000), cfg.reps(5, 3)
    name = "2 apply_async"
    cfg.log(f"  {name}: {n} tasks x {reps} repetitions")
    with _three_pools() as (mesh, pool, ex):
        def run_mesh() -> None:
            for r in [mesh.apply_async(_echo, (i,)) for i in range(n)]:
                r.get(RESULT_TIMEOUT_S)

        def run_pool() -> None:
            for r in [pool.apply_async(_echo, (i,)) for i in range(n)]:
                r.get(RESULT_TIMEOUT_S)

        def run_exec() -> None:
            for f in [ex.submit(_echo, i) for i in range(n)]:
                f.result(RESULT_TIMEOUT_S)

        batches = [(MESH, lambda: _per_op(n, run_mesh)), (POOL, lambda: _per_op(n, run_pool)),
                   (EXEC, lambda: _per_op(n, run_exec))]
        for _, batch in batches:
            batch()
        return _rows(name, alternate(batches, reps, log=cfg.log, label=name), n, "rate", ">=", 1.0)


def imap_unordered(cfg: Config) -> list[Row]:
    n, reps = cfg.size(10_000, 2_000), cfg.reps(5, 3)
    name = "3 imap_unordered"
    cfg.log(f"  {name}: {n} tasks x {reps} repetitions")
    with _three_pools() as (mesh, pool, ex):
        def run_exec() -> None:
            for f in concurrent.futures.as_completed([ex.submit(_echo, i) for i in range(n)]):
                f.result()

        batches = [(MESH, lambda: _per_op(n, lambda: list(mesh.imap_unordered(_echo, range(n))))),
                   (POOL, lambda: _per_op(n, lambda: list(pool.imap_unordered(_echo, range(n))))),
                   (EXEC, lambda: _per_op(n, run_exec))]
        for _, batch in batches:
            batch()
        return _rows(name, alternate(batches, reps, log=cfg.log, label=name), n, "rate", ">=", 1.0)


def apply(cfg: Config) -> list[Row]:
    n, reps = cfg.size(2000, 300), cfg.reps(7, 3)
    name = "4 apply round trip"
    cfg.log(f"  {name}: {n} round trips x {reps} repetitions")
    with _three_pools() as (mesh, pool, ex):
        batches = [(MESH, lambda: loop_time(n, lambda: mesh.apply(_echo, (PAYLOAD,)))),
                   (POOL, lambda: loop_time(n, lambda: pool.apply(_echo, (PAYLOAD,)))),
                   (EXEC, lambda: loop_time(n, lambda: ex.submit(_echo, PAYLOAD).result()))]
        for _, batch in batches:  # warm-up
            batch()
        return _rows(name, alternate(batches, reps, log=cfg.log, label=name), n, "time", "<=", 1.0)


def startup(cfg: Config) -> list[Row]:
    reps = cfg.reps(25, 3)
    name = "5 start-up to first result"
    cfg.log(f"  {name}: {reps} repetitions")
    threaded: list[int] = []

    def mesh() -> float:
        if not wait_single_threaded():
            threaded.append(1)
        start = time.perf_counter()
        pool = mpmesh.Pool(2)
        try:
            pool.apply(_echo, (0,))
            return time.perf_counter() - start
        finally:
            pool.terminate()

    def stdlib() -> float:
        wait_single_threaded()
        start = time.perf_counter()
        pool = multiprocessing.get_context().Pool(2)
        try:
            pool.apply(_echo, (0,))
            return time.perf_counter() - start
        finally:
            pool.terminate()
            pool.join()

    def executor() -> float:
        wait_single_threaded()
        start = time.perf_counter()
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context()) as ex:
            ex.submit(_echo, 0).result(RESULT_TIMEOUT_S)
            return time.perf_counter() - start

    cold = mesh(), stdlib()
    cfg.notes.append(f"cold first start-up (not in the medians): mpmesh.Pool(2) {cold[0] * 1e3:.1f} ms, "
                     f"multiprocessing.Pool(2) {cold[1] * 1e3:.1f} ms")
    samples = alternate([(MESH, mesh), (POOL, stdlib), (EXEC, executor)], reps, log=cfg.log, label=name)
    if threaded:
        cfg.notes.append(f"{len(threaded)} mpmesh.Pool start(s) began with helper threads alive: "
                         "its zygote was exec'd instead of forked")
    return _rows(name, samples, 1, "time", "<=", 1.5, show_rate=False)


def cpu_map(cfg: Config) -> list[Row]:
    count, reps = 200, cfg.reps(9, 3)
    name = "6 CPU-bound map (200 x ~5 ms)"
    n = _calibrate(CPU_TASK_S)
    cfg.log(f"  {name}: burn({n}) ~{CPU_TASK_S * 1e3:.0f} ms each x {reps} repetitions")
    work = [n] * count
    with _three_pools() as (mesh, pool, ex):
        batches = [(MESH, lambda: _per_op(count, lambda: mesh.map(_burn, work))),
                   (POOL, lambda: _per_op(count, lambda: pool.map(_burn, work))),
                   (EXEC, lambda: _per_op(count, lambda: list(ex.map(_burn, work, chunksize=25))))]
        return _rows(name, alternate(batches, reps, log=cfg.log, label=name), count, "time", "<=", 1.05)


def run(cfg: Config) -> list[Row]:
    # Start-up first, while the process is single-threaded (listed last in the table).
    first = guarded(cfg, [startup])
    return guarded(cfg, [maps, apply_async, imap_unordered, apply, cpu_map]) + first
