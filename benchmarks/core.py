"""core: Requests both ways, throughput and start-up, against the stdlib.

Scenarios, each side by side with its peer in the same process, alternating:

1. **round trip**: ``m.send_request("echo", "w", PAYLOAD)`` to a sequential child, vs
   ``multiprocessing.Pool(1).apply(_echo, (PAYLOAD,))`` and a ``multiprocessing.Pipe``
   ping-pong between two processes (the floor: no library can do less).
   Bar: mpmesh <= 0.80x the time of ``Pool.apply``.
2. **throughput**: N outstanding ``m.request("echo", "g", i)`` futures to a group of two
   concurrent children, then wait for all; vs ``Pool(2).apply_async(_echo, (i,))`` N times,
   then ``.get()`` all. Bar: mpmesh >= 1.25x the tasks/s of ``Pool.apply_async``.
3. **child to master**: a child's handler loops K ``child.send_request("pong", PAYLOAD)``
   calls to a master handler and returns the elapsed time; no stdlib peer, so it is set
   against the Pipe floor.
4. **start-up**: from ``Master()`` to a group of two forked children both answering a
   request (``g-0`` and ``g-1`` by name), vs ``Pool(2)`` to its first ``apply`` result.
   Bar: mpmesh <= 1.50x. Teardown (``Master.shutdown()`` vs ``pool.terminate(); pool.join()``)
   is its own row, without a bar.

Set-up order: every stdlib peer is created before the Master of its scenario, so no
process forks after the Master's threads exist (the Master then starts its zygote as a
fresh interpreter instead of forking it, which only affects untimed set-up). Start-up
runs first, while the process is still single-threaded, so the Master forks its zygote
the fast way, as in a user's program.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Iterator
from typing import Any, Final

import mpmesh

from ._harness import Config, Row, alternate, bar_check, guarded, loop_time, relate, wait_single_threaded

__all__ = ["TITLE", "budget", "run", "echo_worker", "c2m_worker", "pipe_echo"]

TITLE: Final = "requests both ways, throughput, start-up"
# A small message, the same for every contender: a few fields, pickled in ~1 us.
PAYLOAD: Final = {"id": 12345, "op": "echo", "args": (1, 2.5, "x")}
RESULT_TIMEOUT_S: Final = 60.0     # bound on any single wait for a result
SHUTDOWN_TIMEOUT_S: Final = 10.0

S1, S2, S3, S4, S4T = ("1 round trip", "2 throughput", "3 child->master", "4 start-up", "4 teardown")
MESH_RTT, POOL_RTT, PIPE = "mpmesh send_request", "Pool(1).apply", "Pipe ping-pong (floor)"
MESH_TPUT, POOL_TPUT = "mpmesh request x N, group of 2", "Pool(2).apply_async x N"
MESH_C2M = "mpmesh child.send_request"
MESH_UP, POOL_UP = "Master() + 2 children answering", "Pool(2) to first apply"
MESH_DOWN, POOL_DOWN = "Master.shutdown()", "pool.terminate() + join()"


def budget(cfg: Config) -> float:
    """Seconds one mode may take before the worker is considered hung."""
    return 45.0 if cfg.quick and not cfg.repeat else 100.0 + 10.0 * (cfg.repeat or 0)


# -- what the children run (module level: they cross processes by reference) ----------------

def _echo(x: object) -> object:
    return x


def _affinity(_: object = None) -> list[int]:
    return sorted(os.sched_getaffinity(0))


def echo_worker(child: mpmesh.Child) -> None:
    child.register_handler("echo", _echo)
    child.register_handler("affinity", _affinity)
    child.run()


def c2m_worker(child: mpmesh.Child) -> None:
    """Serves ``call-master``: K requests to the master's ``pong``; returns their elapsed time."""

    def call_master(k: int) -> float:
        send = child.send_request
        start = time.perf_counter()
        for _ in range(k):
            send("pong", PAYLOAD)
        return time.perf_counter() - start

    child.register_handler("call-master", call_master)
    child.register_handler("affinity", _affinity)
    child.run()


def pipe_echo(conn: multiprocessing.connection.Connection) -> None:
    """The floor's other end: send back whatever arrives, until ``None`` or EOF."""
    try:
        while (msg := conn.recv()) is not None:
            conn.send(msg)
    except (EOFError, OSError):
        pass


class PipeFloor:
    """A process at the other end of a ``multiprocessing.Pipe``, for ping-pong."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context()
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=pipe_echo, args=(theirs,), name="bench-pipe-echo", daemon=True)
        self.proc.start()
        theirs.close()

    def round_trips(self, n: int) -> float:
        conn = self.conn
        send, recv = conn.send, conn.recv

        def once() -> None:
            send(PAYLOAD)
            recv()

        return loop_time(n, once)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


@contextlib.contextmanager
def closing_all() -> Iterator[list[Any]]:
    """Close whatever the block registers (meshes, pools, pipes), last first, always."""
    held: list[Any] = []
    try:
        yield held
    finally:
        for obj in reversed(held):
            with contextlib.suppress(Exception):
                if isinstance(obj, mpmesh.Master):
                    obj.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
                elif isinstance(obj, PipeFloor):
                    obj.close()
                else:  # a multiprocessing Pool
                    obj.terminate()
                    obj.join()


def _profiled(cfg: Config) -> contextlib.AbstractContextManager[None]:
    return cfg.profiler.on_main() if cfg.profile and cfg.profiler else contextlib.nullcontext()


def _check_pinned(cfg: Config, what: str, cpus: object) -> None:
    if cfg.mode == "pinned" and cpus != [cfg.cpu]:
        cfg.notes.append(f"{what} runs on CPUs {cpus}, not pinned to {cfg.cpu}")


def _new_master(cfg: Config) -> mpmesh.Master:
    if cfg.profile and cfg.profiler:
        cfg.profiler.hook_new_threads()  # profile the broker's thread from its start
        try:
            return mpmesh.Master()
        finally:
            cfg.profiler.unhook()
    return mpmesh.Master()


# -- scenarios -------------------------------------------------------------------------------------

def _section(cfg: Config, name: str) -> None:
    if cfg.profiler is not None:
        cfg.profiler.section = name


def round_trip(cfg: Config) -> list[Row]:
    n, reps = cfg.size(2000, 200), cfg.reps(7, 3)
    _section(cfg, S1)
    cfg.log(f"  {S1}: {n} round trips x {reps} repetitions")
    with closing_all() as held:
        pipe = PipeFloor()
        held.append(pipe)
        pool = multiprocessing.get_context().Pool(1)
        held.append(pool)
        m = _new_master(cfg)
        held.append(m)
        m.spawn_child("w", echo_worker, mode="sequential")
        _check_pinned(cfg, "child 'w'", m.send_request("affinity", "w"))
        _check_pinned(cfg, "the Pool's worker", pool.apply(_affinity))
        send, apply = m.send_request, pool.apply

        def mesh() -> float:
            with _profiled(cfg):
                return loop_time(n, lambda: send("echo", "w", PAYLOAD))

        def stdlib() -> float:
            return loop_time(n, lambda: apply(_echo, (PAYLOAD,)))

        def floor() -> float:
            return pipe.round_trips(n)

        warm = max(n // 10, 50)
        loop_time(warm, lambda: send("echo", "w", PAYLOAD))
        loop_time(warm, lambda: apply(_echo, (PAYLOAD,)))
        pipe.round_trips(warm)
        samples = alternate([(MESH_RTT, mesh), (POOL_RTT, stdlib), (PIPE, floor)], reps, log=cfg.log, label=S1)
    rows = [Row(S1, impl, samples[impl], n) for impl in (MESH_RTT, POOL_RTT, PIPE)]
    relate(rows, POOL_RTT, floor=PIPE)
    bar_check(rows[0], "<=", 0.80)
    return rows


def throughput(cfg: Config) -> list[Row]:
    n, reps = cfg.size(20000, 2000), cfg.reps(5, 3)
    _section(cfg, S2)
    cfg.log(f"  {S2}: {n} outstanding tasks x {reps} repetitions")
    with closing_all() as held:
        pool = multiprocessing.get_context().Pool(2)
        held.append(pool)
        m = _new_master(cfg)
        held.append(m)
        m.spawn_group("g", echo_worker, size=2, mode="concurrent")
        request, apply_async = m.request, pool.apply_async

        def mesh(count: int = n) -> float:
            with _profiled(cfg):
                start = time.perf_counter()
                futures = [request("echo", "g", i) for i in range(count)]
                for fut in futures:
                    fut.result(RESULT_TIMEOUT_S)
                return (time.perf_counter() - start) / count

        def stdlib(count: int = n) -> float:
            start = time.perf_counter()
            results = [apply_async(_echo, (i,)) for i in range(count)]
            for res in results:
                res.get(RESULT_TIMEOUT_S)
            return (time.perf_counter() - start) / count

        mesh(max(n // 10, 200))
        stdlib(max(n // 10, 200))
        samples = alternate([(MESH_TPUT, mesh), (POOL_TPUT, stdlib)], reps, log=cfg.log, label=S2)
    rows = [Row(S2, impl, samples[impl], n) for impl in (MESH_TPUT, POOL_TPUT)]
    relate(rows, POOL_TPUT, kind="rate")
    bar_check(rows[0], ">=", 1.25)
    return rows


def child_to_master(cfg: Config) -> list[Row]:
    k, reps = cfg.size(2000, 200), cfg.reps(7, 3)
    cfg.log(f"  {S3}: {k} calls x {reps} repetitions")
    with closing_all() as held:
        pipe = PipeFloor()
        held.append(pipe)
        m = _new_master(cfg)
        held.append(m)
        m.register_handler("pong", _echo)
        m.spawn_child("c", c2m_worker, mode="sequential")
        _check_pinned(cfg, "child 'c'", m.send_request("affinity", "c"))

        def mesh(count: int = k) -> float:
            elapsed = m.send_request("call-master", "c", count, timeout=RESULT_TIMEOUT_S)
            assert isinstance(elapsed, float)
            return elapsed / count

        def floor() -> float:
            return pipe.round_trips(k)

        mesh(max(k // 10, 50))
        pipe.round_trips(max(k // 10, 50))
        samples = alternate([(MESH_C2M, mesh), (PIPE, floor)], reps, log=cfg.log, label=S3)
    rows = [Row(S3, impl, samples[impl], k) for impl in (MESH_C2M, PIPE)]
    relate(rows, PIPE)  # the reference is the floor itself
    return rows


def startup(cfg: Config) -> list[Row]:
    reps = cfg.reps(11, 3)  # cheap (tens of ms each) and noisy: more repetitions
    cfg.log(f"  {S4}: {reps} repetitions")
    threaded: list[int] = []

    def mesh() -> dict[str, float]:
        if not wait_single_threaded():
            threaded.append(1)  # the Master will exec its zygote instead of forking it
        start = time.perf_counter()
        with closing_all() as held:
            m = mpmesh.Master()
            held.append(m)
            m.spawn_group("g", echo_worker, size=2, mode="concurrent")
            first, second = m.request("echo", "g-0", 0), m.request("echo", "g-1", 1)
            first.result(RESULT_TIMEOUT_S)
            second.result(RESULT_TIMEOUT_S)
            up = time.perf_counter()
            held.pop()
            m.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            down = time.perf_counter()
        return {MESH_UP: up - start, MESH_DOWN: down - up}

    def stdlib() -> dict[str, float]:
        wait_single_threaded()  # the same starting line as the Master's
        start = time.perf_counter()
        with closing_all() as held:
            pool = multiprocessing.get_context().Pool(2)
            held.append(pool)
            pool.apply(_echo, (0,))
            up = time.perf_counter()
            held.pop()
            pool.terminate()
            pool.join()
            down = time.perf_counter()
        return {POOL_UP: up - start, POOL_DOWN: down - up}

    cold_mesh, cold_pool = mesh(), stdlib()  # first time: lazy imports, cold caches
    cfg.notes.append(f"cold first start-up (not in the medians): Master + 2 children "
                     f"{cold_mesh[MESH_UP] * 1e3:.1f} ms, Pool(2) {cold_pool[POOL_UP] * 1e3:.1f} ms")
    samples = alternate([("mesh", mesh), ("stdlib", stdlib)], reps, log=cfg.log, label=S4)
    if threaded:
        cfg.notes.append(f"{len(threaded)} Master start(s) began with helper threads still alive: "
                         "zygote exec'd instead of forked")
    up = [Row(S4, impl, samples[impl], 1, show_rate=False) for impl in (MESH_UP, POOL_UP)]
    down = [Row(S4T, impl, samples[impl], 1, show_rate=False) for impl in (MESH_DOWN, POOL_DOWN)]
    relate(up, POOL_UP)
    relate(down, POOL_DOWN)
    bar_check(up[0], "<=", 1.50)
    return up + down


def run(cfg: Config) -> list[Row]:
    if cfg.profile:
        return guarded(cfg, [round_trip, throughput])
    # Start-up first: the process is still single-threaded, as a user's would be. It is
    # listed last in the table.
    first = guarded(cfg, [startup])
    return guarded(cfg, [round_trip, throughput, child_to_master]) + first
