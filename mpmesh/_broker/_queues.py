"""Broker-native ``queue.Queue`` (a Manager's ``Queue`` and ``JoinableQueue``).

Same semantics and exceptions as ``queue.Queue``: ``put`` on a full bounded queue and
``get`` on an empty one park their caller (FIFO) until an item or a slot frees up, or
raise ``queue.Full`` / ``queue.Empty`` at their deadline; ``join`` parks until every
item put so far was marked ``task_done``. Items are handed straight from a ``put`` to a
parked ``get``, so a waiting consumer costs nothing to poll. ``shutdown`` (Python 3.13's
``queue.ShutDown``) is offered where the running Python has it.
"""

from __future__ import annotations

import queue
from collections import deque

from ._waiters import PARKED, Effects, Native, ObjectGone, Waiter, deadline_for, remove

__all__ = ["Queue"]

ShutDown: type[Exception] | None = getattr(queue, "ShutDown", None)  # Python 3.13+


class Queue(Native):
    KIND = "Queue"

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self.items: deque[object] = deque()
        self.getters: deque[Waiter] = deque()
        self.putters: deque[Waiter] = deque()   # data: the item each one brings
        self.joiners: list[Waiter] = []
        self.unfinished = 0
        self.is_shutdown = False

    def __repr__(self) -> str:
        return f"<queue.Queue object at {id(self):#x}>"

    def _full(self) -> bool:
        return 0 < self.maxsize <= len(self.items)

    def _put(self, item: object, fx: Effects) -> None:
        self.unfinished += 1
        if self.getters:
            fx.wake(self.getters.popleft(), item)
        else:
            self.items.append(item)

    def _admit_putters(self, fx: Effects) -> None:
        while self.putters and not self._full():
            w = self.putters.popleft()
            self._put(w.data, fx)
            fx.wake(w, None)

    # -- the proxy's methods -----------------------------------------------------------------

    def op_put(self, w: Waiter, now: float, fx: Effects, item: object, block: bool = True,
               timeout: float | None = None) -> object:
        if self.is_shutdown and ShutDown is not None:
            raise ShutDown
        if not self._full():
            self._put(item, fx)
            return None
        if not block:
            raise queue.Full
        if timeout is not None:
            if timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            if timeout == 0:
                raise queue.Full
        w.deadline, w.owner, w.data = deadline_for(now, timeout), self, item
        self.putters.append(w)
        return PARKED

    def op_put_nowait(self, w: Waiter, now: float, fx: Effects, item: object) -> object:
        return self.op_put(w, now, fx, item, False)

    def op_get(self, w: Waiter, now: float, fx: Effects, block: bool = True,
               timeout: float | None = None) -> object:
        if self.items:
            item = self.items.popleft()
            self._admit_putters(fx)
            return item
        if self.is_shutdown and ShutDown is not None:
            raise ShutDown
        if not block:
            raise queue.Empty
        if timeout is not None:
            if timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            if timeout == 0:
                raise queue.Empty
        w.deadline, w.owner = deadline_for(now, timeout), self
        self.getters.append(w)
        return PARKED

    def op_get_nowait(self, w: Waiter, now: float, fx: Effects) -> object:
        return self.op_get(w, now, fx, False)

    def op_qsize(self, w: Waiter, now: float, fx: Effects) -> object:
        return len(self.items)

    def op_empty(self, w: Waiter, now: float, fx: Effects) -> object:
        return not self.items

    def op_full(self, w: Waiter, now: float, fx: Effects) -> object:
        return self._full()

    def op_task_done(self, w: Waiter, now: float, fx: Effects) -> object:
        if self.unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self.unfinished -= 1
        if self.unfinished == 0:
            joiners, self.joiners = self.joiners, []
            for joiner in joiners:
                fx.wake(joiner, None)
        return None

    def op_join(self, w: Waiter, now: float, fx: Effects) -> object:
        if self.unfinished == 0:
            return None
        w.owner = self
        self.joiners.append(w)
        return PARKED

    def op_shutdown(self, w: Waiter, now: float, fx: Effects, immediate: bool = False) -> object:
        if ShutDown is None:
            raise AttributeError("'Queue' object has no attribute 'shutdown' before Python 3.13")
        self.is_shutdown = True
        if immediate:
            while self.items:
                self.items.popleft()
                if self.unfinished > 0:
                    self.unfinished -= 1
            if self.unfinished == 0:
                joiners, self.joiners = self.joiners, []
                for joiner in joiners:
                    fx.wake(joiner, None)
        while self.putters:
            fx.fail(self.putters.popleft(), ShutDown())
        if not self.items:
            while self.getters:
                fx.fail(self.getters.popleft(), ShutDown())
        return None

    # -- parking ----------------------------------------------------------------------------

    def expire(self, w: Waiter, now: float, fx: Effects) -> None:
        if w in self.getters:
            remove(self.getters, w)
            fx.fail(w, queue.Empty())
        else:
            remove(self.putters, w)
            fx.fail(w, queue.Full())

    def discard(self, w: Waiter, fx: Effects) -> None:
        for waiting in (self.getters, self.putters, self.joiners):
            remove(waiting, w)

    def close(self, fx: Effects) -> None:
        for waiting in (self.getters, self.putters, self.joiners):
            while waiting:
                w = waiting.pop()
                fx.fail(w, ObjectGone("the queue was freed while waiting"))
