"""Pub/sub, pure: matching, delivery order, credit, drops, disconnection; and RPC pools."""

from __future__ import annotations

import pytest

from .shared_fakes import Driver, answers, blob, closes, pushes
from mpmesh._broker._pubsub import ACK, STREAM_BASE, PubSub, pack_publish, push_cost
from mpmesh._broker._rpc import CALL_BASE, OK, RpcPools, pack_call, pack_result
from mpmesh._errors import NotFound, RequestTimeout, WorkerLost
from mpmesh._wire._messages import ErrorCode

A, B, C = 1, 2, 3


def subscribe(d: Driver, peer: int, pattern: str, stream: int) -> int:
    return int(d.op(peer, "subscribe", (pattern, STREAM_BASE + stream)))


def publish(d: Driver, peer: int, channel: str, value: object = None) -> tuple[int, list]:  # type: ignore[type-arg]
    rid, actions = d.send(peer, "publish", pack_publish(channel, blob(value)))
    return answers(actions)[(peer, rid)], actions


@pytest.fixture
def d() -> Driver:
    return Driver(PubSub(), "pubsub")


def test_exact_and_prefix_matching(d: Driver) -> None:
    subscribe(d, A, "orders.*", 1)
    subscribe(d, B, "orders.created", 1)
    subscribe(d, C, "*", 1)
    subscribe(d, C, "ord*", 2)
    reached, actions = publish(d, A, "orders.created", {"id": 7})
    assert reached == 4
    assert sorted((peer, push.stream - STREAM_BASE) for peer, push in pushes(actions)) == [
        (A, 1), (B, 1), (C, 1), (C, 2)]
    assert publish(d, A, "orders.eu.created")[0] == 3   # any depth
    assert publish(d, A, "orders")[0] == 2              # "orders.*" needs the dot; "ord*" and "*" match
    assert publish(d, A, "other")[0] == 1


def test_unsubscribe_and_peer_lost(d: Driver) -> None:
    subscribe(d, A, "x.*", 1)
    subscribe(d, B, "x.*", 1)
    assert d.op(A, "unsubscribe", STREAM_BASE + 1) is True
    assert d.op(A, "unsubscribe", STREAM_BASE + 1) is False
    assert publish(d, C, "x.y")[0] == 1
    d.component.on_peer_lost(B, 0.0)
    assert publish(d, C, "x.y")[0] == 0
    assert d.component.prefixes == {} and d.component._prefix_lengths == {}


def test_bad_patterns(d: Driver) -> None:
    for pattern in ("", "a*b", "*a*"):
        with pytest.raises(ValueError):
            subscribe(d, A, pattern, 1)
    subscribe(d, A, "ok", 1)
    with pytest.raises(ValueError):
        subscribe(d, A, "ok2", 1)  # the same stream id twice
    with pytest.raises(ValueError):
        d.op(A, "subscribe", ("ok3", 5))  # below STREAM_BASE


def test_payload_is_forwarded_untouched_in_publish_order(d: Driver) -> None:
    subscribe(d, B, "c", 1)
    seen = []
    for i in range(5):
        _, actions = publish(d, A, "c", {"i": i})
        seen += [push.payload for _, push in pushes(actions)]
    assert seen == [blob({"i": i}) for i in range(5)]


def test_a_stalled_subscriber_is_bounded_then_disconnected() -> None:
    d = Driver(PubSub(high_water=10_000, hard_limit=50_000), "pubsub")
    subscribe(d, A, "c", 1)
    subscribe(d, B, "c", 1)
    value = b"x" * 1000
    cost = push_cost("c", blob(value))
    reached_total = dropped_b = 0
    closed: list[int] = []
    for i in range(100):
        reached, actions = publish(d, C, "c", value)
        reached_total += reached
        # A keeps up: acknowledges everything it got; B never does.
        d.send(A, "ack", ACK.pack((i + 1) * cost), rid=0)
        closed += closes(actions)
        dropped_b = d.component.subscribers[B].dropped if B in d.component.subscribers else dropped_b
        if closed:
            break
    state = d.component.subscribers[B]
    assert state.sent - state.acked <= 10_000 + cost  # never more than the high-water mark queued
    assert d.component.dropped > 0
    assert closed == [B]
    assert d.component.subscribers[A].dropped == 0


def test_ack_restores_credit(d: Driver) -> None:
    d = Driver(PubSub(high_water=4000, hard_limit=1_000_000), "pubsub")
    subscribe(d, A, "c", 1)
    value = b"x" * 900
    while publish(d, B, "c", value)[0]:
        pass
    assert d.component.dropped == 1
    state = d.component.subscribers[A]
    d.send(A, "ack", ACK.pack(state.sent), rid=0)
    assert publish(d, B, "c", value)[0] == 1


def test_a_big_message_still_reaches_an_idle_subscriber() -> None:
    d = Driver(PubSub(high_water=1000, hard_limit=10_000), "pubsub")
    subscribe(d, A, "c", 1)
    assert publish(d, B, "c", b"x" * 5000)[0] == 1


# -- RPC pools -----------------------------------------------------------------------------

@pytest.fixture
def rpc() -> Driver:
    return Driver(RpcPools(), "rpc")


def call(d: Driver, peer: int, name: str, args: object = ((), {}), timeout: float = -1.0) -> tuple[int, list]:  # type: ignore[type-arg]
    return d.send(peer, "call", pack_call(name, blob(args)), timeout=timeout)


def result(d: Driver, peer: int, cid: int, value: object) -> list:  # type: ignore[type-arg]
    return d.send(peer, "result", pack_result(cid, OK, "", blob(value)), rid=0)[1]


def test_rpc_least_busy_and_results(rpc: Driver) -> None:
    assert rpc.op(A, "register", "f") is True
    assert rpc.op(B, "register", "f") is True
    targets = []
    calls = []
    for _ in range(4):
        rid, actions = call(rpc, C, "f")
        (peer, push), = pushes(actions)
        assert push.key == "f" and push.stream <= -CALL_BASE
        targets.append(peer)
        calls.append((rid, peer, -push.stream))
    assert sorted(targets) == [A, A, B, B]  # spread evenly
    rid, peer, cid = calls[0]
    out = answers(result(rpc, peer, cid, 42))
    assert out == {(C, rid): 42}
    _, actions = call(rpc, C, "f")
    assert pushes(actions)[0][0] == peer  # the one that just finished is least busy


def test_rpc_unknown_name(rpc: Driver) -> None:
    rid, actions = call(rpc, C, "nope")
    assert isinstance(answers(actions)[(C, rid)], NotFound)


def test_rpc_registrant_lost_mid_call(rpc: Driver) -> None:
    rpc.op(A, "register", "f")
    rid, _ = call(rpc, C, "f")
    out = answers(rpc.component.on_peer_lost(A, 0.0))
    assert isinstance(out[(C, rid)], WorkerLost)
    rid, actions = call(rpc, C, "f")
    assert isinstance(answers(actions)[(C, rid)], NotFound)


def test_rpc_timeout_then_late_answer_is_dropped(rpc: Driver) -> None:
    rpc.op(A, "register", "f")
    rpc.op(B, "register", "f")
    rid, actions = call(rpc, C, "f", timeout=1.0)
    (hung, push), = pushes(actions)
    assert rpc.component.next_deadline() == 1.0
    out = rpc.tick(1.0)
    assert isinstance(answers(out)[(C, rid)], RequestTimeout)
    assert [p for p, m in pushes(out)] == [hung]  # told to skip it
    _, actions = call(rpc, C, "f")
    assert pushes(actions)[0][0] != hung  # the hung registrant still counts as busy
    assert result(rpc, hung, -push.stream, "late") == []


def test_rpc_failure_is_forwarded(rpc: Driver) -> None:
    rpc.op(A, "register", "f")
    rid, actions = call(rpc, C, "f")
    cid = -pushes(actions)[0][1].stream
    _, out = rpc.send(A, "result", pack_result(cid, ErrorCode.NO_HANDLER, "gone", b""), rid=0)
    assert "gone" in str(answers(out)[(C, rid)])


def test_rpc_caller_lost_withdraws_its_calls(rpc: Driver) -> None:
    rpc.op(A, "register", "f")
    call(rpc, C, "f")
    out = rpc.component.on_peer_lost(C, 0.0)
    assert [(p, m.key) for p, m in pushes(out)] == [(A, "")]


def test_rpc_unregister(rpc: Driver) -> None:
    rpc.op(A, "register", "f")
    assert rpc.op(A, "unregister", "f") is True
    assert rpc.op(A, "unregister", "f") is False
    assert rpc.component.names == {}
    with pytest.raises(ValueError):
        rpc.op(A, "register", "")
