"""What a Master does when its children end or go silent: restart them by its restart
policy, or mark them down for good; and how it stops them (gracefully, then by signal)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._broker._core import BrokerCore
from .._broker._jobs import WorkerState
from .._io._forking import stop_in_turn
from .._io._loop import BrokerLoop
from .._procs._restarts import RestartPolicy
from .._procs._supervisor import ChildSpec, Supervisor, describe_exit
from .._wire._messages import ErrorCode

__all__ = ["Lifecycle"]


class Lifecycle:
    """A Master's children from exit to restart or stop.

    The Master owns one and hands it its children's specs, its broker, its supervisor
    and restart policy, how to tell its event listeners, whether it is closed, and how
    to start a child's process.
    """

    def __init__(self, specs: dict[str, ChildSpec], core: BrokerCore, loop: BrokerLoop,
                 supervisor: Supervisor, restarts: RestartPolicy, log: logging.Logger,
                 emit: Callable[[str, dict[str, Any]], None], closed: Callable[[], bool],
                 start: Callable[[ChildSpec], concurrent.futures.Future[int]]) -> None:
        self._specs, self._core, self._loop = specs, core, loop
        self._supervisor, self._restarts, self.log = supervisor, restarts, log
        self._emit, self._closed, self._start = emit, closed, start

    def beats_missed(self, info: dict[str, Any]) -> None:
        """A child missed its heartbeats: kill it, to be restarted, if it restarts."""
        name = str(info["name"])
        spec = self._specs.get(name)
        restart = spec is not None and spec.auto_restart and not self._closed()
        self.log.warning("child %r (pid %s) missed its heartbeats for %.1f s%s", name,
                         info["pid"], info["silent_for"], "; killing it to restart it" if restart else "")
        if restart:
            self._supervisor.kill(name)

    def on_exit(self, name: str, pid: int, exitcode: int) -> None:
        """A child process ended (broker thread): restart it, or mark it down for good."""
        how = describe_exit(exitcode)
        spec = self._specs.get(name)
        worker = self._core.child(name)
        stopping = worker is None or worker.state is WorkerState.STOPPING
        delay: float | None = None
        if spec is not None and spec.auto_restart and not self._closed() and not stopping:
            delay = self._restarts.next_delay(name, time.monotonic())
        level = logging.INFO if exitcode == 0 or self._closed() or stopping else logging.WARNING
        self.log.log(level, "child %r (pid %d) %s", name, pid, how)
        self._emit("child-exit", {"name": name, "pid": pid, "exitcode": exitcode,
                                  "signal": -exitcode if exitcode < 0 else None,
                                  "group": spec.group if spec else None})
        restarting = delay is not None
        if spec is not None and spec.auto_restart and not restarting and not self._closed() and not stopping:
            why = (f"restarted {self._restarts.limit} times within {self._restarts.window:g} s; "
                   f"giving up (last: {how})")
            self.log.error("child %r %s", name, why)
            self._emit("auto-restart", {"name": name, "given_up": True, "reason": why})
            how = f"{how}; not restarted: {why}"

        if worker is not None and worker.peer is not None:
            self._loop.drain(worker.peer)  # its last replies first
        self._loop.run_core(lambda now: self._core.child_down(name, how, now, restarting=restarting))
        if restarting:
            assert delay is not None
            timer = threading.Timer(delay, self._restart, (name, delay, how))
            timer.daemon = True
            timer.start()

    def _restart(self, name: str, delay: float, how: str) -> None:
        """Start child ``name`` again from its original spec (on a timer thread)."""
        spec = self._specs.get(name)
        worker = self._core.child(name)
        if (self._closed() or spec is None or not spec.auto_restart or worker is None
                or worker.state is not WorkerState.STARTING):
            return
        try:
            pid = self._supervisor.wait_started(name, self._start(spec))
        except Exception as exc:
            if self._closed():
                return
            self.log.error("could not restart child %r: %s", name, exc)
            reason = f"{how}; restart failed: {exc}"
            self._loop.run_core(lambda now: self._core.child_down(name, reason, now))
            return
        worker.restarts += 1
        self.log.warning("restarted child %r as pid %d (restart %d, after %.2f s)", name, pid, worker.restarts, delay)
        self._emit("auto-restart", {"name": name, "pid": pid, "restarts": worker.restarts,
                                    "delay": delay, "reason": how, "given_up": False})

    def shutdown_child(self, name: str, timeout: float) -> None:
        """Stop child ``name`` for good (the Master checked it exists)."""
        self._specs[name].auto_restart = False
        self.stop([name], timeout)
        if not self._supervisor.alive(name):
            self._loop.run_core(lambda now: self._core.child_down(name, "was shut down", now, unless_down=True))

    def shutdown_all(self, timeout: float) -> None:
        """Stop every child for good and fail every request still waiting."""
        with self._loop.locked():
            specs = list(self._specs.values())
        for spec in specs:
            spec.auto_restart = False
        self.stop([spec.name for spec in specs], timeout)
        self._loop.run_core(lambda now: self._core.fail_all(ErrorCode.CLOSED, "the mesh was shut down"))

    def stop(self, names: list[str], timeout: float | None) -> None:
        """Let children ``names`` finish what they hold, then terminate, then kill them."""
        self._loop.run_core(lambda now: self._core.stop_children(names, timeout))
        live = [n for n in names if self._supervisor.alive(n)]
        if self._supervisor.wait_exited(live, timeout):
            return
        sup = self._supervisor

        def send(sig: int) -> None:
            for name in live:
                sup.kill(name, sig)

        if stop_in_turn(send, lambda t: sup.wait_exited(live, t)):
            return
        self.log.error("children %s did not exit after SIGKILL", [n for n in live if self._supervisor.alive(n)])
