"""Near copies of shared state (reads served from a process's own copy while the
broker's version table says it is current): linearizable per key, copies stay private,
changes are seen at once, TTL and LRU hold, and nothing outlives its processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from mpmesh._io import _loop
from tests.conftest import descendants, wait_for
from tests.integration import near_workers
from tests.integration.near_workers import ROUNDS

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0

Op = tuple[int, int, int]  # (start ns, end ns, value)


# -- the checker -----------------------------------------------------------------------------

def violations(writes: list[Op], reads: list[Op]) -> list[str]:
    """Linearizability of one key with one writer of increasing values: a read returns
    neither a value older than a write that completed before it began, nor one whose
    write began after it ended, nor one older than what a read that ended before it
    began returned."""
    found = []
    began = {value: start for start, _, value in writes}
    for start, end, value in reads:
        newest_done = max((v for _, w_end, v in writes if w_end < start), default=0)
        if value < newest_done:
            found.append(f"stale: read {value} in [{start}, {end}] after write {newest_done} completed")
        if value and began.get(value, end) > end:
            found.append(f"from the future: read {value} before its write began")
    ordered = sorted(reads)
    best_before = 0
    ends = sorted((end, value) for _, end, value in reads)
    j = 0
    for start, _, value in ordered:
        while j < len(ends) and ends[j][0] < start:
            best_before = max(best_before, ends[j][1])
            j += 1
        if value < best_before:
            found.append(f"new-old inversion: read {value} after a read of {best_before} had ended")
    return found


def test_the_checker_catches_a_stale_read_a_future_read_and_an_inversion() -> None:
    writes = [(10, 20, 1), (30, 40, 2)]
    assert violations(writes, [(5, 15, 0), (25, 28, 1), (45, 50, 2), (35, 38, 1)]) == []
    assert any("stale" in v for v in violations(writes, [(41, 50, 1)]))
    assert any("future" in v for v in violations(writes, [(21, 25, 2)]))
    assert any("inversion" in v for v in violations(writes, [(31, 33, 2), (34, 36, 1)]))


# -- histories ---------------------------------------------------------------------------------

def _shared(kind: str, manager: Any, master: Any) -> Any:
    if kind == "dict":
        obj = manager.dict()
        obj["k"] = 0
    elif kind == "list":
        obj = manager.list([0])
    elif kind == "value":
        obj = manager.Value("i", 0)
    else:
        obj = master.cache(f"c-{uuid.uuid4().hex[:6]}")
        obj["k"] = 0
    return obj


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["dict", "list", "value", "cache"])
def test_reads_are_linearizable_per_key(kind: str, method: str) -> None:
    ctx = mp.get_context(method)
    with mpmesh.Manager() as manager, mpmesh.Master() as master:
        obj = _shared(kind, manager, master)
        out = ctx.Queue()
        readers = [ctx.Process(target=near_workers.reader, args=(kind, obj, out)) for _ in range(2)]
        for p in readers:
            p.start()
        assert [out.get(timeout=WAIT_S)[0] for _ in readers] == ["ready", "ready"]
        writer = ctx.Process(target=near_workers.writer, args=(kind, obj, out))
        writer.start()
        results = [out.get(timeout=WAIT_S) for _ in range(3)]
        for p in [*readers, writer]:
            p.join(WAIT_S)
            assert p.exitcode == 0
        out.close()
        out.join_thread()
    writes = next(h for who, h, _ in results if who == "w")
    reads = [op for who, h, _ in results if who == "r" for op in h]
    assert len(writes) == ROUNDS and max(v for _, _, v in reads) == ROUNDS
    assert violations(writes, reads) == []
    assert sum(hits for who, _, hits in results if who == "r") > 0  # copies served some reads


# -- copies --------------------------------------------------------------------------------------

def test_a_value_read_and_mutated_does_not_change_the_next_read() -> None:
    with mpmesh.Manager() as manager, mpmesh.Master() as master:
        d = manager.dict(k=[1, {"x": 1}])
        lst = manager.list([[1], [2]])
        ns = manager.Namespace(v={"a": 1})
        cache = master.cache("c")
        cache["k"] = {"x": [1]}
        assert d._client.near is not None and cache._bound().near is not None
        for _ in range(2):
            got = d["k"]
            got[1]["x"] = 99
            got.append(3)
            lst[0].append(9)
            ns.v["a"] = 2
            cache["k"]["x"].append(2)
            d.get("k").clear()
            d.items()[0][1].clear()
        assert d["k"] == [1, {"x": 1}] and d.copy() == {"k": [1, {"x": 1}]}
        assert lst[0] == [1] and ns.v == {"a": 1} and cache["k"] == {"x": [1]}
        assert d._client.near.hits > 0


def test_a_write_from_another_process_is_seen_by_a_process_holding_a_copy() -> None:
    with mpmesh.Manager() as manager:
        d = manager.dict(k="old")
        ours, theirs = mp.Pipe()
        p = mp.Process(target=near_workers.hold_then_read, args=(d, theirs))
        p.start()
        assert ours.recv() == "old"
        d["k"] = "new"          # a write that completed...
        ours.send("go")          # ...before the reader's next read began
        assert ours.recv() == "new"
        p.join(WAIT_S)
        assert p.exitcode == 0


def test_reads_of_every_kind_follow_writes() -> None:
    with mpmesh.Manager() as manager:
        d = manager.dict(a=1)
        lst = manager.list([1, 2, 3])
        v = manager.Value("i", 1)
        arr = manager.Array("i", [1, 2])
        ns = manager.Namespace(x=1)
        for _ in range(2):  # the second pass is served from copies
            assert (d["a"], d.get("a"), "a" in d, "b" in d, len(d), d.keys(), d.values(), d.items(),
                    list(d)) == (1, 1, True, False, 1, ["a"], [1], [("a", 1)], ["a"])
            assert (lst[1], lst[1:], len(lst), 2 in lst, lst.index(3), lst.count(1), list(lst)) == (
                2, [2, 3], 3, True, 2, 1, [1, 2, 3])
            assert (v.value, v.get(), arr[1], len(arr), list(arr), ns.x) == (1, 1, 2, 2, [1, 2], 1)
            with pytest.raises(KeyError):
                d["missing"]
            with pytest.raises(AttributeError):
                ns.missing
        d["b"] = 2
        d.update(a=5)
        lst.append(4)
        v.value = 7
        arr[1] = 9
        ns.missing = "here"
        assert (d["a"], d["b"], len(d), sorted(d)) == (5, 2, 2, ["a", "b"])
        assert (lst[3], len(lst), list(lst)) == (4, 4, [1, 2, 3, 4])
        assert (v.value, arr[1], ns.missing) == (7, 9, "here")
        d.clear()
        assert len(d) == 0 and "a" not in d and d.get("a") is None


def test_iterating_a_dict_while_another_process_resizes_it_raises() -> None:
    with mpmesh.Manager() as manager:
        d = manager.dict({0: 0, 1: 0, 2: 0})
        it = iter(d)
        assert next(it) == 0
        d[3] = 0
        with pytest.raises(RuntimeError, match="changed size"):
            next(it)
        assert sorted(d) == [0, 1, 2, 3]
        seen = []
        for key in d:
            seen.append(key)
            d[key] = 1  # changing values while iterating is allowed, as for a dict
        assert seen == [0, 1, 2, 3]


# -- the mesh cache: TTL and LRU -------------------------------------------------------------

def test_a_copy_lapses_with_its_entrys_ttl() -> None:
    with mpmesh.Master() as master:
        cache = master.cache("c")
        cache.set("t", "soon gone", ttl=0.3)
        assert cache["t"] == "soon gone" and cache["t"] == "soon gone"
        assert cache._bound().near.hits > 0  # type: ignore[union-attr]
        assert wait_for(lambda: cache.get("t") is None, timeout=5)
        assert "t" not in cache and cache.mget(["t"]) == [None]


def test_lru_eviction_counts_reads_served_from_copies() -> None:
    with mpmesh.Master() as master:
        cache = master.cache("lru", maxsize=2)
        cache["a"] = 1
        assert cache["a"] == 1     # the broker sees this read...
        cache["b"] = 2             # ...then this write: "a" is its least recently used
        near = cache._bound().near
        assert near is not None
        hits = near.hits
        assert cache["a"] == 1     # served here: the broker never sees it, yet it counts
        assert near.hits == hits + 1
        cache["c"] = 3
        assert sorted(cache.keys()) == ["a", "c"]


# -- brokers that go away --------------------------------------------------------------------

def test_copies_are_not_served_once_the_broker_is_gone() -> None:
    manager = mpmesh.Manager()
    try:
        d = manager.dict(k=1)
        assert d["k"] == 1
        near = d._client.near
        assert near is not None and near.trusted()
        os.kill(manager._process.pid, signal.SIGKILL)
        assert wait_for(lambda: not near.trusted(), timeout=_loop.LEASE_S * 8)
        with pytest.raises(mpmesh.BrokerUnavailable):
            d["k"]
    finally:
        manager.shutdown()


@pytest.mark.timeout(120)
def test_a_restarted_standalone_broker_leaves_no_copy_from_before() -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"

    def serve() -> subprocess.Popen[str]:
        server = subprocess.Popen([sys.executable, "-m", "mpmesh", "serve", "--name", name], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert server.stderr is not None and "listening" in server.stderr.readline()
        return server

    write = textwrap.dedent(f"""
        import mpmesh
        with mpmesh.connect({name!r}, autospawn=False) as h:
            h.cache("c")["k"] = "after"
    """)
    servers = [serve()]
    try:
        with mpmesh.connect(name, autospawn=False) as h:
            cache = h.cache("c")
            cache["k"] = "before"
            assert cache["k"] == "before" and cache["k"] == "before"
            servers[0].kill()
            servers[0].wait(WAIT_S)
            servers.append(serve())
            out = subprocess.run([sys.executable, "-c", write], cwd=ROOT, capture_output=True,
                                 text=True, timeout=WAIT_S)
            assert out.returncode == 0, out.stderr
            try:
                assert cache["k"] == "after"
            except mpmesh.BrokerUnavailable:
                pass  # our connection was to the broker that died: also not a stale copy
        with mpmesh.connect(name, autospawn=False) as h:
            assert h.cache("c")["k"] == "after"
    finally:
        subprocess.run([sys.executable, "-m", "mpmesh", "stop", "--name", name], cwd=ROOT,
                       capture_output=True, timeout=WAIT_S)
        for server in servers:
            if server.poll() is None:
                server.kill()
            server.wait(WAIT_S)
            if server.stderr is not None:
                server.stderr.close()


def _segments_mapped_by(pids: set[int]) -> int:
    count = 0
    for pid in pids:
        try:
            count += Path(f"/proc/{pid}/maps").read_text().count("mpmesh-versions")
        except OSError:
            pass
    return count


@pytest.mark.timeout(60)
def test_sigkill_of_the_master_leaves_no_segment_behind() -> None:
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    script = textwrap.dedent("""
        import sys, mpmesh
        from tests.integration.near_workers import hold_forever
        m = mpmesh.Master()
        m.cache("c")["k"] = 1
        m.spawn_child("holder", hold_forever)
        assert m.cache("c")["k"] == 1
        assert m.send_request("ready", "holder", None, timeout=20) == 1
        print("up", flush=True)
        sys.stdin.read()
    """)
    master = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert master.stdout is not None and master.stdout.readline().strip() == "up"
        tree = descendants(master.pid) | {master.pid}
        assert _segments_mapped_by(tree) >= 2  # the state broker's and at least one reader's
        master.kill()
        master.wait(WAIT_S)
        assert wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                                        Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                                        for p in tree), timeout=20)
        assert _segments_mapped_by(tree) == 0
        shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        assert not {n for n in shm_after - shm_before if "mpmesh" in n}
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
        if master.stdin is not None:
            master.stdin.close()
        if master.stdout is not None:
            master.stdout.close()


# -- switches and counters -----------------------------------------------------------------

def test_near_copies_can_be_switched_off_per_manager_master_and_cache() -> None:
    with mpmesh.Manager(near_cache=False) as manager, mpmesh.Master(near_cache=False) as master:
        d = manager.dict(k=1)
        assert d["k"] == 1 and d["k"] == 1 and d._client.near is None
        cache = master.cache("c")
        cache["k"] = 1
        assert cache["k"] == 1 and cache._bound().near is None
    with mpmesh.Master() as master:
        cache = master.cache("c", near=False)
        cache["k"] = 1
        near = cache._bound().near
        assert near is not None
        hits = near.hits
        assert cache["k"] == 1 and cache["k"] == 1 and near.hits == hits
        assert master.cache("c")["k"] == 1 and master.cache("c")["k"] == 1 and near.hits == hits + 1


def test_stats_count_this_processs_near_reads_and_the_budget_bounds_its_copies() -> None:
    from mpmesh._client import _near
    try:
        with mpmesh.Master(near_cache_bytes=4096) as master:
            cache = master.cache("c")
            before = master.stats()
            for i in range(20):
                cache.mset({f"k{i}": [i] * 100})   # ~300 bytes pickled; sent, so not kept here
                assert cache[f"k{i}"] == [i] * 100
                assert cache[f"k{i}"] == [i] * 100
            after = master.stats()
            assert after["near_hits"] - before["near_hits"] >= 20
            assert after["near_misses"] - before["near_misses"] >= 20
            assert 0 < after["near_bytes"] <= 4096
    finally:
        _near.set_budget(_near.MAX_TOTAL_BYTES)
