"""What a Master reports of its children and groups (``process_stats``, ``group_stats``,
``stats``), and the queries that read it from its broker and supervisor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._broker._core import BrokerCore
from .._broker._jobs import Worker, WorkerState
from .._errors import NotFound
from .._io._loop import BrokerLoop
from .._procs._supervisor import ChildSpec, Supervisor

__all__ = ["Census", "GroupStats", "ProcessStats"]


@dataclass(frozen=True)
class ProcessStats:
    """What one child has done so far (``Master.process_stats``).

    ``average_response_time`` is an exponential moving average in seconds.
    """

    name: str
    pid: int | None
    alive: bool
    requests_handled: int
    requests_active: int
    average_response_time: float
    errors: int
    restarts: int
    healthy: bool
    group: str | None


@dataclass(frozen=True)
class GroupStats:
    """Totals for one group (``Master.group_stats``)."""

    name: str
    strategy: str
    members: list[str]
    max_concurrency: int | None
    queue_length: int
    requests_active: int
    requests_handled: int
    errors: int
    restarts: int


class Census:
    """A Master's queries of its children and groups, read from its broker core (under
    the loop's lock where a Pool's thread may change them) and its supervisor.

    Only the children the Master spawned count (``specs``): the core also knows other
    processes of the mesh.
    """

    def __init__(self, specs: dict[str, ChildSpec], core: BrokerCore, loop: BrokerLoop,
                 supervisor: Supervisor) -> None:
        self._specs, self._core, self._loop, self._supervisor = specs, core, loop, supervisor

    def children(self) -> list[str]:
        """Names of the children that are running or being restarted, in spawn order."""
        with self._loop.locked():  # a Pool's thread may add or forget children meanwhile
            workers = self._core.children()
            return [n for n in self._specs
                    if (w := workers.get(n)) is not None and w.state is not WorkerState.DOWN]

    def unhealthy(self) -> list[str]:
        """Children whose heartbeats stopped (they leave the list when beats resume)."""
        with self._loop.locked():
            return self._unhealthy()

    def _unhealthy(self) -> list[str]:
        """``unhealthy()`` with the core lock held."""
        return [n for n, w in self._core.children().items()
                if n in self._specs and not w.healthy and w.state is not WorkerState.DOWN]

    def process(self, w: Worker) -> ProcessStats:
        """Counters for one child."""
        return ProcessStats(w.name, self._supervisor.pid(w.name), self._supervisor.alive(w.name),
                            w.handled, len(w.running), w.ema, w.errors, w.restarts, w.healthy,
                            w.group.name if w.group else None)

    def group_stats(self, group: str) -> GroupStats:
        """Totals for a group."""
        with self._loop.locked():
            g = self.group(group)
            return GroupStats(g.name, g.strategy, [w.name for w in g.members], g.max_concurrency,
                              len(g.queue), g.busy, sum(w.handled for w in g.members),
                              sum(w.errors for w in g.members), sum(w.restarts for w in g.members))

    def snapshot(self, mesh: str, address: str) -> dict[str, Any]:
        """The mesh's own figures of ``Master.stats``: children, groups, requests, connections."""
        with self._loop.locked():
            core = self._core
            children = {n: self.process(w) for n, w in core.children().items() if n in self._specs}
            groups = list(core.groups())
            queued, in_flight = core.requests()
            snapshot: dict[str, Any] = {
                "mesh": mesh, "address": address, "children": children,
                "requests_queued": queued, "requests_in_flight": in_flight,
                "connections": len(self._core.peers) - 1, "unhealthy": self._unhealthy(),
            }
        snapshot["groups"] = {g: self.group_stats(g) for g in groups}
        return snapshot

    def worker(self, name: str) -> Worker:
        """The broker's record of child ``name``. Raises NotFound: no such child."""
        worker = self._core.child(name)
        if worker is None or name not in self._specs:
            raise NotFound(f"no child named {name!r}")
        return worker

    def group(self, group: str) -> Any:
        """The broker's record of group ``group``. Raises NotFound: no such group."""
        g = self._core.group(group)
        if g is None:
            raise NotFound(f"no group named {group!r}")
        return g
