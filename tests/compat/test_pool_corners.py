"""Pool corners where ``mpmesh.Pool`` behaves as ``multiprocessing.Pool`` does.

Each parity test runs against both (``impl``, ``make_pool``: ``conftest.py``), with pools
started by fork and by spawn (``pool_method``, overridden here):

- an argument or a function that cannot be pickled fails its call at once, with the
  very exception pickling raised, where the stdlib raises it (``apply``, ``map`` and
  ``starmap`` raise it; the ``_async`` variants from ``get()`` and to ``error_callback``;
  ``imap*`` at its item), and the pool goes on;
- a failed task's ``__cause__`` is a ``multiprocessing.pool.RemoteTraceback``;
- a running pool collected without ``close()``/``terminate()`` warns and stops its workers;
- ``pool._pool`` lists the current workers (``pid``, ``exitcode``, ``is_alive()``, ``name``);
- a result that cannot be pickled fails with ``MaybeEncodingError``; its worker lives on.

mpmesh-only tests (deliberate differences, ``m.Pool``) come last.
"""

from __future__ import annotations

import gc
import multiprocessing.pool
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mpmesh
from mpmesh._io._spare import discard_spare
from tests.conftest import descendants, wait_for
from tests.integration import pool_workers as W

from . import _pool_corner_workers as CW
from .conftest import FORK_WARNING, Impl

# Every call must return or raise within this many seconds (the stdlib's do at once).
WITHIN = 10.0


@pytest.fixture(params=[pytest.param("fork", marks=pytest.mark.filterwarnings(FORK_WARNING)), "spawn"])
def pool_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def outcome(call: Callable[[], object], label: str = "the call") -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` of ``call``, run on a thread so that a hang
    fails the test (after WITHIN seconds) instead of blocking it."""
    done: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            done.append((True, call()))
        except BaseException as exc:
            done.append((False, exc))

    thread = threading.Thread(target=run, name="pool-corner-call", daemon=True)
    thread.start()
    thread.join(WITHIN)
    assert done, f"{label} neither returned nor raised within {WITHIN:g} s: a hang"
    return done[0]


def raised_by(call: Callable[[], object], label: str = "the call") -> BaseException:
    returned, value = outcome(call, label)
    assert not returned, f"{label} returned {value!r} instead of raising"
    return value  # type: ignore[no-any-return]


def via_get(start: Callable[[Callable[[BaseException], object]], Any]) -> Callable[[], object]:
    """A call that starts an async job (``start(error_callback)``, which must not raise) and
    waits for it: it raises what ``get()`` raises, once checked that the error callback
    received that very exception, as the stdlib's does."""
    def call() -> object:
        errors: list[BaseException] = []
        try:
            result = start(errors.append)
        except BaseException as exc:
            raise AssertionError(f"raised at once, not from get(): {exc!r}") from exc
        try:
            return result.get()
        except BaseException as exc:
            assert len(errors) == 1 and errors[0] is exc, f"error_callback got {errors!r}, get() raised {exc!r}"
            raise
    return call


def via_next(start: Callable[[], Iterator[Any]]) -> Callable[[], object]:
    """A call that starts an ``imap`` (which must not raise) and takes its first item."""
    def call() -> object:
        try:
            it = start()
        except BaseException as exc:
            raise AssertionError(f"raised at once, not from next(): {exc!r}") from exc
        return next(it)
    return call


# -- an argument or a function that cannot be pickled ---------------------------------------------

BAD_ARGUMENTS = {  # how to make one, what pickling it raises
    "reduce-raises": (CW.RefusesPickling, RuntimeError, "this object refuses to be pickled"),
    "lock": (threading.Lock, TypeError, "cannot pickle '_thread.lock' object"),  # dill would make a new one
}


def entry_points(pool: Any, bad: object) -> Iterator[tuple[str, Callable[[], object]]]:
    """Every way to hand ``bad`` to ``pool``: ``(label, call)``, where ``call()`` does what
    raises the pickling error in the stdlib (the call itself, ``get()``, or ``next()``)."""
    yield "apply", lambda: pool.apply(W.square, (bad,))
    yield "apply(kwds)", lambda: pool.apply(W.power, (2,), {"exp": bad})
    yield "apply_async", via_get(lambda cb: pool.apply_async(W.square, (bad,), error_callback=cb))
    items, pairs = [bad] * 10, [(bad, 1)] * 10
    for chunksize in (1, 3, None):
        cs = {} if chunksize is None else {"chunksize": chunksize}
        yield f"map {cs}", lambda: pool.map(W.square, items, **cs)
        yield f"starmap {cs}", lambda: pool.starmap(W.add, pairs, **cs)
        yield f"map_async {cs}", via_get(lambda cb: pool.map_async(W.square, items, error_callback=cb, **cs))
        yield f"starmap_async {cs}", via_get(lambda cb: pool.starmap_async(W.add, pairs, error_callback=cb, **cs))
        yield f"imap {cs}", via_next(lambda: pool.imap(W.square, items, **cs))
        yield f"imap_unordered {cs}", via_next(lambda: pool.imap_unordered(W.square, items, **cs))


def test_no_call_hangs_on_an_argument_that_cannot_be_pickled(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(2)
    for label, call in entry_points(pool, CW.RefusesPickling()):
        outcome(call, label)
    assert pool.map(W.square, range(10)) == [x * x for x in range(10)]


@pytest.mark.parametrize("what", list(BAD_ARGUMENTS))
def test_an_argument_that_cannot_be_pickled_fails_as_itself(make_pool: Callable[..., Any], what: str) -> None:
    make_bad, error, message = BAD_ARGUMENTS[what]
    pool = make_pool(2)
    for label, call in entry_points(pool, make_bad()):
        exc = raised_by(call, label)
        assert type(exc) is error and str(exc) == message, (label, exc)
    assert pool.map(W.square, range(10)) == [x * x for x in range(10)]


def test_only_the_items_that_cannot_be_pickled_fail(make_pool: Callable[..., Any]) -> None:
    bad = CW.RefusesPickling()
    pool = make_pool(2)
    exc = raised_by(lambda: pool.map(W.identity, [1, 2, bad, 4] * 3, chunksize=2))
    assert type(exc) is RuntimeError, exc
    it = pool.imap(W.identity, [1, bad, 3])
    assert outcome(it.next) == (True, 1)
    assert type(raised_by(it.next)) is RuntimeError
    assert outcome(it.next) == (True, 3)
    assert type(raised_by(it.next)) is StopIteration


def test_a_function_that_cannot_be_pickled_fails_as_itself(make_pool: Callable[..., Any]) -> None:
    fn = CW.RefusingFunction()
    pool = make_pool(2)
    calls = {
        "apply": lambda: pool.apply(fn, (1,)),
        "map": lambda: pool.map(fn, range(10)),
        "map chunksize=1": lambda: pool.map(fn, range(10), chunksize=1),
        "map_async": via_get(lambda cb: pool.map_async(fn, range(10), error_callback=cb)),
        "imap_unordered": via_next(lambda: pool.imap_unordered(fn, range(3))),
    }
    for label, call in calls.items():
        exc = raised_by(call, label)
        assert type(exc) is RuntimeError and str(exc) == "this object refuses to be pickled", (label, exc)
    assert pool.map(W.square, range(3)) == [0, 1, 4]


# -- a failed task's cause --------------------------------------------------------------------------


def test_a_failed_task_has_the_workers_traceback_as_cause(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(2)
    calls: dict[str, Callable[[], object]] = {
        "apply": lambda: pool.apply(W.fail_on, (3,)),
        "map": lambda: pool.map(W.fail_on, range(6), chunksize=2),
        "imap": lambda: list(pool.imap(W.fail_on, range(6))),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="bad value 3") as info:
            call()
        cause = info.value.__cause__
        assert type(cause) is multiprocessing.pool.RemoteTraceback, (name, cause)  # CPython's test_traceback
        text = str(cause)
        assert text == cause.tb
        assert "Traceback (most recent call last)" in text and "in fail_on" in text
        assert text.rstrip('"\n').endswith("ValueError: bad value 3")  # the stdlib's is in """ quotes


# -- a pool collected while it runs ---------------------------------------------------------------


def all_gone(pids: set[int]) -> bool:
    discard_spare()  # a standalone mpmesh pool's zygote, parked for the next pool: not a leak
    return not pids & descendants()


def test_a_running_pool_collected_unclosed_warns_and_stops_its_workers(impl: Impl, pool_method: str) -> None:
    before = descendants()
    pool = impl.Pool(2, method=pool_method)
    assert pool.map(W.square, range(4)) == [0, 1, 4, 9]
    pids = descendants() - before  # its workers (and mpmesh's zygote)
    assert len(pids) >= 2
    gc.collect()  # whatever else is garbage goes first: only this pool is watched
    with pytest.warns(ResourceWarning, match=r"^unclosed running multiprocessing pool <.* state=RUN pool_size=2>$"):
        del pool
        gc.collect()
    assert wait_for(lambda: all_gone(pids), WITHIN), "its processes outlived the pool"


def test_a_closed_pool_collected_stops_its_workers_without_a_warning(impl: Impl, pool_method: str) -> None:
    before = descendants()
    pool = impl.Pool(2, method=pool_method)
    assert pool.map(W.square, range(4)) == [0, 1, 4, 9]
    pids = descendants() - before
    pool.close()
    gc.collect()  # whatever else is garbage goes first: only this pool is watched
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        del pool
        gc.collect()
    assert [w.message for w in seen if issubclass(w.category, ResourceWarning)] == []
    assert wait_for(lambda: all_gone(pids), WITHIN), "its processes outlived the pool"


# -- pool._pool ---------------------------------------------------------------------------------------


def replaced(pool: Any, old: list[Any]) -> bool:
    """``pool._pool`` lists as many live workers as it started with, none of them in ``old``."""
    now = pool._pool
    return (len(now) == len(old) and all(p.is_alive() for p in now)
            and not {p.pid for p in now} & {p.pid for p in old})


def test_underscore_pool_lists_the_current_workers(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(2, maxtasksperchild=1)
    first = list(pool._pool)
    assert len(first) == 2
    for p in first:
        assert isinstance(p.pid, int) and p.pid > 0 and isinstance(p.name, str)
        assert p.is_alive() and p.exitcode is None
    ran = pool.map(W.getpid, range(6), chunksize=1)
    assert {p.pid for p in first} <= set(ran) and len(set(ran)) == 6
    assert wait_for(lambda: replaced(pool, first), WITHIN), pool._pool
    assert wait_for(lambda: all(not p.is_alive() and p.exitcode == 0 for p in first), WITHIN)
    pool._repopulate_pool()  # what such code calls to refill; replacements are already there
    assert wait_for(lambda: len(pool._pool) == 2 and all(p.is_alive() for p in pool._pool), WITHIN)


# -- a result that cannot be pickled ------------------------------------------------------------------


def test_a_result_that_cannot_be_pickled_fails_and_the_worker_lives_on(make_pool: Callable[..., Any]) -> None:
    pool = make_pool(2)
    assert pool.map(W.square, range(4)) == [0, 1, 4, 9]
    processes = descendants()  # the workers, which must all live on
    errors: list[BaseException] = []
    result = pool.apply_async(CW.return_lock, error_callback=errors.append)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
        result.get(WITHIN)
    assert errors == [info.value]
    assert info.value.exc == '''TypeError("cannot pickle '_thread.lock' object")'''
    assert info.value.value.startswith("<unlocked _thread.lock object")
    assert str(info.value) == f"Error sending result: '{info.value.value}'. Reason: '{info.value.exc}'"
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="Error sending result: '\\[<unlocked"):
        pool.map(CW.return_lock, range(4), chunksize=2)
    assert pool.apply(W.square, (5,)) == 25
    assert pool.map(W.square, range(8), chunksize=1) == [x * x for x in range(8)]
    assert descendants() == processes


# -- mpmesh only -------------------------------------------------------------------------------------


@pytest.fixture
def mesh_pool() -> Iterator[mpmesh.Pool]:
    with mpmesh.Pool(2) as pool:
        yield pool


def test_a_socket_result_fails_with_maybe_encoding_error(mesh_pool: mpmesh.Pool) -> None:
    # The stdlib hands a socket over (its pickler dups the descriptor through a resource
    # sharer thread); mpmesh fails it as it fails any result pickle refuses.
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="cannot pickle 'socket' object"):
        mesh_pool.apply(CW.return_socket)
    assert mesh_pool.apply(W.square, (3,)) == 9


def test_a_lambda_result_comes_back(mesh_pool: mpmesh.Pool) -> None:
    # The stdlib fails it (MaybeEncodingError); mpmesh sends it with dill, as it sends lambdas.
    assert mesh_pool.apply(CW.return_lambda)(1) == 2


def test_a_pool_on_a_master_has_the_same_corners() -> None:
    with mpmesh.Master() as m:
        pool = m.Pool(2, maxtasksperchild=1)
        first = pool._pool
        assert sorted(p.name for p in first) == sorted(m.children())
        for label, call in entry_points(pool, CW.RefusesPickling()):
            exc = raised_by(call, label)
            assert type(exc) is RuntimeError, (label, exc)
        del exc, call  # a traceback holds the pool
        with pytest.raises(ValueError) as info:
            pool.apply(W.fail_on, (3,))
        assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback
        del info  # its traceback holds the pool
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            pool.apply(CW.return_lock)
        assert len(set(pool.map(W.getpid, range(4), chunksize=1))) == 4
        assert wait_for(lambda p=pool: replaced(p, first), WITHIN), pool._pool
        with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
            del pool
            gc.collect()
        assert wait_for(lambda: m.children() == [], WITHIN), m.children()
