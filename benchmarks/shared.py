"""shared: Shared state against ``multiprocessing.Manager``.

Scenarios, each side by side with its peer in the same process, alternating:

1. **cache get / set, one client**: this process joins a standalone broker with
   ``mpmesh.connect()`` (a process hop, as a Manager proxy has) and runs ``cache.get`` /
   ``cache.set`` on one key; vs ``Manager().dict()`` ``d[k]`` / ``d[k] = v`` on the same
   key. A third row is a Master's own cache (its state broker is a process of its own:
   one hop too), for information.
   Bar: mpmesh >= 1.5x Manager's ops/s pinned, >= 1.0x unpinned.
2. **cache get/set, 4 clients**: four processes alternate get and set on their own key,
   started together by a barrier; aggregate ops/s = all operations / the slowest
   process's time. Bar: mpmesh >= 2.5x Manager's aggregate, pinned and unpinned.

Scenarios 1 and 2 have a floor row: the same clients doing bare 64-byte round trips with
a Python socket echo server (``_echo.py``: one poll loop, no protocol). A bar above the
floor's rate is out of reach of any Python broker on that machine.
3. **mget / mset of 100 keys** vs the Manager dict doing the same key by key (``d.get``
   100 times) and ``d.update`` (one call). No bar.
4. **lock acquire + release** (``m.lock`` context manager) vs a ``Manager().Lock()``. No bar.
5. **pub/sub to 1 and 4 subscribers**: messages/s from one publisher until every
   subscriber process has received all of them, vs a ``Manager().Queue()`` per
   subscriber that the publisher puts each message into. No bar.
6. **busy master**: one ``connect()``ed process alternates cache get and set while the
   process that made the Master computes in Python; vs a ``Manager().dict()`` under the
   same load, and a ``Master(broker="thread")`` for comparison. Bar: >= 1.0x.

A ``redis-py`` column against a local ``redis-server`` is left out: neither is installed
on the benchmark machines (noted under the table when missing).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.managers
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any, Final

import mpmesh

from . import _echo
from ._harness import Config, Row, alternate, bar_check, guarded, loop_time, relate

__all__ = ["TITLE", "budget", "run"]

TITLE: Final = "shared state: cache, counters, locks, pub/sub"
VALUE: Final = {"id": 12345, "name": "Ada", "tags": ("x", "y")}  # small, pickled in ~1 us
RESULT_TIMEOUT_S: Final = 60.0

S1G, S1S, S2, S3G, S3S, S4, S5A, S5B = (
    "1 cache get, 1 client", "1 cache set, 1 client", "2 get/set, 4 clients", "3 mget 100 keys",
    "3 mset 100 keys", "4 lock acquire+release", "5 pub/sub, 1 subscriber", "5 pub/sub, 4 subscribers")
MESH, MGR, LOCAL = "mpmesh connect() client", "Manager().dict()", "mpmesh Master's own cache"
FLOOR: Final = "bare socket echo (floor)"
S6, MASTER = "6 busy master: cache get/set, 1 client", "mpmesh Master() client"


def budget(cfg: Config) -> float:
    return 120.0 if cfg.quick and not cfg.repeat else 400.0 + 20.0 * (cfg.repeat or 0)


@contextlib.contextmanager
def standalone(cfg: Config) -> Iterator[mpmesh._mesh._connect.MeshHandle]:
    """A standalone broker (autospawned; it inherits this process's CPU affinity), stopped after."""
    from mpmesh._mesh._cli import main as cli

    name = f"bench-{uuid.uuid4().hex[:8]}"
    handle = mpmesh.connect(name)
    try:
        yield handle
    finally:
        handle.close()
        with contextlib.redirect_stdout(None):
            cli(["stop", "--name", name])


def _bar(cfg: Config, row: Row, pinned: float, unpinned: float) -> None:
    bar_check(row, ">=", pinned if cfg.mode == "pinned" else unpinned)


# -- 1: one client ---------------------------------------------------------------------------

def one_client(cfg: Config) -> list[Row]:
    n, reps = cfg.size(5000, 500), cfg.reps(7, 3)
    cfg.log(f"  {S1G} / {S1S}: {n} ops x {reps} repetitions")
    with (multiprocessing.Manager() as manager, standalone(cfg) as h, mpmesh.Master() as m,
          _echo.EchoServer() as echo, _echo.echo_client(echo.address) as sock):
        d = manager.dict()
        c = h.cache("bench")
        local = m.cache("bench")
        for target in (d, c, local):
            target["k"] = VALUE

        def batch(get: Any, put: Any) -> Any:
            def timed() -> dict[str, float]:
                return {"get": loop_time(n, get), "set": loop_time(n, put)}
            return timed

        batches = [(MESH, batch(lambda: c.get("k"), lambda: c.set("k", VALUE))),
                   (MGR, batch(lambda: d["k"], lambda: d.__setitem__("k", VALUE))),
                   (LOCAL, batch(lambda: local.get("k"), lambda: local.set("k", VALUE))),
                   (FLOOR, lambda: {"get": _echo.round_trips(sock, n) / n, "set": _echo.round_trips(sock, n) / n})]
        results: dict[str, dict[str, list[float]]] = {}
        for rep in range(reps):
            order = batches if rep % 2 == 0 else list(reversed(batches))
            for impl, fn in order:
                for op, value in fn().items():
                    results.setdefault(op, {}).setdefault(impl, []).append(value)
    rows: list[Row] = []
    for scenario, op in ((S1G, "get"), (S1S, "set")):
        group = [Row(scenario, impl, results[op][impl], n) for impl in (MESH, MGR, LOCAL, FLOOR)]
        relate(group, MGR, kind="rate", floor=FLOOR)
        _bar(cfg, group[0], 1.5, 1.0)
        rows += group
    return rows


# -- 2: four clients -------------------------------------------------------------------------

def _mesh_client(name: str, key: str, n: int, barrier: Any, out: Any) -> None:
    with mpmesh.connect(name, autospawn=False) as h:
        c = h.cache("bench")
        c.set(key, VALUE)
        barrier.wait()
        start = time.perf_counter()
        for _ in range(n // 2):
            c.get(key)
            c.set(key, VALUE)
        out.put(time.perf_counter() - start)


def _manager_client(d: Any, key: str, n: int, barrier: Any, out: Any) -> None:
    d[key] = VALUE
    barrier.wait()
    start = time.perf_counter()
    for _ in range(n // 2):
        d[key]
        d[key] = VALUE
    out.put(time.perf_counter() - start)


def _echo_worker(address: str, key: str, n: int, barrier: Any, out: Any) -> None:
    with _echo.echo_client(address) as sock:
        barrier.wait()
        out.put(_echo.round_trips(sock, n))


def _fan_out(target: Any, args_for: Any, clients: int, *, busy: bool = False) -> float:
    """The slowest client's time; with ``busy`` this process computes in Python meanwhile."""
    ctx = multiprocessing.get_context()
    # Busy: this process meets the clients at the barrier too, so it starts computing once
    # they are connected and ready, and the figure is their operations alone.
    barrier, out = ctx.Barrier(clients + busy), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(i), barrier, out)) for i in range(clients)]
    for p in procs:
        p.start()
    try:
        if busy:
            barrier.wait(RESULT_TIMEOUT_S)
            x, deadline = 0, time.monotonic() + RESULT_TIMEOUT_S
            while out.empty() and time.monotonic() < deadline:
                for i in range(20_000):
                    x += i * i
        # A client that died never answers: give up on it rather than wait forever.
        elapsed = [out.get(timeout=RESULT_TIMEOUT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(RESULT_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
        out.close()
        out.join_thread()
    return max(elapsed)


def four_clients(cfg: Config) -> list[Row]:
    n, reps, clients = cfg.size(4000, 600), cfg.reps(5, 3), 4
    cfg.log(f"  {S2}: {clients} processes x {n} ops x {reps} repetitions")
    with multiprocessing.Manager() as manager, standalone(cfg) as h, _echo.EchoServer() as echo:
        d = manager.dict()
        name = h.name

        def mesh() -> float:
            return _fan_out(_mesh_client, lambda i: (name, f"k{i}", n), clients) / (n * clients)

        def stdlib() -> float:
            return _fan_out(_manager_client, lambda i: (d, f"k{i}", n), clients) / (n * clients)

        def floor() -> float:
            return _fan_out(_echo_worker, lambda i: (echo.address, f"k{i}", n), clients) / (n * clients)

        samples = alternate([(MESH, mesh), (MGR, stdlib), (FLOOR, floor)], reps, log=cfg.log, label=S2)
    rows = [Row(S2, impl, samples[impl], n * clients) for impl in (MESH, MGR, FLOOR)]
    relate(rows, MGR, kind="rate", floor=FLOOR)
    _bar(cfg, rows[0], 2.5, 2.5)
    return rows


# -- 3, 4: batches and locks ----------------------------------------------------------------

def batches_and_locks(cfg: Config) -> list[Row]:
    n, reps = cfg.size(500, 60), cfg.reps(7, 3)
    cfg.log(f"  {S3G} / {S3S} / {S4}: {n} ops x {reps} repetitions")
    keys = [f"key:{i}" for i in range(100)]
    mapping = {k: VALUE for k in keys}
    with multiprocessing.Manager() as manager, standalone(cfg) as h:
        d = manager.dict()
        c = h.cache("bench")
        d.update(mapping)
        c.mset(mapping)
        mlock = manager.Lock()

        def mesh() -> dict[str, float]:
            def locked() -> None:
                with h.lock("bench"):
                    pass
            return {f"{S3G}|{MESH}": loop_time(n, lambda: c.mget(keys)),
                    f"{S3S}|{MESH}": loop_time(n, lambda: c.mset(mapping)),
                    f"{S4}|{MESH}": loop_time(n * 4, locked)}

        def stdlib() -> dict[str, float]:
            def locked() -> None:
                with mlock:
                    pass
            get = d.get
            return {f"{S3G}|{MGR}": loop_time(max(n // 10, 5), lambda: [get(k) for k in keys]),
                    f"{S3S}|{MGR}": loop_time(n, lambda: d.update(mapping)),
                    f"{S4}|{MGR}": loop_time(n * 4, locked)}

        samples = alternate([("mesh", mesh), ("stdlib", stdlib)], reps, log=cfg.log, label="3+4")
    rows: list[Row] = []
    for scenario, mgr_label in ((S3G, "Manager dict, d.get x 100"), (S3S, "Manager dict, d.update"),
                                (S4, "Manager().Lock()")):
        group = [Row(scenario, MESH if scenario != S4 else "mpmesh lock()", samples[f"{scenario}|{MESH}"], n),
                 Row(scenario, mgr_label, samples[f"{scenario}|{MGR}"], n)]
        relate(group, mgr_label, kind="rate")
        rows += group
    return rows


# -- 5: pub/sub ----------------------------------------------------------------------------

def _mesh_subscriber(name: str, n: int, ready: Any, done: Any) -> None:
    import threading

    got = [0]
    finished = threading.Event()

    def on(payload: object, channel: str) -> None:
        got[0] += 1
        if got[0] == n:
            finished.set()

    with mpmesh.connect(name, autospawn=False) as h:
        sub = h.subscribe("bench.*", on)
        ready.wait()
        finished.wait(RESULT_TIMEOUT_S)
        done.put(got[0])
        sub.unsubscribe()


def _queue_subscriber(q: Any, n: int, ready: Any, done: Any) -> None:
    ready.wait()
    for _ in range(n):
        q.get()
    done.put(n)


def pubsub(cfg: Config) -> list[Row]:
    n, reps = cfg.size(3000, 400), cfg.reps(5, 3)
    rows: list[Row] = []
    ctx = multiprocessing.get_context()
    for scenario, subs in ((S5A, 1), (S5B, 4)):
        cfg.log(f"  {scenario}: {n} messages x {reps} repetitions")
        with multiprocessing.Manager() as manager, standalone(cfg) as h:
            queues = [manager.Queue() for _ in range(subs)]

            def run_mesh() -> float:
                ready, done = ctx.Barrier(subs + 1), ctx.SimpleQueue()
                procs = [ctx.Process(target=_mesh_subscriber, args=(h.name, n, ready, done)) for _ in range(subs)]
                for p in procs:
                    p.start()
                ready.wait()
                # A subscription is live once its process passed the barrier: it
                # subscribed before waiting. Publish, then wait for every subscriber.
                start = time.perf_counter()
                for i in range(n):
                    h.publish("bench.x", i)
                got = [done.get() for _ in procs]
                elapsed = time.perf_counter() - start
                for p in procs:
                    p.join(RESULT_TIMEOUT_S)
                assert got == [n] * subs, got
                return elapsed / n

            def run_queues() -> float:
                ready, done = ctx.Barrier(subs + 1), ctx.SimpleQueue()
                procs = [ctx.Process(target=_queue_subscriber, args=(q, n, ready, done)) for q in queues]
                for p in procs:
                    p.start()
                ready.wait()
                start = time.perf_counter()
                for i in range(n):
                    for q in queues:
                        q.put(i)
                for _ in procs:
                    done.get()
                elapsed = time.perf_counter() - start
                for p in procs:
                    p.join(RESULT_TIMEOUT_S)
                return elapsed / n

            label = f"Manager().Queue() x {subs}"
            samples = alternate([(MESH, run_mesh), (label, run_queues)], reps, log=cfg.log, label=scenario)
        group = [Row(scenario, "mpmesh publish", samples[MESH], n), Row(scenario, label, samples[label], n)]
        relate(group, label, kind="rate")
        rows += group
    return rows


# -- 6: a busy master ---------------------------------------------------------------------------

def busy_master(cfg: Config) -> list[Row]:
    """One client's cache get/set while the process that made the mesh computes in Python."""
    n, reps = cfg.size(2000, 300), cfg.reps(5, 3)
    thread = "mpmesh Master(broker='thread') client"
    cfg.log(f"  {S6}: {n} ops x {reps} repetitions (thread broker: {n // 10})")
    with multiprocessing.Manager() as manager, mpmesh.Master() as m, mpmesh.Master(broker="thread") as old:
        d = manager.dict()

        def mesh() -> float:
            return _fan_out(_mesh_client, lambda i: (m.name, "k", n), 1, busy=True) / n

        def on_thread() -> float:
            return _fan_out(_mesh_client, lambda i: (old.name, "k", n // 10), 1, busy=True) / (n // 10)

        def stdlib() -> float:
            return _fan_out(_manager_client, lambda i: (d, "k", n), 1, busy=True) / n

        samples = alternate([(MASTER, mesh), (MGR, stdlib), (thread, on_thread)], reps, log=cfg.log, label=S6)
    rows = [Row(S6, MASTER, samples[MASTER], n), Row(S6, MGR, samples[MGR], n),
            Row(S6, thread, samples[thread], n // 10)]
    relate(rows, MGR, kind="rate")
    bar_check(rows[0], ">=", 1.0)
    return rows


def run(cfg: Config) -> list[Row]:
    if not shutil.which("redis-server"):
        cfg.notes.append("redis-py column skipped: no redis-server on this machine")
    return guarded(cfg, [one_client, four_clients, batches_and_locks, pubsub, busy_master])


if __name__ == "__main__":  # pragma: no cover - a quick look without the harness
    from ._harness import render_table

    config = Config(quick=True)
    print(render_table(run(config)))
    for note in config.notes:
        print("-", note)
