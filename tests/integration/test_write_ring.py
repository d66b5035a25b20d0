"""Writes without a round trip: plain writes to Manager objects that a process leaves in
the broker's write ring (``_broker/_ring``) are applied in order, before anything reads
them, and none is lost, whether its writer goes on, mixes them with sent calls, or is
killed right after."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest

import mpmesh
import mpmesh.managers
from mpmesh._client import _near
from mpmesh._io import _mutex
from tests.integration import near_workers
from tests.integration.near_workers import Point

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not _mutex.available(), reason="no process-shared robust mutex here (x86-64 Linux only)"),
]
WAIT_S = 30.0
fork = mp.get_context("fork")


def run(target: Any, *args: Any) -> Any:
    """Run ``target(*args, out)`` in a forked process; what it put on ``out``."""
    out = fork.Queue()
    p = fork.Process(target=target, args=(*args, out))
    p.start()
    try:
        return out.get(timeout=WAIT_S)
    finally:
        p.join(WAIT_S)
        assert p.exitcode == 0
        out.close()
        out.join_thread()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_plain_writes_of_every_kind_go_through_the_ring_and_everyone_sees_them(method: str) -> None:
    ctx = mp.get_context(method)
    with mpmesh.Manager() as m:
        d, ns, v, items = m.dict(), m.Namespace(), m.Value("d", 0.0), m.list()
        out = ctx.Queue()
        p = ctx.Process(target=near_workers.write_plainly, args=(d, ns, v, items, 300, out))
        p.start()
        left = out.get(timeout=WAIT_S)
        p.join(WAIT_S)
        assert p.exitcode == 0
        assert left == 4 * 300  # every one of them was left in the ring
        assert d.copy() == {f"k{i}": 290 + i for i in range(10)}
        assert ns.x == (299, "x") and v.value == 299.0
        assert items[:] == [[i] for i in range(300)]
        out.close()
        out.join_thread()


def test_writes_left_in_the_ring_and_sent_calls_keep_one_order() -> None:
    with mpmesh.Manager() as m:
        d, items = m.dict(), m.list()
        seen, left = run(near_workers.write_in_order, d, items)
        assert seen == list(range(200))
        assert left == 4 * 200
        assert d.copy() == {"a": -199, "b": 200}
        assert items[:] == [i for i in range(200) for _ in (0, 1)]


def test_the_creator_writes_through_the_ring_too_and_reads_its_own_writes() -> None:
    with mpmesh.Manager() as m:
        d = m.dict()
        before = _near.counters()["near_writes"]
        for i in range(100):
            d["k"] = i
            assert d["k"] == i and d.get("k") == i and len(d) == 1
        assert _near.counters()["near_writes"] - before == 100


def test_values_that_are_not_plain_are_sent_and_work_as_before() -> None:
    with mpmesh.Manager() as m:
        d, other = m.dict(), m.dict()
        before = _near.counters()["near_writes"]
        d["p"] = Point(1)              # the user's class
        d["nested"] = other            # a proxy
        d[frozenset({1})] = "no stable hash"
        d["deep"] = [[1]] * 1000       # more than the ring looks through
        assert _near.counters()["near_writes"] == before
        assert d["p"] == Point(1) and d[frozenset({1})] == "no stable hash"
        other["x"] = 1
        assert d["nested"]["x"] == 1
        # A dict that holds a user's value has its calls run off the broker's loop: writes
        # left in the ring still take their turn.
        for i in range(50):
            d["k"] = i
        assert d["k"] == 49 and d["p"] == Point(1)
        with pytest.raises(TypeError):
            d[[1]] = 1                  # unhashable: the broker says so, as before


def test_writes_left_by_a_process_killed_right_after_are_applied() -> None:
    with mpmesh.Manager() as m:
        d = m.dict()
        p = fork.Process(target=near_workers.write_then_die, args=(d, 500))
        p.start()
        p.join(WAIT_S)
        assert p.exitcode == -9
        assert d.copy() == {i: i for i in range(500)}
        d["after"] = 1  # the ring (its mutex included) still works for the others
        assert d["after"] == 1


def test_more_writes_than_the_ring_holds_lose_none() -> None:
    with mpmesh.Manager() as m:
        d = m.dict()
        n = 20_000  # ~4.6 MB of entries: several times the ring
        left = run(near_workers.write_many, d, n)
        assert 0 < left <= n
        assert len(d) == 1000
        assert d[999] == (n - 1, "x" * 200) and d[0] == (n - 1000, "x" * 200)


def test_no_ring_without_near_copies_or_over_tcp() -> None:
    with mpmesh.Manager(near_cache=False) as m:
        d = m.dict()
        before = _near.counters()["near_writes"]
        d["k"] = 1
        assert d["k"] == 1 and _near.counters()["near_writes"] == before
    with mpmesh.managers.SyncManager(address=("127.0.0.1", 0), authkey=b"tcp") as m:
        d = m.dict()
        d["k"] = 1
        assert d["k"] == 1 and _near.counters()["near_writes"] == before


# -- mesh caches ---------------------------------------------------------------------------------

def test_cache_sets_go_through_the_ring_and_are_read_back_from_the_writers_copy() -> None:
    with mpmesh.Master() as m:
        cache = m.cache("c")
        left, hits = run(near_workers.cache_writes, m.name, 200)
        assert left == 200 and hits >= 200  # every set left in the ring, every read-back a copy
        assert {k: cache[k] for k in cache.keys()} == {f"k{i}": 190 + i for i in range(10)}


def test_a_cache_set_left_in_the_ring_keeps_its_ttl_and_its_order_with_sent_calls() -> None:
    with mpmesh.Master() as m:
        cache = m.cache("t")
        before = _near.counters()["near_writes"]
        cache.set("soon", 1, ttl=0.3)
        cache["k"] = 1
        del cache["k"]               # sent: after the set
        assert "k" not in cache and cache.get("k") is None
        cache["k"] = 2
        assert cache.incr("k") == 3  # sent: after the set
        assert cache["k"] == 3
        assert _near.counters()["near_writes"] - before == 3
        assert cache["soon"] == 1
        deadline = time.monotonic() + 5
        while "soon" in cache and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "soon" not in cache and m.cache("t").get("soon") is None


def test_a_cache_set_the_broker_would_refuse_is_sent_and_refused() -> None:
    with mpmesh.Master() as m:
        small = m.cache("small", maxbytes=1000)
        before = _near.counters()["near_writes"]
        with pytest.raises(ValueError):
            small["big"] = "x" * 5000
        with pytest.raises(ValueError):
            small.set("k", 1, ttl=-1)
        with pytest.raises(TypeError):
            small[[1]] = 1
        assert _near.counters()["near_writes"] == before
        assert "big" not in small
