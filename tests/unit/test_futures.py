"""MeshFuture makes its Condition only when needed: it must still be a Future in full."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from mpmesh._client._futures import Call, Latch, MeshFuture
from mpmesh._client._local import LocalClient
from tests.conftest import wait_for

LONG = 10.0


def test_settled_before_anyone_looks() -> None:
    fut = MeshFuture()
    fut.set_result(5)
    assert fut.done() and not fut.cancelled() and fut.result() == 5 and fut.exception() is None
    failed = MeshFuture()
    failed.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        failed.result()
    assert isinstance(failed.exception(), ValueError)


def test_a_waiter_wakes_when_another_thread_settles_it() -> None:
    fut = MeshFuture()

    def settle() -> None:
        # Settle only once the waiter has made the Condition it blocks on (the path
        # that must notify it).
        assert wait_for(lambda: fut._cond is not None, LONG)
        fut.set_result("late")

    thread = threading.Thread(target=settle)
    thread.start()
    assert fut.result(LONG) == "late"
    thread.join(LONG)


def test_timeout_while_pending() -> None:
    with pytest.raises(concurrent.futures.TimeoutError):
        MeshFuture().result(0.01)


def test_settling_twice_or_after_cancel_is_an_error() -> None:
    fut = MeshFuture()
    fut.set_result(1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        fut.set_result(2)
    cancelled = MeshFuture()
    assert cancelled.cancel() and cancelled.cancelled() and cancelled.done()
    with pytest.raises(concurrent.futures.InvalidStateError):
        cancelled.set_exception(ValueError())
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result()


def test_callbacks_wait_and_as_completed() -> None:
    seen: list[object] = []
    called = threading.Event()
    fut = MeshFuture()
    fut.add_done_callback(lambda f: (seen.append(f.result()), called.set()))
    futures = [MeshFuture() for _ in range(3)]
    timer = threading.Timer(0.02, lambda: [f.set_result(i) for i, f in enumerate([fut, *futures])])
    timer.start()
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=LONG)) == [1, 2, 3]
    done, not_done = concurrent.futures.wait([fut], timeout=LONG)
    assert done == {fut} and not not_done
    assert called.wait(LONG) and seen == [0]
    timer.join(LONG)


def test_waiters_installed_on_pending_futures_are_woken() -> None:
    # A future settled unobserved makes neither its Condition nor its lists; wait() and
    # as_completed() install waiters on pending ones (under the Condition they make)
    # and must be woken by the settling.
    early = MeshFuture()
    early.set_result("early")
    assert early._cond is None and "_waiters" not in vars(early)
    pending = [MeshFuture() for _ in range(3)]

    def settle() -> None:
        assert wait_for(lambda: all(f._cond is not None and f._waiters for f in pending), LONG)
        for i, f in enumerate(pending):
            f.set_result(i)

    thread = threading.Thread(target=settle)
    thread.start()
    results = [f.result() for f in concurrent.futures.as_completed([early, *pending], timeout=LONG)]
    assert sorted(results, key=str) == [0, 1, 2, "early"]
    thread.join(LONG)
    again = MeshFuture()
    thread = threading.Thread(target=lambda: wait_for(lambda: bool(again._waiters), LONG) and again.set_result(1))
    thread.start()
    done, not_done = concurrent.futures.wait([again, early], return_when=concurrent.futures.ALL_COMPLETED,
                                             timeout=LONG)
    assert done == {again, early} and not not_done
    thread.join(LONG)


def test_asyncio_can_await_it() -> None:
    fut = MeshFuture()

    async def main() -> object:
        threading.Timer(0.02, fut.set_result, ("from a thread",)).start()
        return await asyncio.wrap_future(fut)

    assert asyncio.run(main()) == "from a thread"


def test_a_call_settled_by_another_thread_wakes_its_waiter() -> None:
    client = LocalClient(None)  # type: ignore[arg-type]
    call = Call(client, 1)

    def settle() -> None:
        # Only once the waiter blocks on the Event it made (the path that must wake it).
        assert wait_for(lambda: call._latch._event is not None, LONG)
        call._settle(None, KeyError("gone"))

    thread = threading.Thread(target=settle)
    thread.start()
    with pytest.raises(KeyError):
        call.result(LONG)
    thread.join(LONG)
    with pytest.raises(concurrent.futures.TimeoutError):
        Call(client, 2).result(0.01)


def test_a_latch_opened_before_anyone_waits_makes_no_event() -> None:
    latch = Latch()
    latch.open()
    assert latch.wait(0) and latch._event is None
    assert not Latch().wait(0.01)
