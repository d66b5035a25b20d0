"""A sequential child's queued requests, shared by two threads.

In a sequential child that has started a reader thread (it ran an ``async def``
handler), Cancels and Goodbyes are read on that thread while the main thread pops the
inbox: a Cancel claims a request without scanning the inbox, and the main thread pops
without checking the inbox's size first.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from mpmesh._client._handlers import HandlerRegistry
from mpmesh._procs._child import Child
from mpmesh._wire import _codec
from mpmesh._wire._messages import Cancel, ErrorCode, Failure, Reply, Request


class _RacingInbox(collections.deque):  # type: ignore[type-arg]
    """An inbox whose head the main thread takes the moment anyone iterates it."""

    def __iter__(self) -> Iterator[Any]:
        items = super().__iter__()
        first = next(items)
        self.popleft()
        yield first
        yield from items  # RuntimeError: deque mutated during iteration


class _NoWaiting:
    """The connection: every request is queued already, so nothing may wait on it."""

    def wait_until(self, ready: object, deadline: float) -> None:
        raise AssertionError("the child waited for the socket with requests still queued")


def _sequential_child(ran: list[int], answers: list[Reply | Failure]) -> Child:
    child = Child.__new__(Child)
    child.name, child.mode = "seq", "sequential"
    child._client = _NoWaiting()  # type: ignore[assignment]
    child._handlers = HandlerRegistry("test child")
    child._handlers.register("work", ran.append)
    child._inbox = _RacingInbox()
    child._pending = {}
    child._outstanding = 0
    child._stopping = False
    child._master_gone = False
    child._aloop = None
    child._answer = answers.append  # type: ignore[method-assign,assignment]
    return child


def _request(rid: int) -> Request:
    return Request(rid, 0, -1, 0, -1.0, 0.0, "work", "g", _codec.dumps(rid))


def test_a_cancel_for_a_queued_request_answers_cancelled_and_it_never_runs() -> None:
    ran: list[int] = []
    answers: list[Reply | Failure] = []
    child = _sequential_child(ran, answers)
    child._on_incoming(_request(1))
    child._on_incoming(_request(2))

    child._on_incoming(Cancel(2))
    child._on_incoming(Cancel(99))  # unknown or already started: nothing to answer
    child._stopping = True
    child._run_sequential()  # drains the inbox, then returns: stopping

    assert ran == [1]
    assert [(type(a), a.rid) for a in answers] == [(Failure, 2), (Reply, 1)]
    cancelled = answers[0]
    assert isinstance(cancelled, Failure) and cancelled.code == ErrorCode.CANCELLED
    assert not child._pending


class _EmptiedAfterLooking(collections.deque):  # type: ignore[type-arg]
    """An inbox a reader thread's Goodbye empties right after anyone checks its size."""

    def __len__(self) -> int:
        size = super().__len__()
        self.clear()
        return size


def test_an_inbox_emptied_by_a_goodbye_mid_loop_ends_the_loop_quietly() -> None:
    ran: list[int] = []
    answers: list[Reply | Failure] = []
    child = _sequential_child(ran, answers)
    child._inbox = _EmptiedAfterLooking()
    child._on_incoming(_request(1))
    child._stopping = True  # as a Goodbye leaves it

    child._run_sequential()  # must neither raise IndexError nor wait

    assert ran in ([], [1]) and len(answers) == len(ran)
