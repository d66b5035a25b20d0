"""Corners of ``Manager()`` where mpmesh used to differ from the standard library:

- an argument pickling refuses, given to a manager's Pool: what pickling raised, at the call;
- proxies sent into the manager work there (a Pool callback, a Barrier action);
- a Lock held by a process that exits normally stays held (the parent may release it); only
  a holder that dies abnormally has it released, with a warning (mpmesh only: the standard
  library keeps it held forever, cpython#88304);
- iterating a dict, list or array proxy is live, not a snapshot.

Every parity test runs against both implementations (``impl``/``manager`` fixtures).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mpmesh

from ..conftest import wait_for
from . import _manager_corner_workers as W
from .conftest import FORK_WARNING, Impl

LONG = 30.0
QUICK = 10.0  # a call refused at once must not take longer than this


@pytest.fixture(params=["spawn", pytest.param("fork", marks=pytest.mark.filterwarnings(FORK_WARNING))])
def ctx(request: pytest.FixtureRequest) -> Any:
    import multiprocessing

    return multiprocessing.get_context(request.param)


@pytest.fixture(params=["process", "thread"])
def mesh_manager(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An mpmesh manager, its broker in a process of its own or on a thread of this one."""
    m = mpmesh.Manager(broker=request.param)
    try:
        yield m
    finally:
        gc.collect()
        m.shutdown()


def logs_here(proxy: Any) -> bool:
    """Whether the broker holding ``proxy``'s object runs in this process (its warnings
    reach caplog here): the proxy then calls it in-process."""
    from mpmesh._client._local import LocalClient

    return isinstance(proxy._client, LocalClient)


def broker_forgot(proxy: Any, pid: int) -> bool:
    """Whether the mpmesh broker holding ``proxy``'s object has acted on process ``pid``'s
    connection closing (the standard library's manager has nothing to wait for: True)."""
    if not isinstance(proxy, mpmesh.managers.BaseProxy):
        return True
    client = proxy._client
    _, nodes = client.wait(client.op("admin", "nodes"), time.monotonic() + LONG)
    return all(node[3] != pid for node in nodes)


@contextlib.contextmanager
def started(ctx: Any, target: Callable[..., object], *args: object) -> Iterator[Any]:
    """A started process, killed (if still alive) and closed when the block ends."""
    proc = ctx.Process(target=target, args=args)
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(LONG)
        proc.close()


# -- 1. an argument that cannot be pickled, given to a manager's Pool -------------------------

POOL_CALLS: list[tuple[str, Callable[[Any, Any], object]]] = [
    ("apply", lambda pool, u: pool.apply(W.identity, (u,))),
    ("apply_async", lambda pool, u: pool.apply_async(W.identity, (u,))),
    ("map", lambda pool, u: pool.map(W.identity, [1, u])),
    ("map chunksize=1", lambda pool, u: pool.map(W.identity, [1, u], 1)),
    ("map_async", lambda pool, u: pool.map_async(W.identity, [1, u])),
    ("map_async chunksize=1", lambda pool, u: pool.map_async(W.identity, [1, u], 1)),
    ("imap", lambda pool, u: pool.imap(W.identity, [1, u])),
    ("imap chunksize=1", lambda pool, u: pool.imap(W.identity, [1, u], 1)),
    ("imap_unordered", lambda pool, u: pool.imap_unordered(W.identity, [1, u])),
    ("imap_unordered chunksize=1", lambda pool, u: pool.imap_unordered(W.identity, [1, u], 1)),
    ("starmap", lambda pool, u: pool.starmap(W.first, [(1, u)])),
    ("starmap chunksize=1", lambda pool, u: pool.starmap(W.first, [(1, u)], 1)),
    ("starmap_async", lambda pool, u: pool.starmap_async(W.first, [(1, u)])),
    ("starmap_async chunksize=1", lambda pool, u: pool.starmap_async(W.first, [(1, u)], 1)),
]


def assert_refused_at_once(name: str, call: Callable[[], object]) -> None:
    """``call`` raises what pickling ``W.Unpicklable`` raised, as itself, within ``QUICK``."""
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        call()
    assert time.monotonic() - start < QUICK, name
    assert type(info.value) is RuntimeError and str(info.value) == W.REFUSAL, name


def test_pool_argument_that_cannot_be_pickled(manager: Any) -> None:
    """The standard library's proxy pickles the call as it sends it: every method raises
    what pickling raised, as itself, at the call, and the pool carries on."""
    pool = manager.Pool(2)
    try:
        for name, call in POOL_CALLS:
            assert_refused_at_once(name, lambda: call(pool, W.Unpicklable()))
            assert pool.map(W.square, range(4)) == [0, 1, 4, 9], name
    finally:
        pool.terminate()


# -- 2. proxies sent into the manager ---------------------------------------------------------

def test_pool_callback_is_a_method_of_a_proxy(manager: Any) -> None:
    lst = manager.list()
    pool = manager.Pool(1)
    try:
        assert pool.map_async(int, ["1"], callback=lst.append).get(LONG) == [1]
        assert wait_for(lambda: len(lst) == 1, LONG)
        assert lst[:] == [[1]]  # map_async's callback gets the whole result list
        assert pool.apply_async(int, ("2",), callback=lst.append).get(LONG) == 2
        assert wait_for(lambda: len(lst) == 2, LONG)
        assert lst[:] == [[1], 2]
    finally:
        pool.terminate()


def test_barrier_action_holding_a_proxy(manager: Any) -> None:
    lst = manager.list()
    barrier = manager.Barrier(3, action=W.AppendTrue(lst))
    results: list[object] = []

    def party() -> None:
        try:
            results.append(barrier.wait(LONG))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results.append(exc)

    threads = [threading.Thread(target=party) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
        assert not t.is_alive()
    assert sorted(results) == [0, 1, 2]  # type: ignore[type-var]
    assert lst[:] == [True]
    assert barrier.broken is False


@pytest.mark.parametrize("broker", ["process", "thread"])
def test_proxies_in_a_tcp_managers_process_use_its_authkey(broker: str) -> None:
    """mpmesh only: a manager at a TCP address with a key of its own; a proxy rebuilt in
    its process (here inside a Barrier's action) reaches it. The standard library's server
    rebuilds it with its own process's authkey, and the action fails to connect."""
    m = mpmesh.managers.SyncManager(address=("127.0.0.1", 0), authkey=b"corners", broker=broker)
    m.start()
    try:
        lst = m.list()
        barrier = m.Barrier(1, action=W.AppendTrue(lst))
        assert barrier.wait(LONG) == 0
        assert lst[:] == [True]
        del lst, barrier
    finally:
        gc.collect()
        m.shutdown()
        m.join()


# -- 3. who may release a Manager lock its holder left behind ----------------------------------

@pytest.mark.parametrize("kind", ["Lock", "Semaphore"])
def test_lock_of_a_worker_that_exited_normally_stays_held(manager: Any, ctx: Any, kind: str) -> None:
    """The holder returned normally: the lock stays held and the parent's release is a
    legitimate hand-off, as in the standard library."""
    lock, q = getattr(manager, kind)(), manager.Queue()
    with started(ctx, W.acquire_and_end, lock, q, "return") as proc:
        assert q.get(timeout=LONG) == "held"
        proc.join(LONG)
        assert proc.exitcode == 0
        assert wait_for(lambda: broker_forgot(lock, proc.pid), LONG)
    assert lock.acquire(False) is False
    lock.release()  # mpmesh used to raise "release unlocked lock" here
    assert lock.acquire(False) is True
    lock.release()


@pytest.fixture
def warnings_seen(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The messages of the lock-release warnings logged so far."""
    caplog.set_level(logging.WARNING, logger="mpmesh")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("mpmesh")
                    and r.levelno == logging.WARNING and "while holding Manager" in r.getMessage()]


def released(warnings_seen: Callable[[], list[str]], pid: int, kind: str = "Lock") -> bool:
    """Whether a warning said the ``kind`` held by process ``pid`` was released."""
    return any(f"(pid {pid})" in text and f"Manager {kind} " in text for text in warnings_seen())


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Semaphore"])
def test_lock_of_a_killed_holder_is_released_with_a_warning(
        mesh_manager: Any, ctx: Any, kind: str, warnings_seen: Callable[[], list[str]]) -> None:
    """mpmesh only: the standard library's manager keeps it held forever."""
    lock, q, never = getattr(mesh_manager, kind)(), mesh_manager.Queue(), mesh_manager.Event()
    with started(ctx, W.acquire_and_wait, lock, q, never) as proc:
        assert q.get(timeout=LONG) == "held"
        assert lock.acquire(False) is False
        pid = proc.pid
        os.kill(pid, signal.SIGKILL)
        proc.join(LONG)
        assert proc.exitcode == -signal.SIGKILL
    assert lock.acquire(timeout=LONG) is True
    lock.release()
    assert not logs_here(lock) or wait_for(lambda: released(warnings_seen, pid, kind), LONG)


@pytest.mark.parametrize("how", ["exit3", "raise"])
def test_lock_of_a_holder_that_failed_is_released_with_a_warning(
        mesh_manager: Any, ctx: Any, how: str, warnings_seen: Callable[[], list[str]]) -> None:
    """mpmesh only: sys.exit(3) or an exception out of run() is an abnormal end."""
    lock, q = mesh_manager.Lock(), mesh_manager.Queue()
    with started(ctx, W.acquire_and_end, lock, q, how) as proc:
        assert q.get(timeout=LONG) == "held"
        proc.join(LONG)
        pid = proc.pid
        assert proc.exitcode == (3 if how == "exit3" else 1)
    assert lock.acquire(timeout=LONG) is True
    lock.release()
    assert not logs_here(lock) or wait_for(lambda: released(warnings_seen, pid), LONG)


def test_a_clean_exit_logs_no_warning(mesh_manager: Any, warnings_seen: Callable[[], list[str]]) -> None:
    import multiprocessing

    lock, q = mesh_manager.Lock(), mesh_manager.Queue()
    with started(multiprocessing.get_context("spawn"), W.acquire_and_end, lock, q, "return") as proc:
        assert q.get(timeout=LONG) == "held"
        proc.join(LONG)
        assert proc.exitcode == 0
        assert wait_for(lambda: broker_forgot(lock, proc.pid), LONG)
    assert warnings_seen() == []
    lock.release()


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
@pytest.mark.parametrize("how", ["return", "exit3"])
def test_lock_of_a_masters_child(start_method: str, how: str, warnings_seen: Callable[[], list[str]]) -> None:
    """mpmesh only: a Master's child says Goodbye only if its target ended cleanly."""
    with mpmesh.Master(start_method=start_method) as m:
        lock, q = m.Lock(), m.Queue()
        m.spawn_child("holder", W.child_acquire_and_end, args=(lock, q, how), auto_restart=False)
        pid = q.get(timeout=LONG)
        assert wait_for(lambda: not m.is_alive("holder") and broker_forgot(lock, pid), LONG)
        if how == "return":
            assert lock.acquire(False) is False and warnings_seen() == []
            lock.release()
        else:
            assert lock.acquire(timeout=LONG) is True
            lock.release()
            assert not logs_here(lock) or wait_for(lambda: released(warnings_seen, pid), LONG)


# -- 4. iteration is live ----------------------------------------------------------------------

def test_dict_iteration_is_live(manager: Any) -> None:
    d = manager.dict(a=1, b=2)
    it = iter(d)
    d.clear()
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        next(it)
    d.update(a=1, b=2)
    it = iter(d)
    assert next(it) == "a"
    d["c"] = 3
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        next(it)
    assert list(d) == ["a", "b", "c"]
    assert [k for k in d] == ["a", "b", "c"]
    it = iter(d)
    assert iter(it) is it
    assert list(it) == ["a", "b", "c"] and list(it) == []
    assert type(d.keys()) is list and type(d.values()) is list and type(d.items()) is list


def test_list_and_array_iteration_is_live(manager: Any) -> None:
    lst = manager.list([1, 2, 3])
    it = iter(lst)
    lst[0] = 100
    assert next(it) == 100
    lst.append(4)
    assert list(it) == [2, 3, 4]
    assert list(lst) == [100, 2, 3, 4]
    arr = manager.Array("i", [1, 2, 3])
    it = iter(arr)
    arr[0] = 9
    assert next(it) == 9
    assert list(it) == [2, 3]


def test_iterators_are_freed(manager: Any, impl: Impl) -> None:
    d = manager.dict(a=1)
    base = manager._number_of_objects()
    for _ in range(3):
        assert list(d) == ["a"]
    it = iter(d)
    # The standard library's iterator is an object in the manager; mpmesh's iterates the
    # keys this process read (its near copy) and leaves nothing there to free.
    assert manager._number_of_objects() == base + (0 if impl.is_mpmesh else 1)
    del it
    gc.collect()
    assert wait_for(lambda: manager._number_of_objects() == base, LONG)


def test_a_masters_dict_iterates_live() -> None:
    """mpmesh only: a Master has no registry; its dict's iterator is an AutoProxy."""
    with mpmesh.Master() as m:
        d = m.dict(a=1, b=2)
        it = iter(d)
        assert iter(it) is it and next(it) == "a"
        d["c"] = 3
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            next(it)
        assert list(d) == ["a", "b", "c"]


# Every other entry point that sends a user's value to the manager: the factories and the
# proxy methods that take one.
OBJECT_CALLS: list[tuple[str, Callable[[Any, Any], object]]] = [
    ("dict()", lambda m, u: m.dict({"k": u})),
    ("list()", lambda m, u: m.list([u])),
    ("Namespace()", lambda m, u: m.Namespace(a=u)),
    ("Barrier(action=)", lambda m, u: m.Barrier(2, action=u)),
    ("Condition(lock=)", lambda m, u: m.Condition(u)),
    ("d[k] = v", lambda m, u: m.dict().__setitem__("k", u)),
    ("d.update", lambda m, u: m.dict().update({"k": u})),
    ("d.setdefault", lambda m, u: m.dict().setdefault("k", u)),
    ("d.get(default)", lambda m, u: m.dict().get("k", u)),
    ("lst.append", lambda m, u: m.list().append(u)),
    ("lst.extend", lambda m, u: m.list().extend([u])),
    ("lst.insert", lambda m, u: m.list().insert(0, u)),
    ("lst[i] = v", lambda m, u: m.list([0]).__setitem__(0, u)),
    ("lst.count", lambda m, u: m.list().count(u)),
    ("ns.attr = v", lambda m, u: setattr(m.Namespace(), "a", u)),
    ("Queue.put", lambda m, u: m.Queue().put(u)),
    ("Queue.put_nowait", lambda m, u: m.Queue().put_nowait(u)),
]


def test_object_argument_that_cannot_be_pickled(manager: Any) -> None:
    """Each raises what pickling raised, at the call, quickly; the manager carries on."""
    for name, call in OBJECT_CALLS:
        assert_refused_at_once(name, lambda: call(manager, W.Unpicklable()))
        d = manager.dict(ok=1)
        assert d["ok"] == 1, name
