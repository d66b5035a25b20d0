"""mpmesh only: a Master's factories (``m.dict()``, ``m.Lock()``...) shared with its
children, through spawn arguments, request data and replies, with every start method."""

from __future__ import annotations


import mpmesh

from . import _workers


def test_master_objects_shared_with_children(start_method: str) -> None:
    with mpmesh.Master(start_method=start_method) as m:
        d, lock = m.dict(), m.Lock()
        m.spawn_group("w", _workers.mesh_counter, size=2, args=(d, lock))
        assert sorted(m.send_request("incr", f"w-{i}", 1, timeout=30) for i in range(2)) == [1, 2]
        assert d["n"] == 2
        lst = m.list()
        assert m.send_request("append", "w-0", (lst, "x"), timeout=30) == 1
        assert lst[:] == ["x"]
        back = m.send_request("make", "w-1", None, timeout=30)
        back["from_master"] = True
        assert d["from_master"] is True


def test_master_factories_are_typed_like_the_managers() -> None:
    with mpmesh.Master() as m:
        assert isinstance(m.dict(), mpmesh.managers.DictProxy)
        q = m.JoinableQueue()
        q.put(1)
        assert q.get() == 1
        q.task_done()
        q.join()
        cond = m.Condition(m.RLock())
        with cond:
            assert cond.wait(0) is False
        assert m.Barrier(1).wait() == 0
        assert m.Value("d", 1.5).value == 1.5 and list(m.Array("b", [1, 2])) == [1, 2]
        assert m.Namespace(x=1).x == 1 and m.Event().is_set() is False
        assert m.Semaphore(2).acquire() and m.BoundedSemaphore().acquire()
