"""Queue and JoinableQueue proxies: FIFO, blocking with timeouts, queue.Empty/Full,
task_done/join; the same in both implementations."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest

from .test_sync import LONG, TIMEOUT, in_thread, join, timed


@pytest.mark.parametrize("typeid", ["Queue", "JoinableQueue"])
def test_fifo_and_sizes(manager: Any, typeid: str) -> None:
    q = getattr(manager, typeid)()
    assert q.empty() and q.qsize() == 0 and not q.full()
    for i in range(5):
        q.put(i)
    assert q.qsize() == 5 and not q.empty()
    assert [q.get() for _ in range(5)] == [0, 1, 2, 3, 4]
    q.put_nowait({"x": [1]})
    assert q.get_nowait() == {"x": [1]}


def test_empty_raises(manager: Any) -> None:
    q = manager.Queue()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    with pytest.raises(queue.Empty):
        q.get(block=False)
    _, took = timed(lambda: pytest.raises(queue.Empty, q.get, timeout=TIMEOUT))
    assert took >= TIMEOUT * 0.9
    with pytest.raises(ValueError):
        q.get(timeout=-1)


def test_full_raises(manager: Any) -> None:
    q = manager.Queue(2)
    q.put(1)
    q.put(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, False)
    _, took = timed(lambda: pytest.raises(queue.Full, q.put, 3, timeout=TIMEOUT))
    assert took >= TIMEOUT * 0.9
    assert [q.get(), q.get()] == [1, 2]


def test_blocking_get_is_woken_by_put(manager: Any) -> None:
    q = manager.Queue()
    t, out = in_thread(lambda: q.get(timeout=LONG))
    q.put("item")
    join(t)
    assert out == ["item"]


def test_blocking_put_is_woken_by_get(manager: Any) -> None:
    q = manager.Queue(1)
    q.put("first")
    t, out = in_thread(lambda: q.put("second", timeout=LONG))
    assert q.get(timeout=LONG) == "first"
    join(t)
    assert out == [None]
    assert q.get(timeout=LONG) == "second"


def test_task_done_and_join(manager: Any) -> None:
    q = manager.JoinableQueue()
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    q.join()  # nothing unfinished
    for i in range(3):
        q.put(i)

    def consume() -> list[int]:
        got = []
        for _ in range(3):
            got.append(q.get(timeout=LONG))
            q.task_done()
        return got

    t, out = in_thread(consume)
    start = time.monotonic()
    q.join()
    assert time.monotonic() - start < LONG
    join(t)
    assert out == [[0, 1, 2]]


def test_many_producers_and_consumers(manager: Any) -> None:
    q = manager.Queue(3)
    n = 20
    producers = [threading.Thread(target=lambda k=k: [q.put((k, i), timeout=LONG) for i in range(n)])
                 for k in range(2)]
    results: list[Any] = []
    consumers = [in_thread(lambda: [q.get(timeout=LONG) for _ in range(n)]) for _ in range(2)]
    for p in producers:
        p.start()
    for p in producers:
        p.join(LONG)
    for t, out in consumers:
        join(t)
        results += out[0]
    assert sorted(results) == sorted((k, i) for k in range(2) for i in range(n))
    assert q.empty()


def test_queue_repr(manager: Any) -> None:
    assert "queue.Queue object" in str(manager.Queue())


@pytest.mark.skipif(not hasattr(queue, "ShutDown"), reason="Queue.shutdown is new in Python 3.13")
def test_shutdown(manager: Any) -> None:
    q = manager.Queue()
    q.put(1)
    t, out = in_thread(lambda: [q.get(timeout=LONG), q.get(timeout=LONG)])
    q.shutdown()
    join(t)
    assert isinstance(out[0], queue.ShutDown)  # got 1, then ShutDown once empty
    with pytest.raises(queue.ShutDown):
        q.put(2)
    q2 = manager.JoinableQueue()
    q2.put(1)
    q2.shutdown(immediate=True)
    q2.join()  # the dropped item counts as done
    with pytest.raises(queue.ShutDown):
        q2.get_nowait()
