"""The receiving side of pub/sub and RPC pools in one process, per client connection.

Pushes from the broker arrive on an I/O thread (a client's reader, or the broker's own
thread in a Master); nothing user-written runs there (a slow callback would stall every delivery). ``Session.on_push``
only sorts them:

- a pub/sub delivery goes to one ordered *lane* (a single worker thread), so callbacks
  run one at a time in the order the broker sent them: per publisher, publish order.
  After each callback the consumed bytes are counted and acknowledged to the broker every
  ``ack_every`` bytes (the credit of ``_broker/_pubsub``);
- an RPC call goes to a small pool of worker threads; its answer goes back as a
  fire-and-forget ``Op("rpc", "result")`` (rid 0: the broker sends nothing back).

Worker threads are daemons and exit after ``IDLE_EXIT_S`` without work, so an idle
process keeps none of them.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast, final

from .._broker._payload import pack
from .._broker._pubsub import ACK, STREAM_BASE, push_cost
from .._broker._rpc import CALL_BASE, OK, pack_result
from .._client._handlers import failure_from
from .._errors import MeshError, MessageTooLarge, SerializationError
from .._io._threads import WorkerThreads
from .._wire import _codec
from .._wire._messages import ErrorCode, Op, Push

if TYPE_CHECKING:
    from .._client._base import ClientBase

__all__ = ["Session", "Subscription", "session_for"]

log = logging.getLogger("mpmesh.shared")

# Threads serving RPC calls in one process (each running call holds one).
RPC_THREADS: Final = 16
# A worker thread with nothing to do for this long exits (a new one starts on demand).
IDLE_EXIT_S: Final = 5.0


@final
class Subscription:
    """A live ``subscribe(pattern, callback)``; ``unsubscribe()`` ends it (idempotent).

    Created by ``subscribe`` only; also a context manager that unsubscribes on exit.
    """

    __slots__ = ("pattern", "callback", "id", "_session", "_active")

    def __init__(self, session: Session, sub_id: int, pattern: str,
                 callback: Callable[[Any, str], object]) -> None:
        self._session = session
        self.id = sub_id
        self.pattern = pattern
        self.callback = callback
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def unsubscribe(self) -> None:
        """Stop deliveries to this callback; messages already under way are skipped."""
        if not self._active:
            return
        self._active = False
        self._session.subs.pop(self.id, None)
        client = self._session.client
        if client._closed is None:
            try:
                client.wait(client.op("pubsub", "unsubscribe", payload=pack(self.id)), float("inf"))
            except MeshError:
                pass  # the mesh is gone, and with it the subscription

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r} {'active' if self._active else 'ended'}>"


class Session:
    """Pub/sub deliveries and RPC serving for one client."""

    def __init__(self, client: ClientBase) -> None:
        self.client = client
        self.subs: dict[int, Subscription] = {}
        self.fns: dict[str, Callable[..., Any]] = {}
        self.ack_every = 1 << 20
        self._ids = itertools.count(STREAM_BASE)
        self._consumed = 0
        self._acked = 0
        self._lane = WorkerThreads("mpmesh-pubsub", idle_exit=IDLE_EXIT_S, logger=log,
                                   failed="mpmesh-pubsub: %r raised")
        self._pool = WorkerThreads("mpmesh-rpc", RPC_THREADS, idle_exit=IDLE_EXIT_S, logger=log,
                                   failed="mpmesh-rpc: %r raised")
        self._calls: set[int] = set()       # received, not started (a cancel removes them)
        self._calls_lock = threading.Lock()
        self._fallback = client.on_push
        client.on_push = self.on_push
        start_reader = getattr(client, "start_reader", None)
        if start_reader is not None:
            start_reader()  # pushes must arrive while no thread waits on the connection

    # -- the I/O thread's part: sort, never run user code -----------------------------------

    def on_push(self, msg: Push) -> None:
        stream = msg.stream
        if stream >= STREAM_BASE:
            self._lane.submit(self._deliver, stream, msg)
        elif stream <= -CALL_BASE:
            cid = -stream
            with self._calls_lock:
                if not msg.key:  # the broker withdrew the call
                    self._calls.discard(cid)
                    return
                self._calls.add(cid)
            self._pool.submit(self._serve, cid, msg.key, msg.payload)
        else:
            self._fallback(msg)

    # -- pub/sub --------------------------------------------------------------------------

    def subscribe(self, pattern: str, callback: Callable[[Any, str], object]) -> Subscription:
        sub = Subscription(self, next(self._ids), pattern, callback)
        self.subs[sub.id] = sub  # filed first: a delivery may follow the broker's answer at once
        client = self.client
        try:
            self.ack_every = int(client.wait(  # type: ignore[call-overload]
                client.op("pubsub", "subscribe", payload=pack((pattern, sub.id))), float("inf")))
        except BaseException:
            sub._active = False
            self.subs.pop(sub.id, None)
            raise
        return sub

    def _deliver(self, stream: int, msg: Push) -> None:
        sub = self.subs.get(stream)
        if sub is not None and sub._active:
            try:
                value = _codec.loads(msg.payload)
            except SerializationError:
                log.exception("cannot read a message on %r for %r", msg.key, sub.pattern)
            else:
                try:
                    sub.callback(value, msg.key)
                except Exception:
                    log.exception("subscriber callback %r for %r raised on %r", sub.callback,
                                  sub.pattern, msg.key)
        self._consumed += push_cost(msg.key, msg.payload)
        if self._consumed - self._acked >= self.ack_every:
            self._acked = self._consumed
            self._send(Op(0, -1.0, "pubsub", "ack", ACK.pack(self._consumed)))

    # -- RPC --------------------------------------------------------------------------------

    def _serve(self, cid: int, name: str, payload: bytes) -> None:
        with self._calls_lock:
            if cid not in self._calls:
                return  # withdrawn before it started
            self._calls.discard(cid)
        code, message, body = self._run(cid, name, payload)
        try:
            self.client._send(Op(0, -1.0, "rpc", "result", pack_result(cid, code, message, body)))
        except MessageTooLarge as exc:  # the caller gets that error, not a timeout
            failure = failure_from(cid, exc)
            self._send(Op(0, -1.0, "rpc", "result", pack_result(cid, failure.code, failure.message,
                                                                failure.payload)))
        except MeshError:
            pass  # the broker is gone: it no longer waits for this

    def _run(self, cid: int, name: str, payload: bytes) -> tuple[int, str, bytes]:
        fn = self.fns.get(name)
        if fn is None:
            return ErrorCode.NO_HANDLER, f"this process no longer serves {name!r}", b""
        try:
            args, kwargs = cast("tuple[tuple[Any, ...], dict[str, Any]]", _codec.loads(payload))
        except SerializationError as exc:
            return ErrorCode.SERIALIZATION, f"the arguments of {name!r} cannot be read: {exc}", b""
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(result)  # type: ignore[arg-type]
        except Exception as exc:
            failure = failure_from(cid, exc)
            return failure.code, failure.message, failure.payload
        try:
            return OK, "", _codec.dumps(result)
        except SerializationError as exc:
            return ErrorCode.SERIALIZATION, f"the result of {name!r} cannot be sent back: {exc}", b""

    def _send(self, msg: Op) -> None:
        try:
            self.client._send(msg)
        except MeshError:
            pass  # the broker is gone: it no longer waits for this


def session_for(client: ClientBase) -> Session:
    """The client's session, created (and its reader started) on first use."""
    session: Session | None = getattr(client, "_mpmesh_session", None)
    if session is None:
        with _session_lock:
            session = getattr(client, "_mpmesh_session", None)
            if session is None:
                session = Session(client)
                client._mpmesh_session = session  # type: ignore[attr-defined]
    return session


_session_lock = threading.Lock()
