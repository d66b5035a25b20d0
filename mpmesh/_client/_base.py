"""The one client: request ids, pending calls, results and errors, whatever carries them.

``ClientBase`` holds what both transports share; ``LocalClient`` (``_local.py``) hands
messages to a broker core in this process, ``SocketClient`` (``_socket.py``) talks to a
broker over its Unix socket. What callers wait on (futures, blocking-call records)
lives in ``_futures.py``.
"""


from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from .._broker._lockcells import LockCells
from .._broker._ring import OBJECTS, RingWriter
from .._errors import BrokerUnavailable, MeshClosed, MeshError, RequestTimeout, SerializationError
from .._io import _deadline
from .._wire import _codec
from .._wire._messages import Cancel, Failure, Hello, Message, Op, Push, Reply, Request
from ._futures import Call, MeshFuture, error_for
from ._near import NearCache


__all__ = ["ClientBase", "make_hello"]

log = logging.getLogger("mpmesh.client")

_T = TypeVar("_T")


class ClientBase:
    """Request ids, pending futures and result decoding, independent of the transport."""

    def __init__(self) -> None:
        self._rids = itertools.count(1)
        self._pending: dict[int, MeshFuture | Call] = {}
        self._closed: BaseException | None = None
        self.on_incoming: Callable[[Message], None] = self._drop_incoming
        self.on_push: Callable[[Push], None] = self._drop_incoming
        self.instance_id = -1
        self.name = ""
        # Copies of shared state kept by this process, when the broker shares its
        # version table with us (``_near``); None: every read is a round trip.
        self.near: NearCache | None = None
        # Where plain writes to Manager objects go without a round trip (``_broker/_ring``),
        # and where Manager Locks keep their state (``_broker/_lockcells``).
        self.ring: RingWriter | None = None
        self.cells: LockCells | None = None
        # The handle's timeout (its owner sets it): see ``due``; None: no limit.
        self.timeout: float | None = None
        # Why the broker is taken for silent (SocketClient): new calls are refused meanwhile.
        self._silent = ""

    def segment_usable(self) -> bool:
        """Whether the ring and the lock cells may be used now (``_proxies``)."""
        return False

    def leave(self, payload: bytes, s1: int, s2: int, n1: int, n2: int,
              kind: int = OBJECTS) -> tuple[int, int] | None:
        """Leave a write in the broker's write ring instead of sending it (see
        ``RingWriter.append``): the versions slots ``n1`` and ``n2`` show after it, for a
        copy of what it wrote; None if it must be sent (no ring here, the broker gone or
        silent, the ring full or busy, the write too large)."""
        return None

    def due(self) -> float:
        """The deadline of an operation the broker answers at once, sent just now."""
        timeout = self.timeout
        return _deadline.FOREVER if timeout is None else time.monotonic() + timeout

    # transport hooks
    def _send(self, msg: Message) -> None:
        raise NotImplementedError

    def wait(self, fut: MeshFuture | Call, deadline: float) -> object:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _drop_incoming(self, msg: Message) -> None:
        log.debug("no one takes %s here; dropped", type(msg).__name__)

    def _new_future(self) -> tuple[int, MeshFuture]:
        if self._closed is not None or self._silent:
            self._refuse()
        rid = next(self._rids)
        fut = MeshFuture()
        fut._client = self
        fut._rid = rid
        self._pending[rid] = fut
        return rid, fut

    def _new_call(self) -> tuple[int, Call]:
        if self._closed is not None or self._silent:
            self._refuse()
        rid = next(self._rids)
        call = self._pending[rid] = Call(self, rid)
        return rid, call

    def _refuse(self) -> None:
        """Raise why no call can start now, if it still holds."""
        if self._closed is not None:
            raise self._closed_error()

    def _closed_error(self) -> BaseException:
        err = self._closed
        if isinstance(err, MeshClosed):
            return MeshClosed(str(err))
        return BrokerUnavailable(str(err))

    def request(self, action: str, target: str | int, data: object = None, *,
                timeout: float | None = None, priority: int = 0, retries: int = 0,
                retry_delay: float = 0.0) -> MeshFuture:
        """Send a request; the future resolves to the handler's return value."""
        payload = _codec.dumps(data)  # fails here, in the caller's frame, before anything is held
        rid, fut = self._new_future()
        self._send_or_forget(self._send, _request_msg(rid, action, target, payload, timeout, priority, retries,
                                                      retry_delay))
        return fut

    def _send_or_forget(self, send: Callable[[Request], _T], msg: Request) -> _T:
        """``send(msg)``; if it fails, the request's pending call is dropped."""
        try:
            return send(msg)
        except BaseException:
            self._pending.pop(msg.rid, None)
            raise

    def op(self, component: str, op: str, args: object = None, *, timeout: float | None = None,
           payload: bytes | None = None) -> Call:
        """An operation on broker-held state; ``args`` is pickled unless ``payload`` is given.
        Wait for it with ``wait``."""
        raw = _codec.dumps(args) if payload is None else payload
        rid, call = self._new_call()
        try:
            self._send(Op(rid, -1.0 if timeout is None else float(timeout), component, op, raw))
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return call

    def post_op(self, component: str, op: str, args: object = None, timeout: float = -1.0) -> None:
        """An operation that gets no answer (request id 0); quietly skipped if the
        connection is closed (what needed it fails on its own)."""
        try:
            self._send(Op(0, timeout, component, op, _codec.dumps(args)))
        except (MeshError, OSError):
            pass

    def call_op(self, component: str, op: str, payload: bytes,
                withdraw: Callable[[ClientBase, int], None] | None = None) -> object:
        """A blocking ``op`` with no timeout: its value, or its error raised here. If the
        wait is interrupted before the answer, ``withdraw(self, rid)`` is called."""
        call = self.op(component, op, payload=payload)
        try:
            return self.wait(call, _deadline.FOREVER)
        except BaseException:
            if withdraw is not None and not call.done():
                withdraw(self, call._rid)
            raise

    def fetch_op(self, component: str, op: str, payload: bytes,
                 withdraw: Callable[[ClientBase, int], None] | None = None) -> tuple[object, bytes | None]:
        """``call_op``, and the pickle its value came as (what a near copy keeps)."""
        call = self.op(component, op, payload=payload)
        try:
            value = self.wait(call, _deadline.FOREVER)
        except BaseException:
            if withdraw is not None and not call.done():
                withdraw(self, call._rid)
            raise
        msg = call._msg
        return value, (msg.payload if type(msg) is Reply else None)

    def call(self, action: str, target: str | int, data: object = None, *,
             timeout: float | None = None, priority: int = 0, retries: int = 0,
             retry_delay: float = 0.0) -> object:
        """Blocking ``request``: the result, or the remote exception raised here."""
        payload = _codec.dumps(data)
        rid, call = self._new_call()
        msg = _request_msg(rid, action, target, payload, timeout, priority, retries, retry_delay)
        return self._call(call, msg, self.guard_deadline(timeout, retries, retry_delay))

    def _call(self, call: Call, msg: Request, deadline: float) -> object:
        """Send the request ``call`` stands for and wait for its answer."""
        self._send_or_forget(self._send, msg)
        return self.wait(call, deadline)

    @staticmethod
    def guard_deadline(timeout: float | None, retries: int, retry_delay: float) -> float:
        if timeout is None:
            return _deadline.FOREVER
        return _deadline.after(timeout * (retries + 1) + retry_delay * retries + _deadline.GUARD_SLACK_S)

    def _resolve(self, msg: Reply | Failure) -> None:
        fut = self._pending.pop(msg.rid, None)
        if fut is None or fut._settled():
            return
        if type(fut) is Call:
            fut._settle(msg)  # decoded by the waiter, off the I/O thread
            return
        assert isinstance(fut, MeshFuture)
        if type(msg) is Reply:
            try:
                result = _codec.loads(msg.payload)
            except SerializationError as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        else:
            fut.set_exception(error_for(msg))  # type: ignore[arg-type]

    def _forget(self, rid: int) -> None:
        """The caller gave up on ``rid``: tell the broker, drop the future."""
        if self._pending.pop(rid, None) is not None and self._closed is None:
            try:
                self._send(Cancel(rid))
            except (MeshError, OSError):
                pass

    def _fail_pending(self, exc_factory: Callable[[], BaseException]) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if fut.done():
                continue
            if type(fut) is Call:
                fut._settle(None, exc_factory())
            else:
                fut.set_exception(exc_factory())  # type: ignore[union-attr]

    def _timed_out(self, fut: MeshFuture | Call) -> BaseException:
        fut.cancel()
        return RequestTimeout("no answer in time: the broker did not respond (it may be overloaded or gone)")

    async def arequest(self, *args: object, **kwargs: object) -> object:
        return await asyncio.wrap_future(self.request(*args, **kwargs))  # type: ignore[arg-type]


def _request_msg(rid: int, action: str, target: str | int, payload: bytes, timeout: float | None,
                 priority: int, retries: int, retry_delay: float) -> Request:
    if isinstance(target, int) and not isinstance(target, bool):
        name, target_id = "", target
    else:
        name, target_id = str(target), -1
    return Request(rid, priority, target_id, retries, -1.0 if timeout is None else float(timeout),
                   retry_delay, action, name, payload)


def make_hello(role: int, *, name: str = "", group: str = "", capacity: int = 0) -> Hello:
    return Hello(os.getpid(), role, capacity, name, group, socket.gethostname())
