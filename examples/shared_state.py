"""Shared state across processes: a cache, a counter, a fenced lock, pub/sub and an RPC pool.

Run: python examples/shared_state.py
"""

from __future__ import annotations

import os

import mpmesh


def worker(child: mpmesh.Child) -> None:
    cache = child.cache("demo")

    @child.handler("bump")
    def bump(n: int) -> int:
        cache.incr("bumps")                                # atomic, from every process
        with child.lock("bump", ttl=10, wait=5) as grant:  # one process at a time
            total = int(cache.get("total") or 0) + n
            cache.fenced_set(grant, "total", total)        # refused if the grant expired
        child.publish("totals", {"by": child.name, "total": total})
        return total

    child.register("resize", lambda w, h: (w // 2, h // 2, os.getpid()))  # an RPC pool
    child.run()


def main() -> None:
    with mpmesh.Master() as m:
        received: list[object] = []
        m.subscribe("totals", lambda payload, channel: received.append(payload))
        m.spawn_group("w", worker, size=2)
        for i in range(4):
            m.send_request("bump", "w", i + 1)
        cache = m.cache("demo")
        print("bumps:", cache["bumps"], "total:", cache["total"])       # 4, 10
        print("resize:", m.call("resize", 800, 600, timeout=5))         # least-busy worker
        print("nodes:", [(n.name, n.pid) for n in m.nodes()])
        print("published so far:", len(received))
        print("stats:", {k: v for k, v in m.stats().items() if k.startswith(("cache_", "lock", "pubsub"))})


if __name__ == "__main__":
    main()
