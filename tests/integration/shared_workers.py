"""Targets for the shared-state tests (importable, so every start method works).

Children report progress through the mesh itself (cache keys, pub/sub), never through
sleeps: a test waits on what they publish.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import mpmesh


def shared(child: mpmesh.Child, cache: mpmesh._state._shared.Cache | None = None) -> None:
    """A worker with a handler for each shared-state behaviour the tests need."""

    @child.handler("cas-incr")
    def cas_incr(data: tuple[str, str, int]) -> int:
        """Increment ``key`` of cache ``name`` ``n`` times with get + cas; return the retries."""
        name, key, n = data
        c = child.cache(name)
        retries = 0
        for _ in range(n):
            while True:
                old = c.get(key)
                if c.cas(key, old, (old or 0) + 1):
                    break
                retries += 1
        return retries

    @child.handler("incr")
    def incr(data: tuple[str, str, int]) -> None:
        name, key, n = data
        c = child.cache(name)
        for _ in range(n):
            c.incr(key)

    @child.handler("cache-set")
    def cache_set(data: tuple[str, str, Any, float | None]) -> None:
        name, key, value, ttl = data
        child.cache(name).set(key, value, ttl=ttl)

    @child.handler("use-passed-cache")
    def use_passed_cache(key: str) -> Any:
        assert cache is not None
        cache[key + "-seen"] = os.getpid()
        return cache.get(key)

    @child.handler("hold-lock")
    def hold_lock(data: tuple[str, float | None]) -> int:
        """Take lock ``name``, announce it on channel ``locked``, and keep it (for good)."""
        name, ttl = data
        grant = child.lock(name, ttl=ttl)
        child.publish("locked", {"pid": os.getpid(), "token": grant.token})
        threading.Event().wait()  # hold it until this process dies
        return grant.token  # pragma: no cover

    @child.handler("lock-and-release")
    def lock_and_release(name: str) -> int:
        with child.lock(name, wait=10) as grant:
            return grant.token

    @child.handler("register")
    def register(name: str) -> int:
        """Serve RPC ``name`` from here: ``slow`` announces itself, then blocks forever."""
        if name == "slow":
            def slow(tag: object) -> None:
                child.publish("rpc-started", {"pid": os.getpid(), "tag": tag})
                threading.Event().wait()
            child.register("slow", slow)
        elif name == "whoami":
            child.register("whoami", lambda: os.getpid())
        elif name == "unpicklable":
            child.register("unpicklable", lambda: (x for x in range(3)))
        elif name == "fail":
            def fail(message: str) -> None:
                raise KeyError(message)
            child.register("fail", fail)
        return os.getpid()

    @child.handler("publish")
    def publish(data: tuple[str, int]) -> int:
        channel, n = data
        for i in range(n):
            child.publish(channel, {"pid": os.getpid(), "i": i})
        return n

    @child.handler("subscribe-stalled")
    def subscribe_stalled(pattern: str) -> int:
        """Subscribe with a callback that never returns: this process stops consuming."""
        stuck = threading.Event()

        def callback(payload: object, channel: str) -> None:
            stuck.wait()

        child.subscribe(pattern, callback)
        return os.getpid()

    @child.handler("subscribe-count")
    def subscribe_count(data: tuple[str, str]) -> int:
        """Count deliveries on ``pattern`` in cache key ``counter`` of cache "pubsub"."""
        pattern, counter = data
        c = child.cache("pubsub")
        child.subscribe(pattern, lambda payload, channel: c.incr(counter))
        return os.getpid()

    @child.handler("nodes")
    def nodes(_: object) -> list[Any]:
        return child.nodes()

    @child.handler("sleep")
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    child.run()
