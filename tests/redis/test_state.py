"""The cache and the locks on a real Redis: their behaviour matches the local ones, and holds
across processes (spawned, each with its own connection) and across Redis faults."""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mpmesh import BrokerUnavailable, FencedError, RequestTimeout, SerializationError
from mpmesh._redis._link import Link
from mpmesh._redis._pubsub import RedisPubSub
from mpmesh._redis._state import RedisCache, RedisGrant, RedisLocks, _key

SPAWN = multiprocessing.get_context("spawn")
MESH = "t"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds, for at most ``timeout`` seconds. (Spawned children
    import this module, so it cannot import the root conftest, which starts processes.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def raw_key(cache: RedisCache, key: Any) -> bytes:
    """The Redis key of ``key``'s entry (to read its TTL as Redis keeps it)."""
    return cache._base.encode() + _key(key)


def run_all(target: Callable[..., None], argsets: list[tuple[Any, ...]], timeout: float = 45.0) -> None:
    """Run ``target(*args)`` in one spawned process per argument tuple, at once; all must succeed."""
    procs = [SPAWN.Process(target=target, args=args) for args in argsets]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
            p.close()


@pytest.fixture
def cache(link: Link) -> RedisCache:
    return RedisCache(link, "c")


@pytest.fixture
def locks(link: Link, closing: Callable[[Any], Any]) -> RedisLocks:
    return closing(RedisLocks(link, 1))  # type: ignore[no-any-return]


@pytest.fixture
def other_locks(make_link: Callable[..., Link], closing: Callable[[Any], Any]) -> RedisLocks:
    """Another process's lock table, as far as Redis can tell: a connection of its own."""
    return closing(RedisLocks(make_link(), 2))  # type: ignore[no-any-return]


# -- the mapping ------------------------------------------------------------------------------

def test_every_method_of_the_mapping(cache: RedisCache) -> None:
    cache["a"] = 1
    cache.set("b", {"x": [1, 2]})
    assert cache["a"] == 1 and cache.get("b") == {"x": [1, 2]}
    assert cache.get("nope") is None and cache.get("nope", 7) == 7
    with pytest.raises(KeyError):
        cache["nope"]
    with pytest.raises(KeyError):
        del cache["nope"]
    assert "a" in cache and "nope" not in cache
    assert cache.setdefault("a", 9) == 1 and cache.setdefault("s", 9) == 9 and cache["s"] == 9
    assert cache.pop("s") == 9 and cache.pop("s", "gone") == "gone"
    with pytest.raises(KeyError):
        cache.pop("s")
    cache.mset({"m1": 1.5, "m2": None})
    cache.update({"u": "v"}, w=b"\x00")
    assert cache.mget(["m1", "nope", "m2", "u", "w"]) == [1.5, None, None, "v", b"\x00"]
    assert cache.mget([]) == []
    assert cache.keys() == ["b", "a", "m1", "m2", "u", "w"]  # setdefault read "a": a use
    assert list(cache) == cache.keys() and len(cache) == 6
    assert cache.items() == [("b", {"x": [1, 2]}), ("a", 1), ("m1", 1.5), ("m2", None), ("u", "v"), ("w", b"\x00")]
    assert cache.values() == [{"x": [1, 2]}, 1, 1.5, None, "v", b"\x00"]
    del cache["a"]
    assert "a" not in cache and len(cache) == 5
    cache.clear()
    assert len(cache) == 0 and cache.keys() == [] and cache.get("b") is None
    cache["again"] = 1
    assert cache.items() == [("again", 1)]


def test_values_come_back_as_they_were_written(cache: RedisCache) -> None:
    values = [0, -1, 2**63 - 1, -(2**63), 2**64, 1.0, -0.0, math.inf, 0.1, True, False, None, "7", b"7",
              (1, "a"), {"k": {1, 2}}, [1.5, "x"], 3 + 4j, lambda x: x + 1]
    for i, value in enumerate(values):
        cache[i] = value
    for i, value in enumerate(values[:-1]):
        got = cache[i]
        assert got == value and type(got) is type(value), (value, got)
    assert math.copysign(1, cache[6]) == -1  # -0.0 keeps its sign
    assert cache[len(values) - 1](1) == 2  # dill carried the lambda


def test_keys_equal_in_python_are_one_entry(cache: RedisCache) -> None:
    cache[1] = "one"
    assert cache[1.0] == "one" and cache[True] == "one" and cache[1 + 0j] == "one"
    a, b = "ab", "".join(["a", "b"])
    cache[(a, a)] = "pair"  # one string object twice pickles unlike two equal ones
    assert cache[(a, b)] == "pair"
    cache[frozenset({"x", "y", 3})] = "set"
    assert cache[frozenset({3, "y", "x"})] == "set"
    cache[range(0)] = "empty"
    assert cache[range(5, 5)] == "empty"
    assert len(cache) == 4


def test_keys_of_every_builtin_kind_round_trip(cache: RedisCache) -> None:
    keys = ["", "é:\\x", "\udcff", b"", b"\xff:", 0, -5, 2**100, 1.5, -math.inf, None, (), ((1,), ("a", b"b")),
            frozenset(), frozenset({(1, 2)}), 2j, range(1, 10, 3), (None, 2.5, "s2:x")]
    for i, key in enumerate(keys):
        cache[key] = i
    assert cache.keys() == keys
    assert [cache[k] for k in keys] == list(range(len(keys)))


def test_keys_that_are_not_builtin_values_are_refused(cache: RedisCache) -> None:
    class Key:
        pass

    for bad in (Key(), [1], {"a": 1}, (1, [2]), {1}, bytearray(b"x")):
        with pytest.raises(TypeError):
            cache[bad] = 1
        with pytest.raises(TypeError):
            cache.get(bad)
        with pytest.raises(TypeError):
            bad in cache  # noqa: B015
    assert len(cache) == 0


def test_an_unpicklable_value_fails_in_the_caller_and_nothing_is_written(cache: RedisCache, link: Link) -> None:
    gen = (x for x in range(3))  # neither pickle nor dill can send it
    with pytest.raises(SerializationError):
        cache["k"] = gen
    with pytest.raises(SerializationError):
        cache.mset({"a": 1, "b": gen})
    with pytest.raises(SerializationError):
        cache.setdefault("k", gen)
    with pytest.raises(SerializationError):
        cache.cas("k", None, gen)
    assert len(cache) == 0
    assert link.redis.keys(link.key("cache", "c", "v", "*")) == []


def test_values_not_sealed_with_the_mesh_key_are_never_unpickled(cache: RedisCache, link: Link) -> None:
    from mpmesh import AuthenticationError

    cache["k"] = "mine"
    forged = pickle.dumps("theirs", 5)
    link.redis.set(raw_key(cache, "k"), b"m" + b"\x00" * 32 + forged)
    with pytest.raises(AuthenticationError):
        cache["k"]


# -- TTL and LRU ------------------------------------------------------------------------------

def test_ttl_is_redis_s_own_and_entries_expire(link: Link) -> None:
    cache = RedisCache(link, "ttl", ttl=30)
    cache.set("short", 1, ttl=0.1)
    cache["default"] = 2
    cache.set("never", 3, ttl=math.inf)
    cache.set("now", 4, ttl=0)
    assert 0 < link.redis.pttl(raw_key(cache, "short")) <= 100
    assert 29_000 < link.redis.pttl(raw_key(cache, "default")) <= 30_000
    assert link.redis.pttl(raw_key(cache, "never")) == -1
    assert "now" not in cache
    assert wait_for(lambda: cache.get("short") is None, 5)
    assert sorted(cache.keys()) == ["default", "never"] and len(cache) == 2


def test_expired_entries_leave_len_keys_and_items(link: Link) -> None:
    cache = RedisCache(link, "lazy")
    cache.mset({i: i for i in range(20)}, ttl=0.05)
    cache["stays"] = 1
    assert wait_for(lambda: link.redis.exists(raw_key(cache, 0)) == 0, 5)  # expired in Redis
    assert len(cache) == 1 and cache.keys() == ["stays"] and cache.items() == [("stays", 1)]


def test_lru_eviction_past_maxsize_a_read_counts_as_a_use(link: Link, make_link: Callable[..., Link]) -> None:
    cache = RedisCache(link, "lru", maxsize=2)
    elsewhere = RedisCache(make_link(), "lru")  # another host's handle
    cache["a"], cache["b"] = 1, 2
    assert elsewhere["a"] == 1  # a read counts as a use, wherever it happens
    cache["c"] = 3
    assert cache.keys() == ["a", "c"]
    cache.mget(["a"])
    elsewhere["d"] = 4
    assert cache.keys() == ["a", "d"] and "c" not in cache
    cache["a"] = 5  # overwriting is no new entry
    assert len(cache) == 2 and cache["d"] == 4


def test_eviction_counts_expired_entries_out_first(link: Link) -> None:
    cache = RedisCache(link, "lru-ttl", maxsize=2)
    cache.set("old", 1)
    cache.set("brief", 2, ttl=0.05)
    assert wait_for(lambda: link.redis.exists(raw_key(cache, "brief")) == 0, 5)
    cache["new"] = 3
    assert sorted(cache.keys()) == ["new", "old"]


# -- counters and compare-and-swap ------------------------------------------------------------

def test_incr_and_decr(cache: RedisCache) -> None:
    assert cache.incr("n") == 1 and cache.incr("n", 5) == 6 and cache.decr("n", 2) == 4
    assert cache.decr("fresh") == -1
    assert cache.incr("f", 0.1) == 0.1 and cache.incr("f", 0.2) == 0.1 + 0.2  # float arithmetic, exactly
    assert cache.incr("n", 0.5) == 4.5 and type(cache["n"]) is float
    assert cache.incr("n", -0.5) == 4.0 and type(cache["n"]) is float  # stays a float, as in Python
    cache["s"] = "text"
    with pytest.raises(TypeError, match="holds a str"):
        cache.incr("s")
    cache["b"] = True
    with pytest.raises(TypeError, match="holds a bool"):
        cache.incr("b")
    with pytest.raises(TypeError):
        cache.incr("n", True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.incr("n", "1")  # type: ignore[arg-type]
    assert cache["s"] == "text" and cache["n"] == 4.0


def test_incr_is_exact_at_and_past_64_bits(cache: RedisCache, link: Link) -> None:
    cache["n"] = 2**63 - 2
    assert cache.incr("n") == 2**63 - 1
    assert cache.incr("n") == 2**63  # past Redis's integers: computed here, stored by cas
    assert cache.incr("n", 2**70) == 2**63 + 2**70
    assert cache.decr("n", 2**70 + 1) == 2**63 - 1
    assert link.redis.get(raw_key(cache, "n")) == b"9223372036854775807"  # a Redis integer again
    assert cache.decr("m", 2**63) == -(2**63) and cache.decr("m") == -(2**63) - 1
    assert cache.incr("m", 0.5) == float(-(2**63) - 1) + 0.5


def test_incr_keeps_the_entry_s_ttl_and_a_new_one_gets_the_default(link: Link) -> None:
    cache = RedisCache(link, "ttl-incr", ttl=60)
    cache.set("n", 1, ttl=5)
    for amount in (1, 0.5, 2**64):
        cache.incr("n", amount)
        assert 0 < link.redis.pttl(raw_key(cache, "n")) <= 5000
    cache.incr("fresh")
    assert 59_000 < link.redis.pttl(raw_key(cache, "fresh")) <= 60_000


def test_cas_compares_built_in_values_by_value_and_others_by_bytes(cache: RedisCache, link: Link) -> None:
    assert cache.cas("k", None, "run")  # missing equals None
    assert not cache.cas("k", None, "x") and not cache.cas("k", "idle", "x")
    assert cache.cas("k", "run", "stop") and cache["k"] == "stop"
    cache["i"] = 1
    assert cache.cas("i", 1.0, "one") and cache["i"] == "one"  # equal values, other bytes
    cache["d"] = {"a": 1, "b": 2}
    assert cache.cas("d", {"b": 2, "a": 1}, "swapped")
    cache["f"] = Fraction3()
    assert not cache.cas("f", AlwaysEqual(), "x")  # not built-in: compared by bytes only
    assert cache.cas("f", Fraction3(), "y") and cache["f"] == "y"
    cache.set("t", 1, ttl=5)
    assert cache.cas("t", 1, 2) and 0 < link.redis.pttl(raw_key(cache, "t")) <= 5000


class Fraction3:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fraction3)


class AlwaysEqual:
    def __eq__(self, other: object) -> bool:
        return True


def _count(url: str, mesh: str, key: bytes, n: int) -> None:
    link = Link(url, mesh, key, timeout=10)
    try:
        cache = RedisCache(link, "counts")
        for _ in range(n):
            cache.incr("n")
            cache.decr("d", 2)
        for _ in range(n // 5):
            while True:
                value = cache.get("c")
                if cache.cas("c", value, (value or 0) + 1):
                    break
    finally:
        link.close()


def test_incr_decr_and_cas_are_atomic_across_processes(cache: RedisCache, link: Link, redis_url: str,
                                                       authkey: bytes) -> None:
    run_all(_count, [(redis_url, MESH, authkey, 500)] * 4)
    counts = RedisCache(link, "counts")
    assert counts["n"] == 2000 and counts["d"] == -4000 and counts["c"] == 400


# -- options and handles ----------------------------------------------------------------------

def test_options_are_kept_in_redis_and_a_clash_is_an_error(link: Link, make_link: Callable[..., Link]) -> None:
    RedisCache(link, "opt", maxsize=10, ttl=5)
    other = RedisCache(make_link(), "opt")  # None: whatever it has
    assert other.options == {"maxsize": 10, "maxbytes": None, "ttl": 5.0}
    assert RedisCache(link, "opt", maxsize=10).options == other.options
    with pytest.raises(ValueError, match="already exists"):
        RedisCache(link, "opt", maxsize=11)
    with pytest.raises(ValueError, match="already exists"):
        RedisCache(link, "opt", ttl=6)
    with pytest.raises(ValueError, match="maxbytes"):
        RedisCache(link, "other", maxbytes=1000)
    for bad in ({"maxsize": 0}, {"maxsize": 1.5}, {"ttl": -1}, {"ttl": math.nan}):
        with pytest.raises(ValueError):
            RedisCache(link, "bad", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RedisCache(link, "")
    with pytest.raises(ValueError):
        RedisCache(link, "k").set("k", 1, ttl=-1)


def test_names_cannot_reach_into_each_other(link: Link) -> None:
    a, b = RedisCache(link, "a"), RedisCache(link, "a:v")
    b["x"] = "b's"
    a["v:x"] = "a's"
    assert a.keys() == ["v:x"] and b.keys() == ["x"] and b["x"] == "b's"


def test_a_cache_pickles_and_repr_like_the_local_one(link: Link) -> None:
    cache = RedisCache(link, "p", maxsize=3)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy == cache and hash(copy) == hash(cache) and copy.options == cache.options
    assert repr(cache) == "<mpmesh.Cache 'p' {'maxsize': 3, 'maxbytes': None, 'ttl': None}>"
    cache["k"] = 1
    assert copy["k"] == 1


def _use_pickled(cache: RedisCache) -> None:
    assert cache["from-parent"] == "hello"
    cache["from-child"] = os.getpid()
    cache.incr("n", 2)


def test_a_pickled_cache_works_in_another_process(cache: RedisCache, authkey: bytes,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPMESH_AUTHKEY", authkey.decode())  # the key the child's link is made with
    cache["from-parent"] = "hello"
    run_all(_use_pickled, [(cache,)])
    assert cache["from-child"] not in (None, os.getpid()) and cache["n"] == 2


# -- fenced writes ----------------------------------------------------------------------------

def test_fenced_writes_need_the_current_grant(cache: RedisCache, locks: RedisLocks,
                                              other_locks: RedisLocks) -> None:
    grant = locks.acquire("w", 10, 0)
    assert grant is not None
    cache.fenced_set(grant, "owner", "me")
    assert cache.fenced_cas(grant, "owner", "me", "still me") and cache["owner"] == "still me"
    assert cache.fenced_delete(grant, "owner") and not cache.fenced_delete(grant, "owner")
    grant.release()
    with pytest.raises(FencedError):
        cache.fenced_set(grant, "owner", "stale")
    with pytest.raises(FencedError):
        cache.fenced_cas(grant, "owner", None, "stale")
    with pytest.raises(FencedError):
        cache.fenced_delete(grant, "owner")
    assert "owner" not in cache

    brief = locks.acquire("w", 0.05, 0)
    assert brief is not None
    newer = other_locks.acquire("w", 10, 5)  # granted once ``brief`` expired
    assert newer is not None and newer.token > brief.token
    with pytest.raises(FencedError):
        cache.fenced_set(brief, "owner", "expired")
    cache.fenced_set(newer, "owner", "newer")
    assert cache["owner"] == "newer"
    with pytest.raises(TypeError):
        cache.fenced_set(("w", newer.token), "owner", "x")


# -- locks ------------------------------------------------------------------------------------

def _exclusive(url: str, mesh: str, key: bytes, holder: int, n: int) -> None:
    link = Link(url, mesh, key, timeout=10)
    locks = RedisLocks(link, holder)
    try:
        cache = RedisCache(link, "excl")
        for _ in range(n):
            grant = locks.acquire("m", 10, 30)
            assert grant is not None
            with grant:
                value = cache.get("x", 0)
                time.sleep(0.001)  # the critical section's work: others try meanwhile
                cache["x"] = value + 1
    finally:
        locks.close()
        link.close()


def test_a_lock_excludes_across_processes(link: Link, redis_url: str, authkey: bytes) -> None:
    run_all(_exclusive, [(redis_url, MESH, authkey, holder, 50) for holder in range(4)])
    assert RedisCache(link, "excl")["x"] == 200


def _tokens(url: str, mesh: str, key: bytes, holder: int, n: int) -> None:
    link = Link(url, mesh, key, timeout=10)
    locks = RedisLocks(link, holder)
    try:
        for i in range(n):
            grant = locks.acquire(f"lock{i % 3}", 10, 30)
            assert grant is not None
            link.redis.rpush(f"tokens:{holder}", grant.token)
            grant.release()
    finally:
        locks.close()
        link.close()


def test_tokens_increase_across_locks_and_processes(link: Link, locks: RedisLocks, redis_url: str,
                                                    authkey: bytes) -> None:
    first = locks.acquire("a", None, 0)
    second = locks.acquire("b", None, 0)
    assert first is not None and second is not None and first.token < second.token
    run_all(_tokens, [(redis_url, MESH, authkey, holder, 40) for holder in range(3)])
    last = locks.acquire("c", None, 0)
    assert last is not None
    seen: list[int] = []
    for holder in range(3):
        tokens = [int(t) for t in link.redis.lrange(f"tokens:{holder}", 0, -1)]
        assert len(tokens) == 40 and tokens == sorted(set(tokens))
        seen += tokens
    assert len(set(seen)) == 120 and second.token < min(seen) and max(seen) < last.token


def test_try_once_wait_and_time_out(locks: RedisLocks, other_locks: RedisLocks) -> None:
    held = locks.acquire("l", 10, 0)
    assert held is not None
    assert other_locks.acquire("l", None, 0) is None
    late = []
    for wait in (0.05, 0.15, 0.15, 0.15, 0.15, 0.15, 0.15, 0.15, 0.15, 0.3):
        start = time.monotonic()
        assert other_locks.acquire("l", None, wait) is None
        late.append(time.monotonic() - start - wait)
    # Never early; late by a round trip or a short sleep, not by Redis's clock tick (100 ms).
    assert min(late) >= 0 and sum(late) / len(late) < 0.03 and max(late) < 0.15
    with pytest.raises(ValueError):
        locks.acquire("l", -1, 0)
    with pytest.raises(ValueError):
        locks.acquire("", None, 0)


def test_release_and_extend_go_by_token(link: Link, locks: RedisLocks, other_locks: RedisLocks) -> None:
    old = locks.acquire("l", 0.05, 0)
    assert old is not None
    new = other_locks.acquire("l", 10, 5)
    assert new is not None
    old.release()  # after its TTL: nothing, and not the newer grant either
    assert not old.extend(10)
    assert locks.acquire("l", None, 0) is None
    assert new.extend(30) and new.ttl == 30
    assert 29_000 < link.redis.pttl(link.key("lock", "l")) <= 30_000
    with new:
        pass
    new.release()  # twice: nothing
    assert not new.extend(10)
    assert repr(new) == f"<mpmesh.LockGrant 'l' token={new.token} released>"
    again = locks.acquire("l", 10, 0)
    assert again is not None
    copy = pickle.loads(pickle.dumps(again))
    assert isinstance(copy, RedisGrant) and (copy.name, copy.token, copy.ttl) == ("l", again.token, 10)
    copy.release()  # a grant that travelled releases the lock all the same
    assert other_locks.acquire("l", 10, 0) is not None


def test_a_lock_held_without_ttl_lives_on_a_lease_that_renew_extends(link: Link, closing: Callable[[Any], Any],
                                                                    other_locks: RedisLocks) -> None:
    locks = closing(RedisLocks(link, 1, lease_ms=300))
    grant = locks.acquire("leased", None, 0)
    assert grant is not None and 0 < link.redis.pttl(link.key("lock", "leased")) <= 300
    assert locks.renew(3000) == 1 and link.redis.pttl(link.key("lock", "leased")) > 2000
    assert grant.extend(5) and locks.renew(3000) == 0  # a TTL now: no lease to renew
    assert 4000 < link.redis.pttl(link.key("lock", "leased")) <= 5000
    assert grant.extend(None) and locks.renew(3000) == 1
    link.redis.delete(link.key("lock", "leased"))  # lost (its lease ran out while Redis was away)
    assert locks.renew(3000) == 0 and locks._leases == {}
    assert other_locks.acquire("leased", None, 0) is not None


def test_a_lock_whose_ttl_runs_out_goes_to_the_next_waiter(locks: RedisLocks, other_locks: RedisLocks) -> None:
    held = locks.acquire("l", 0.3, 0)
    assert held is not None
    start = time.monotonic()
    grant = other_locks.acquire("l", 10, 5)
    assert grant is not None and 0.25 < time.monotonic() - start < 0.6


def test_a_release_wakes_a_waiter_at_once(link: Link, locks: RedisLocks, other_locks: RedisLocks) -> None:
    held = locks.acquire("l", 30, 0)
    assert held is not None
    got: dict[str, Any] = {}

    def wait() -> None:
        got["grant"] = other_locks.acquire("l", 10, 20)
        got["at"] = time.monotonic()

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        assert wait_for(lambda: int(link.redis.info("clients")["blocked_clients"]) >= 1, 5)
        released = time.monotonic()
        held.release()
    finally:
        waiter.join(25)
    assert got["grant"] is not None and got["at"] - released < 0.1


def _hold(url: str, mesh: str, key: bytes, lease_ms: int) -> None:
    link = Link(url, mesh, key, timeout=10)
    locks = RedisLocks(link, 99, lease_ms=lease_ms)
    grant = locks.acquire("held", None, 10)
    assert grant is not None
    link.redis.set("held-token", grant.token)
    while True:  # the process's beat; the test kills it
        locks.renew(lease_ms)
        time.sleep(lease_ms / 4000)


def test_a_lock_without_ttl_is_freed_when_its_holder_is_killed(link: Link, locks: RedisLocks,
                                                               redis_url: str, authkey: bytes) -> None:
    proc = SPAWN.Process(target=_hold, args=(redis_url, MESH, authkey, 400))
    proc.start()
    try:
        assert wait_for(lambda: link.redis.get("held-token") is not None, 30)
        assert locks.acquire("held", None, 1.2) is None  # held past three leases: renewed
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        start = time.monotonic()
        grant = locks.acquire("held", None, 5)
        assert grant is not None and time.monotonic() - start < 0.4 + 0.3
        assert grant.token > int(link.redis.get("held-token"))
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        proc.close()


# -- Redis faults -----------------------------------------------------------------------------

@pytest.fixture
def faulty(own_redis: Any, closing: Callable[[Any], Any], authkey: bytes) -> Iterator[Any]:
    yield lambda timeout: closing(Link(own_redis.url, MESH, authkey, timeout=timeout))


def test_a_stopped_redis_fails_fast_and_the_same_handles_work_after_a_restart(
        own_redis: Any, faulty: Callable[[float], Link], closing: Callable[[Any], Any]) -> None:
    link = faulty(5.0)
    cache = RedisCache(link, "c")
    locks = closing(RedisLocks(link, 1))
    pubsub = closing(RedisPubSub(link))
    cache["k"] = 1
    own_redis.stop()
    for op in (lambda: cache.get("k"), lambda: cache.set("k", 2), lambda: cache.incr("n"),
               lambda: len(cache), lambda: locks.acquire("l", None, 0), lambda: pubsub.publish("ch", 1)):
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            op()
        assert time.monotonic() - start < 3
    own_redis.start()
    cache["k"] = 3  # the scripts Redis forgot are loaded again
    assert cache["k"] == 3 and cache.incr("n") == 1
    grant = locks.acquire("l", None, 0)
    assert grant is not None
    grant.release()


def test_a_paused_redis_is_a_timeout_never_a_hang(own_redis: Any, faulty: Callable[[float], Link],
                                                  closing: Callable[[Any], Any]) -> None:
    link = faulty(0.5)
    cache = RedisCache(link, "c")
    locks = closing(RedisLocks(link, 1))
    other = closing(RedisLocks(faulty(0.5), 2))
    cache["k"] = 1
    held = other.acquire("l", 30, 0)
    assert held is not None
    own_redis.pause()
    try:
        for op in (lambda: cache.get("k"), lambda: cache.set("k", 2), lambda: locks.acquire("free", 10, 0),
                   lambda: held.release()):
            start = time.monotonic()
            with pytest.raises(RequestTimeout):
                op()
            assert time.monotonic() - start < 0.5 + 0.5
        own_redis.resume()
        assert cache["k"] in (1, 2)  # the same handle works again
        blocker = other.acquire("w", 30, 5)
        assert blocker is not None
        got: dict[str, Any] = {}

        def wait() -> None:  # a waiter for a lock that never comes, when Redis stops answering
            try:
                locks.acquire("w", None, None)
            except Exception as exc:
                got["error"], got["at"] = exc, time.monotonic()

        waiter = threading.Thread(target=wait)
        waiter.start()
        try:
            assert wait_for(lambda: int(link.redis.info("clients")["blocked_clients"]) >= 1, 5)
            own_redis.pause()
            paused = time.monotonic()
        finally:
            waiter.join(10)
        assert isinstance(got["error"], RequestTimeout) and got["at"] - paused < 0.25 + 0.5 + 0.5
    finally:
        own_redis.resume()


def test_an_acquire_redis_did_not_confirm_is_undone_by_the_next_renew(
        own_redis: Any, faulty: Callable[[float], Link], closing: Callable[[Any], Any]) -> None:
    link = faulty(0.3)
    locks = closing(RedisLocks(link, 1))
    other = closing(RedisLocks(faulty(5.0), 2))
    warm = locks.acquire("warm", 10, 0)  # a connection open, the script loaded: the acquire is sent
    assert warm is not None
    warm.release()
    own_redis.pause()
    try:
        with pytest.raises(RequestTimeout):
            locks.acquire("orphan", 60, 0)
    finally:
        own_redis.resume()
    # Redis had the command before it stopped answering, and runs it now: a grant nobody has.
    assert wait_for(lambda: other._link.redis.exists(link.key("lock", "orphan")) == 1, 5)
    assert other.acquire("orphan", 10, 0) is None
    locks.renew()
    assert other.acquire("orphan", 10, 0) is not None
