"""near: shared state as other processes see it, against ``multiprocessing.Manager()``.

Scenarios, side by side in one run, alternating:

1. **another process**: one spawned process (not the creator) runs N operations back to
   back: a read of an unchanged dict key, of a Value, of a mesh cache key (mpmesh's
   ``Master().cache()``; the reference is the standard manager's dict read); a 95/5
   read/write mix over 50 hot dict keys; a dict write; a Lock acquire+release.
   Bars: unchanged reads >= 5x (aim 10x); mix >= 3x; write and Lock >= 1.0x pinned,
   >= 0.8x unpinned.
2. **the creator**: the same reads and writes from the process that created the manager
   (mpmesh's broker is a process of its own). Bars: reads >= 5x, writes >= 1.0x.
3. **end to end**: ``Pool(2)`` whose workers read a 5-key shared config and count under
   a Manager ``Lock`` (``with lock: counter.value += 1``): ``mpmesh.Pool`` with
   ``mpmesh.Manager`` against ``multiprocessing.Pool`` with ``multiprocessing.Manager``,
   tasks per second. Bar: >= 1.5x.

Reads of mpmesh are served from the reading process's near copy while the broker's
version table says the object is unchanged; every write is a round trip.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import mpmesh

from . import manager as manager_suite
from ._harness import Config, Row, alternate, bar_check, guarded, loop_time, relate

__all__ = ["TITLE", "budget", "run", "client_main", "pool_init", "pool_task"]

TITLE: Final = "near copies: shared state read and written from other processes"
MESH, STD = "mpmesh.Manager()", "multiprocessing.Manager()"
MESH_CACHE = "mpmesh Master().cache()"
HOT: Final = [f"hot-{i}" for i in range(50)]
CONFIG: Final = {"model": "m-7", "batch": 32, "lr": 0.001, "tags": ("a", "b"), "seed": 11}
RESULT_TIMEOUT_S: Final = 120.0

# name -> (bar pinned, bar unpinned)
OTHER_OPS: Final[dict[str, tuple[float, float]]] = {
    "read unchanged dict key": (5.0, 5.0),
    "read Value": (5.0, 5.0),
    "read cache key": (5.0, 5.0),
    "95/5 read/write mix, 50 hot keys": (3.0, 3.0),
    "dict write": (1.0, 0.8),
    "Lock acquire+release": (1.0, 0.8),
}
CREATOR_OPS: Final[dict[str, float]] = {"read unchanged dict key": 5.0, "read Value": 5.0, "dict write": 1.0}


def budget(cfg: Config) -> float:
    return 200.0 if cfg.quick and not cfg.repeat else 500.0 + 20.0 * (cfg.repeat or 0)


def make_op(name: str, objs: dict[str, Any]) -> Callable[[], object]:
    d, v, lock = objs["d"], objs["v"], objs["lock"]
    if name == "read unchanged dict key":
        return lambda: d["k"]
    if name == "read Value":
        return lambda: v.value
    if name == "read cache key":
        cache = objs.get("cache", d)
        return lambda: cache["k"]
    if name == "95/5 read/write mix, 50 hot keys":
        counter = iter(range(1 << 62))

        def mixed() -> None:
            i = next(counter)
            if i % 20 == 0:
                d[HOT[i % 50]] = i
            else:
                d[HOT[(i * 7) % 50]]
        return mixed
    if name == "dict write":
        return lambda: d.__setitem__("w", 1)
    if name == "Lock acquire+release":
        def locked() -> None:
            with lock:
                pass
        return locked
    raise ValueError(name)


def new_objects(manager: Any) -> dict[str, Any]:
    d = manager.dict({"k": [1, 2, 3]})
    d.update({key: 0 for key in HOT})
    return {"d": d, "v": manager.Value("i", 7), "lock": manager.Lock()}


def client_main(conn: multiprocessing.connection.Connection, objs: dict[str, Any]) -> None:
    """Another process: for each ``(op, n)`` command, warm up, time n ops, report s/op."""
    ops: dict[str, Callable[[], object]] = {}
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        name, n = cmd
        fn = ops.get(name) or ops.setdefault(name, make_op(name, objs))
        loop_time(max(n // 20, 5), fn)
        conn.send(loop_time(n, fn))


class Client:
    """One spawned process holding proxies of one implementation's objects."""

    def __init__(self, objs: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=client_main, args=(theirs, objs), name="bench-near-client", daemon=True)
        self.proc.start()
        theirs.close()

    def run(self, name: str, n: int) -> float:
        self.conn.send((name, n))
        if not self.conn.poll(RESULT_TIMEOUT_S):
            raise TimeoutError(f"the client did not finish {name!r} in time")
        return float(self.conn.recv())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


@contextlib.contextmanager
def managers() -> Iterator[tuple[Any, Any, Any]]:
    """The standard library's manager first (it forks), then mpmesh's and a Master."""
    with manager_suite.managers() as (std, mesh), mpmesh.Master() as master:
        yield std, mesh, master


# -- scenarios ---------------------------------------------------------------------------------

def other_process(cfg: Config) -> list[Row]:
    n, reps = cfg.size(4000, 400), cfg.reps(5, 3)
    rows: list[Row] = []
    with managers() as (std, mesh, master):
        objs = {STD: new_objects(std), MESH: new_objects(mesh)}
        cache = master.cache("bench")
        cache["k"] = [1, 2, 3]
        objs[MESH_CACHE] = {**objs[MESH], "cache": cache}
        clients = {impl: Client(o) for impl, o in objs.items()}
        try:
            for name, (pinned, unpinned) in OTHER_OPS.items():
                label = f"other process: {name}"
                cfg.log(f"  {label}: {n} ops x {reps} repetitions")
                mine = MESH_CACHE if name == "read cache key" else MESH
                samples = alternate([(impl, (lambda impl=impl: clients[impl].run(name, n)))  # type: ignore[misc]
                                     for impl in (mine, STD)], reps)
                pair = [Row(label, impl, samples[impl], n) for impl in (mine, STD)]
                relate(pair, STD, kind="rate")
                bar_check(pair[0], ">=", pinned if cfg.mode == "pinned" else unpinned)
                rows += pair
        finally:
            for client in clients.values():
                client.close()
    return rows


def creator(cfg: Config) -> list[Row]:
    n, reps = cfg.size(4000, 400), cfg.reps(5, 3)
    rows: list[Row] = []
    with managers() as (std, mesh, _):
        objs = {STD: new_objects(std), MESH: new_objects(mesh)}
        for name, limit in CREATOR_OPS.items():
            label = f"creator: {name}"
            cfg.log(f"  {label}: {n} ops x {reps} repetitions")
            fns = {impl: make_op(name, objs[impl]) for impl in objs}
            for fn in fns.values():
                loop_time(max(n // 20, 5), fn)
            samples = alternate([(impl, (lambda impl=impl: loop_time(n, fns[impl]))) for impl in (MESH, STD)], reps)  # type: ignore[misc]
            pair = [Row(label, impl, samples[impl], n) for impl in (MESH, STD)]
            relate(pair, STD, kind="rate")
            bar_check(pair[0], ">=", limit)
            rows += pair
    return rows


# -- end to end: Pool workers reading a shared config, counting under a Lock -------------------

_shared: dict[str, Any] = {}


def pool_init(config: Any, lock: Any, counter: Any) -> None:
    _shared.update(config=config, lock=lock, counter=counter)


def pool_task(i: int) -> int:
    config, lock, counter = _shared["config"], _shared["lock"], _shared["counter"]
    total = config["batch"] + len(config["model"]) + len(config["tags"]) + config["seed"]
    if config["lr"] > 1:
        total += 1
    with lock:
        counter.value += 1
    return total + i


def end_to_end(cfg: Config) -> list[Row]:
    n, reps = cfg.size(2000, 200), cfg.reps(5, 3)
    label = "end to end: Pool(2), shared config + count under Lock"
    mesh_impl, std_impl = "mpmesh.Pool + mpmesh.Manager", "multiprocessing.Pool + Manager"
    with managers() as (std, mesh, _):
        pools = {}
        for impl, manager, pool_type in ((std_impl, std, multiprocessing.get_context("fork").Pool),
                                         (mesh_impl, mesh, mpmesh.Pool)):
            args = (manager.dict(CONFIG), manager.Lock(), manager.Value("i", 0))
            pools[impl] = (pool_type(2, initializer=pool_init, initargs=args), args[2])
        try:
            cfg.log(f"  {label}: {n} tasks x {reps} repetitions")

            def batch(impl: str) -> Callable[[], float]:
                pool, counter = pools[impl]

                def timed() -> float:
                    start = time.perf_counter()
                    before = counter.value
                    pool.map(pool_task, range(n), chunksize=8)
                    if counter.value != before + n:
                        raise AssertionError(f"{impl}: counted {counter.value - before}, not {n}")
                    return (time.perf_counter() - start) / n
                return timed

            for impl in pools:
                pools[impl][0].map(pool_task, range(50))  # warm up
            samples = alternate([(impl, batch(impl)) for impl in (mesh_impl, std_impl)], reps)
            rows = [Row(label, impl, samples[impl], n, note="tasks") for impl in (mesh_impl, std_impl)]
            relate(rows, std_impl, kind="rate")
            bar_check(rows[0], ">=", 1.5)
        finally:
            for pool, _ in pools.values():
                pool.terminate()
                pool.join()
    return rows


def run(cfg: Config) -> list[Row]:
    # The end-to-end scenario forks the standard Pool: first, with the fewest threads about.
    return guarded(cfg, [end_to_end, other_process, creator])
