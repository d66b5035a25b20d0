"""supervision: Restart latency, and what a group cap costs.

Scenarios:

1. **restart**: SIGKILL a sequential child, then ``m.send_request("pid", "w", retries=3,
   retry_delay=0)`` right away: the time from the kill to the replacement's answer (the
   request races the broker's noticing the death; one that reached the dead child is
   retried, so the figure is what a caller waits, end to end; with the default
   ``retry_delay`` of 0.1 s a retried request waits that much longer). One sample per kill, median of the kills.
   The Master runs with ``restart_backoff=0`` and a restart limit no run reaches, so every
   kill measures the mechanism (noticing the exit, forking, connecting, answering), not
   the back-off. Two sub-figures, from the ``child-exit`` and ``child-started`` events,
   split it: kill -> exit noticed, kill -> replacement connected. The reference row is a
   fresh ``spawn_child`` to its first answer in the same Master: the least a restart can
   cost. No stdlib peer: killing an idle ``multiprocessing.Pool`` worker can leave the
   pool's task-queue lock held forever (the dead worker held it while waiting), so the
   pool hangs rather than replaces the worker.
2. **capped group**: N outstanding ``m.request("echo", group, i)`` futures, then wait for
   all, to a saturated group of two concurrent children, with ``configure_group(
   max_concurrency=C)`` set vs unset (two groups of the same Master, alternating). With C
   equal to the group's capacity (2 x 16) the cap never binds, so the difference is what
   the group queue and its bookkeeping cost; bar: >= 0.90x the tasks/s of the uncapped
   group (the goal: the queue must not cost more than 10% of throughput). A binding
   cap (C = 8) is shown too, without a bar: fewer requests in flight is its purpose. Its
   control is an uncapped group whose children take 4 each (8 in flight, no group queue
   in the way): the gap between the two is the cost of queueing in the broker rather
   than in the children's own capacity.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from typing import Any, Final

import mpmesh

from ._harness import Config, Row, alternate, bar_check, relate
from .core import closing_all, echo_worker

__all__ = ["TITLE", "budget", "run", "pid_worker"]

TITLE: Final = "restart latency after SIGKILL, group cap overhead"
RESULT_TIMEOUT_S: Final = 60.0
CHILD_CONCURRENCY: Final = 16          # each concurrent child's own cap (the default)
BINDING_CAP: Final = 8

S1, S2 = "1 restart", "2 capped group"
KILL_ANSWER = "SIGKILL -> replacement answers"
KILL_EXIT = "SIGKILL -> exit noticed (child-exit)"
KILL_STARTED = "SIGKILL -> replacement connected (child-started)"
SPAWN = "spawn_child -> first answer (floor)"
FREE = "group of 2, no cap"
CAP_FULL = f"group of 2, max_concurrency={2 * CHILD_CONCURRENCY} (= capacity)"
CAP_BIND = f"group of 2, max_concurrency={BINDING_CAP}"
CHILD_BIND = f"group of 2, no cap, children max_concurrency={BINDING_CAP // 2}"


def budget(cfg: Config) -> float:
    """Seconds one mode may take before the worker is considered hung."""
    return 90.0 if cfg.quick and not cfg.repeat else 240.0 + 20.0 * (cfg.repeat or 0)


def pid_worker(child: mpmesh.Child) -> None:
    child.register_handler("pid", lambda _: os.getpid())
    child.run()


class _Stamps:
    """perf_counter() of each child-exit / child-started event, by pid."""

    def __init__(self, m: mpmesh.Master) -> None:
        self.cond = threading.Condition()
        self.at: dict[tuple[str, int], float] = {}
        for event in ("child-exit", "child-started"):
            m.on(event, lambda info, event=event: self._add(event, int(info["pid"])))

    def _add(self, event: str, pid: int) -> None:
        now = time.perf_counter()
        with self.cond:
            self.at[(event, pid)] = now
            self.cond.notify_all()

    def wait(self, event: str, pid: int) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: (event, pid) in self.at, RESULT_TIMEOUT_S):
                raise TimeoutError(f"no {event} event for pid {pid}")
            return self.at[(event, pid)]


def restart(cfg: Config) -> list[Row]:
    kills, spawns = cfg.size(30, 10), cfg.size(10, 5)
    if cfg.repeat:
        kills = spawns = cfg.repeat
    cfg.log(f"  {S1}: {kills} kills, {spawns} fresh spawns")
    samples: dict[str, list[float]] = {KILL_ANSWER: [], KILL_EXIT: [], KILL_STARTED: [], SPAWN: []}
    with closing_all() as held:
        m = mpmesh.Master(restart_backoff=0.0, restart_limit=10 * kills, restart_window=3600.0,
                          timeout=RESULT_TIMEOUT_S)
        held.append(m)
        stamps = _Stamps(m)
        m.spawn_child("w", pid_worker)
        pid = m.send_request("pid", "w")
        assert isinstance(pid, int)
        for i in range(kills):
            killed = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            answer = m.send_request("pid", "w", retries=3, retry_delay=0.0)
            answered = time.perf_counter()
            assert isinstance(answer, int) and answer != pid, (answer, pid)
            samples[KILL_ANSWER].append(answered - killed)
            samples[KILL_EXIT].append(stamps.wait("child-exit", pid) - killed)
            samples[KILL_STARTED].append(stamps.wait("child-started", answer) - killed)
            pid = answer
        restarts = m.process_stats("w").restarts
        if restarts != kills:
            cfg.notes.append(f"expected {kills} restarts, counted {restarts}")
        for i in range(spawns):
            name = f"fresh-{i}"
            started = time.perf_counter()
            m.spawn_child(name, pid_worker)
            m.send_request("pid", name)
            samples[SPAWN].append(time.perf_counter() - started)
            m.shutdown_child(name)
    exits = samples[KILL_EXIT]
    cfg.notes.append(f"kill -> exit noticed: median {statistics.median(exits) * 1e3:.2f} ms, "
                     f"max {max(exits) * 1e3:.2f} ms over {kills} kills")
    rows = [Row(S1, impl, samples[impl], 1, show_rate=False)
            for impl in (KILL_ANSWER, KILL_EXIT, KILL_STARTED, SPAWN)]
    relate(rows, SPAWN)
    return rows


def capped_group(cfg: Config) -> list[Row]:
    n, reps = cfg.size(20000, 4000), cfg.reps(7, 5)  # quick: still 5 reps, the bar is a 10% margin
    cfg.log(f"  {S2}: {n} outstanding requests x {reps} repetitions")
    groups = {FREE: ("free", None), CAP_FULL: ("full", 2 * CHILD_CONCURRENCY), CAP_BIND: ("bind", BINDING_CAP),
              CHILD_BIND: ("ctl", None)}
    with closing_all() as held:
        m = mpmesh.Master(timeout=RESULT_TIMEOUT_S)
        held.append(m)
        for group, cap in groups.values():
            per_child = BINDING_CAP // 2 if group == "ctl" else CHILD_CONCURRENCY
            m.spawn_group(group, echo_worker, size=2, mode="concurrent", max_concurrency=per_child)
            if cap is not None:
                m.configure_group(group, max_concurrency=cap)
        request = m.request

        def batch(group: str, count: int = n) -> float:
            start = time.perf_counter()
            futures = [request("echo", group, i) for i in range(count)]
            for fut in futures:
                fut.result(RESULT_TIMEOUT_S)
            return (time.perf_counter() - start) / count

        def timed(group: str) -> Any:
            return lambda: batch(group)

        for group, _ in groups.values():
            batch(group, max(n // 10, 200))  # warm-up: threads, buffers, code paths
        samples = alternate([(label, timed(group)) for label, (group, _) in groups.items()],
                            reps, log=cfg.log, label=S2)
        peak = {label: m.group_stats(group).max_concurrency for label, (group, _) in groups.items()}
    rows = [Row(S2, label, samples[label], n) for label in groups]
    relate(rows, FREE, kind="rate")
    bar_check(rows[1], ">=", 0.90)
    cfg.notes.append(f"caps in force: {peak}")
    return rows


def run(cfg: Config) -> list[Row]:
    return restart(cfg) + capped_group(cfg)
