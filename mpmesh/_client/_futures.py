"""What a caller waits on: futures for requests, light records for blocking calls.

``MeshFuture`` is the ``concurrent.futures.Future`` that ``request`` hands to users; its
callbacks run on one callback thread per process (``dispatcher``), never on an I/O
thread. ``Call`` is what mpmesh's own blocking calls wait on: no callbacks, no
Condition unless a waiter must block, decoded by the thread that waits. ``error_for``
turns a Failure into the exception the caller sees.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, Final, Protocol

from .._errors import (
    MeshClosed, MeshError, NoHandler, NotFound, RemoteError, RequestTimeout, SerializationError,
    WorkerLost,
)
from .._io._threads import WorkerThreads
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Reply

__all__ = ["Call", "Latch", "MeshFuture", "dispatcher", "error_for"]


class Issuer(Protocol):
    """The client that issued a call: told when its caller gives up on it."""

    def _forget(self, rid: int) -> None: ...


log = logging.getLogger("mpmesh.client")


# -- callbacks -----------------------------------------------------------------------------

# One thread per process runs user callbacks off the I/O threads, in the order they come;
# it starts with the first callback and can be retired when idle: a Master forks its
# zygote only from a single-threaded process.
dispatcher: Final = WorkerThreads("mpmesh-callbacks", logger=log, failed="callback %r raised")


# Guards making a future's Condition, or a Latch's Event, against it settling.
_settle_lock = threading.Lock()
_PENDING, _FINISHED = "PENDING", "FINISHED"  # concurrent.futures' state names
_EMPTY: tuple[()] = ()


class MeshFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` whose callbacks never run on an I/O thread,
    and whose ``cancel()`` withdraws the request from the broker.

    Its Condition (the costliest part of a Future) is made only when something needs
    it: a thread that must wait, a callback, ``concurrent.futures.wait``. A future that
    is settled before anyone looks, the common case for many outstanding requests,
    never makes one, nor the two lists that come with it: thousands of outstanding
    futures are thousands fewer objects for the garbage collector to walk.
    Everything else is the base class's own code.
    """

    _client: Issuer | None = None
    _rid = 0
    # Read (as empty) until the Condition is made; whatever adds to them (a callback,
    # concurrent.futures.wait / as_completed) holds the Condition first.
    _waiters: list[Any] = _EMPTY  # type: ignore[assignment]
    _done_callbacks: list[Callable[[concurrent.futures.Future], object]] = _EMPTY  # type: ignore[assignment,type-arg]

    def __init__(self) -> None:
        # The base __init__ without its Condition and lists; the attributes are the base class's.
        self._cond: threading.Condition | None = None
        self._state = _PENDING
        self._result = None
        self._exception: BaseException | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _settle_lock:
                cond = self._cond
                if cond is None:
                    self._waiters, self._done_callbacks = [], []
                    cond = self._cond = threading.Condition()
        return cond

    def _settle_quietly(self, result: object, exception: BaseException | None) -> bool:
        """Settle without a Condition if none was ever made (no waiter, no callback)."""
        with _settle_lock:
            if self._cond is not None or self._state != _PENDING:
                return False  # the base class's path: it notifies, or raises InvalidStateError
            self._result, self._exception = result, exception
            self._state = _FINISHED
            return True

    def set_result(self, result: object) -> None:
        if not self._settle_quietly(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._settle_quietly(None, exception):
            super().set_exception(exception)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED:
            if self._exception is not None:
                return super().result()
            return self._result
        return super().result(timeout)

    def done(self) -> bool:
        return self._state != _PENDING and self._state != "RUNNING"

    def _settled(self) -> bool:
        """``done()`` without taking the condition's lock: a future never leaves a done
        state, and ours never enter RUNNING, so any state but PENDING is final."""
        return self._state != _PENDING

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future], object]) -> None:  # type: ignore[type-arg]
        if self.done():
            super().add_done_callback(fn)
        else:
            super().add_done_callback(lambda fut: dispatcher.submit(fn, fut))

    def cancel(self) -> bool:
        cancelled = super().cancel()
        client = self._client
        if cancelled and client is not None:
            client._forget(self._rid)
        return cancelled


class Latch:
    """A one-shot "it is in" flag whose Event is made only when a waiter has to block.

    Most results arrive before anyone waits for them, and an Event (a Condition and two
    locks) costs more than the message that carries the result; ``Call`` and the Pool's
    results use this instead.
    """

    __slots__ = ("done", "_event", "_alarm")

    def __init__(self) -> None:
        self.done = False
        self._event: threading.Event | None = None
        self._alarm: Callable[[], None] | None = None

    def open(self) -> None:
        """Mark it done (after writing what it guards) and wake any waiter."""
        with _settle_lock:
            self.done = True
            event, alarm = self._event, self._alarm
        if event is not None:
            event.set()
        if alarm is not None:
            alarm()

    def arm(self, alarm: Callable[[], None] | None) -> None:
        """Have ``open`` also call ``alarm`` (a waiter blocked elsewhere than on the
        Event); None disarms."""
        with _settle_lock:
            self._alarm = alarm

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` passes; True if done."""
        if self.done:
            return True
        with _settle_lock:
            if self.done:
                return True
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        return event.wait(timeout)


class Call:
    """A pending blocking call: a Future's job at a fraction of its cost.

    Operations on shared state, Manager proxy calls and blocking requests are waited for
    by mpmesh's own code, never handed to users, so they need no callbacks, no
    Condition per call and no decoding on the I/O thread: a waiting leader reads the
    reply itself and nothing else wakes up.
    """

    __slots__ = ("_client", "_error", "_latch", "_msg", "_rid")

    def __init__(self, client: Issuer, rid: int) -> None:
        self._client = client
        self._rid = rid
        self._msg: Reply | Failure | None = None
        self._error: BaseException | None = None
        self._latch = Latch()

    def _settled(self) -> bool:
        return self._latch.done

    done = _settled

    def _settle(self, msg: Reply | Failure | None, error: BaseException | None = None) -> None:
        self._msg, self._error = msg, error
        self._latch.open()

    def cancel(self) -> bool:
        """Give up on the call: the broker is told to drop it."""
        if self._settled():
            return False
        self._client._forget(self._rid)
        self._settle(None, concurrent.futures.CancelledError())
        return True

    def result(self, timeout: float | None = None) -> object:
        """The reply's value, or its error raised here (``concurrent.futures.TimeoutError``
        if it does not come within ``timeout``)."""
        if not self._latch.wait(timeout):
            raise concurrent.futures.TimeoutError
        if self._error is not None:
            raise self._error
        msg = self._msg
        if type(msg) is Reply:
            return _codec.loads(msg.payload)
        raise error_for(msg)  # type: ignore[arg-type]


# -- errors ------------------------------------------------------------------------------

_SIMPLE: Final[dict[int, type[BaseException]]] = {
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.NO_HANDLER: NoHandler,
    ErrorCode.TIMEOUT: RequestTimeout,
    ErrorCode.WORKER_LOST: WorkerLost,
    ErrorCode.UNAVAILABLE: WorkerLost,
    ErrorCode.SERIALIZATION: SerializationError,
    ErrorCode.CLOSED: MeshClosed,
    ErrorCode.BAD_REQUEST: ValueError,
    ErrorCode.REMOTE_TEXT: RemoteError,
}


def error_for(msg: Failure) -> BaseException:
    """The exception a caller sees for a Failure."""
    if msg.code == ErrorCode.REMOTE:
        return _codec.unpack_exception(msg.payload, msg.message)
    if msg.code == ErrorCode.CANCELLED:
        return concurrent.futures.CancelledError(msg.message)
    return _SIMPLE.get(msg.code, MeshError)(msg.message)
