"""The cache component, pure: fake clock, no processes, no sockets."""

from __future__ import annotations

import pytest

from .shared_fakes import Driver, answer, blob
from mpmesh._broker._cache import SWEEP_INTERVAL_S, CacheStore
from mpmesh._broker._locks import LockTable
from mpmesh._broker._payload import MISSING, pack
from mpmesh._errors import FencedError, NotFound

P = 1  # the peer every test talks as


@pytest.fixture
def d() -> Driver:
    drv = Driver(CacheStore(), "cache")
    drv.op(P, "open", ("c", None, None, None))
    return drv


def opened(maxsize=None, ttl=None, maxbytes=None, locks=None) -> Driver:  # type: ignore[no-untyped-def]
    drv = Driver(CacheStore(fence=locks.valid if locks else None), "cache")
    drv.op(P, "open", ("c", maxsize, ttl, maxbytes))
    return drv


def test_set_get_delete_contains(d: Driver) -> None:
    assert d.op(P, "get", ("c", "k")) is MISSING
    d.op(P, "set", ("c", "k", None), blob({"name": "Ada"}))
    assert d.op(P, "get", ("c", "k")) == {"name": "Ada"}
    assert d.op(P, "contains", ("c", "k")) is True
    assert d.op(P, "delete", ("c", "k")) is True
    assert d.op(P, "delete", ("c", "k")) is False
    assert d.op(P, "contains", ("c", "k")) is False


def test_values_are_stored_as_sent(d: Driver) -> None:
    raw = blob([1, 2, 3])
    d.op(P, "set", ("c", "k", None), raw)
    rid, actions = d.send(P, "get", pack(("c", "k")))
    assert actions[0].msg.payload == raw  # type: ignore[union-attr]


def test_unknown_cache_is_not_found() -> None:
    drv = Driver(CacheStore(), "cache")
    with pytest.raises(NotFound):
        drv.op(P, "get", ("nope", "k"))


def test_reopen_with_other_options_is_refused() -> None:
    drv = opened(maxsize=10)
    assert drv.op(P, "open", ("c", None, None, None))["maxsize"] == 10  # attach: fine
    assert drv.op(P, "open", ("c", 10, None, None))["maxsize"] == 10    # same: fine
    with pytest.raises(ValueError, match="already exists"):
        drv.op(P, "open", ("c", 20, None, None))


@pytest.mark.parametrize("bad", [("c", 0, None, None), ("c", None, -1, None), ("c", None, None, 0),
                                 ("", None, None, None), ("c", True, None, None)])
def test_bad_options(bad: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        Driver(CacheStore(), "cache").op(P, "open", bad)


def test_keys_must_be_builtin(d: Driver) -> None:
    import datetime

    with pytest.raises(TypeError, match="built-in"):
        d.op(P, "set", ("c", datetime.date(2020, 1, 1), None), blob(1))


def test_ttl_expiry_default_and_per_item() -> None:
    drv = opened(ttl=10.0)
    drv.op(P, "set", ("c", "default", None), blob(1))
    drv.op(P, "set", ("c", "short", 2.0), blob(2))
    drv.now = 1.9
    assert drv.op(P, "mget", ("c", ["default", "short"])) == [blob(1), blob(2)]
    drv.now = 2.0
    assert drv.op(P, "get", ("c", "short")) is MISSING
    assert drv.op(P, "get", ("c", "default")) == 1
    drv.now = 10.0
    assert drv.op(P, "get", ("c", "default")) is MISSING
    assert drv.op(P, "len", ("c",)) == 0


def test_lru_eviction_counts_reads_as_use() -> None:
    drv = opened(maxsize=3)
    for k in "abc":
        drv.op(P, "set", ("c", k, None), blob(k))
    drv.op(P, "get", ("c", "a"))          # a is now the most recently used
    drv.op(P, "set", ("c", "d", None), blob("d"))
    assert sorted(drv.op(P, "keys", ("c",))) == ["a", "c", "d"]
    assert drv.component.stats(0.0)["caches"]["c"]["evictions"] == 1


def test_maxbytes_bounds_total_size() -> None:
    drv = opened(maxbytes=1000)
    for i in range(50):
        drv.op(P, "set", ("c", i, None), blob(b"x" * 100))
    assert drv.op(P, "len", ("c",)) < 10
    with pytest.raises(ValueError):
        drv.op(P, "set", ("c", "huge", None), blob(b"x" * 5000))


def test_incr_decr_from_zero_and_types(d: Driver) -> None:
    assert d.op(P, "incr", ("c", "n", 1)) == 1
    assert d.op(P, "incr", ("c", "n", 5)) == 6
    assert d.op(P, "incr", ("c", "n", -2)) == 4
    assert d.op(P, "incr", ("c", "f", 0.5)) == 0.5
    assert d.op(P, "get", ("c", "n")) == 4
    d.op(P, "set", ("c", "s", None), blob("text"))
    with pytest.raises(TypeError, match="not a number"):
        d.op(P, "incr", ("c", "s", 1))
    with pytest.raises(TypeError):
        d.op(P, "incr", ("c", "n", "1"))


def test_incr_and_cas_keep_the_remaining_ttl() -> None:
    drv = opened()
    drv.op(P, "set", ("c", "n", 5.0), blob(1))
    drv.now = 4.0
    assert drv.op(P, "incr", ("c", "n", 1)) == 2
    assert drv.op(P, "cas", ("c", "n", len(blob(2))), blob(2), blob(3)) is True
    drv.now = 4.99
    assert drv.op(P, "get", ("c", "n")) == 3
    drv.now = 5.0
    assert drv.op(P, "get", ("c", "n")) is MISSING


def test_cas(d: Driver) -> None:
    d.op(P, "set", ("c", "k", None), blob({"v": 1, "w": 2}))
    exp = blob({"v": 0})
    assert d.op(P, "cas", ("c", "k", len(exp)), exp, blob("x")) is False
    exp = blob({"w": 2, "v": 1})  # equal by value, different bytes
    assert d.op(P, "cas", ("c", "k", len(exp)), exp, blob("new")) is True
    assert d.op(P, "get", ("c", "k")) == "new"
    none = blob(None)
    assert d.op(P, "cas", ("c", "missing", len(none)), none, blob(1)) is True  # missing == None
    assert d.op(P, "get", ("c", "missing")) == 1


def test_cas_on_non_builtin_values_compares_pickles(d: Driver) -> None:
    import fractions

    d.op(P, "set", ("c", "k", None), blob(fractions.Fraction(1, 3)))
    exp = blob(fractions.Fraction(1, 3))
    assert d.op(P, "cas", ("c", "k", len(exp)), exp, blob(2)) is True
    exp = blob(fractions.Fraction(1, 3))
    assert d.op(P, "cas", ("c", "k", len(exp)), exp, blob(3)) is False


def test_mget_mset_items_clear(d: Driver) -> None:
    blobs = [blob(1), blob("two")]
    d.op(P, "mset", ("c", [("a", len(blobs[0])), ("b", len(blobs[1]))], None), *blobs)
    assert d.op(P, "mget", ("c", ["a", "b", "z"])) == [blobs[0], blobs[1], None]
    assert sorted(d.op(P, "items", ("c",))) == [("a", blobs[0]), ("b", blobs[1])]
    d.op(P, "clear", ("c",))
    assert d.op(P, "len", ("c",)) == 0


def test_pop_and_setdefault(d: Driver) -> None:
    assert d.op(P, "setdefault", ("c", "k", None), blob(1)) == 1
    assert d.op(P, "setdefault", ("c", "k", None), blob(2)) == 1
    assert d.op(P, "pop", ("c", "k")) == 1
    assert d.op(P, "pop", ("c", "k")) is MISSING


def test_fenced_writes_follow_the_lock() -> None:
    locks = LockTable()
    drv = opened(locks=locks)
    ldrv = Driver(locks, "locks")
    token, _ = ldrv.op(P, "acquire", ("L", 5.0, None))
    drv.op(P, "fenced_set", ("c", ("L", token), "k", None), blob(1))
    assert drv.op(P, "get", ("c", "k")) == 1
    drv.now = ldrv.now = 5.0  # the grant's TTL ran out
    with pytest.raises(FencedError):
        drv.op(P, "fenced_set", ("c", ("L", token), "k", None), blob(2))
    new, _ = ldrv.op(2, "acquire", ("L", None, None))
    assert new > token
    with pytest.raises(FencedError):
        drv.op(P, "fenced_delete", ("c", ("L", token), "k"))
    exp = blob(1)
    assert drv.op(2, "fenced_cas", ("c", ("L", new), "k", len(exp)), exp, blob(7)) is True
    assert drv.op(2, "fenced_delete", ("c", ("L", new), "k")) is True
    assert drv.op(P, "get", ("c", "k")) is MISSING


def test_sweep_removes_expired_entries() -> None:
    drv = opened()
    drv.op(P, "set", ("c", "k", 0.5), blob(1))
    deadline = drv.component.next_deadline()
    assert deadline == SWEEP_INTERVAL_S
    drv.tick(deadline)
    assert drv.component.stats(deadline)["caches"]["c"]["size"] == 0
    drv.tick(deadline + SWEEP_INTERVAL_S)
    assert drv.component.next_deadline() is None or drv.component.caches["c"].timed


def test_garbage_payload_is_the_callers_error(d: Driver) -> None:
    rid, actions = d.send(P, "get", b"\x00\x00\x00\x09garbage!!")
    with pytest.raises(TypeError):
        answer(actions, P, rid)
    with pytest.raises(ValueError, match="unknown cache operation"):
        d.op(P, "frobnicate", ("c",))
