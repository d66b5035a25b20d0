"""Targets for the broker-process tests (importable, so ``spawn`` children find them)."""

from __future__ import annotations

import time
from typing import Any


def timed_ops(d: Any, lst: Any, lock: Any, n: int, out: Any) -> None:
    """Do ``n`` rounds of dict, list and lock operations; report the slowest round (s)."""
    worst = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        with lock:
            d["n"] = d.get("n", 0) + 1
        lst.append(i)
        _ = lst[-1]
        worst = max(worst, time.perf_counter() - t0)
    out.put(worst)


def park_on(event: Any, ready: Any) -> None:
    """Say we are connected, then wait on a manager Event (parked in the broker)."""
    ready.put("parked")
    event.wait()


def shared_state_rounds(child: Any) -> None:
    """A mesh child: ``rounds`` runs ``n`` rounds of cache, lock and publish operations
    and answers the slowest round (s)."""

    @child.handler("rounds")
    def rounds(n: int) -> float:
        cache, times = child.cache("busy"), []
        for i in range(n):
            t0 = time.perf_counter()
            cache[f"k{i % 8}"] = i
            cache.incr("count")
            with child.lock("busy-lock", ttl=10):
                pass
            child.publish("busy.tick", i)
            times.append(time.perf_counter() - t0)
        return max(times)

    child.run()


def gil_hog(child: Any) -> None:
    """A mesh child whose ``hog`` handler sits in GIL-holding C calls for ``seconds``."""
    import re

    @child.handler("hog")
    def hog(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            re.match(r"(a+)+b", "a" * 22)

    child.run()
