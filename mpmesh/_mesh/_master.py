"""Master: hosts the broker, spawns and supervises children, talks to them both ways.

It composes its pieces: the broker loop (a thread of this process, see
``docs/architecture.md`` for why), the supervisor (process lifecycle), the local client
(this process's requests go straight into the broker core), a handler registry for
requests children send to the master, and collaborators it owns, one per job: exits,
restarts and stopping (``_lifecycle``), the statistics (``_stats``), the state broker
(``_statebroker``) and, on a Redis backend, routing across hosts (``_across``). Each
public method is a few lines over them.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, TypeVar

from .._broker._actions import Notify
from .._broker._jobs import WorkerState
from .._broker._routing import STRATEGIES
from .._client import _near
from .._client._base import ClientBase
from .._client._futures import MeshFuture, dispatcher
from .._client._handlers import AsyncRunner, HandlerRegistry, invoke
from .._client._retry_on import RetryOn
from .._errors import MeshClosed, NotFound, RequestTimeout, WorkerLost
from .._host import _process as _broker_process
from .._host._inproc import BrokerHost
from .._io import _deadline
from .._io import _paths
from .._io._threads import WorkerThreads
from .._managers._factories import SharedObjects
from .._procs._child import check_mode
from .._procs._restarts import RestartPolicy
from .._procs._supervisor import START_METHODS, ChildSpec, Supervisor, default_start_method
from .._redis._link import Link, backend_from_env, shared_authkey
from .._redis._node import ID_BLOCK
from .._redis._remote import Remote, reserve_ids
from .._state._shared import SharedState
from .._wire._messages import Message, Request
from ._across import Across
from ._lifecycle import Lifecycle
from ._statebroker import StateBroker
from ._stats import Census, GroupStats, ProcessStats

__all__ = ["EVENTS", "GroupStats", "Master", "ProcessStats"]

F = TypeVar("F", bound=Callable[..., Any])
EVENTS: Final = ("child-started", "child-exit", "heartbeat-missed", "auto-restart", "request-retry",
                  "heartbeat-resumed", "node-left")
# Threads serving children's requests to the master (each handler call holds one).
MASTER_HANDLER_THREADS: Final = 32


class Master(SharedState, SharedObjects):
    """Hosts a mesh: the broker, named children and groups, requests both ways.

    Use it as a context manager; leaving the block shuts every child down.
    """

    _remote: Remote | None

    def __init__(self, name: str | None = None, *, authkey: bytes | None = None,
                 timeout: float | None = 30.0, retries: int = 0, retry_delay: float = 0.1,
                 heartbeat_interval: float = 1.0, heartbeat_miss_threshold: int = 3,
                 start_method: str | None = None, logger: logging.Logger | None = None,
                 restart_limit: int = 10, restart_window: float = 60.0,
                 restart_backoff: float = 0.1, restart_backoff_max: float = 10.0,
                 broker: str = "process", near_cache: bool = True,
                 near_cache_bytes: int | None = None, backend: str | None = None) -> None:
        _deadline.check_timeout(timeout)
        _deadline.check_timeout(retry_delay, "retry_delay")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries!r}")
        if not heartbeat_interval > 0 or heartbeat_miss_threshold < 1:
            raise ValueError("heartbeat_interval must be > 0 and heartbeat_miss_threshold >= 1")
        method = start_method or default_start_method()
        if method not in START_METHODS:
            raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, not {method!r}")
        if authkey is not None and not isinstance(authkey, (bytes, bytearray)):
            raise TypeError("authkey must be bytes")
        if broker not in ("process", "thread"):
            raise ValueError(f"broker must be 'process' or 'thread', not {broker!r}")
        if near_cache_bytes is not None:
            _near.set_budget(near_cache_bytes)
        self._near_cache = bool(near_cache)
        self.name = name or _paths.new_mesh_name()
        self.backend = backend_from_env(backend)
        if self.backend is not None:
            if name is None:
                raise ValueError("a mesh across hosts needs a name, the same on every host")
            authkey = authkey or shared_authkey()
        self.authkey = bytes(authkey) if authkey else os.urandom(32)
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_miss_threshold = heartbeat_miss_threshold
        self.start_method = method
        self.log = logger or logging.getLogger("mpmesh")
        restarts = RestartPolicy(restart_limit, restart_window, restart_backoff, restart_backoff_max)
        self._closed = False
        self._pid = os.getpid()  # a forked copy of this process never shuts the mesh down
        self._specs: dict[str, ChildSpec] = {}
        self._callbacks: dict[str, list[Callable[[dict[str, Any]], object]]] = {e: [] for e in EVENTS}
        self._handlers = HandlerRegistry("the master")
        # Threads for child-to-master handlers: the pool starts them only when used.
        self._pool = WorkerThreads(lambda n: f"mpmesh-master-handler_{n}", MASTER_HANDLER_THREADS,
                                   logger=self.log, failed="a request to the master failed outside its handler")
        self._async: AsyncRunner | None = None  # an event loop thread, made on first use
        self._async_lock = threading.Lock()  # by whichever thread delivers that request
        self.address = _paths.socket_path(self.name)
        if _listening(self.address):
            # Checked before anything of ours exists (a state broker beside that mesh's);
            # binding the socket below still settles a race with another new Master.
            raise ValueError(f"a mesh is already listening at {self.address}")
        # Shared state lives in a broker process of its own (see docs/architecture.md):
        # started first, while this process may still fork it directly.
        self._state_broker: StateBroker | None = None
        if broker == "process":
            self._state_broker = StateBroker(self.address, self.authkey, near_cache=self._near_cache,
                                             timeout=timeout)
        # No files for the zygote to remove yet: the socket and key file are the mesh's
        # only once it is bound (else they may be another Master's of the same name).
        # A mesh across hosts: its instance ids come from one counter in Redis, a block
        # of them for this host's broker (every host's ids differ).
        link = Link(self.backend, self.name, self.authkey, timeout=timeout) if self.backend else None
        first_instance = reserve_ids(link) if link is not None else 1
        self._supervisor = Supervisor(
            {"address": self.address, "authkey": self.authkey, "timeout": timeout,
             "heartbeat_interval": heartbeat_interval, "mesh": self.name, "backend": self.backend},
            [], self._on_exit,
        )
        if method == "fork":
            # Before this process starts any thread of ours: fork the zygote now.
            self._supervisor.fork_zygote_if_safe()
        self._supervisor.ensure_zygote()  # otherwise exec one (it boots in the background)
        try:
            self._host = BrokerHost(self.name, self.authkey, on_notify=self._on_notify,
                                    near_cache=self._near_cache, first_instance=first_instance)
        except BaseException:
            self._supervisor.close()
            self._stop_state_broker()
            raise
        self._supervisor.remove_at_end(self._host.cleanup_paths)
        self._core = self._host.core
        self._loop = self._host.loop
        self._client = self._host.client
        self._client.on_incoming = self._on_incoming
        self._lifecycle = Lifecycle(self._specs, self._core, self._loop, self._supervisor, restarts, self.log,
                                    self._emit, lambda: self._closed, self._start)
        self._census = Census(self._specs, self._core, self._loop, self._supervisor)
        self._core.enable_heartbeats(heartbeat_interval, heartbeat_miss_threshold, time.monotonic(),
                                     inspect=True)
        self._supervisor.attach(self._loop, adopt=self._loop.adopt)
        self._host.start_thread()
        self._remote = None
        self._across: Across | None = None
        if link is not None:
            try:
                self._across = Across(link, self.instance_id, first_instance + ID_BLOCK - 1, core=self._core,
                                      loop=self._loop, client=self._client, closed=lambda: self._closed,
                                      check_open=self._check_open, emit=self._emit, log=self.log)
                self._remote = self._across.remote
            except BaseException:
                self._closed = True
                self._host.close()
                self._supervisor.close()
                self._stop_state_broker()
                raise
        self._atexit = _make_atexit(weakref.ref(self))
        atexit.register(self._atexit)

    @property
    def instance_id(self) -> int:
        """This Master's instance id (unique in the mesh for its lifetime)."""
        return self._core.instance_id()

    @property
    def _state_proc(self) -> _broker_process.BrokerProcess | None:
        """The state broker's process (None: the state is in this process's broker)."""
        return self._state_broker.proc if self._state_broker is not None else None

    def _open_state_conn(self) -> ClientBase:
        """Our end of the socketpair made with the state broker, once it listens."""
        if self._state_broker is None:
            return self._client  # broker="thread": the state is in our own broker
        return self._state_broker.connect(self._check_open)

    def _objects_home(self) -> tuple[ClientBase, str]:
        if self._state_broker is None:
            return super()._objects_home()
        return self._state_conn, self._state_broker.address

    def _stop_state_broker(self) -> None:
        client = self.__dict__.pop("_state_client", None)
        if client is not None:
            client.close()
        if self._state_broker is not None:
            self._state_broker.stop()

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._specs)} children"
        return f"<Master {self.name!r} {state}>"

    # -- children -------------------------------------------------------------------------------

    def spawn_child(self, name: str, target: Callable[..., Any] | str, mode: str = "sequential",
                    group: str | None = None, *, args: tuple[Any, ...] = (),
                    kwargs: dict[str, Any] | None = None, max_concurrency: int | None = None,
                    auto_restart: bool = True, env: dict[str, str] | None = None) -> None:
        """Start a child process named ``name`` that runs ``target``.

        ``target`` is a callable taking the ``Child`` first, or the path of a script /
        the name of a module that creates ``mpmesh.Child()`` itself.

        Raises:
            ValueError: duplicate name, unknown mode, bad max_concurrency.
        """
        self._wait_started(name, self._launch(name, target, mode, group, args=args, kwargs=kwargs,
                                              max_concurrency=max_concurrency,
                                              auto_restart=auto_restart, env=env))

    def _launch(self, name: str, target: Callable[..., Any] | str, mode: str, group: str | None, *,
                args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                max_concurrency: int | None = None, auto_restart: bool = True,
                env: dict[str, str] | None = None) -> concurrent.futures.Future[int]:
        """Declare child ``name`` to the broker and start its process (without waiting)."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a child needs a non-empty string name, not {name!r}")
        if not (callable(target) or isinstance(target, str)):
            raise TypeError(f"target must be a callable or a script/module name, not {type(target).__name__}")
        capacity = check_mode(mode, max_concurrency)
        spec = ChildSpec(name, target, mode, group, capacity, tuple(args), dict(kwargs or {}),
                         dict(env) if env else None, auto_restart, self.start_method)
        with self._loop.locked():
            if group is not None and self._core.group(group) is None:
                self._core.declare_group(group, "round-robin")
            self._core.declare_child(name, group, capacity)
            self._specs[name] = spec  # with the router's record: readers see both or neither
        try:
            return self._start(spec)
        except BaseException:
            self._forget(name)
            raise

    def _start(self, spec: ChildSpec) -> concurrent.futures.Future[int]:
        """Start ``spec``'s process. Once its pid is known the broker lets only that
        process say Hello with the child's name (no process with the key takes it over)."""
        fut = self._supervisor.launch(spec)
        fut.add_done_callback(lambda done: self._started(spec.name, done))
        return fut

    def _started(self, name: str, fut: concurrent.futures.Future[int]) -> None:
        """Tell the broker the pid child ``name`` started as (the zygote's report, on the
        loop's thread, or the caller's for a ``multiprocessing`` start)."""
        if fut.cancelled() or fut.exception() is not None:
            return
        pid = fut.result()
        self._loop.run_core(lambda now: self._core.child_started(name, pid, now))

    def _wait_started(self, name: str, fut: concurrent.futures.Future[int]) -> None:
        try:
            self._supervisor.wait_started(name, fut)
        except BaseException:
            self._forget(name)
            raise

    def _names_in_use(self) -> set[str]:
        """Every group and child name taken in this mesh (a pool picks a free one)."""
        return set(self._core.groups()) | set(self._core.children())

    def _forget(self, name: str) -> None:
        with self._loop.locked():
            self._specs.pop(name, None)
            self._core.forget_child(name)

    def spawn_group(self, group: str, target: Callable[..., Any] | str, size: int,
                    mode: str = "concurrent", strategy: str = "round-robin", **child_opts: Any) -> list[str]:
        """Start ``size`` children named ``f"{group}-{i}"`` that share a queue; return their names."""
        self._check_open()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, not {size!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        check_mode(mode, child_opts.get("max_concurrency"))
        with self._loop.locked():
            if self._core.group(group) is not None:
                raise ValueError(f"group {group!r} already exists")
            self._core.declare_group(group, strategy)
        names = [f"{group}-{i}" for i in range(size)]
        # Ask for every process first, then wait: the forks overlap.
        launched = [(child, self._launch(child, target, mode, group, **child_opts)) for child in names]
        for child, fut in launched:
            self._wait_started(child, fut)
        return names

    def Pool(self, processes: int | None = None, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        """A ``multiprocessing.Pool`` drop-in whose workers are a new group of this mesh."""
        from .._pool import Pool

        return Pool._on_master(self, processes, *args, **kwargs)

    def configure_group(self, group: str, *, strategy: str | None = None,
                        max_concurrency: int | None = None, auto_restart: bool | None = None) -> None:
        """Change how a group balances its requests, caps them, and restarts its members."""
        self._check_open()
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 1):
            raise ValueError(f"max_concurrency must be a positive int, not {max_concurrency!r}")

        def change(now: float) -> list[Any]:
            try:
                actions = self._core.configure_group(group, now, strategy=strategy, max_concurrency=max_concurrency)
            except KeyError:
                raise NotFound(f"no group named {group!r}") from None
            if auto_restart is not None:
                for spec in self._specs.values():
                    if spec.group == group:
                        spec.auto_restart = auto_restart
            return actions

        self._loop.run_core(change)

    # -- requests ---------------------------------------------------------------------------------

    def request(self, action: str, target: str | int, data: object = None, *,
                timeout: float | None = None, retries: int | None = None,
                retry_delay: float | None = None, priority: int = 0,
                retry_on: tuple[type[BaseException], ...] = ()) -> MeshFuture:
        """Send a request; return a ``concurrent.futures.Future`` of its result.

        ``retries`` re-sends after WorkerLost and RequestTimeout; exceptions the handler
        raised are re-sent only when they match ``retry_on``.
        """
        self._check_open()
        options = self._options(timeout, retries, retry_delay)
        if self._across is not None and (host := self._across.other_host(target)) is not None:
            return self._across.request(host, action, target, data, priority=priority, retry_on=retry_on,
                                        **options)
        if retry_on and options["retries"]:
            # One budget for every cause: each attempt goes out alone, retried here.
            once = dict(options, retries=0, priority=priority)
            first = self._client.request(action, target, data, **once)
            return RetryOn(self, first, (*retry_on, WorkerLost, RequestTimeout),
                            (action, target, data), once, options["retries"]).outer
        return self._client.request(action, target, data, priority=priority, **options)

    def send_request(self, action: str, target: str | int, data: object = None, *,
                     timeout: float | None = None, retries: int | None = None,
                     retry_delay: float | None = None, priority: int = 0,
                     retry_on: tuple[type[BaseException], ...] = ()) -> object:
        """Run ``action`` on ``target`` (child, group or instance id) and return its result.

        Raises:
            NotFound: no such child or group.  NoHandler: the target lacks ``action``.
            RequestTimeout: no answer within ``timeout`` (per attempt).
            WorkerLost: the process died while handling it.  MeshClosed: after shutdown.
        """
        self._check_open()
        options = self._options(timeout, retries, retry_delay)
        if self._across is not None and (host := self._across.other_host(target)) is not None:
            return self._across.ask(host, action, target, data, priority=priority, retry_on=retry_on, **options)
        if retry_on and options["retries"]:
            fut = self.request(action, target, data, priority=priority, retry_on=retry_on, **options)
            attempts = options["retries"] + 1
            return self._client.wait(fut, self._client.guard_deadline(
                options["timeout"], attempts * attempts, options["retry_delay"]))
        return self._client.call(action, target, data, priority=priority, **options)

    async def arequest(self, action: str, target: str | int, data: object = None, *,
                       timeout: float | None = None, retries: int | None = None,
                       retry_delay: float | None = None, priority: int = 0) -> object:
        """``send_request`` for asyncio code."""
        import asyncio

        fut = self.request(action, target, data, timeout=timeout, retries=retries,
                           retry_delay=retry_delay, priority=priority)
        return await asyncio.wrap_future(fut)

    def _options(self, timeout: float | None, retries: int | None, retry_delay: float | None) -> dict[str, Any]:
        _deadline.check_timeout(timeout)
        _deadline.check_timeout(retry_delay, "retry_delay")
        if retries is not None and retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries!r}")
        return {"timeout": self.timeout if timeout is None else timeout,
                "retries": self.retries if retries is None else retries,
                "retry_delay": self.retry_delay if retry_delay is None else retry_delay}

    def broadcast(self, action: str, group: str, data: object = None, *,
                  timeout: float | None = None) -> dict[str, object]:
        """Run ``action`` on every member of ``group``; map each name to its result or exception."""
        self._check_open()
        members = [w.name for w in self._census.group(group).members if w.state is not WorkerState.DOWN]
        futures = {name: self.request(action, name, data, timeout=timeout) for name in members}
        results: dict[str, object] = {}
        for name, fut in futures.items():
            try:
                results[name] = self._client.wait(fut, self._client.guard_deadline(
                    self.timeout if timeout is None else timeout, 0, 0))
            except Exception as exc:
                results[name] = exc
        return results

    # -- the master's own handlers ------------------------------------------------------------------

    def register_handler(self, action: str, fn: Callable[[Any], Any]) -> None:
        """Serve ``child.send_request(action, data)`` with ``fn(data)`` (plain or ``async def``)."""
        self._handlers.register(action, fn)

    def handler(self, action: str) -> Callable[[F], F]:
        """Decorator form of ``register_handler``."""
        return self._handlers.handler(action)

    def _on_incoming(self, msg: Message) -> None:
        """A child's request for the master, or a cancel (broker thread, no lock held)."""
        if type(msg) is not Request:
            return
        req: Request = msg
        fn = self._handlers.get(req.action)
        if fn is None:
            self._loop.submit_local(self._handlers.missing(req))
        elif self._handlers.is_async(req.action):
            self._async_runner().submit(fn, req, self._loop.submit_local)
        else:
            self._pool.submit(lambda: self._loop.submit_local(invoke(fn, req)))

    def _async_runner(self) -> AsyncRunner:
        if self._async is None:
            with self._async_lock:
                if self._async is None:
                    self._async = AsyncRunner("mpmesh-master-async")
        return self._async

    # -- events -------------------------------------------------------------------------------------

    def on(self, event: str, callback: Callable[[dict[str, Any]], object]) -> None:
        """Call ``callback(info)`` (on a helper thread) whenever ``event`` happens."""
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r}; expected one of {', '.join(EVENTS)}")
        self._callbacks[event].append(callback)

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for callback in self._callbacks.get(event, ()):
            dispatcher.submit(callback, info)

    def _on_notify(self, notes: list[Notify]) -> None:
        for note in notes:
            info: dict[str, Any] = dict(note.info)
            if note.event == "heartbeat-missed":
                self._lifecycle.beats_missed(info)
            elif note.event == "request-retry":
                self.log.info("retrying %r on %r (attempt %s of %s): %s", info["action"],
                              info["target"], info["attempt"], info["attempts"], info["reason"])
            elif note.event == "child-started" and self._remote is not None:
                self._remote.node().nudge()  # other hosts learn of it now, not at the next beat
            elif note.event == "heartbeat-resumed":
                self.log.info("child %r is healthy again", info["name"])
            else:
                self.log.debug("%s %s", note.event, info)
            self._emit(note.event, info)

    def _on_exit(self, name: str, pid: int, exitcode: int) -> None:
        """A child process ended (the supervisor's report, on the broker thread)."""
        self._lifecycle.on_exit(name, pid, exitcode)

    # -- introspection ------------------------------------------------------------------------------

    def children(self) -> list[str]:
        """Names of the children that are running or being restarted, in spawn order."""
        return self._census.children()

    def is_alive(self, name: str) -> bool:
        """Whether child ``name``'s process is running."""
        if self._census.worker(name).state is WorkerState.DOWN:
            # The router knows it ended (a request it held has failed) a moment before the
            # supervisor's record says so.
            return False
        return self._supervisor.alive(name)

    def unhealthy(self) -> list[str]:
        """Children whose heartbeats stopped (they leave the list when beats resume)."""
        return self._census.unhealthy()

    def process_stats(self, name: str) -> ProcessStats:
        """Counters for one child: requests handled and active, response time, errors, restarts."""
        return self._census.process(self._census.worker(name))

    def group_stats(self, group: str) -> GroupStats:
        """Totals for a group: members, strategy, cap, queue length, requests and errors."""
        return self._census.group_stats(group)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the whole mesh (cheap enough to poll every second)."""
        snapshot = self._census.snapshot(self.name, self.address)
        # The shared-state counters (and the memory and CPU of the broker that keeps them);
        # the mesh's own figures above win where names meet (its connections).
        shared: dict[str, Any] = super().stats()
        shared.update(snapshot)
        return shared

    # -- shutting down ------------------------------------------------------------------------------

    def shutdown_child(self, name: str, timeout: float = 10.0) -> None:
        """Stop child ``name`` for good: let it finish what it holds, then terminate, then kill."""
        _deadline.check_timeout(timeout)
        self._check_open()
        self._census.worker(name)
        self._lifecycle.shutdown_child(name, timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every child (in parallel, gracefully first) and the broker. Idempotent.

        In a forked copy of the Master's process (a ``with`` block left in a child of
        ``os.fork()``, its exit handlers) it only closes this copy's handle: the mesh is
        its creator's to stop, as with a standard Manager or Pool.
        """
        _deadline.check_timeout(timeout)
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return
        try:
            atexit.unregister(self._atexit)
            self._lifecycle.shutdown_all(timeout)
        finally:
            if self._remote is not None:
                self._remote.close()
            self._host.close()
            self._supervisor.close()
            self._stop_state_broker()
            self._pool.close(wait=False, cancel=True)
            if self._async is not None:
                self._async.close()

    def _check_open(self) -> None:
        if self._closed:
            raise MeshClosed(f"mesh {self.name!r} was shut down")


def _listening(address: str) -> bool:
    """Whether something accepts connections at the Unix socket ``address`` right now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _make_atexit(ref: weakref.ref[Master]) -> Callable[[], None]:
    def shutdown_at_exit() -> None:
        master = ref()
        if master is not None:
            master.shutdown(timeout=2.0)
    return shutdown_at_exit

