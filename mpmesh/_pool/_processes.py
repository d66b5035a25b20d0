"""The pool's worker processes on a Master: start, replace, kill, stop, forget.

This is the one module that knows how a pool's workers come and go, so the policy can
change in one place. Workers are children of a Master in one group, spawned with
``auto_restart=False``: the pool replaces a worker that died, timed out or retired
(``maxtasksperchild``) with a *new* child named ``f"{group}-{n}"`` (the stdlib names its
workers ``ForkPoolWorker-N`` the same way). The supervisor's own auto-restart is not
used because its back-off and storm guard, right for long-lived services, would stall a
pool that recycles workers by design (``maxtasksperchild=1`` exits a worker per task).

One *lifecycle* thread per pool does the blocking work: it starts replacement workers
(a start can take tens of milliseconds) and learns of exits by waiting on the
supervisor's exit condition (no polling), then reports ``(name, pid, exitcode)``. It
lives exactly as long as the pool: a pool that is done leaves no thread behind, so the
next Master in this process can still fork its zygote the fast way.

A standalone ``Pool`` owns a private Master; ``m.Pool(...)`` borrows the caller's.
"""

from __future__ import annotations

import collections
import itertools
import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .._errors import MeshError
from . import _worker

if TYPE_CHECKING:
    from .._master import Master

__all__ = ["WorkerProcesses"]

log = logging.getLogger("mpmesh.pool")

_group_ids = itertools.count(1)
# How long ``terminate()`` gives workers after SIGTERM before SIGKILL.
TERMINATE_GRACE_S: Final = 1.0


class WorkerProcesses:
    """Starts and stops the pool's workers; reports exits and failed starts."""

    def __init__(self, master: Master, owns_master: bool, worker_args: tuple[Any, ...],
                 on_exit: Callable[[str, int, int], None],
                 on_spawn_failed: Callable[[str, BaseException], None]) -> None:
        self.master = master
        self.owns_master = owns_master
        self._args = worker_args
        self._on_exit = on_exit
        self._on_spawn_failed = on_spawn_failed
        self._sup = master._supervisor
        self._counter = itertools.count()
        self._watched: set[str] = set()     # started, exit not reported yet
        self._dead: list[str] = []           # exited; the Master may forget them
        self._spawns: collections.deque[str] = collections.deque()
        self._stopping = False
        if owns_master:
            self.group = "pool"
        else:
            taken = set(master._core.router.groups) | set(master._core.router.workers)
            self.group = next(g for g in (f"pool{n}" for n in _group_ids) if g not in taken)
        self._thread: threading.Thread | None = None

    def next_name(self) -> str:
        return f"{self.group}-{next(self._counter)}"

    def start(self, names: list[str]) -> None:
        """Start the first workers, named as ``spawn_group`` names them (errors propagate)."""
        assert names == [f"{self.group}-{i}" for i in range(len(names))]
        with self._sup.exited:
            self._watched.update(names)
        self._thread = threading.Thread(target=self._run, name="mpmesh-pool-lifecycle", daemon=True)
        self._thread.start()
        self.master.spawn_group(self.group, _worker.main, len(names), mode="sequential",
                                args=self._args, auto_restart=False)

    def request_spawn(self, name: str) -> None:
        """Have the lifecycle thread start a worker named ``name`` (never blocks)."""
        with self._sup.exited:
            self._spawns.append(name)
            self._sup.exited.notify_all()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._sup.kill(name, sig)

    def terminate(self, names: list[str]) -> None:
        """Stop the named workers now: SIGTERM, then SIGKILL (as ``Pool.terminate``)."""
        if self.owns_master:
            self.master.shutdown(timeout=0.0)
            return
        live = [n for n in names if self._sup.alive(n)]
        for sig, grace in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 10.0)):
            for name in live:
                self.kill(name, sig)
            if self._sup.wait_exited(live, grace):
                break

    def close(self) -> None:
        """After the pool is done: stop the lifecycle thread; shut a private Master down,
        or drop the records of the pool's dead workers from a shared one."""
        with self._sup.exited:
            self._stopping = True
            self._sup.exited.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30.0)
        if self.owns_master:
            try:
                self.master.shutdown()
            except MeshError:  # pragma: no cover - already shut down
                pass
        else:
            self._forget_dead()

    # -- the lifecycle thread -------------------------------------------------------------------

    def _run(self) -> None:
        sup = self._sup
        while True:
            with sup.exited:
                while True:
                    if self._stopping:
                        return
                    exits = [(n, sup.pid(n) or 0, code) for n in self._watched
                             if (code := sup.exitcode(n)) is not None]
                    spawns = list(self._spawns)
                    self._spawns.clear()
                    if exits or spawns:
                        break
                    sup.exited.wait()
                for name, _, _ in exits:
                    self._watched.discard(name)
                    self._dead.append(name)
            for name, pid, code in exits:
                self._on_exit(name, pid, code)
            for name in spawns:
                self._spawn(name)

    def _spawn(self, name: str) -> None:
        self._forget_dead()
        with self._sup.exited:
            if self._stopping:
                return
            self._watched.add(name)
        try:
            self.master.spawn_child(name, _worker.main, "sequential", self.group, args=self._args,
                                    auto_restart=False)
        except Exception as exc:
            with self._sup.exited:
                self._watched.discard(name)
            self._on_spawn_failed(name, exc)

    def _forget_dead(self) -> None:
        """Drop the Master's records of workers that exited (a recycling pool would grow them)."""
        with self._sup.exited:
            dead, self._dead = self._dead, []
        for name in dead:
            self.master._forget(name)
