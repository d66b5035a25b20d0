"""User code in Manager objects (``__setstate__``, ``__hash__``, ``__eq__``, ``__lt__``,
``__reduce__``) runs off the broker's loop: a slow one stalls only its own object, while
other processes' calls on other objects, mesh caches and locks go on; calls on the same
object wait for it, in order; a raising ``__setstate__`` fails only its own call."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from tests.conftest import wait_for
from tests.integration import offloop_workers as w

WAIT_S = 30.0
QUICK_S = 0.5  # 150 round trips and 50 lock hand-offs take milliseconds; the slow call w.SLOW_S


def _target(kind: str, m: Any, marker: str) -> Any:
    if kind == "eq":
        return m.list([w.SlowEq(marker)])
    if kind == "lt":
        return m.list([w.SlowLt(marker, n=1), w.SlowLt(marker, n=0)])
    if kind == "reduce":
        d = m.dict()
        d["x"] = w.SlowReduce(marker)
        return d
    if kind == "queue":
        return m.Queue()
    return m.dict()


def _run_both(ctx: Any, kind: str, target: Any, marker: str, d: Any, cache: Any, lock: Any) -> dict[str, Any]:
    """Connect the quick process; start the slow operation; once the broker is inside
    it, let the quick process go."""
    out, go = ctx.Queue(), ctx.Event()
    quick = ctx.Process(target=w.quick_ops, args=(d, cache, lock, go, out))
    slow = ctx.Process(target=w.slow_op, args=(kind, target, marker, out))
    try:
        quick.start()
        assert out.get(timeout=WAIT_S) == ("ready", None)
        slow.start()
        assert wait_for(lambda: os.path.exists(marker), timeout=WAIT_S)
        go.set()
        results = dict(out.get(timeout=WAIT_S) for _ in range(2))
        for p in (slow, quick):
            p.join(WAIT_S)
            assert p.exitcode == 0
    finally:
        for p in (slow, quick):
            if p.is_alive():
                p.kill()
                p.join()
        out.close()
        out.join_thread()
    return results


EXPECTED = {"setstate": "stored", "hash": "stored", "eq": True, "lt": [0, 1], "reduce": "SlowReduce",
            "queue": "put"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["setstate", "hash", "eq", "lt", "reduce", "queue"])
def test_slow_user_code_stalls_no_other_object(kind: str, tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    marker = str(tmp_path / "inside")
    with mpmesh.Master() as m:
        target = _target(kind, m, marker)
        d, cache, lock = m.dict(), m.cache("quick"), m.Lock()
        results = _run_both(ctx, kind, target, marker, d, cache, lock)
        assert results["slow"] == EXPECTED[kind]
        assert results["quick"] < QUICK_S, f"quick calls took {results['quick']:.2f}s behind a slow {kind}"
        assert cache["k49"] == 49 and d["k49"] == 49
        if kind == "queue":
            assert type(target.get(timeout=WAIT_S)).__name__ == "SlowState"


@pytest.mark.timeout(60)
def test_a_managers_own_broker_process_keeps_serving_too(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    marker = str(tmp_path / "inside")
    with mpmesh.Manager() as m:
        target, d, lock = m.dict(), m.dict(), m.Lock()
        results = _run_both(ctx, "setstate", target, marker, d, None, lock)
        assert results["slow"] == "stored" and results["quick"] < QUICK_S
        assert type(target["x"]).__name__ == "SlowState" and d["k49"] == 49


@pytest.mark.timeout(60)
def test_a_read_behind_a_slow_write_of_the_same_object_sees_it(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    marker = str(tmp_path / "inside")
    with mpmesh.Master() as m:
        d = m.dict(x=0)
        out = ctx.Queue()
        writer = ctx.Process(target=w.slow_op, args=("setstate", d, marker, out))
        writer.start()
        assert wait_for(lambda: os.path.exists(marker), timeout=WAIT_S)
        reader = ctx.Process(target=w.read_key, args=(d, "x", out))  # sent while the write runs
        reader.start()
        got = [out.get(timeout=WAIT_S) for _ in range(2)]
        for p in (writer, reader):
            p.join(WAIT_S)
            assert p.exitcode == 0
        out.close()
        out.join_thread()
    assert ("read", "SlowState") in got and ("slow", "stored") in got


@pytest.mark.timeout(60)
def test_a_raising_setstate_fails_its_own_call_and_the_broker_keeps_serving() -> None:
    for manager in (mpmesh.Master, mpmesh.Manager):
        with manager() as m:
            d, lst, q = m.dict(), m.list(), m.Queue()
            with pytest.raises(mpmesh.SerializationError, match="bad state for the broker"):
                d["x"] = w.BadState()
            with pytest.raises(mpmesh.SerializationError, match="bad state for the broker"):
                lst.append(w.BadState())
            with pytest.raises(mpmesh.SerializationError, match="bad state for the broker"):
                q.put(w.BadState())
            with pytest.raises(mpmesh.SerializationError, match="bad state for the broker"):
                m.dict({"x": w.BadState()})
            d["y"] = 1
            lst.append(2)
            q.put(3)
            assert dict(d) == {"y": 1} and list(lst) == [2] and q.get() == 3


@pytest.mark.timeout(60)
def test_objects_holding_user_values_behave_as_before() -> None:
    with mpmesh.Master() as m:
        marker = "/nonexistent/never-made"  # never armed here: nothing is slow
        d = m.dict({"a": 1})
        d["obj"] = w.Slow(marker)
        assert type(d["obj"]).__name__ == "Slow" and d["a"] == 1 and len(d) == 2
        assert sorted(d.keys()) == ["a", "obj"] and "obj" in d
        assert str(d) == "{'a': 1, 'obj': Slow()}"
        assert type(d.copy()["obj"]).__name__ == "Slow"
        assert sorted(iter(d)) == ["a", "obj"]
        with pytest.raises(KeyError):
            d["missing"]
        inner = m.dict(k="v")
        lst = m.list([w.Slow(marker), inner])
        assert lst[1]["k"] == "v" and len(lst) == 2
        lst.pop(0)
        assert lst[0]["k"] == "v"                   # a proxy inside, still live
        del d["obj"]
        assert d.copy() == {"a": 1}
        ns = m.Namespace(v=w.Slow(marker))
        assert type(ns.v).__name__ == "Slow"
        val = m.Value("O", w.Slow(marker))
        val.value = 5
        assert val.value == 5


_HOME = os.getpid()


class _Seconds(float):
    """A number whose conversion is user code: it must not run in the broker."""

    def __float__(self) -> float:
        if os.getpid() != _HOME:
            raise AssertionError("user code ran in the broker")
        return float.__float__(self)


@pytest.mark.timeout(60)
def test_a_user_number_passed_to_a_lock_or_queue_is_refused_not_run() -> None:
    with mpmesh.Manager() as manager:
        lock, q = manager.Lock(), manager.Queue()
        with pytest.raises(TypeError, match="built-in values"):
            lock.acquire(True, _Seconds(1.0))
        with pytest.raises(TypeError, match="built-in values"):
            q.get(True, _Seconds(0.1))
        q.put(_Seconds(2.0))                 # an item is stored as it came, and comes back
        assert type(q.get(timeout=5)) is _Seconds
        assert lock.acquire(timeout=1) and lock.release() is None
