"""Worker health: which supervised workers went silent for longer than their heartbeats allow.

Any message from a worker proves it alive (``on_beat``). Every ``interval`` the core asks
``check`` about its workers; one silent for ``misses`` intervals is reported unhealthy
once (``heartbeat-missed``), and healthy again when it next speaks. With ``inspect``, a
silent worker's pid is first handed to the driver (``Inspect``): a process on a CPU is
busy in one long call (a C call holding the GIL starves the thread that beats), not
stuck, and its answer (``on_running``) decides. Routing is unaffected: an unhealthy
worker still takes requests; what to do about it is the owner's choice.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._actions import Action, Inspect, Notify
from ._jobs import W_READY, W_STOPPING, Worker
from ._limits import FOREVER

__all__ = ["HealthCheck"]


class HealthCheck:
    """Heartbeat bookkeeping over the router's workers; every method returns the actions
    to perform. Off until ``enable``."""

    __slots__ = ("interval", "timeout", "next_check", "_inspect", "_inspecting")

    def __init__(self) -> None:
        self.interval = 1.0
        self.timeout: float | None = None   # silence that makes a worker unhealthy
        self.next_check = FOREVER
        self._inspect = False
        self._inspecting: set[Worker] = set()  # silent workers asked about (``Inspect``)

    def enable(self, interval: float, misses: int, now: float, inspect: bool = False) -> None:
        """Check heartbeats every ``interval``; a worker silent for ``misses`` of them is
        unhealthy. With ``inspect``, the driver is asked first whether its process is on
        a CPU, and one that is counts as busy, not stuck."""
        self.interval = interval
        self.timeout = interval * misses
        self.next_check = now + interval
        self._inspect = inspect

    def check(self, workers: Iterable[Worker], now: float) -> list[Action]:
        """Mark ``workers`` silent for longer than ``timeout`` unhealthy (once per episode);
        due at ``next_check``."""
        self.next_check = now + self.interval
        limit = self.timeout
        if limit is None:
            return []
        actions: list[Action] = []
        for worker in workers:
            if (worker.supervised and worker.peer is not None and worker.healthy
                    and worker.state in (W_READY, W_STOPPING)
                    and now - worker.last_beat > limit):
                if worker.pid and self._inspect:
                    self._inspecting.add(worker)  # is it on a CPU? (``on_running``)
                    continue
                actions.append(self._missed(worker, now))
        if self._inspecting:
            actions.append(Inspect(tuple(sorted({w.pid for w in self._inspecting}))))
        return actions

    def on_running(self, running: set[int], now: float) -> list[Action]:
        """The answer to ``Inspect``: of the silent workers, those whose process is on a
        CPU are busy in a long call, not stuck; the others missed their heartbeats."""
        actions: list[Action] = []
        asked, self._inspecting = self._inspecting, set()
        for worker in asked:
            if (not worker.healthy or worker.peer is None or worker.state not in (W_READY, W_STOPPING)
                    or now - worker.last_beat <= (self.timeout or 0.0)):
                continue  # beat meanwhile, already marked, or gone
            if worker.pid in running:
                worker.last_beat = now
            else:
                actions.append(self._missed(worker, now))
        return actions

    def on_beat(self, worker: Worker, now: float) -> list[Action]:
        """Any message from a worker proves it alive."""
        worker.last_beat = now
        if worker.healthy or worker.state is not W_READY:
            return []
        worker.healthy = True
        return [Notify("heartbeat-resumed", {"name": worker.name, "pid": worker.pid})]

    @staticmethod
    def _missed(worker: Worker, now: float) -> Notify:
        worker.healthy = False
        return Notify("heartbeat-missed", {
            "name": worker.name, "pid": worker.pid, "silent_for": now - worker.last_beat,
            "group": worker.group.name if worker.group else None})
