"""No blocking call hangs on a broker that stopped answering.

The broker process of a ``Manager()`` or of a Master's shared state is frozen with
SIGSTOP (always resumed, in a ``finally``): every call ends within its handle's timeout
with RequestTimeout or BrokerUnavailable, whether it expects its answer at once or waits
by design (a lock, ``Queue.get()``); a call that waits by design on a broker that is
alive keeps waiting past the timeout; a write the frozen broker never takes ends too. A
plain write to a Manager dict is left in the write ring at once instead, and applied
when the broker runs again; a free Manager Lock is taken, and a held one released, in its
cell in shared memory.
Once resumed, the broker serves again with its state intact (a connection whose write
was cut short says it is closed).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mpmesh
from mpmesh._managers._sync import SyncManager
from mpmesh._state._shared import LockGrant
from tests.conftest import wait_for

TIMEOUT = 1.0  # the handles' timeout in these tests
SLACK = 1.5  # what a loaded machine may add to it
STUCK = (mpmesh.RequestTimeout, mpmesh.BrokerUnavailable)

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def ends_in_time(call: Callable[[], object]) -> BaseException:
    """``call()`` raises RequestTimeout or BrokerUnavailable within the timeout."""
    start = time.monotonic()
    with pytest.raises(STUCK) as info:
        call()
    assert time.monotonic() - start < TIMEOUT + SLACK
    return info.value


def at_once_or_ends_in_time(call: Callable[[], object]) -> bool:
    """A call that shared memory can serve: done at once without the broker (True: a
    plain write left in the write ring, which the broker applies when it runs again, or a
    free Manager Lock taken, or a held one released, in its cell), or, where there is no
    shared memory, ``ends_in_time`` (False)."""
    start = time.monotonic()
    try:
        call()
    except STUCK:
        assert time.monotonic() - start < TIMEOUT + SLACK
        return False
    assert time.monotonic() - start < 0.5
    return True


def serves_again(call: Callable[[], object]) -> None:
    """After SIGCONT: ``call()`` succeeds once the broker's answer to the ping that found
    it silent has come in (calls until then are refused at once)."""
    def works() -> bool:
        try:
            call()
        except mpmesh.BrokerUnavailable:
            return False
        return True

    assert wait_for(works, 10.0)


class Waiter(threading.Thread):
    """Runs a blocking call on a thread and keeps what it returned or raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._call = call
        self.result: object = None
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc
        self.ended_at = time.monotonic()


# -- mpmesh.Manager(): its broker process ---------------------------------------------------

@pytest.fixture
def manager() -> Iterator[Any]:
    with mpmesh.Manager(timeout=TIMEOUT) as m:
        yield m


MANAGER_CALLS: dict[str, Callable[[Any], object]] = {
    "dict write": lambda ns: ns["d"].__setitem__("b", 2),
    "dict read": lambda ns: ns["d"].get("never read here"),
    "lock acquire": lambda ns: ns["free"].acquire(),
    "lock release": lambda ns: ns["held"].release(),
    "queue get (waits by design)": lambda ns: ns["q"].get(),
}


@pytest.mark.parametrize("name", sorted(MANAGER_CALLS))
def test_a_manager_call_on_a_frozen_broker_ends_in_time(manager: Any, name: str) -> None:
    ns = {"d": manager.dict(a=1), "free": manager.Lock(), "held": manager.Lock(), "q": manager.Queue()}
    ns["held"].acquire()
    left = False
    with frozen(manager._process.pid):
        if name in ("dict write", "lock acquire", "lock release"):
            left = at_once_or_ends_in_time(lambda: MANAGER_CALLS[name](ns))
        else:
            ends_in_time(lambda: MANAGER_CALLS[name](ns))
        ends_in_time(lambda: ns["d"].pop("c", None))  # and the next call at once
    serves_again(lambda: ns["d"].__setitem__("c", 3))
    assert ns["d"]["a"] == 1 and ns["d"]["c"] == 3  # the objects outlived the freeze
    if left and name == "dict write":
        assert ns["d"]["b"] == 2  # the write left in the ring was applied
    ns["q"].put("item")
    assert ns["q"].get(timeout=5) == "item"  # an abandoned get() took nothing


@pytest.mark.parametrize("what", ["Queue.get()", "Lock.acquire()"])
def test_a_manager_call_that_waits_by_design_waits_while_the_broker_lives_and_ends_when_it_stops(
        manager: Any, what: str) -> None:
    q, lock = manager.Queue(), manager.Lock()
    lock.acquire()
    waiter = Waiter(q.get if what == "Queue.get()" else lock.acquire)
    waiter.start()
    waiter.join(3 * TIMEOUT)  # three timeouts: the broker answers the pings meanwhile
    assert waiter.is_alive(), f"{what} ended while the broker was alive: {waiter.error!r}"
    pid = manager._process.pid
    with frozen(pid):
        stopped_at = time.monotonic()
        waiter.join(TIMEOUT + SLACK + 1)
        assert not waiter.is_alive()
        assert isinstance(waiter.error, mpmesh.BrokerUnavailable)
        assert waiter.ended_at - stopped_at < TIMEOUT + SLACK
    serves_again(q.qsize)
    # The abandoned call was withdrawn: what it would have taken is there for the next.
    if what == "Queue.get()":
        q.put("item")
        assert q.get(timeout=5) == "item"
    else:
        lock.release()
        assert lock.acquire(timeout=5)


def test_a_manager_call_waiting_by_design_gets_its_answer_after_a_long_wait(manager: Any) -> None:
    q = manager.Queue()
    waiter = Waiter(q.get)
    waiter.start()
    waiter.join(3 * TIMEOUT)
    assert waiter.is_alive()
    q.put("late")
    waiter.join(10)
    assert waiter.error is None and waiter.result == "late"


def _hang() -> None:
    threading.Event().wait()


def test_a_manager_server_whose_initializer_hangs_is_stopped_in_time() -> None:
    manager = SyncManager(timeout=TIMEOUT)
    start = time.monotonic()
    with pytest.raises(mpmesh.BrokerUnavailable, match="initializer"):
        manager.start(initializer=_hang)
    assert time.monotonic() - start < TIMEOUT + SLACK + 1  # its SIGTERM included


# -- a Master's state broker -----------------------------------------------------------------

@pytest.fixture
def master() -> Iterator[mpmesh.Master]:
    with mpmesh.Master(timeout=TIMEOUT) as m:
        yield m


def _state_broker(m: mpmesh.Master) -> int:
    assert m._state_proc is not None
    pid = m._state_proc.pid
    assert m.stats()["broker_pid"] == pid
    return pid


MASTER_CALLS: dict[str, Callable[[dict[str, Any]], object]] = {
    "cache get": lambda ns: ns["cache"].get("never read here"),
    "cache set": lambda ns: ns["cache"].set("y", 2),
    "lock acquire": lambda ns: ns["m"].lock("free"),
    "lock acquire (waits by design)": lambda ns: ns["m"].lock("held"),
    "LockGrant.release": lambda ns: ns["grant"].release(),
    "dict write": lambda ns: ns["d"].__setitem__("b", 2),
    "dict read": lambda ns: ns["d"].get("never read here"),
}


@pytest.mark.parametrize("name", sorted(MASTER_CALLS))
def test_a_shared_state_call_on_a_frozen_state_broker_ends_in_time(master: mpmesh.Master, name: str) -> None:
    cache = master.cache("c")
    cache["x"] = 1
    ns = {"m": master, "cache": cache, "grant": master.lock("held"), "d": master.dict(a=1)}
    left = False
    with frozen(_state_broker(master)):
        if name in ("dict write", "cache set"):
            left = at_once_or_ends_in_time(lambda: MASTER_CALLS[name](ns))
        else:
            ends_in_time(lambda: MASTER_CALLS[name](ns))
        ends_in_time(lambda: cache.pop("z", None))  # and the next call at once
    serves_again(lambda: cache.set("z", 3))
    assert cache["x"] == 1 and cache["z"] == 3 and ns["d"]["a"] == 1
    if left:  # the write left in the ring was applied
        assert ns["d"]["b"] == 2 if name == "dict write" else cache["y"] == 2
    if name == "LockGrant.release":  # refused or not, the release reached the broker
        master.lock("held", wait=5).release()


def test_a_lock_waited_for_by_design_is_granted_after_a_long_wait(master: mpmesh.Master) -> None:
    grant = master.lock("l")
    waiter = Waiter(lambda: master.lock("l"))
    waiter.start()
    waiter.join(3 * TIMEOUT)
    assert waiter.is_alive()
    grant.release()
    waiter.join(10)
    assert isinstance(waiter.result, LockGrant), waiter.error
    waiter.result.release()


def test_a_writer_the_frozen_broker_never_reads_ends_in_time(master: mpmesh.Master) -> None:
    cache = master.cache("c")
    cache["x"] = 1
    big = b"x" * (64 * 2**20)  # far more than the socket buffers hold
    with frozen(_state_broker(master)):
        err = ends_in_time(lambda: cache.set("big", big))
    # A frame cut short cannot be taken back: that connection is closed, and says so.
    assert isinstance(err, mpmesh.BrokerUnavailable) and "took no data" in str(err)
    with pytest.raises(mpmesh.BrokerUnavailable, match="took no data"):
        cache.get("x")


# -- the client's socket timeouts stay out of a plain wait ----------------------------------

def test_an_idle_subscriber_keeps_its_subscription(master: mpmesh.Master) -> None:
    """A reader thread idles on the socket far longer than its receive timeout."""
    got: queue.Queue[object] = queue.Queue()
    with master.subscribe("news", lambda payload, channel: got.put(payload)):
        time.sleep(3 * TIMEOUT)  # the idling is what is tested
        assert master.publish("news", "hello") == 1
        assert got.get(timeout=10) == "hello"
