"""The version table, pure: which writes bump which slots (Manager objects and mesh
caches), stable key hashes, and a process's copies (``NearCache``) over a plain buffer."""

from __future__ import annotations

import mmap
import subprocess
import sys

import pytest

from .shared_fakes import Driver, answer, blob
from .test_objects import ADDRESS
from mpmesh._broker import _versions as v
from mpmesh._broker._cache import CacheStore
from mpmesh._broker._objects import ObjectTable
from mpmesh._client import _near
from mpmesh._client._near import NearCache
from mpmesh._wire import _codec
from mpmesh._wire._messages import Op

P = 1


def table() -> v.VersionTable:
    return v.VersionTable(bytearray(v.TABLE_BYTES))


def snapshot(t: v.VersionTable) -> list[int]:
    return list(t.words[v.VERSIONS:v.ACCESS])


def bumped(before: list[int], t: v.VersionTable) -> set[int]:
    return {i + v.VERSIONS for i, (a, b) in enumerate(zip(before, snapshot(t))) if a != b}


# -- keys ---------------------------------------------------------------------------------------

def test_equal_keys_hash_alike_and_others_have_no_stable_hash() -> None:
    assert v.stable_hash(1) == v.stable_hash(1.0) == v.stable_hash(True)
    assert v.stable_hash(("a", 1)) == v.stable_hash(("a", 1.0))
    assert v.stable_hash("a") != v.stable_hash(b"a")
    assert v.stable_hash(None) is None and v.stable_hash(frozenset()) is None
    assert v.stable_hash(("a", None)) is None


def test_str_hashes_are_the_same_in_every_process() -> None:
    code = "from mpmesh._broker._versions import stable_hash; print(stable_hash(('key', 'é', b'x', 2)))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "3")}
    assert outs == {str(v.stable_hash(("key", "é", b"x", 2)))}


# -- Manager objects ----------------------------------------------------------------------------

class Objects:
    def __init__(self) -> None:
        self.versions = table()
        self.table = ObjectTable(versions=self.versions)
        self.table.address = ADDRESS
        self.rid = 0

    def op(self, name: str, args: object) -> object:
        self.rid += 1
        actions = self.table.on_op(P, Op(self.rid, -1.0, "objects", name, _codec.dumps(args)), 1.0)
        return answer(actions, P, self.rid)

    def create(self, typeid: str, *args: object) -> int:
        oid, _ = self.op("create", (typeid, args, {}))  # type: ignore[misc]
        return oid  # type: ignore[no-any-return]

    def call(self, oid: int, method: str, *args: object) -> object:
        return self.op("call", (oid, method, args, {}, 0))


def test_a_dict_write_bumps_its_key_and_whole_slots_and_reads_bump_nothing() -> None:
    o = Objects()
    oid = o.create("dict")
    o.call(oid, "__setitem__", "a", 1)
    before = snapshot(o.versions)
    for method, args in [("__getitem__", ("a",)), ("get", ("a",)), ("keys", ()), ("__len__", ()),
                         ("items", ()), ("__contains__", ("b",)), ("copy", ())]:
        o.call(oid, method, *args)
    assert bumped(before, o.versions) == set()
    o.call(oid, "__setitem__", "a", 2)
    assert bumped(before, o.versions) == {v.whole_slot(oid), v.key_slot(oid, v.stable_hash("a"))}  # type: ignore[arg-type]
    before = snapshot(o.versions)
    o.call(oid, "update", {"x": 1})
    assert bumped(before, o.versions) == {v.whole_slot(oid), v.bulk_slot(oid)}


def test_a_failed_write_still_bumps_and_other_types_bump_their_whole_slot() -> None:
    o = Objects()
    d, lst, val = o.create("dict"), o.create("list"), o.create("Value", "i", 0)
    before = snapshot(o.versions)
    with pytest.raises(KeyError):
        o.call(d, "pop", "missing")
    assert v.whole_slot(d) in bumped(before, o.versions)
    before = snapshot(o.versions)
    o.call(lst, "append", 1)
    o.call(val, "set", 5)
    assert {v.whole_slot(lst), v.whole_slot(val)} <= bumped(before, o.versions)
    lock = o.create("Lock")
    before = snapshot(o.versions)
    o.call(lock, "acquire")
    assert bumped(before, o.versions) == set()  # locks are not read from copies


# -- mesh caches ----------------------------------------------------------------------------------

def test_cache_writes_and_evictions_bump_their_keys() -> None:
    t = table()
    drv = Driver(CacheStore(versions=t), "cache")
    drv.op(P, "open", ("c", 2, None, None))
    ident = v.cache_ident("c")
    before = snapshot(t)
    drv.op(P, "set", ("c", "a", None), blob(1))
    assert bumped(before, t) == {v.whole_slot(ident), v.key_slot(ident, v.stable_hash("a"))}  # type: ignore[arg-type]
    drv.op(P, "set", ("c", "b", None), blob(2))
    before = snapshot(t)
    assert drv.op(P, "nget", ("c", "a")) == (blob(1), float("inf"))
    assert bumped(before, t) == set()
    drv.op(P, "set", ("c", "c", None), blob(3))  # evicts b
    assert v.key_slot(ident, v.stable_hash("b")) in bumped(before, t)  # type: ignore[arg-type]
    assert sorted(drv.op(P, "keys", ("c",))) == ["a", "c"]


def test_a_local_read_noted_in_the_table_saves_an_entry_from_eviction() -> None:
    t = table()
    drv = Driver(CacheStore(versions=t), "cache")
    drv.op(P, "open", ("c", 2, None, None))
    drv.now = 1.0
    drv.op(P, "set", ("c", "a", None), blob(1))
    drv.now = 2.0
    drv.op(P, "set", ("c", "b", None), blob(2))
    # A process served "a" from its copy at t=3 s: the broker never saw that read.
    t.words[v.ACCESS - v.VERSIONS + v.key_slot(v.cache_ident("c"), v.stable_hash("a"))] = 3 * 10**9  # type: ignore[arg-type]
    drv.now = 4.0
    drv.op(P, "set", ("c", "c", None), blob(3))
    assert sorted(drv.op(P, "keys", ("c",))) == ["a", "c"]
    assert drv.component.stats(4.0)["caches"]["c"]["evictions"] == 1


def test_keys_and_len_of_a_cache_whose_entries_can_expire_are_not_kept() -> None:
    drv = Driver(CacheStore(versions=table()), "cache")
    drv.op(P, "open", ("c", None, None, None))
    drv.op(P, "set", ("c", "a", None), blob(1))
    assert drv.op(P, "nkeys", ("c",)) == (["a"], True) and drv.op(P, "nlen", ("c",)) == (1, True)
    drv.op(P, "set", ("c", "b", 5.0), blob(2))
    assert drv.op(P, "nlen", ("c",)) == (2, False)


# -- a process's copies -------------------------------------------------------------------------

@pytest.fixture
def near() -> NearCache:
    mm = mmap.mmap(-1, v.TABLE_BYTES)
    words = memoryview(mm).cast("Q")
    words[v.LEASE] = 1 << 62  # the broker vouches "forever"
    del words
    return NearCache(mm)


def test_a_copy_is_served_until_its_slot_moves(near: NearCache) -> None:
    calls = []

    def fetch() -> tuple[object, bytes]:
        calls.append(1)
        value = {"n": len(calls)}
        return value, _codec.dumps(value)

    s1, s2 = v.key_slot(7, 1), v.bulk_slot(7)
    first = near.read("k", s1, s2, fetch)
    first["n"] = 99
    assert near.read("k", s1, s2, fetch) == {"n": 1} and len(calls) == 1
    near.words[s2] += 1
    assert near.read("k", s1, s2, fetch) == {"n": 2} and len(calls) == 2


def test_no_copy_is_served_outside_the_lease_or_once_closed(near: NearCache) -> None:
    near.keep("k", 0, 0, _near.ETERNAL, 5, None)
    s = v.whole_slot(1)
    assert near.lookup("k", s, s) is not None
    near.words[v.CLOSED] = 1
    assert near.lookup("k", s, s) is None
    near.words[v.CLOSED] = 0
    near.words[v.LEASE] = 0
    assert near.lookup("k", s, s) is None and not near.trusted()


def test_copies_are_bounded(near: NearCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_near, "MAX_COPIES", 10)
    for i in range(25):
        near.keep(i, 0, 0, _near.ETERNAL, i, None)
    assert len(near.entries) == 10 and 24 in near.entries and 0 not in near.entries
    big = b"x" * (_near.MAX_COPY_BYTES + 1)
    near.keep("big", 0, 0, _near.ETERNAL, [1], big)
    assert "big" not in near.entries
    near.keep("proxy", 0, 0, _near.ETERNAL, [1], b"...rebuild_ref...")
    assert "proxy" not in near.entries
