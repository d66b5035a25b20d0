"""Counts a peer controls have limits, and times that would corrupt timer heaps are
refused: pure components, fake clock. Each limit is lowered to keep the tests small."""

from __future__ import annotations

import math

import pytest

from ._broker_harness import Harness, failures_to, replies_to, requests_to
from .shared_fakes import Driver
from mpmesh._broker import _cache, _limits, _locks, _pubsub, _routing, _rpc
from mpmesh._broker._cache import CacheStore
from mpmesh._broker._locks import LockTable
from mpmesh._broker._pubsub import STREAM_BASE, PubSub
from mpmesh._broker._rpc import RpcPools
from mpmesh._wire._messages import ErrorCode

P = 1


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.group("g", 1, capacity=1000)
    harness.client()
    return harness


def test_a_request_id_already_in_flight_is_refused_and_the_first_still_answered(h: Harness) -> None:
    rid, actions = h.request("g")
    (first,) = requests_to(actions, 1)
    _, again = h.request("g", rid=rid)
    (failure,) = failures_to(again)
    assert failure.rid == rid and failure.code == ErrorCode.BAD_REQUEST and "already in flight" in failure.message
    assert requests_to(again, 1) == []
    assert [r.rid for r in replies_to(h.reply(1, first.rid))] == [rid]


def test_requests_in_flight_per_peer_are_capped(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_routing, "MAX_IN_FLIGHT_PER_PEER", 3)
    sent = [requests_to(h.request("g")[1], 1)[0] for _ in range(3)]
    _, refused = h.request("g")
    (failure,) = failures_to(refused)
    assert failure.code == ErrorCode.BAD_REQUEST and "limit is 3" in failure.message
    h.reply(1, sent[0].rid)                  # one answered: room for one more
    assert requests_to(h.request("g")[1], 1)
    other = h.client(peer=50)                # another process has its own allowance
    assert requests_to(h.request("g", origin=other)[1], 1)


@pytest.mark.parametrize("timeout, retry_delay", [
    (math.nan, 0.0), (math.inf, 0.0), (-5.0, 0.0), (1.0, math.nan), (1.0, math.inf), (1.0, -1.0),
])
def test_a_time_that_would_corrupt_the_timer_heaps_is_refused(h: Harness, timeout: float,
                                                              retry_delay: float) -> None:
    _, actions = h.request("g", timeout=timeout, retries=1, retry_delay=retry_delay)
    (failure,) = failures_to(actions)
    assert failure.code == ErrorCode.BAD_REQUEST and "finite" in failure.message
    assert requests_to(actions, 1) == []
    h.settled()


def test_caches_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cache, "MAX_CACHES", 2)
    drv = Driver(CacheStore(), "cache")
    drv.op(P, "open", ("a", None, None, None))
    drv.op(P, "open", ("b", None, None, None))
    with pytest.raises(_limits.TooMany, match="too many caches"):
        drv.op(P, "open", ("c", None, None, None))
    drv.op(P, "open", ("a", None, None, None))  # reopening one that exists is fine


def test_locks_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_locks, "MAX_LOCKS", 2)
    drv = Driver(LockTable(), "locks")
    drv.op(P, "acquire", ("a", None, 0))
    drv.op(P, "acquire", ("b", None, 0))
    with pytest.raises(_limits.TooMany, match="too many locks"):
        drv.op(P, "acquire", ("c", None, 0))


def test_subscriptions_per_peer_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pubsub, "MAX_SUBSCRIPTIONS_PER_PEER", 2)
    drv = Driver(PubSub(), "pubsub")
    drv.op(P, "subscribe", ("x", STREAM_BASE))
    drv.op(P, "subscribe", ("y.*", STREAM_BASE + 1))
    with pytest.raises(_limits.TooMany, match="too many subscriptions"):
        drv.op(P, "subscribe", ("z", STREAM_BASE + 2))
    drv.op(P + 1, "subscribe", ("z", STREAM_BASE))  # another process has its own allowance


def test_rpc_names_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_rpc, "MAX_RPC_NAMES", 1)
    drv = Driver(RpcPools(), "rpc")
    drv.op(P, "register", "f")
    drv.op(P + 1, "register", "f")  # one more server of a name that exists is fine
    with pytest.raises(_limits.TooMany, match="too many registered names"):
        drv.op(P, "register", "g")


def test_a_limit_is_a_mesh_error_and_a_value_error() -> None:
    from mpmesh import MeshError
    assert issubclass(_limits.TooMany, MeshError) and issubclass(_limits.TooMany, ValueError)


def test_shared_objects_and_parked_calls_per_peer_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpmesh._broker import _objects
    from mpmesh._broker._objects import ObjectTable
    from mpmesh._wire import _codec
    from mpmesh._wire._messages import Op

    from .shared_fakes import answer

    monkeypatch.setattr(_objects, "MAX_OBJECTS", 2)
    monkeypatch.setattr(_objects, "MAX_PARKED_PER_PEER", 1)
    table = ObjectTable()
    rids = iter(range(1, 100))

    def op(peer: int, name: str, args: object) -> object:
        rid = next(rids)
        return answer(table.on_op(peer, Op(rid, -1.0, "objects", name, _codec.dumps(args)), 0.0), peer, rid)

    lock, _ = op(P, "create", ("Lock", (), {}))  # type: ignore[misc]
    op(P, "create", ("dict", (), {}))
    with pytest.raises(_limits.TooMany, match="too many shared objects"):
        op(P, "create", ("list", (), {}))
    op(P, "call", (lock, "acquire", (), {}, 1))           # held by peer 1, thread 1
    rid = next(rids)                                       # peer 2 waits for it: parked
    assert table.on_op(2, Op(rid, -1.0, "objects", "call", _codec.dumps((lock, "acquire", (), {}, 1))), 0.0) == []
    with pytest.raises(_limits.TooMany, match="too many blocking calls"):
        op(2, "call", (lock, "acquire", (), {}, 2))
