"""CPython's own Manager and Pool tests (``test._test_multiprocessing``), run against mpmesh.

Importing this module swaps the standard library's factories for mpmesh's, then imports
CPython's test module and builds its test classes here, exactly as CPython's
``test_multiprocessing_fork`` / ``_spawn`` modules do (``install_tests_in_module_dict``).
What is swapped, and nothing else:

- ``multiprocessing.Pool`` and every context's ``.Pool()``: ``mpmesh.Pool(...,
  context=ctx)``. ``ProcessesMixin.Pool`` captures ``multiprocessing.Pool`` when the test
  module is imported, so the swap happens before that import.
- ``multiprocessing.Manager`` and every context's ``.Manager()``: ``mpmesh.Manager(ctx=ctx)``
  (what ``ManagerMixin.setUpClass`` calls).
- ``multiprocessing.managers.SyncManager``: ``mpmesh.managers.SyncManager`` (what
  ``TestSyncManagerTypes`` and ``TestInitializers`` instantiate).
- While the test module is imported, and only then, ``multiprocessing.managers.BaseManager``
  and ``BaseProxy`` are mpmesh's, so the module's ``from multiprocessing.managers import
  BaseManager, BaseProxy, RemoteError`` reads as a user's switched import line (its custom
  managers and proxy types then derive from mpmesh's). ``RemoteError`` stays the standard
  library's: mpmesh's derives from it, so the tests check the stricter contract.

With ``MPMESH_CONFORMANCE_TARGET=stdlib`` nothing is swapped: the same tests then run
against the standard library, a baseline that shows the harness itself changes nothing.

The test classes live in this module, importable as CPython's live in
``test.test_multiprocessing_<method>``: a child process finds them by reference.
``cpython_worker.py`` is the worker's ``__main__``; it imports this module first, so a
process started with ``spawn`` (which re-imports the ``__main__`` file) swaps the factories
before anything else too.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import signal
import sys
import time
import traceback
import unittest
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType, TracebackType
from typing import Any, TextIO, Union

import multiprocessing
import multiprocessing.context
import multiprocessing.managers

import mpmesh
import mpmesh.managers
from cpython_selection import HARNESS_SKIPS, SELECTED, START_METHOD_ENV, TARGET_ENV

__all__ = ["EventResult", "install", "main", "run"]

# -- the swap ------------------------------------------------------------------------------


def _mpmesh_pool(self: multiprocessing.context.BaseContext, processes: int | None = None,
                 initializer: Any = None, initargs: Any = (),
                 maxtasksperchild: int | None = None) -> mpmesh.Pool:
    """``BaseContext.Pool``, with mpmesh's Pool (same signature, same context)."""
    return mpmesh.Pool(processes, initializer, initargs, maxtasksperchild,
                       context=self.get_context())


def _mpmesh_manager(self: multiprocessing.context.BaseContext) -> mpmesh.managers.SyncManager:
    """``BaseContext.Manager``, with mpmesh's started SyncManager."""
    return mpmesh.Manager(ctx=self.get_context())


@contextmanager
def _swapped(module: ModuleType, **names: object) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _import_cpython_tests(target: str) -> ModuleType:
    """Swap the factories (unless ``target`` is ``"stdlib"``), then import
    ``test._test_multiprocessing`` (see the module doc)."""
    if target == "stdlib":
        return importlib.import_module("test._test_multiprocessing")
    if target != "mpmesh":
        raise ValueError(f"{TARGET_ENV} must be 'mpmesh' or 'stdlib', not {target!r}")
    context: Any = multiprocessing.context
    context.BaseContext.Pool = _mpmesh_pool
    context.BaseContext.Manager = _mpmesh_manager
    package: Any = multiprocessing
    package.Pool = context._default_context.Pool  # what `from multiprocessing import Pool` gets
    package.Manager = context._default_context.Manager
    managers: Any = multiprocessing.managers
    managers.SyncManager = mpmesh.managers.SyncManager
    with _swapped(multiprocessing.managers, BaseManager=mpmesh.managers.BaseManager,
                  BaseProxy=mpmesh.managers.BaseProxy):
        # A process that unpickled one of its functions before importing this module
        # (a pool worker, say) has it already: run it again with the swap in place.
        if "test._test_multiprocessing" in sys.modules:
            cpython_tests = importlib.reload(sys.modules["test._test_multiprocessing"])
        else:
            cpython_tests = importlib.import_module("test._test_multiprocessing")
    # The names the test classes captured at import must be mpmesh's.
    if not (cpython_tests.ProcessesMixin.Pool.__func__ is _mpmesh_pool
            and issubclass(cpython_tests.MyManager, mpmesh.managers.BaseManager)
            and cpython_tests.TestSyncManagerTypes.manager_class is mpmesh.managers.SyncManager):
        raise RuntimeError("the swap did not reach test._test_multiprocessing's classes")
    return cpython_tests


def install(namespace: dict[str, Any], start_method: str) -> None:
    """Build CPython's test classes into ``namespace`` (its ``setUpModule`` sets the
    start method) and mark the tests the harness cannot run."""
    _CPYTHON_TESTS.install_tests_in_module_dict(namespace, start_method)
    for test_id, reason in HARNESS_SKIPS.items():
        class_name, method_name = test_id.split(".")
        cls = namespace[class_name]
        setattr(cls, method_name, unittest.skip(f"harness: {reason}")(getattr(cls, method_name)))


_CPYTHON_TESTS = _import_cpython_tests(os.environ.get(TARGET_ENV, "mpmesh"))
install(globals(), os.environ.get(START_METHOD_ENV, "fork"))

# -- the worker: run the selected tests, report each as a JSON line ------------------------

ErrInfo = Union[tuple[type[BaseException], BaseException, TracebackType], tuple[None, None, None]]


def short_id(test: unittest.TestCase | Any) -> str:
    """``WithProcessesTestPool.test_map``: the test id without the module."""
    test_id: str = test.id()
    prefix = f"{__name__}."
    return test_id[len(prefix):] if test_id.startswith(prefix) else test_id.replace(f"({prefix}", "(")


class EventResult(unittest.TextTestResult):
    """Writes one JSON line per test event, at once: the driver reads them to tell which
    test was running when a worker hung or died."""

    events: TextIO
    _outcome_reported = False

    def _emit(self, **event: Any) -> None:
        self.events.write(json.dumps(event) + "\n")
        self.events.flush()

    def _report(self, test: unittest.TestCase, outcome: str, detail: str = "",
                summary: str = "") -> None:
        self._outcome_reported = True
        self._emit(event="result", id=short_id(test), outcome=outcome, summary=summary,
                   detail=detail, time=time.monotonic())

    def _error(self, test: unittest.TestCase, outcome: str, err: ErrInfo) -> None:
        exc_type, value, tb = err
        if exc_type is None or value is None:
            self._report(test, outcome, "", "(no exception)")
            return
        message = str(value).strip().splitlines()
        summary = f"{exc_type.__qualname__}: {message[0]}" if message else exc_type.__qualname__
        self._report(test, outcome, "".join(traceback.format_exception(exc_type, value, tb)), summary)

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        self._emit(event="start", id=short_id(test), time=time.monotonic())
        self._outcome_reported = False
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().stopTest(test)
        if not self._outcome_reported:  # unittest reported nothing: never a pass
            self._report(test, "error", "", "the test ended without an outcome")

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().addSuccess(test)
        self._report(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: ErrInfo) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._error(test, "failed", err)

    def addError(self, test: unittest.TestCase, err: ErrInfo) -> None:  # noqa: N802
        super().addError(test, err)  # also a class or module fixture (an _ErrorHolder)
        self._error(test, "error", err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        super().addSkip(test, reason)
        self._report(test, "skipped", reason, reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: ErrInfo) -> None:  # noqa: N802
        super().addExpectedFailure(test, err)
        self._report(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().addUnexpectedSuccess(test)
        self._report(test, "failed", "", "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase,  # noqa: N802
                   err: ErrInfo | None) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None and err[0] is not None:  # reported as the test's own outcome
            failed = issubclass(err[0], test.failureException)
            self._error(test, "failed" if failed else "error", err)


def _iter_tests(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _iter_tests(item)
        else:
            yield item


def run(selectors: list[str], events_path: str, exclude: set[str]) -> None:
    """Run the tests ``selectors`` name (``Class`` or ``Class.test``), minus ``exclude``.

    SIGUSR1 makes faulthandler dump every thread's stack to stderr: the driver sends it to
    a worker that hangs, before killing it. (A watchdog thread here would make this
    process multi-threaded, and mpmesh then takes its slower paths, exec'ing where it
    would fork.)"""
    module = sys.modules[__name__]
    loader = unittest.TestLoader()
    tests = [test for name in selectors
             for test in _iter_tests(loader.loadTestsFromName(name, module))
             if short_id(test) not in exclude]
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with open(events_path, "a", encoding="utf-8") as events:
        EventResult.events = events
        events.write(json.dumps({"event": "plan", "ids": [short_id(t) for t in tests]}) + "\n")
        events.flush()
        # (typeshed types resultclass as generic over its stream; EventResult is not)
        runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2,
                                         resultclass=EventResult)  # type: ignore[arg-type]
        runner.run(unittest.TestSuite(tests))
        events.write(json.dumps({"event": "finished", "time": time.monotonic()}) + "\n")
        events.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("selectors", nargs="*", default=list(SELECTED),
                        help="Class or Class.test_name (default: every selected test)")
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    parser.add_argument("--events", default=os.devnull, help="file to append JSON-line events to")
    parser.add_argument("--exclude", action="append", default=[], help="a test id not to run")
    args = parser.parse_args(argv)
    os.environ[START_METHOD_ENV] = args.start_method
    install(globals(), args.start_method)  # setUpModule now sets this start method
    run(args.selectors, args.events, set(args.exclude))
