"""Parity fixtures: every test body runs against ``multiprocessing`` and ``mpmesh``.

``impl`` names the implementation and gives its ``Manager()`` and ``managers`` module;
``manager`` is a started SyncManager of that implementation, shut down after the test.
The standard library's managers start from the forkserver (started once per session,
before any test's leak guard looks): forking the test process itself would warn on
3.12+ whenever a thread (ours or pytest's) is alive.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.managers
import multiprocessing.resource_tracker
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

import mpmesh
import mpmesh.managers

# Forking a process that runs mpmesh's broker thread is what 3.12+ warns about; the
# fork start method is still tested, with that warning allowed.
FORK_WARNING = "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"


@dataclass(frozen=True)
class Impl:
    name: str
    managers: ModuleType

    @property
    def is_mpmesh(self) -> bool:
        return self.name == "mpmesh"

    def Manager(self) -> Any:  # noqa: N802
        if self.is_mpmesh:
            return mpmesh.Manager()
        return multiprocessing.get_context("forkserver").Manager()

    def start(self, manager: Any) -> None:
        """Start a BaseManager subclass the way this implementation's tests should."""
        manager.start()


IMPLS = {
    "multiprocessing": Impl("multiprocessing", multiprocessing.managers),
    "mpmesh": Impl("mpmesh", mpmesh.managers),
}


@pytest.fixture(scope="session", autouse=True)
def _forkserver_running() -> None:
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()


@pytest.fixture(params=list(IMPLS))
def impl(request: pytest.FixtureRequest) -> Impl:
    return IMPLS[request.param]


@pytest.fixture
def manager(impl: Impl) -> Iterator[Any]:
    m = impl.Manager()
    try:
        yield m
    finally:
        gc.collect()  # proxies caught in exception/traceback cycles hold connections
        m.shutdown()
        m.join()  # the standard library keeps its server's pipes until join()


@pytest.fixture(params=["spawn", "forkserver", pytest.param("fork", marks=pytest.mark.filterwarnings(FORK_WARNING))])
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """A multiprocessing context for child processes that receive proxies."""
    return multiprocessing.get_context(request.param)
