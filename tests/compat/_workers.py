"""Targets for child processes of the compat tests (importable under spawn/forkserver)."""

from __future__ import annotations

from typing import Any


def add_under_lock(counter: Any, lock: Any, n: int) -> None:
    for _ in range(n):
        with lock:
            counter.value = counter.value + 1


def fill(d: Any, lst: Any, q: Any, key: str) -> None:
    d[key] = len(key)
    lst.append(key)
    q.put(key)


def wait_event_then_put(event: Any, q: Any) -> None:
    q.put("waiting")
    q.put(event.wait(30))


def nested_write(outer: Any) -> None:
    outer[0]["from_child"] = True


def square_into(args: tuple[Any, int]) -> int:
    d, i = args
    d[i] = i * i
    return i * i


def barrier_wait(barrier: Any, q: Any) -> None:
    q.put(barrier.wait(30))


def hold_lock_and_die(lock: Any, q: Any) -> None:
    import os
    lock.acquire()
    q.put("held")
    os._exit(1)


class Counter:
    """A user type for BaseManager.register tests."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    def get(self) -> int:
        return self.n

    def fail(self) -> None:
        raise ValueError("boom")

    def make_child(self) -> "Counter":
        return Counter(self.n * 10)

    def _private(self) -> int:
        return -1


class Box:
    """A user type whose ``get`` blocks until another caller ``put``s."""

    def __init__(self) -> None:
        import queue
        import threading

        self._items: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0

    def get(self) -> object:
        with self._lock:
            self._waiting += 1
        return self._items.get(timeout=60)  # a bound for a test gone wrong; never reached

    def put(self, item: object) -> None:
        self._items.put(item)

    def waiting(self) -> int:
        with self._lock:
            return self._waiting


# -- mpmesh children (targets take the Child first) ----------------------------------------

def mesh_counter(child: Any, d: Any, lock: Any) -> None:
    @child.handler("incr")
    def incr(n: int) -> int:
        with lock:
            d["n"] = d.get("n", 0) + n
            return d["n"]  # type: ignore[no-any-return]

    @child.handler("append")
    def append(args: tuple[Any, Any]) -> int:
        lst, value = args
        lst.append(value)
        return len(lst)

    @child.handler("make")
    def make(_: object) -> Any:
        return d  # a proxy travels back to the master too

    child.run()


def square(x: int) -> int:
    return x * x
