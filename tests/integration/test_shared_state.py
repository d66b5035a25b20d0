"""Shared state across real processes: cache, locks, pub/sub, RPC pools, nodes.

Children are mesh workers from ``shared_workers``; tests wait on futures, events and
what children publish, never on sleeps (a TTL is waited out with a bounded poll, since
only the clock can tell).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import mpmesh
from mpmesh._state._shared import Cache, LockGrant, Node
from tests.conftest import wait_for
from tests.integration import shared_workers, workers

WAIT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _stdlib_helpers() -> None:
    workers.start_stdlib_helpers()


@pytest.fixture
def m() -> Iterator[mpmesh.Master]:
    with mpmesh.Master(timeout=WAIT_S) as master:
        yield master


class Inbox:
    """A subscriber callback that records deliveries and lets a test wait for a count."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str]] = []
        self.cond = threading.Condition()

    def __call__(self, payload: Any, channel: str) -> None:
        with self.cond:
            self.items.append((payload, channel))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = WAIT_S) -> list[tuple[Any, str]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)


# -- cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cache_proxy_pickles_into_a_child(method: str) -> None:
    with mpmesh.Master(start_method=method, timeout=WAIT_S) as m:
        cache = m.cache("sessions", maxsize=100)
        cache["user:1"] = {"name": "Ada"}
        m.spawn_child("w", shared_workers.shared, args=(cache,))
        assert m.send_request("use-passed-cache", "w", "user:1") == {"name": "Ada"}
        assert cache["user:1-seen"] != os.getpid()
        assert isinstance(cache, Cache) and len(cache) == 2


def test_cache_mapping_api(m: mpmesh.Master) -> None:
    c = m.cache("c")
    c["a"] = 1
    c.set("b", [1, 2], ttl=60)
    c.update({"x": "X"}, y="Y")
    assert c["a"] == 1 and c.get("b") == [1, 2] and c.get("zz", "d") == "d"
    assert "a" in c and "zz" not in c
    assert sorted(c.keys()) == sorted(c) == ["a", "b", "x", "y"]
    assert dict(c.items()) == {"a": 1, "b": [1, 2], "x": "X", "y": "Y"}
    assert c.mget(["a", "nope", "x"]) == [1, None, "X"]
    c.mset({"m1": 1, "m2": 2})
    assert c.pop("m1") == 1 and c.pop("m1", None) is None
    assert c.setdefault("sd", 5) == 5 and c.setdefault("sd", 6) == 5
    with pytest.raises(KeyError):
        c["missing"]
    with pytest.raises(KeyError):
        del c["missing"]
    del c["a"]
    assert c.incr("n") == 1 and c.incr("n", 10) == 11 and c.decr("n", 2) == 9
    assert c.cas("n", 9, 100) is True and c.cas("n", 9, 0) is False and c["n"] == 100
    c.clear()
    assert len(c) == 0
    with pytest.raises(ValueError):
        m.cache("c", maxsize=5)  # exists without a bound
    assert m.cache("c") == c


def test_counters_from_many_processes(m: mpmesh.Master) -> None:
    m.spawn_group("g", shared_workers.shared, 3)
    futures = [m.request("incr", f"g-{i}", ("counters", "hits", 300)) for i in range(3)]
    for fut in futures:
        fut.result(WAIT_S * 3)
    assert m.cache("counters")["hits"] == 900


def test_ttl_expiry_is_seen_from_another_process(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared)
    c = m.cache("ttl")
    m.send_request("cache-set", "w", ("ttl", "k", "v", 0.3))
    assert c.get("k") == "v"  # set by the child, seen here
    m.send_request("cache-set", "w", ("ttl", "n", 1, 0.3))
    assert c.incr("n") == 2   # keeps the child's TTL
    # "n" was set a round trip after "k", so it expires that much later: wait for both.
    assert wait_for(lambda: c.get("k") is None and c.get("n") is None, WAIT_S)
    assert "k" not in c and "n" not in c


def test_lru_bound_holds_across_processes(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared)
    c = m.cache("lru", maxsize=2)
    c["old"] = 0
    c["kept"] = 1
    c.get("old")  # a read is a use
    m.send_request("cache-set", "w", ("lru", "new", 2, None))
    assert sorted(c.keys()) == ["new", "old"]


def test_unpicklable_values_fail_at_the_call_site(m: mpmesh.Master) -> None:
    c = m.cache("u")
    lock = (x for x in range(3))  # a generator: neither pickle nor dill can send it
    with pytest.raises(mpmesh.SerializationError):
        c["k"] = lock
    with pytest.raises(TypeError):  # SerializationError is a TypeError
        c.mset({"a": 1, "b": lock})
    with pytest.raises(mpmesh.SerializationError):
        m.publish("ch", lock)
    m.register("echo", lambda x: x)
    with pytest.raises(mpmesh.SerializationError):
        m.call("echo", lock)
    assert len(c) == 0  # nothing half-written


# -- locks ----------------------------------------------------------------------------------

def test_lock_excludes_and_tokens_increase(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared)
    grant = m.lock("job:42")
    assert isinstance(grant, LockGrant)
    assert m.try_lock("job:42") is None
    fut = m.request("lock-and-release", "w", "job:42")
    with pytest.raises(concurrent.futures.TimeoutError):
        fut.result(0.2)  # the child waits: we hold it
    grant.release()
    grant.release()  # idempotent
    assert fut.result(WAIT_S) > grant.token
    with m.lock("job:42", ttl=5, wait=1) as again:
        assert again.token > grant.token
    assert m.try_lock("job:42") is not None


def test_lock_timeout(m: mpmesh.Master) -> None:
    with m.lock("busy"):
        with pytest.raises(mpmesh.LockTimeout) as info:
            m.lock("busy", wait=0.2)
        assert isinstance(info.value, TimeoutError)
    with pytest.raises(ValueError):
        m.lock("busy", wait=-1)


def test_stale_fenced_write_after_ttl_expiry(m: mpmesh.Master) -> None:
    c = m.cache("fenced")
    grant = m.lock("balance", ttl=0.3)
    c.fenced_set(grant, "balance", 100)
    successor = m.lock("balance", wait=WAIT_S)  # granted when the first grant's TTL runs out
    assert successor.token > grant.token
    with pytest.raises(mpmesh.FencedError):
        c.fenced_set(grant, "balance", 0)
    with pytest.raises(mpmesh.FencedError):
        c.fenced_cas(grant, "balance", 100, 0)
    c.fenced_set(successor, "balance", 200)
    assert c["balance"] == 200
    successor.release()
    with pytest.raises(mpmesh.FencedError):
        c.fenced_delete(successor, "balance")


def test_locks_of_an_exiting_process_are_released(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared, auto_restart=False)
    inbox = Inbox()
    m.subscribe("locked", inbox)
    m.request("hold-lock", "w", ("held", None))
    inbox.wait(1)
    assert m.try_lock("held") is None
    m.shutdown_child("w", timeout=1.0)
    assert m.lock("held", wait=WAIT_S).token > inbox.items[0][0]["token"]


# -- pub/sub ------------------------------------------------------------------------------

def test_publish_order_per_publisher_and_counts(m: mpmesh.Master) -> None:
    m.spawn_group("p", shared_workers.shared, 2)
    inbox = Inbox()
    sub = m.subscribe("events.*", inbox)
    exact = Inbox()
    m.subscribe("events.a", exact)
    assert m.publish("events.a", "hello") == 2
    assert m.publish("other", "x") == 0
    for fut in [m.request("publish", f"p-{i}", (f"events.p{i}.deep", 200)) for i in range(2)]:
        fut.result(WAIT_S)
    got = inbox.wait(401)
    for i in range(2):
        mine = [p["i"] for p, ch in got if ch == f"events.p{i}.deep"]
        assert mine == list(range(200))  # in publish order
    sub.unsubscribe()
    sub.unsubscribe()
    assert m.publish("events.a", "bye") == 1
    assert exact.wait(2)[1] == ("bye", "events.a")


def test_callback_errors_do_not_end_the_subscription(m: mpmesh.Master) -> None:
    inbox = Inbox()

    def flaky(payload: Any, channel: str) -> None:
        if payload == "boom":
            raise RuntimeError("callback failed")
        inbox(payload, channel)

    with m.subscribe("ch", flaky):
        m.publish("ch", "boom")
        m.publish("ch", "after")
        assert inbox.wait(1) == [("after", "ch")]
    assert m.publish("ch", "gone") == 0


def test_child_subscribes_and_master_publishes(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared)
    m.send_request("subscribe-count", "w", ("news.*", "news"))
    for i in range(50):
        assert m.publish(f"news.{i}", i) == 1
    c = m.cache("pubsub")
    assert wait_for(lambda: c.get("news") == 50, WAIT_S)


# -- RPC pools ------------------------------------------------------------------------------

def test_rpc_calls_spread_over_registrants(m: mpmesh.Master) -> None:
    m.spawn_group("r", shared_workers.shared, 2)
    pids = {m.send_request("register", f"r-{i}", "whoami") for i in range(2)}
    seen = {m.call("whoami") for _ in range(10)}
    assert seen == pids
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: m.call("whoami"), range(20))) == pids


def test_rpc_errors(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared)
    with pytest.raises(mpmesh.NotFound):
        m.call("nobody")
    m.send_request("register", "w", "fail")
    with pytest.raises(KeyError, match="no such thing") as info:
        m.call("fail", "no such thing")
    assert isinstance(info.value.__cause__, mpmesh._errors.RemoteTraceback)
    m.send_request("register", "w", "unpicklable")
    with pytest.raises(mpmesh.SerializationError):
        m.call("unpicklable")
    m.register("add", lambda a, b=0: a + b)
    assert m.call("add", 2, b=3) == 5
    assert m.unregister("add") is True
    with pytest.raises(mpmesh.NotFound):
        m.call("add", 1)


def test_rpc_hung_registrant_is_reaped_after_the_timeout(m: mpmesh.Master) -> None:
    m.spawn_child("w", shared_workers.shared)
    m.send_request("register", "w", "slow")
    m.register("slow", lambda tag: "master")
    outcomes = []
    for tag in range(2):  # one of the first two calls lands on the hung child
        try:
            outcomes.append(m.call("slow", tag, timeout=0.5))
        except mpmesh.RequestTimeout:
            outcomes.append("timeout")
    assert sorted(outcomes) == ["master", "timeout"]
    assert [m.call("slow", tag, timeout=5) for tag in range(5)] == ["master"] * 5


# -- the mesh -----------------------------------------------------------------------------------

def test_nodes_and_stats(m: mpmesh.Master) -> None:
    m.spawn_group("n", shared_workers.shared, 2)
    for i in range(2):
        m.send_request("sleep", f"n-{i}", 0)  # both have connected
    nodes = m.nodes()
    assert all(isinstance(n, Node) for n in nodes)
    assert {n.name for n in nodes} == {"master", "n-0", "n-1"}
    me = [n for n in nodes if n.is_self]
    assert len(me) == 1 and me[0].pid == os.getpid()
    theirs = m.send_request("nodes", "n-1", None)
    assert [n.name for n in theirs if n.is_self] == ["n-1"]
    assert {n.group for n in nodes} == {None, "n"}
    m.cache("s")["k"] = 1
    with m.lock("l"):
        stats = m.stats()
    for key in ("ops", "cache_ops", "caches", "cache_entries", "locks_held", "lock_waiters",
                "subscriptions", "pubsub_dropped", "connections", "broker_memory_bytes",
                "broker_cpu_seconds", "children"):
        assert key in stats, key
    assert stats["locks_held"] == 1 and stats["caches"]["s"]["size"] == 1
    assert stats["connections"] == 2 and stats["broker_memory_bytes"] > 0
