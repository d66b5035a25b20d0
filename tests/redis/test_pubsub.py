"""Publish/subscribe on a real Redis: matching, order, counts, slow subscribers, faults,
and no thread left behind."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mpmesh import BrokerUnavailable, MeshClosed, SerializationError
from mpmesh._redis._link import Link
from mpmesh._redis._pubsub import RedisPubSub
from tests.conftest import wait_for

Make = Callable[..., Any]


class Inbox:
    """A callback that keeps what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, str]] = []

    def __call__(self, payload: Any, channel: str) -> None:
        self.got.append((payload, channel))

    def has(self, n: int, timeout: float = 10.0) -> bool:
        return wait_for(lambda: len(self.got) >= n, timeout)


@pytest.fixture
def pubsub(link: Link, closing: Callable[[Any], Any]) -> RedisPubSub:
    return closing(RedisPubSub(link))  # type: ignore[no-any-return]


@pytest.fixture
def process(make_link: Make, closing: Callable[[Any], Any]) -> Make:
    """``process(mesh="t", **options)``: another process's pub/sub, as far as Redis can tell."""
    return lambda mesh="t", **options: closing(RedisPubSub(make_link(mesh), **options))


def threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("mpmesh-redis")]


def test_an_exact_channel(pubsub: RedisPubSub, process: Make) -> None:
    inbox = Inbox()
    sub = pubsub.subscribe("orders", inbox)
    publisher = process()
    assert publisher.publish("orders", {"id": 1}) == 1
    assert publisher.publish("orders.x", 2) == 0 and publisher.publish("order", 3) == 0
    assert publisher.publish("orders") == 1
    assert inbox.has(2)
    assert inbox.got == [({"id": 1}, "orders"), (None, "orders")]
    assert sub.active and sub.pattern == "orders" and sub.callback is inbox
    assert repr(sub) == "<Subscription 'orders' active>"


def test_a_prefix_pattern_matches_at_any_depth_and_not_a_sibling(pubsub: RedisPubSub) -> None:
    inbox = Inbox()
    pubsub.subscribe("orders.*", inbox)
    for channel in ("ordersx", "orders", "order.a", "orders.a", "xorders.b", "orders.a.b"):
        pubsub.publish(channel, channel)
    everything = Inbox()
    pubsub.subscribe("*", everything)
    pubsub.publish("any.thing", 1)
    assert inbox.has(2) and everything.has(1)
    assert [c for _, c in inbox.got] == ["orders.a", "orders.a.b"] and everything.got == [(1, "any.thing")]


@pytest.mark.parametrize("prefix,matching,other", [
    ("a[b].", "a[b].x", "ab.x"),
    ("q?.", "q?.1", "qx.1"),
    ("back\\slash.", "back\\slash.1", "backslash.1"),
    ("x]y.", "x]y.1", "x].1"),
])
def test_glob_characters_in_a_prefix_match_themselves(pubsub: RedisPubSub, prefix: str, matching: str,
                                                      other: str) -> None:
    inbox = Inbox()
    pubsub.subscribe(prefix + "*", inbox)
    assert pubsub.publish(other, 0) == 0
    assert pubsub.publish(matching, 1) == 1
    assert inbox.has(1) and inbox.got == [(1, matching)]


def test_channels_with_glob_characters_and_meshes_with_them(pubsub: RedisPubSub, process: Make) -> None:
    exact = Inbox()
    pubsub.subscribe("a[1]", exact)
    assert pubsub.publish("a1", 0) == 0 and pubsub.publish("a[1]", 1) == 1
    odd = process("m[1]")  # a mesh whose name is a glob: its patterns stay within it
    theirs = Inbox()
    odd.subscribe("*", theirs)
    assert process("m1").publish("c", "other mesh") == 0
    assert pubsub.publish("c", "mesh t") == 0
    assert odd.publish("c", "m[1]") == 1
    assert exact.has(1) and theirs.has(1)
    assert exact.got == [(1, "a[1]")] and theirs.got == [("m[1]", "c")]


def test_each_publisher_s_messages_arrive_in_order(pubsub: RedisPubSub, process: Make) -> None:
    inbox = Inbox()
    pubsub.subscribe("seq.*", inbox)
    publishers = [process() for _ in range(2)]

    def publish(i: int) -> None:
        for n in range(1000):
            publishers[i].publish(f"seq.{i}", n)

    workers = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert inbox.has(2000, 20)
    for i in range(2):
        assert [n for n, channel in inbox.got if channel == f"seq.{i}"] == list(range(1000))


def test_a_raising_callback_is_logged_and_the_subscription_lives_on(
        pubsub: RedisPubSub, caplog: pytest.LogCaptureFixture) -> None:
    got: list[Any] = []

    def fragile(payload: Any, channel: str) -> None:
        if payload == "boom":
            raise RuntimeError("callback failed")
        got.append(payload)

    sub = pubsub.subscribe("c", fragile)
    with caplog.at_level(logging.ERROR, logger="mpmesh"):
        pubsub.publish("c", "boom")
        pubsub.publish("c", "after")
        assert wait_for(lambda: got == ["after"])
    assert sub.active and any("callback failed" in r.getMessage() or r.exc_info and "callback failed"
                              in str(r.exc_info[1]) for r in caplog.records)
    assert pubsub.stats()["pubsub_delivered"] == 2


def test_a_message_not_sealed_with_the_mesh_key_is_never_unpickled(
        pubsub: RedisPubSub, link: Link, caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()
    pubsub.subscribe("c", inbox)
    with caplog.at_level(logging.ERROR, logger="mpmesh"):
        assert link.redis.publish(link.key("ps", "c"), b"m" + b"\x00" * 32 + pickle.dumps("forged")) == 1
        pubsub.publish("c", "sealed")
        assert inbox.has(1)
    assert inbox.got == [("sealed", "c")] and caplog.records


def test_publish_counts_the_subscriptions_redis_reached(pubsub: RedisPubSub, process: Make) -> None:
    assert pubsub.publish("n.a", 1) == 0
    first, second, third = Inbox(), Inbox(), Inbox()
    pubsub.subscribe("n.a", first)
    assert pubsub.publish("n.a", 2) == 1
    elsewhere = process()
    elsewhere.subscribe("n.*", second)
    assert pubsub.publish("n.a", 3) == 2
    elsewhere.subscribe("n.*", third)  # the same pattern in the same process: one Redis subscription
    assert pubsub.publish("n.a", 4) == 2
    assert first.has(3) and second.has(2) and third.has(1)
    assert [p for p, _ in third.got] == [4]
    assert pubsub.stats()["subscriptions"] == 1 and elsewhere.stats()["subscriptions"] == 2


def test_a_subscription_gets_no_message_published_before_it(pubsub: RedisPubSub) -> None:
    first, second = Inbox(), Inbox()
    pubsub.subscribe("c", first)
    with pubsub._lane_lock:  # the reader cannot hand over what it reads next...
        pubsub.publish("c", "before")
        joining = threading.Thread(target=lambda: pubsub.subscribe("c", second))
        joining.start()  # ...while the second subscription joins the pattern's Redis subscription
        assert wait_for(lambda: len(pubsub._names[(b"subscribe", pubsub._prefix + b"c")]) == 2)
    joining.join(10)
    pubsub.publish("c", "after")
    assert first.has(2) and second.has(1)
    assert [p for p, _ in first.got] == ["before", "after"] and second.got == [("after", "c")]


def test_a_slow_subscriber_drops_and_counts_while_a_fast_one_gets_everything(
        pubsub: RedisPubSub, process: Make) -> None:
    slow = process(high_water=50)
    gate = threading.Event()
    slow_got: list[int] = []

    def stuck(payload: int, channel: str) -> None:
        gate.wait(20)
        slow_got.append(payload)

    fast = Inbox()
    slow.subscribe("flood", stuck)
    pubsub.subscribe("flood", fast)
    for n in range(1000):
        assert pubsub.publish("flood", n) == 2  # Redis counts it, dropped later or not
    assert fast.has(1000) and [p for p, _ in fast.got] == list(range(1000))
    assert wait_for(lambda: slow.stats()["pubsub_received"] == 1000)
    stats = slow.stats()
    assert stats["pubsub_dropped"] >= 1000 - 51 and stats["pubsub_waiting"] <= 50
    gate.set()
    assert wait_for(lambda: len(slow_got) == 1000 - stats["pubsub_dropped"])
    assert slow_got == sorted(slow_got) and slow_got[0] == 0
    assert pubsub.stats()["pubsub_dropped"] == 0


def test_unsubscribe_stops_delivery_and_skips_what_is_under_way(pubsub: RedisPubSub) -> None:
    gate, entered = threading.Event(), threading.Event()
    got: list[int] = []

    def slow(payload: int, channel: str) -> None:
        entered.set()
        gate.wait(10)
        got.append(payload)

    sub = pubsub.subscribe("u", slow)
    for n in range(5):
        pubsub.publish("u", n)
    assert entered.wait(10) and wait_for(lambda: pubsub.stats()["pubsub_received"] == 5)
    sub.unsubscribe()
    sub.unsubscribe()  # twice: nothing
    gate.set()
    assert pubsub.publish("u", 99) == 0
    assert wait_for(lambda: pubsub.stats()["pubsub_waiting"] == 0)
    assert got == [0] and not sub.active and repr(sub) == "<Subscription 'u' ended>"
    with pubsub.subscribe("u", Inbox()) as again:
        assert again.active and pubsub.publish("u", 1) == 1
    assert not again.active and pubsub.publish("u", 2) == 0


def test_arguments_are_checked_before_anything_is_sent(pubsub: RedisPubSub) -> None:
    with pytest.raises(ValueError):
        pubsub.subscribe("a*b", Inbox())
    with pytest.raises(ValueError):
        pubsub.subscribe("", Inbox())
    with pytest.raises(TypeError):
        pubsub.subscribe("a", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pubsub.publish("a.*", 1)
    with pytest.raises(ValueError):
        pubsub.publish(3, 1)  # type: ignore[arg-type]
    with pytest.raises(SerializationError):
        pubsub.publish("a", (x for x in range(3)))
    assert threads() == []  # nothing subscribed: no connection, no thread


def test_subscriptions_come_back_after_redis_restarts(own_redis: Any, closing: Callable[[Any], Any],
                                                      authkey: bytes) -> None:
    link = closing(Link(own_redis.url, "t", authkey, timeout=2.0))
    pubsub = closing(RedisPubSub(link))
    exact, prefix = Inbox(), Inbox()
    pubsub.subscribe("r", exact)
    pubsub.subscribe("r.*", prefix)
    own_redis.stop()
    with pytest.raises(BrokerUnavailable):
        pubsub.subscribe("meanwhile", Inbox())
    own_redis.start()
    assert wait_for(lambda: pubsub.publish("r", "back") == 1 and pubsub.publish("r.x", "back") == 1, 15)
    assert exact.has(1) and prefix.has(1)
    assert pubsub.stats()["pubsub_reconnects"] >= 1 and pubsub.stats()["subscriptions"] == 2


def test_subscribing_with_redis_down_fails_at_once(own_redis: Any, closing: Callable[[Any], Any],
                                                   authkey: bytes) -> None:
    link = closing(Link(own_redis.url, "t", authkey, timeout=2.0))
    pubsub = closing(RedisPubSub(link))
    own_redis.stop()
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        pubsub.subscribe("c", Inbox())
    assert time.monotonic() - start < 3 and threads() == []


def test_close_ends_the_threads_and_the_subscriptions(link: Link) -> None:
    pubsub = RedisPubSub(link)
    sub = pubsub.subscribe("c", Inbox())
    assert sorted(threads()) == ["mpmesh-redis-callbacks", "mpmesh-redis-pubsub"]
    pubsub.close()
    assert threads() == [] and not sub.active
    pubsub.close()  # twice: nothing
    with pytest.raises(MeshClosed):
        pubsub.subscribe("c", Inbox())
    assert pubsub.publish("c", 1) == 0  # publishing needs no subscription connection


def test_close_from_a_callback(link: Link) -> None:
    pubsub = RedisPubSub(link)
    done = threading.Event()

    def closer(payload: Any, channel: str) -> None:
        pubsub.close()
        done.set()

    pubsub.subscribe("c", closer)
    pubsub.publish("c", 1)
    assert done.wait(10) and wait_for(lambda: threads() == [], 5)
