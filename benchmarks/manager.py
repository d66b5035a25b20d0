"""manager: ``mpmesh.Manager()`` against ``multiprocessing.Manager()``.

Scenarios, each side by side with its peer in the same process, alternating:

1. **one client**: the process that created the manager runs N operations back to back
   on its proxies: dict set, dict get, dict update of 100 keys, list append, Lock
   acquire+release, Value increment under a Lock (4 calls), Queue put+get (2 calls).
   Bar: mpmesh >= 1.5x the ops/s on dict get/set and Lock acquire+release pinned, and
   >= 1.0x unpinned.
2. **4 clients**: four other processes (spawned once, reused) hammer the same shared
   objects at once, starting together on a ``multiprocessing.Barrier``; the figure is
   the aggregate: all their operations over the wall time from the barrier to the last
   one done. Bar: mpmesh >= 2.5x the aggregate ops/s on dict get/set and Lock
   acquire+release, pinned and unpinned. Those scenarios have a floor row: four such
   processes doing bare 64-byte round trips with a Python socket echo server
   (``_echo.py``), the most any Python server reaches on that machine.
3. **busy creator**: one client process does ``with lock: d["n"] = d.get("n", 0) + 1``
   rounds while the process that created the manager computes in Python, for mpmesh's
   default broker (a process of its own), the standard library's and mpmesh's
   ``broker="thread"``. Bar: mpmesh >= 1.0x the standard library's rate.
4. **start-up / shutdown**: ``Manager()`` returning a started manager, then one
   ``dict()`` created (the first proxy), then ``shutdown()``. Bar: start-up <= 1.0x.

Set-up order: each scenario creates the standard library's manager first (it forks its
server), then mpmesh's, so no process forks while mpmesh's threads run. Client
processes are spawned.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import mpmesh

from . import _echo
from ._harness import Config, Row, alternate, bar_check, guarded, loop_time, relate, wait_single_threaded

__all__ = ["TITLE", "budget", "run", "client_main"]

TITLE: Final = "Manager drop-in: shared objects from 1 and 4 clients, start-up"
MESH, STD = "mpmesh.Manager()", "multiprocessing.Manager()"
FLOOR: Final = "bare socket echo (floor)"
CLIENTS: Final = 4
RESULT_TIMEOUT_S: Final = 120.0
UPDATE: Final = {f"key-{i}": i for i in range(100)}

# name -> (calls per op, has a bar)
OPS: Final[dict[str, tuple[int, bool]]] = {
    "dict set": (1, True),
    "dict get": (1, True),
    "dict update 100 keys": (1, False),
    "list append": (1, False),
    "Lock acquire+release": (2, True),
    "Value += 1 under Lock": (4, False),
    "Queue put+get": (2, False),
    "lock + get + set": (4, False),
}


def budget(cfg: Config) -> float:
    return 150.0 if cfg.quick and not cfg.repeat else 400.0 + 20.0 * (cfg.repeat or 0)


def make_op(name: str, objs: dict[str, Any]) -> Callable[[], object]:
    """One operation of scenario ``name`` on the proxies in ``objs`` (or, for the floor,
    as many bare round trips with the echo server at ``objs["echo"]`` as it makes calls)."""
    if "echo" in objs:
        ping, calls = _echo.pinger(_echo.connect(objs["echo"])), OPS[name][0]
        return ping if calls == 1 else lambda: [ping() for _ in range(calls)]
    d, lst, lock, v, q = objs["d"], objs["l"], objs["lock"], objs["v"], objs["q"]
    if name == "dict set":
        return lambda: d.__setitem__("k", 1)
    if name == "dict get":
        return lambda: d["k"]
    if name == "dict update 100 keys":
        return lambda: d.update(UPDATE)
    if name == "list append":
        return lambda: lst.append(1)
    if name == "Lock acquire+release":
        def locked() -> None:
            with lock:
                pass
        return locked
    if name == "Value += 1 under Lock":
        def incr() -> None:
            with lock:
                v.value += 1
        return incr
    if name == "lock + get + set":
        def bump() -> None:
            with lock:
                d["n"] = d.get("n", 0) + 1
        return bump
    if name == "Queue put+get":
        def put_get() -> None:
            q.put(1)
            q.get()
        return put_get
    raise ValueError(name)


def new_objects(manager: Any) -> dict[str, Any]:
    objs = {"d": manager.dict({"k": 0}), "l": manager.list(), "lock": manager.Lock(),
            "v": manager.Value("i", 0), "q": manager.Queue()}
    return objs


def reset(objs: dict[str, Any]) -> None:
    del objs["l"][:]  # list append grows the list; keep every batch alike


# -- client processes ------------------------------------------------------------------------

def client_main(conn: multiprocessing.connection.Connection, objs: dict[str, Any], barrier: Any) -> None:
    """A client process: for each ``(op, n)`` command, meet at the barrier, run, report."""
    ops: dict[str, Callable[[], object]] = {}
    while True:
        cmd = conn.recv()
        if cmd is None:
            return
        name, n = cmd
        fn = ops.get(name) or ops.setdefault(name, make_op(name, objs))
        for _ in range(max(n // 20, 5)):  # warm this op's path
            fn()
        barrier.wait()
        for _ in range(n):
            fn()
        conn.send(time.monotonic())


class Clients:
    """``count`` spawned processes holding proxies of one manager's objects."""

    def __init__(self, objs: dict[str, Any], count: int = CLIENTS) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(count + 1)
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for i in range(count):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(theirs, objs, self.barrier),
                               name=f"bench-manager-client-{i}", daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def run(self, name: str, n: int, *, busy: bool = False) -> float:
        """Seconds per operation, aggregate over every client; with ``busy``, this
        process computes in Python until they are done (a creator busy with its own work)."""
        for conn in self.conns:
            conn.send((name, n))
        self.barrier.wait(RESULT_TIMEOUT_S)
        start = time.monotonic()
        ends = []
        for conn in self.conns:
            if busy:
                _spin_until(conn.poll, start + RESULT_TIMEOUT_S)
            if not conn.poll(RESULT_TIMEOUT_S):
                raise TimeoutError(f"a client did not finish {name!r} in time")
            ends.append(conn.recv())
        return (max(ends) - start) / (n * len(self.conns))

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


def _spin_until(done: Callable[[], bool], deadline: float) -> None:
    x = 0
    while not done() and time.monotonic() < deadline:
        for i in range(20_000):
            x += i * i


@contextlib.contextmanager
def managers() -> Iterator[tuple[Any, Any]]:
    """The standard library's manager first (it forks), then mpmesh's; both shut down."""
    wait_single_threaded()
    std = multiprocessing.Manager()
    try:
        mesh = mpmesh.Manager()
        try:
            yield std, mesh
        finally:
            mesh.shutdown()
    finally:
        std.shutdown()


def _bars(rows: list[Row], cfg: Config, *, clients: int) -> None:
    if clients == 1:
        bar_check(rows[0], ">=", 1.5 if cfg.mode == "pinned" else 1.0)
    else:
        bar_check(rows[0], ">=", 2.5)


# -- scenarios ---------------------------------------------------------------------------------

def one_client(cfg: Config) -> list[Row]:
    n, reps = cfg.size(3000, 300), cfg.reps(5, 3)
    rows: list[Row] = []
    with managers() as (std, mesh):
        objs = {STD: new_objects(std), MESH: new_objects(mesh)}
        for name, (calls, has_bar) in OPS.items():
            label = f"1 client: {name}"
            cfg.log(f"  {label}: {n} ops x {reps} repetitions")
            fns = {impl: make_op(name, objs[impl]) for impl in objs}

            def batch(impl: str) -> Callable[[], float]:
                def timed() -> float:
                    reset(objs[impl])
                    return loop_time(n, fns[impl])
                return timed

            for impl in objs:
                loop_time(max(n // 10, 30), fns[impl])  # warm up
            samples = alternate([(MESH, batch(MESH)), (STD, batch(STD))], reps)
            pair = [Row(label, impl, samples[impl], n, note=f"{calls} call(s) per op")
                    for impl in (MESH, STD)]
            relate(pair, STD, kind="rate")
            if has_bar:
                _bars(pair, cfg, clients=1)
            rows += pair
    return rows


def four_clients(cfg: Config) -> list[Row]:
    n, reps = cfg.size(2000, 200), cfg.reps(3, 2)
    rows: list[Row] = []
    with managers() as (std, mesh), _echo.EchoServer() as echo:
        objs = {STD: new_objects(std), MESH: new_objects(mesh)}
        clients = {impl: Clients(objs[impl]) for impl in objs}
        clients[FLOOR] = Clients({"echo": echo.address})
        try:
            for name, (calls, has_bar) in OPS.items():
                label = f"{CLIENTS} clients: {name}"
                cfg.log(f"  {label}: {CLIENTS} x {n} ops x {reps} repetitions")

                def batch(impl: str) -> Callable[[], float]:
                    def timed() -> float:
                        if impl in objs:
                            reset(objs[impl])
                        return clients[impl].run(name, n)
                    return timed

                impls = (MESH, STD, FLOOR) if has_bar else (MESH, STD)
                samples = alternate([(impl, batch(impl)) for impl in impls], reps)
                pair = [Row(label, impl, samples[impl], n * CLIENTS, note="aggregate") for impl in impls]
                relate(pair, STD, kind="rate", floor=FLOOR if has_bar else None)
                if has_bar:
                    _bars(pair, cfg, clients=CLIENTS)
                rows += pair
        finally:
            for group in clients.values():
                group.close()
    return rows


def busy_creator(cfg: Config) -> list[Row]:
    """One client's lock + get + set rounds while the creator computes in Python."""
    n, reps = cfg.size(400, 60), cfg.reps(5, 3)
    label, thread = "busy creator: 1 client, lock + get + set", "mpmesh.Manager(broker='thread')"
    rows: list[Row] = []
    with managers() as (std, mesh):
        old = mpmesh.Manager(broker="thread")
        objs = {STD: new_objects(std), MESH: new_objects(mesh), thread: new_objects(old)}
        clients = {impl: Clients(objs[impl], count=1) for impl in objs}
        try:
            cfg.log(f"  {label}: {n} ops x {reps} repetitions (thread broker: 10 ops)")
            # The thread broker waits for this process's GIL on every call: ~0.4 s a round.
            sizes = {STD: n, MESH: n, thread: 10}

            def batch(impl: str) -> Callable[[], float]:
                return lambda: clients[impl].run("lock + get + set", sizes[impl], busy=True)

            samples = alternate([(impl, batch(impl)) for impl in (MESH, STD, thread)], reps)
            rows = [Row(label, impl, samples[impl], sizes[impl], note="4 calls per op")
                    for impl in (MESH, STD, thread)]
            relate(rows, STD, kind="rate")
            bar_check(rows[0], ">=", 1.0)
        finally:
            for group in clients.values():
                group.close()
            old.shutdown()
    return rows


def startup(cfg: Config) -> list[Row]:
    reps = cfg.reps(9, 3)
    up_label, down_label = "start-up: Manager() + first dict()", "shutdown()"

    def mesh() -> dict[str, float]:
        wait_single_threaded()
        start = time.perf_counter()
        m = mpmesh.Manager()
        m.dict()
        up = time.perf_counter()
        m.shutdown()
        return {MESH + " up": up - start, MESH + " down": time.perf_counter() - up}

    def stdlib() -> dict[str, float]:
        wait_single_threaded()
        start = time.perf_counter()
        m = multiprocessing.Manager()
        m.dict()
        up = time.perf_counter()
        m.shutdown()
        return {STD + " up": up - start, STD + " down": time.perf_counter() - up}

    stdlib(), mesh()  # cold: lazy imports
    samples = alternate([("mesh", mesh), ("stdlib", stdlib)], reps)
    up = [Row(up_label, impl, samples[impl + " up"], 1, show_rate=False) for impl in (MESH, STD)]
    down = [Row(down_label, impl, samples[impl + " down"], 1, show_rate=False) for impl in (MESH, STD)]
    relate(up, STD)
    relate(down, STD)
    bar_check(up[0], "<=", 1.0)
    return up + down


def run(cfg: Config) -> list[Row]:
    if os.environ.get("MPMESH_BENCH_MANAGER_ONLY") == "1":  # pragma: no cover - manual runs
        return guarded(cfg, [one_client])
    # Start-up first, while this process is still single-threaded.
    first = guarded(cfg, [startup])
    return guarded(cfg, [one_client, four_clients, busy_creator]) + first
