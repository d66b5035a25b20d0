"""Parity fixtures: every test body runs against ``multiprocessing`` and ``mpmesh``.

``impl`` names the implementation and gives its ``Manager()``, ``Pool()`` and ``managers``
module; ``manager`` is a started SyncManager of that implementation, shut down after the
test; ``make_pool`` builds pools of it, terminated after the test, with the start method
``pool_method`` names (a test module overrides that fixture to choose its own). The
standard library's managers and pools start from the forkserver (started once per
session, before any test's leak guard looks) unless told otherwise: forking the test
process itself would warn on 3.12+ whenever a thread (ours or pytest's) is alive.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.managers
import multiprocessing.resource_tracker
from collections.abc import Callable, Iterator
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

    def Pool(self, *args: Any, method: str | None = None, **kwargs: Any) -> Any:  # noqa: N802
        """A pool of this implementation; ``method``: its start method (None: mpmesh's
        default; the forkserver for the standard library's)."""
        if self.is_mpmesh:
            if method is not None:
                kwargs["context"] = multiprocessing.get_context(method)
            return mpmesh.Pool(*args, **kwargs)
        return multiprocessing.get_context(method or "forkserver").Pool(*args, **kwargs)


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


@pytest.fixture
def pool_method() -> str | None:
    """The start method of ``make_pool``'s pools (None: each implementation's default)."""
    return None


@pytest.fixture
def make_pool(impl: Impl, pool_method: str | None) -> Iterator[Callable[..., Any]]:
    pools: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        pool = impl.Pool(*args, method=pool_method, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.terminate()
        pool.join()
        if not impl.is_mpmesh:  # the stdlib keeps its pipes until the pool is collected
            for q in (pool._inqueue, pool._outqueue, pool._change_notifier):
                q.close()
            for process in pool._pool:
                process.close()
    pools.clear()
    gc.collect()


@pytest.fixture(params=["spawn", "forkserver", pytest.param("fork", marks=pytest.mark.filterwarnings(FORK_WARNING))])
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """A multiprocessing context for child processes that receive proxies."""
    return multiprocessing.get_context(request.param)
