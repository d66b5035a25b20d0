"""Shared state under faults: holders and registrants killed mid-flight, stalled
subscribers, racing writers, stale grants, strangers with the wrong key.

Sleeps appear only inside workers, as the fault; tests wait on events, futures, what
children publish, and the OS.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import mpmesh
from mpmesh._broker._pubsub import HIGH_WATER_BYTES
from tests.conftest import wait_for
from tests.integration import shared_workers, workers

WAIT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def _stdlib_helpers() -> None:
    workers.start_stdlib_helpers()


@pytest.fixture
def m() -> Iterator[mpmesh.Master]:
    with mpmesh.Master(timeout=60.0) as master:
        yield master


def announced(m: mpmesh.Master, channel: str) -> tuple[threading.Event, list[Any]]:
    got: list[Any] = []
    event = threading.Event()

    def on(payload: Any, _: str) -> None:
        got.append(payload)
        event.set()

    m.subscribe(channel, on)
    return event, got


def test_lock_holder_sigkilled_while_waiters_queue(m: mpmesh.Master) -> None:
    m.spawn_child("holder", shared_workers.shared, auto_restart=False)
    m.spawn_child("waiter", shared_workers.shared, auto_restart=False)
    locked, info = announced(m, "locked")
    m.request("hold-lock", "holder", ("job", None))  # no TTL: only its death frees it
    assert locked.wait(WAIT_S)
    child_wait = m.request("lock-and-release", "waiter", "job")  # first in the queue
    assert wait_for(lambda: m.stats()["lock_waiters"] == 1, WAIT_S)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ours = pool.submit(m.lock, "job", None, WAIT_S)             # second
        assert wait_for(lambda: m.stats()["lock_waiters"] == 2, WAIT_S)
        assert not child_wait.done()
        killed_at = time.monotonic()
        os.kill(info[0]["pid"], signal.SIGKILL)
        child_token = child_wait.result(WAIT_S)
        grant = ours.result(WAIT_S)
        granted_after = time.monotonic() - killed_at
    assert info[0]["token"] < child_token < grant.token  # FIFO, fencing tokens increase
    assert granted_after < 3.0  # at once, not after some timeout
    grant.release()


def test_registrant_killed_mid_call_fails_with_worker_lost(m: mpmesh.Master) -> None:
    m.spawn_child("r", shared_workers.shared, auto_restart=False)
    pid = m.send_request("register", "r", "slow")
    started, _ = announced(m, "rpc-started")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(m.call, "slow", "tag", timeout=60)
        assert started.wait(WAIT_S)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(mpmesh.WorkerLost, match="slow"):
            call.result(WAIT_S)
    with pytest.raises(mpmesh.NotFound):  # its registration went with it
        m.call("slow", "again", timeout=1)


def test_a_stalled_subscriber_does_not_grow_the_broker(m: mpmesh.Master) -> None:
    m.spawn_child("slow", shared_workers.shared)
    m.send_request("subscribe-stalled", "slow", "flood")
    received = [0]
    progress = threading.Condition()
    n, size = 1500, 16 * 1024  # ~24 MiB, three times the high-water mark
    ahead = 64  # 1 MiB: the fast subscriber keeps up, far under the high-water mark

    def fast(payload: Any, channel: str) -> None:
        with progress:
            received[0] += 1
            progress.notify_all()

    m.subscribe("flood", fast)
    payload = b"x" * size
    reached = []
    for i in range(n):
        # The fast subscriber shares this process's GIL with the publishing loop: without
        # this bound it can fall 8 MiB behind and be dropped as a slow consumer itself.
        with progress:
            assert progress.wait_for(lambda: received[0] >= i - ahead, WAIT_S)
        reached.append(m.publish("flood", payload))
    stats = m.stats()
    assert stats["pubsub_dropped"] > 0
    assert stats["pubsub_queued_bytes"] <= 2 * HIGH_WATER_BYTES
    assert stats["broker_memory_bytes"] < 400 * 2**20
    assert reached[0] == 2 and reached[-1] == 1  # the stalled one stopped being reached
    with progress:  # the fast subscriber (this process) got every message
        assert progress.wait_for(lambda: received[0] == n, WAIT_S)
    assert m.send_request("sleep", "slow", 0) == 0  # and the stalled one is still served


@pytest.mark.timeout(300)
def test_cas_race_between_four_processes_loses_no_update(m: mpmesh.Master) -> None:
    per_process = 10_000
    m.spawn_group("racers", shared_workers.shared, 4)
    futures = [m.request("cas-incr", f"racers-{i}", ("race", "n", per_process), timeout=300)
               for i in range(4)]
    retries = [f.result(300) for f in futures]
    assert m.cache("race")["n"] == 4 * per_process
    assert all(r >= 0 for r in retries)


def test_wrong_authkey_is_refused_and_the_mesh_keeps_serving() -> None:
    with mpmesh.Master(name=f"auth-{os.getpid()}", authkey=b"right") as m:
        m.cache("c")["k"] = 1
        with pytest.raises(mpmesh.AuthenticationError):
            mpmesh.connect(m.name, authkey=b"wrong", autospawn=False)
        with mpmesh.connect(m.name, autospawn=False) as h:  # the key file works
            assert h.cache("c")["k"] == 1


def test_garbage_arguments_are_the_callers_error(m: mpmesh.Master) -> None:
    from mpmesh._client._base import make_hello
    from mpmesh._client._socket import SocketClient
    from mpmesh._wire._messages import Role

    client = SocketClient(m.address, m.authkey, make_hello(Role.CLIENT))
    try:
        for component, op in (("cache", "get"), ("locks", "acquire"), ("pubsub", "subscribe"),
                              ("rpc", "register"), ("pubsub", "publish"), ("rpc", "call")):
            with pytest.raises((TypeError, ValueError)):
                client.wait(client.op(component, op, payload=b"\xff\x00garbage"), time.monotonic() + WAIT_S)
        with pytest.raises(mpmesh.NotFound):
            client.wait(client.op("nope", "x", payload=b""), time.monotonic() + WAIT_S)
    finally:
        client.close()
    still = m.cache("still")
    still["ok"] = True
    assert still["ok"] is True


def test_an_expired_ttl_lets_the_next_holder_in_while_the_old_one_still_runs(m: mpmesh.Master) -> None:
    m.spawn_child("old", shared_workers.shared, auto_restart=False)
    locked, info = announced(m, "locked")
    m.request("hold-lock", "old", ("lease", 0.3))  # holds its process forever, the lock 0.3 s
    assert locked.wait(WAIT_S)
    grant = m.lock("lease", wait=WAIT_S)
    assert grant.token > info[0]["token"]
    c = m.cache("fence")
    from mpmesh._state._shared import LockGrant

    stale = LockGrant(m.address, "lease", info[0]["token"], 0.3, None)
    with pytest.raises(mpmesh.FencedError):
        c.fenced_set(stale, "k", "stale write")
    c.fenced_set(grant, "k", "fresh write")
    assert c["k"] == "fresh write"
    os.kill(info[0]["pid"], signal.SIGKILL)  # it would hold its handler until shutdown's timeout
