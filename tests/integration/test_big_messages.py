"""Big messages: up to ``mpmesh.MAX_MESSAGE_BYTES`` goes through; more is MessageTooLarge.

The sender learns of a message over the limit before anything is sent, and its
connection stays usable; a reply over it reaches its caller as that error; a message
within it reaches a peer that keeps reading whatever its size (the broker's outbound
cap only disconnects a peer that does not read). The limit is lowered to a few MiB to
test the behaviour (``LIMIT``); one test moves a real 270 MB value (over the outbound cap) between processes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest

import mpmesh
from mpmesh._broker._payload import pack
from mpmesh._io import _loop
from mpmesh._wire import _codec, _messages
from mpmesh._wire._messages import Reply, Request, encode, encode_op

LIMIT = 4 * 2**20  # the message limit these tests set (the real one is 1 GiB)


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Lower this process's message limit to LIMIT (and so a broker's that runs here)."""
    monkeypatch.setattr(_messages, "MAX_MESSAGE_BYTES", LIMIT)
    return LIMIT


@pytest.fixture
def hosted(limit: int) -> Iterator[tuple[mpmesh.Master, Any]]:
    """A Master whose broker (shared state included) runs in this process, so it has the
    lowered limit too, and a connect() handle: a socket client of it."""
    with mpmesh.Master(broker="thread") as m:
        handle = mpmesh.connect(m.name, autospawn=False, timeout=30)
        try:
            yield m, handle
        finally:
            handle.close()


def _set_frame_size(cache: Any, key: str, value: bytes) -> int:
    """The body size of the frame ``cache.set(key, value)`` sends."""
    return len(encode_op(0, -1.0, b"cache", b"set", pack((cache.name, key, None), _codec.dumps(value)))) - 5


@pytest.mark.timeout(10)
def test_a_message_over_4_gib_is_message_too_large_not_a_struct_error() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 5 * 2**30

    with pytest.raises(mpmesh.MessageTooLarge):
        encode_op(1, -1.0, b"cache", b"set", Huge())
    with pytest.raises(mpmesh.MessageTooLarge):
        encode(Reply(1, Huge()))
    with pytest.raises(mpmesh.MessageTooLarge):
        encode(Request(1, 0, -1, 0, -1.0, 0.0, "act", "child", Huge()))
    assert issubclass(mpmesh.MessageTooLarge, ValueError)
    assert mpmesh.MAX_MESSAGE_BYTES == 2**30


@pytest.mark.timeout(60)
def test_a_message_over_the_limit_raises_before_sending_and_the_connection_stays_usable(limit: int) -> None:
    big = b"x" * (limit + 1)
    with mpmesh.Master() as m:  # its shared state is a process of its own: a socket client
        cache = m.cache("c")
        with pytest.raises(mpmesh.MessageTooLarge):
            cache.set("big", big)
        with pytest.raises(mpmesh.MessageTooLarge):
            m.publish("news", big)
        with pytest.raises(mpmesh.MessageTooLarge):
            m.call("fn", big)
        with pytest.raises(mpmesh.MessageTooLarge):  # the Master's own (in-process) client
            m.send_request("act", "nobody", big)
        cache.set("ok", 1)
        assert cache["ok"] == 1 and "big" not in cache
        assert m.publish("news", "small") == 0
        with pytest.raises(mpmesh.NotFound):
            m.send_request("act", "nobody", "small")
    with mpmesh.Manager() as manager:  # the proxy's short path
        d = manager.dict()
        with pytest.raises(mpmesh.MessageTooLarge):
            d["big"] = big
        d["ok"] = 1
        assert d.copy() == {"ok": 1}


@pytest.mark.timeout(60)
def test_a_message_exactly_at_the_limit_is_delivered(hosted: tuple[mpmesh.Master, Any], limit: int) -> None:
    _, handle = hosted
    cache = handle.cache("c", near=False)
    probe = b"y" * 2**20
    exact = b"y" * (len(probe) + limit - _set_frame_size(cache, "k", probe))
    assert _set_frame_size(cache, "k", exact) == limit
    cache.set("k", exact)
    assert cache.get("k") == exact
    with pytest.raises(mpmesh.MessageTooLarge):
        cache.set("k", exact + b"y")
    assert cache.get("k") == exact


def big_replier(child: mpmesh.Child) -> None:
    """A child whose handler returns one byte more than the limit it is given."""

    @child.handler("big")
    def big(n: int) -> bytes:
        _messages.MAX_MESSAGE_BYTES = n  # this child's limit: the test's, however it started
        return b"x" * (n + 1)

    child.run()


@pytest.mark.timeout(60)
def test_a_reply_over_the_limit_is_an_error_for_its_caller(hosted: tuple[mpmesh.Master, Any], limit: int) -> None:
    m, handle = hosted
    cache = handle.cache("c", near=False)
    cache.set("a", b"a" * (limit * 3 // 5))
    cache.set("b", b"b" * (limit * 3 // 5))
    with pytest.raises(mpmesh.MessageTooLarge, match="reply"):  # the broker's reply
        cache.mget(["a", "b"])
    assert len(cache) == 2 and cache.get("a") == b"a" * (limit * 3 // 5)  # still connected
    m.spawn_child("replier", big_replier)
    with pytest.raises(mpmesh.MessageTooLarge, match="reply"):  # a child's reply to a request
        m.send_request("big", "replier", limit, timeout=30)
    assert m.is_alive("replier")


@pytest.mark.timeout(60)
def test_a_peer_that_keeps_reading_gets_messages_far_over_the_outbound_cap(
        hosted: tuple[mpmesh.Master, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loop, "MAX_OUTBOUND_BYTES", 2**20)
    _, handle = hosted
    cache = handle.cache("c", near=False)
    value = b"v" * (3 * 2**20)  # three times the cap, each reply
    cache.set("v", value)
    for _ in range(5):
        assert cache.get("v") == value
    assert len(handle.nodes()) == 2  # never disconnected


@pytest.mark.timeout(60)
def test_a_peer_that_does_not_read_is_still_disconnected(
        hosted: tuple[mpmesh.Master, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loop, "MAX_OUTBOUND_BYTES", 64 * 2**10)
    monkeypatch.setattr(_loop, "OUTBOUND_STALL_S", 0.2)
    m, handle = hosted
    handle.cache("c").set("v", b"v" * 1024)
    client = handle._client
    payload = pack(("c", "v"))
    deadline = time.monotonic() + 30
    with pytest.raises(mpmesh.BrokerUnavailable):
        while time.monotonic() < deadline:  # asks, and never reads an answer
            client.op("cache", "get", payload=payload)
    assert [n.is_self for n in m.nodes()] == [True]  # the broker let it go, and serves on
    assert m.cache("c").get("v") == b"v" * 1024


# -- one real big value ------------------------------------------------------------------

# More than the broker's 256 MiB outbound cap in one reply; not much more, as each
# process on the way holds a few copies of it at once (~1.5 GiB in all at the peak).
SIZE = 270 * 10**6


def _write(cache: Any, ready: Any) -> None:
    cache.set("big", bytes(range(256)) * (SIZE // 256))
    ready.send(True)


def _read(cache: Any, out: Any) -> None:
    value = cache.get("big")
    out.send((len(value), hashlib.sha256(value).hexdigest()))


@pytest.mark.timeout(120)
def test_a_270_mb_value_goes_from_one_process_to_another() -> None:
    ctx = multiprocessing.get_context("fork")
    with mpmesh.Master() as m:
        cache = m.cache("big", near=False)
        for target in (_write, _read):  # one after the other: one copy in flight at a time
            here, there = ctx.Pipe(duplex=False)
            with here:
                proc = ctx.Process(target=target, args=(cache, there))
                proc.start()
                there.close()
                try:
                    assert here.poll(90), f"{target.__name__} did not finish"
                    got = here.recv()
                finally:
                    proc.join(30)
                    code = proc.exitcode
                    if code is not None:
                        proc.close()  # its sentinel, now (a failure's traceback holds proc)
            assert code == 0
        expected = hashlib.sha256(bytes(range(256)) * (SIZE // 256)).hexdigest()
        assert got == (SIZE // 256 * 256, expected)


@pytest.mark.timeout(60)
def test_an_rpc_result_over_the_limit_is_an_error_for_its_caller(hosted: tuple[mpmesh.Master, Any],
                                                                 limit: int) -> None:
    m, handle = hosted
    handle.register("big", lambda: b"x" * (limit + 1))
    with pytest.raises(mpmesh.MessageTooLarge):  # before: the caller waited out its timeout
        m.call("big", timeout=20)
    handle.register("small", lambda: b"ok")
    assert m.call("small", timeout=20) == b"ok"
