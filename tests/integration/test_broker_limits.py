"""Limits of the broker's host: threads serving user code that blocks."""

from __future__ import annotations

import os
import threading

import pytest

from mpmesh._broker._actions import Offload
from mpmesh._host import _inproc as _host
from tests.conftest import wait_for


@pytest.mark.timeout(60)
def test_threads_serving_blocking_user_code_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_host, "OFFLOAD_THREADS", 2)
    monkeypatch.setattr(_host, "EXTRA_OFFLOAD_THREADS", 1)
    host = _host.BrokerHost(f"limits-{os.getpid()}", os.urandom(32))
    host.start_thread()
    release = threading.Event()
    started: list[int] = []
    finished: list[int] = []

    def job(i: int) -> Offload:
        def run() -> object:
            started.append(i)
            release.wait(30)
            return i
        return Offload(run, lambda outcome, now: finished.append(outcome) or [])  # type: ignore[func-returns-value]

    def offload_threads() -> int:
        return sum(t.name.startswith("mpmesh-offload") for t in threading.enumerate())

    try:
        for i in range(6):
            host._offload(job(i))
        assert wait_for(lambda: len(started) == 3, timeout=10)   # 2 pooled + 1 of its own
        assert offload_threads() == 3 and len(started) == 3      # the other 3 wait for the pool
        release.set()
        assert wait_for(lambda: sorted(finished) == list(range(6)), timeout=10)
    finally:
        release.set()
        host.close()
        host._offload_pool.close()
