"""Proxies passed to other processes: ``multiprocessing.Process`` with every start
method, ``multiprocessing.Pool``, and a ``multiprocessing.Queue`` in between."""

from __future__ import annotations

import multiprocessing
from typing import Any

from . import _workers

LONG = 60.0


def _run(ctx: Any, target: Any, *args: Any) -> None:
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(LONG)
    assert p.exitcode == 0


def test_counter_under_lock_from_two_processes(manager: Any, mp_context: Any) -> None:
    counter = manager.Value("i", 0)
    lock = manager.Lock()
    procs = [mp_context.Process(target=_workers.add_under_lock, args=(counter, lock, 25)) for _ in range(2)]
    for p in procs:
        p.start()
    _workers.add_under_lock(counter, lock, 25)
    for p in procs:
        p.join(LONG)
        assert p.exitcode == 0
    assert counter.value == 75


def test_dict_list_queue_in_a_child(manager: Any, mp_context: Any) -> None:
    d, lst, q = manager.dict(), manager.list(), manager.Queue()
    _run(mp_context, _workers.fill, d, lst, q, "abc")
    assert d.copy() == {"abc": 3} and lst[:] == ["abc"] and q.get(timeout=LONG) == "abc"


def test_event_set_while_a_child_waits(manager: Any, mp_context: Any) -> None:
    ev, q = manager.Event(), manager.Queue()
    p = mp_context.Process(target=_workers.wait_event_then_put, args=(ev, q))
    p.start()
    assert q.get(timeout=LONG) == "waiting"
    ev.set()
    assert q.get(timeout=LONG) is True
    p.join(LONG)
    assert p.exitcode == 0


def test_barrier_with_a_child(manager: Any, mp_context: Any) -> None:
    barrier, q = manager.Barrier(2), manager.Queue()
    p = mp_context.Process(target=_workers.barrier_wait, args=(barrier, q))
    p.start()
    mine = barrier.wait(LONG)
    theirs = q.get(timeout=LONG)
    p.join(LONG)
    assert sorted([mine, theirs]) == [0, 1]


def test_nested_proxy_in_a_child(manager: Any, mp_context: Any) -> None:
    outer = manager.list([manager.dict()])
    _run(mp_context, _workers.nested_write, outer)
    assert outer[0]["from_child"] is True


def test_proxies_through_a_pool(manager: Any) -> None:
    d = manager.dict()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_workers.square_into, [(d, i) for i in range(6)]) == [0, 1, 4, 9, 16, 25]
        pool.close()
        pool.join()
    assert d.copy() == {i: i * i for i in range(6)}


def test_proxy_through_a_multiprocessing_queue(manager: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    d = manager.dict()
    channel = ctx.Queue()
    try:
        p = ctx.Process(target=_workers.fill, args=(d, manager.list(), manager.Queue(), "via"))
        p.start()
        p.join(LONG)
        channel.put(d)
        again = channel.get(timeout=LONG)
        assert again["via"] == 3
    finally:
        channel.close()
        channel.join_thread()
