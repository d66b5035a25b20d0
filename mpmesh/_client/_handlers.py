"""Handler registry and invocation, shared by Master and Child.

``invoke`` turns one incoming Request into exactly one Reply or Failure: the payload is
unpickled, the handler called, its result pickled; an exception travels back as itself
(with its traceback text), or as text when it cannot be pickled.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Reply, Request

__all__ = ["AsyncRunner", "HandlerRegistry", "invoke", "failure_from"]

F = TypeVar("F", bound=Callable[..., Any])


class HandlerRegistry:
    """Maps action names to plain or ``async def`` functions taking the request data."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._fns: dict[str, Callable[[Any], Any]] = {}
        self._async: set[str] = set()  # asked on every request: decided once, here

    def register(self, action: str, fn: Callable[[Any], Any]) -> None:
        if not isinstance(action, str) or not action:
            raise ValueError(f"an action must be a non-empty string, not {action!r}")
        if not callable(fn):
            raise TypeError(f"handler for {action!r} must be callable, not {type(fn).__name__}")
        self._fns[action] = fn
        if inspect.iscoroutinefunction(fn):
            self._async.add(action)
        else:
            self._async.discard(action)

    def handler(self, action: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            self.register(action, fn)
            return fn
        return decorate

    def get(self, action: str) -> Callable[[Any], Any] | None:
        return self._fns.get(action)

    def is_async(self, action: str) -> bool:
        return action in self._async

    def __bool__(self) -> bool:
        return bool(self._fns)

    def missing(self, req: Request) -> Failure:
        known = ", ".join(sorted(self._fns)) or "none"
        return Failure(req.rid, ErrorCode.NO_HANDLER,
                       f"{self._owner} has no handler for {req.action!r} (it handles: {known})", b"")


def failure_from(rid: int, exc: BaseException) -> Failure:
    payload, text = _codec.pack_exception(exc)
    summary = f"{type(exc).__name__}: {exc}"
    if payload is None:
        return Failure(rid, ErrorCode.REMOTE_TEXT, text, b"")
    return Failure(rid, ErrorCode.REMOTE, summary, payload)


def _finish(req: Request, result: object) -> Reply | Failure:
    try:
        return Reply(req.rid, _codec.dumps(result))
    except SerializationError as exc:
        return Failure(req.rid, ErrorCode.SERIALIZATION,
                       f"the result of {req.action!r} cannot be sent back: {exc}", b"")


def invoke(fn: Callable[[Any], Any], req: Request, run_coro: Callable[[Awaitable[Any]], Any] | None = None) -> Reply | Failure:
    """Run ``fn`` on the request's data and build the answer (never raises Exception)."""
    try:
        data = _codec.loads(req.payload)
    except SerializationError as exc:
        return Failure(req.rid, ErrorCode.SERIALIZATION, f"the data for {req.action!r} cannot be read: {exc}", b"")
    try:
        result = fn(data)
        if inspect.isawaitable(result):
            result = (run_coro or _run_coro)(result)
    except Exception as exc:
        return failure_from(req.rid, exc)
    return _finish(req, result)


async def invoke_async(fn: Callable[[Any], Awaitable[Any]], req: Request) -> Reply | Failure:
    """``invoke`` for an ``async def`` handler, on the caller's event loop."""
    try:
        data = _codec.loads(req.payload)
    except SerializationError as exc:
        return Failure(req.rid, ErrorCode.SERIALIZATION, f"the data for {req.action!r} cannot be read: {exc}", b"")
    try:
        result = await fn(data)
    except Exception as exc:
        return failure_from(req.rid, exc)
    return _finish(req, result)


def _run_coro(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


class AsyncRunner:
    """An event loop on a daemon thread, for ``async def`` handlers."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Any], Awaitable[Any]], req: Request,
               done: Callable[[Reply | Failure], None]) -> None:
        fut = asyncio.run_coroutine_threadsafe(invoke_async(fn, req), self._loop)
        fut.add_done_callback(lambda f: done(f.result()))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
