"""The Child runtime: connect to the broker, serve requests, talk back to the master.

A *sequential* child runs one request at a time, in its main thread, in the order the
broker sends them (the broker holds the priority queue and sends the next request only
when the previous one is answered). A *concurrent* child runs up to ``max_concurrency``
at once: plain functions on a thread pool, ``async def`` handlers on an event loop.

The main thread in ``run()`` reads the socket itself (see ``_client``): a request costs
no thread hand-off in a sequential child.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from .._client._base import make_hello
from .._client._exit import process_ends
from .._client._futures import MeshFuture
from .._client._handlers import AsyncRunner, HandlerRegistry, invoke, invoke_async
from .._client._socket import SocketClient
from .._errors import MeshClosed, MeshError
from .._io import _deadline
from .._io import _zygote
from .._io._threads import WorkerThreads
from .._state._shared import SharedState
from .._wire import _codec
from .._wire._messages import (
    Cancel, ErrorCode, Failure, Goodbye, Heartbeat, Message, Reply, Request, Role, Serve, Shutdown,
)

if TYPE_CHECKING:
    from .._redis._remote import Remote

__all__ = ["Child", "Detached", "keep", "process_main", "run_target"]

log = logging.getLogger("mpmesh.child")

F = TypeVar("F", bound=Callable[..., Any])
MODES: Final = ("sequential", "concurrent")
DEFAULT_CONCURRENCY: Final = 16
# How often a concurrent child that was told to stop looks whether its last handler is done.
STOP_CHECK_S: Final = 0.05
# Exit status of a child whose master vanished (EX_TEMPFAIL): it did not fail itself.
EXIT_MASTER_GONE: Final = 75
# Poll flag for "the peer hung up" (Linux); elsewhere the reader notices EOF instead.
RDHUP: Final[int] = getattr(select, "POLLRDHUP", 0)


def _take_script_config() -> dict[str, Any] | None:
    """A script child's config, taken when mpmesh is first imported: from then on neither
    its environment nor its descriptors hold the authkey for a process it starts."""
    blob = _zygote.take_config()
    if blob is None:
        return None
    config = _codec.loads(blob)
    assert isinstance(config, dict)
    return config


_script_config = _take_script_config()


def check_mode(mode: str, max_concurrency: int | None) -> int:
    """Validate a mode; return the number of requests such a child takes at once."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'sequential' or 'concurrent', not {mode!r}")
    if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be a positive int, not {max_concurrency!r}")
    if mode == "sequential":
        return 1
    return max_concurrency or DEFAULT_CONCURRENCY


class Child(SharedState):
    """A worker's handle on its mesh: handlers, requests to the master, ``run()``.

    Inside a process the master spawned with a script or module target, ``Child()``
    connects using the details the master passed it (read when mpmesh was imported); a
    callable target receives its ``Child`` as first argument.
    """

    _remote: Remote | None

    _client: SocketClient  # always a SocketClient here (the SharedState property stores it)

    def __init__(self, mode: str | None = None, *, max_concurrency: int | None = None) -> None:
        if _script_config is None:
            raise MeshError("mpmesh.Child() only works in a process spawned by a mpmesh Master")
        self._setup(_script_config, mode, max_concurrency)

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> Child:
        child = cls.__new__(cls)
        child._setup(config, None, None)
        return child

    def _setup(self, config: dict[str, Any], mode: str | None, max_concurrency: int | None) -> None:
        self.name: str = config["name"]
        self.group: str | None = config.get("group") or None
        self.mode: str = mode or config.get("mode", "sequential")
        self.max_concurrency = check_mode(self.mode, max_concurrency or config.get("max_concurrency"))
        self.pid = os.getpid()
        self._timeout: float | None = config.get("timeout")
        self._handlers = HandlerRegistry(f"child {self.name!r}")
        self._inbox: collections.deque[Request] = collections.deque()
        # Requests received and not yet started, in either mode. Whoever pops one from
        # here owns it: the thread that starts it, or a Cancel that arrives first.
        self._pending: dict[int, Request] = {}
        self._outstanding = 0                    # concurrent requests accepted, not answered
        self._stopping = False
        self._master_gone = False
        self._ran = False
        self._workers: WorkerThreads | None = None
        self._async: AsyncRunner | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        fd = config.get("socket_fd")  # forked by the zygote: connected already
        self._client = SocketClient(
            config["address"], config["authkey"],
            make_hello(Role.CHILD, name=self.name, group=self.group or "", capacity=0),
            sock=None if fd is None else socket.socket(fileno=fd),
        )
        self.instance_id: int = self._client.instance_id
        self._client.on_incoming = self._on_incoming
        if config.get("backend"):
            # A mesh across hosts: shared state is in Redis; this child's node (for
            # ``register``/``call``) starts on first use.
            from .._redis._link import Link
            from .._redis._remote import Remote

            link = Link(config["backend"], config["mesh"], config["authkey"], timeout=self._timeout)
            self._remote = Remote(link, self.instance_id, role="child", name=self.name, group=self.group,
                                  eager=False)
        self._beating = threading.Event()
        interval = config.get("heartbeat_interval")
        if interval or RDHUP:
            client = self._client
            stopped = lambda: self._beating.is_set() or isinstance(client._closed, MeshClosed)  # noqa: E731
            threading.Thread(target=keep, args=(client.fileno(), float(interval) if interval else None,
                                                self._beat, stopped),
                             name="mpmesh-keeper", daemon=True).start()

    def _beat(self) -> bool:
        try:
            self._client.send_message(Heartbeat(self._outstanding))
        except MeshError:
            return False
        return True

    # -- handlers -----------------------------------------------------------------------

    def handler(self, action: str) -> Callable[[F], F]:
        """Decorator: serve ``action`` with the decorated function."""
        return self._handlers.handler(action)

    def register_handler(self, action: str, fn: Callable[[Any], Any]) -> None:
        """Serve ``action`` with ``fn(data)`` (plain or ``async def``)."""
        self._handlers.register(action, fn)

    # -- requests to the master ---------------------------------------------------------------

    def request(self, action: str, data: object = None, *, timeout: float | None = None) -> MeshFuture:
        """Ask the master to run ``action``; returns a ``concurrent.futures.Future``."""
        _deadline.check_timeout(timeout)
        return self._client.request(action, "", data, timeout=self._timeout if timeout is None else timeout)

    def send_request(self, action: str, data: object = None, *, timeout: float | None = None) -> object:
        """Ask the master to run ``action`` and wait for its result.

        Raises:
            RequestTimeout: no answer within ``timeout`` (default: the master's).
            NoHandler: the master has no handler for ``action``.
        """
        _deadline.check_timeout(timeout)
        timeout = self._timeout if timeout is None else timeout
        return self._client.call(action, "", data, timeout=timeout)

    async def arequest(self, action: str, data: object = None, *, timeout: float | None = None) -> object:
        """``send_request`` for asyncio code."""
        return await asyncio.wrap_future(self.request(action, data, timeout=timeout))

    # -- serving ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve requests until the master shuts this child down (or goes away)."""
        if self._ran:
            raise RuntimeError("Child.run() was already called")
        self._ran = True
        client = self._client
        try:
            client.send_message(Serve(self.max_concurrency))
        except MeshError:
            return
        if self.mode == "sequential":
            self._run_sequential()
        else:
            self._run_concurrent()

    def _run_sequential(self) -> None:
        inbox = self._inbox
        wait_until = self._client.wait_until
        ready = lambda: bool(inbox) or self._stopping  # noqa: E731
        while True:
            try:
                req = inbox.popleft()  # a reader thread's Goodbye may empty it at any time
            except IndexError:
                if self._stopping:
                    return
                wait_until(ready, _deadline.FOREVER)
                continue
            if self._pending.pop(req.rid, None) is None:
                continue  # cancelled while it waited
            fn = self._handlers.get(req.action)
            if fn is None:
                answer: Reply | Failure = self._handlers.missing(req)
            elif self._handlers.is_async(req.action):
                if self._aloop is None:
                    self._aloop = asyncio.new_event_loop()
                    # While the event loop runs this thread reads nothing: replies to the
                    # handler's own requests need a reader of their own.
                    self._client.start_reader()
                answer = self._aloop.run_until_complete(invoke_async(fn, req))
            else:
                answer = invoke(fn, req)
            self._answer(answer)

    def _run_concurrent(self) -> None:
        client = self._client
        if not client.wait_until(lambda: self._stopping, _deadline.FOREVER):
            return  # the connection is gone
        # Handlers still running answer from their own threads, which nothing on the
        # socket announces: look again every STOP_CHECK_S until the last one is done.
        while self._outstanding and client._closed is None:
            client.wait_until(lambda: not self._outstanding, _deadline.after(STOP_CHECK_S))

    def _answer(self, answer: Reply | Failure) -> None:
        try:
            self._client.send_message(answer)
        except MeshError:
            pass  # the broker is gone; the watchdog or run() ends this process

    def _on_incoming(self, msg: Message) -> None:
        """Called by whichever thread is reading the socket."""
        cls = type(msg)
        if cls is Request:
            req: Request = msg  # type: ignore[assignment]
            if self.mode == "sequential":
                self._pending[req.rid] = req
                self._inbox.append(req)
            else:
                self._start_concurrent(req)
        elif cls is Cancel:
            self._cancel(msg.rid)  # type: ignore[attr-defined]
        elif cls is Shutdown:
            self._stopping = True
        elif cls is Goodbye:
            self._stopping = True
            self._master_gone = True
            self._inbox.clear()

    def _start_concurrent(self, req: Request) -> None:
        fn = self._handlers.get(req.action)
        if fn is None:
            self._answer(self._handlers.missing(req))
            return
        self._outstanding += 1
        if self._handlers.is_async(req.action):
            if self._async is None:
                self._async = AsyncRunner(f"mpmesh-{self.name}-async")
            self._async.submit(fn, req, self._finish_concurrent)
            return
        self._pending[req.rid] = req
        if self._workers is None:
            prefix = f"mpmesh-{self.name}"
            self._workers = WorkerThreads(lambda n: f"{prefix}-{n}", self.max_concurrency, logger=log,
                                          failed="a concurrent request failed outside its handler")
        self._workers.submit(self._run_pending, fn, req.rid)

    def _run_pending(self, fn: Callable[[Any], Any], rid: int) -> None:
        req = self._pending.pop(rid, None)  # atomic claim: None means it was cancelled
        if req is not None:
            self._finish_concurrent(invoke(fn, req))

    def _finish_concurrent(self, answer: Reply | Failure) -> None:
        self._outstanding -= 1
        self._answer(answer)
        if self._stopping and not self._outstanding:
            self._client._wake_followers()

    def _cancel(self, rid: int) -> None:
        # Never scans the inbox: a reader thread may cancel while the main thread pops.
        if self._pending.pop(rid, None) is None:
            return  # already running (or done): its answer will be dropped
        if self.mode != "sequential":
            self._outstanding -= 1
        self._answer(Failure(rid, ErrorCode.CANCELLED, "cancelled before it started", b""))

    def close(self) -> None:
        """Leave the mesh: close the connection and stop helper threads."""
        self._beating.set()
        if self._remote is not None:
            self._remote.close()
        if self._workers is not None:
            self._workers.close(timeout=10.0)
        if self._async is not None:
            self._async.close()
        if self._aloop is not None:
            self._aloop.close()
        self._client.close()

    def __repr__(self) -> str:
        return f"<Child {self.name!r} group={self.group!r} mode={self.mode} pid={self.pid}>"


def keep(fd: int, interval: float | None, beat: Callable[[], bool], stopped: Callable[[], bool]) -> None:
    """A helper thread's two jobs that must not wait for a handler to yield: call
    ``beat()`` every ``interval`` (a child busy for minutes still looks alive; False: the
    connection is gone), and exit this process the moment ``fd``'s other end hangs up (no
    child outlives its master; the main thread notices an idle hang-up itself). Returns
    once ``stopped()`` or we closed ``fd`` ourselves."""
    poller = select.poll()
    poller.register(fd, RDHUP)
    next_beat = time.monotonic() + interval if interval else _deadline.FOREVER
    while not stopped():
        wait_ms = None if next_beat == _deadline.FOREVER else max(0.0, next_beat - time.monotonic()) * 1000
        try:
            events = poller.poll(wait_ms)
        except InterruptedError:
            continue
        if events:
            if any(mask & select.POLLNVAL for _, mask in events) or stopped():
                return  # we closed it ourselves
            os._exit(EXIT_MASTER_GONE)
        if interval and time.monotonic() >= next_beat:
            if beat():
                next_beat = time.monotonic() + interval
            elif RDHUP:
                next_beat = _deadline.FOREVER  # the connection is gone: the hang-up comes next
            else:
                return


class Detached:
    """What a target receives instead of a ``Child`` when its process has no broker to
    join (a standalone Pool's workers talk only to their pool). ``guarded``: a zygote
    forked it, and ends it if its master goes away; otherwise it must watch for that
    itself."""

    def __init__(self, name: str, guarded: bool) -> None:
        self.name = name
        self.guarded = guarded
        self.pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Detached child {self.name!r} pid={self.pid}>"


# -- process entry points ------------------------------------------------------------------

def run_target(config: dict[str, Any]) -> int:
    """Run a callable target in this (new) process; return its exit status.

    A config with a broker ``address`` makes a ``Child``; one without, a ``Detached``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master stops us in order
    os.environ.update(config.get("env") or {})
    child: Child | Detached
    try:
        # Connect first: Manager proxies among the arguments rebuild over this connection.
        if "address" in config:
            child = Child._from_config(config)
        else:
            child = Detached(config["name"], guarded=bool(config.get("zygote")))
        target, args, kwargs = cast("tuple[Callable[..., object], tuple[Any, ...], dict[str, Any]]",
                                    _codec.loads(config["target"]))
    except BaseException:
        traceback.print_exc()
        return 1
    code = 0
    try:
        target(child, *args, **kwargs)
        if isinstance(child, Child) and child._handlers and not child._ran:
            child.run()  # a target that registered handlers but forgot run() still serves
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        master_gone = isinstance(child, Child) and child._master_gone
        process_ends(code == 0)  # a failure is a crash to the brokers it used (Goodbye or not)
        if isinstance(child, Child):
            child.close()
    if master_gone and code == 0:
        code = EXIT_MASTER_GONE
    return code


def process_main(config_blob: bytes) -> None:
    """Entry point of a child started by ``multiprocessing`` (spawn, forkserver)."""
    config = _codec.loads(config_blob)
    assert isinstance(config, dict)
    code = run_target(config)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
