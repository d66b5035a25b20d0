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
