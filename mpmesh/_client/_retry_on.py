"""A Master's retry of requests whose handler raised an exception the caller named."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Protocol

from ._base import ClientBase
from ._futures import MeshFuture

__all__ = ["RetryOn"]


class _Sender(Protocol):
    """What a retry needs of its Master."""

    @property
    def _closed(self) -> bool: ...
    @property
    def _client(self) -> ClientBase: ...
    @property
    def log(self) -> logging.Logger: ...

    def _emit(self, event: str, info: dict[str, Any]) -> None: ...


class RetryOn:
    """Re-send a request whose handler raised one of ``retry_on`` while attempts remain.

    The broker retries lost workers and timeouts itself; a handler's exception is only
    known as such in the caller, so this retry lives here.
    """

    def __init__(self, master: _Sender, first: MeshFuture, retry_on: tuple[type[BaseException], ...],
                 call: tuple[str, str | int, object], options: dict[str, Any], retries: int) -> None:
        self.outer = MeshFuture()
        self._master, self._retry_on, self._call, self._options = master, retry_on, call, options
        self._left = retries
        self._attempts = retries + 1
        self._watch(first)

    def _watch(self, fut: MeshFuture) -> None:
        concurrent.futures.Future.add_done_callback(fut, self._done)

    def _done(self, fut: concurrent.futures.Future[Any]) -> None:
        if self.outer.done():
            return
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None and isinstance(exc, self._retry_on) and self._left > 0 and not self._master._closed:
            self._left -= 1
            delay = self._options["retry_delay"]
            attempt = self._attempts - self._left
            self._master.log.info("retrying %r (attempt %d of %d) after %s: %s", self._call[0],
                                  attempt, self._attempts, type(exc).__name__, exc)
            self._master._emit("request-retry", {
                "action": self._call[0], "target": self._call[1], "attempt": attempt,
                "attempts": self._attempts, "reason": f"{type(exc).__name__}: {exc}"})
            timer = threading.Timer(delay, self._resend)
            timer.daemon = True
            timer.start()
            return
        if fut.cancelled():
            self.outer.cancel()
        elif exc is not None:
            self.outer.set_exception(exc)
        else:
            self.outer.set_result(fut.result())

    def _resend(self) -> None:
        try:
            fut = self._master._client.request(*self._call, **self._options)
        except BaseException as exc:
            if not self.outer.done():
                self.outer.set_exception(exc)
            return
        self._watch(fut)
