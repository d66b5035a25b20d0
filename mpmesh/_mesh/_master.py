"""Master: hosts the broker, spawns and supervises children, talks to them both ways.

It composes four pieces: the broker loop (a thread of this process, see
``docs/architecture.md`` for why), the supervisor (process lifecycle), the local client
(this process's requests go straight into the broker core) and a handler registry for
requests children send to the master. Each public method is a few lines over them.
"""

from __future__ import annotations

import atexit
import contextlib
import concurrent.futures
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, TypeVar

from .._client import _binding, _near
from .._io import _deadline
from .._broker._actions import Notify
from .._broker._jobs import Worker, WorkerState
from .._broker._routing import STRATEGIES
from .._procs._child import check_mode
from .._client._futures import MeshFuture, dispatcher
from .._errors import MeshClosed, NotFound, RequestTimeout, WorkerLost
from .._client._handlers import AsyncRunner, HandlerRegistry, invoke
from .._client._base import ClientBase, make_hello
from .._client._socket import SocketClient
from .._host import _process as _broker_process
from .._io import _paths
from .._io._forking import stop_in_turn
from .._io._threads import WorkerThreads
from .._host._inproc import BrokerHost, listen, write_key
from .._managers._manager import SharedObjects
from ._stats import GroupStats, ProcessStats
from .._procs._restarts import RestartPolicy
from .._client._retry_on import RetryOn
from .._redis._link import Link, backend_from_env, shared_authkey
from .._redis._node import ID_BLOCK
from .._redis._remote import Remote, reserve_ids
from .._broker._payload import pack
from .._errors import MeshError
from .._state._shared import SharedState, state_address
from .._procs._supervisor import START_METHODS, ChildSpec, Supervisor, default_start_method, describe_exit
from .._wire._messages import ErrorCode, Message, Request, Role

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
        self._restarts = RestartPolicy(restart_limit, restart_window, restart_backoff, restart_backoff_max)
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
        self._state_proc: _broker_process.BrokerProcess | None = None
        if broker == "process":
            self._start_state_broker()
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
        self._core.enable_heartbeats(heartbeat_interval, heartbeat_miss_threshold, time.monotonic(),
                                     inspect=True)
        self._supervisor.attach(self._loop, adopt=self._loop.adopt)
        self._host.start_thread()
        self._remote = None
        if link is not None:
            try:
                self._remote = Remote(link, self.instance_id, role="master", name="master",
                                      record=self._record, serve=self._serve_remote,
                                      on_left=self._node_left, id_floor=first_instance + ID_BLOCK - 1)
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

    def _start_state_broker(self) -> None:
        """Fork the state broker without waiting for it: its socket and key file are made
        here first, so a child or ``connect()``ed process that comes early waits in the
        socket's backlog, and this Master's own connection is made on first use."""
        dispatcher.retire()  # our idle callback thread would cost the fork
        address = state_address(self.address)
        name = os.path.basename(address)[: -len(".sock")]
        listener = listen(address)
        try:
            write_key(_paths.key_path(name), self.authkey)
            self._state_proc = _broker_process.start(
                _broker_process.Config(name, self.authkey, host_name="master-state", address=address,
                                       near_cache=self._near_cache, lazy=True),
                listener=listener, wait=False)
        except BaseException:
            for path in (address, _paths.key_path(name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        finally:
            listener.close()  # the broker's now: we must not keep connections waiting on it
        self._state_lock = threading.Lock()

    def _open_state_conn(self) -> ClientBase:
        """Our end of the socketpair made with the state broker, once it listens."""
        proc = self._state_proc
        if proc is None:
            return self._client  # broker="thread": the state is in our own broker
        with self._state_lock:
            client: ClientBase | None = self.__dict__.get("_state_client")  # another thread's
            if client is None:
                self._check_open()
                proc.ready()
                # The Master's timeout: a shared-state call ends within it if the state
                # broker stops answering (None: no deadline, but a broker silent for
                # DEFAULT_TIMEOUT_S is still given up).
                client = SocketClient(proc.address, self.authkey, make_hello(Role.CLIENT), sock=proc.sock,
                                      timeout=self.timeout)
                self.__dict__["_state_client"] = client  # before a second caller takes the lock
                _binding.bind(state_address(self.address), client)
        return client

    def _objects_home(self) -> tuple[ClientBase, str]:
        if self._state_proc is None:
            return super()._objects_home()
        return self._state_conn, state_address(self.address)

    def _stop_state_broker(self) -> None:
        client = self.__dict__.pop("_state_client", None)
        if client is not None:
            client.close()
        if self._state_proc is not None:
            self._state_proc.stop()

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
        host = self._other_host(target)
        if host is not None:
            return self._cross_host(host, action, target, data, priority=priority, retry_on=retry_on, **options)
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
        host = self._other_host(target)
        if host is not None:
            return self._ask_host(host, action, target, data, priority=priority, retry_on=retry_on, **options)
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

    # -- across hosts ---------------------------------------------------------------------------

    def _other_host(self, target: str | int) -> int | None:
        """The node of another host a request for ``target`` goes to; None: this host's.

        This host's children come first; another host's when none here is free (or
        none here serves ``target``), and this host's queue when no other has room.
        """
        remote = self._remote
        if remote is None or target == "":
            return None
        # Read without the core lock: a routing hint, and the lock would cost the loop.
        if self._core.serves(target, free_only=True):
            return None
        here = self._core.serves(target, free_only=False)
        try:
            return remote.host_for(target, free_only=here)
        except MeshError:
            if here:  # Redis is away: what this host serves still works
                return None
            raise

    def _cross_host(self, host: int, action: str, target: str | int, data: object, *, timeout: float | None,
                    retries: int, retry_delay: float, priority: int,
                    retry_on: tuple[type[BaseException], ...]) -> MeshFuture:
        """A request sent to another host's node, re-sent (to wherever ``target`` is
        served then) after WorkerLost, RequestTimeout or ``retry_on``."""
        assert self._remote is not None
        remote = self._remote
        outer = MeshFuture()
        again: tuple[type[BaseException], ...] = (WorkerLost, RequestTimeout, *retry_on)

        def attempt(number: int, to: int) -> None:
            try:
                fut = remote.send(to, action, target, data, timeout=timeout, priority=priority)
            except BaseException as exc:
                outer.set_exception(exc)
                return
            fut.add_done_callback(lambda done: settle(number, done))

        def settle(number: int, done: concurrent.futures.Future[Any]) -> None:
            exc = done.exception()
            if exc is None:
                outer.set_result(done.result())
            elif isinstance(exc, again) and number < retries and not self._closed:
                self._emit("request-retry", {"action": action, "target": target, "attempt": number + 2,
                                             "attempts": retries + 1, "reason": str(exc)})
                timer = threading.Timer(retry_delay, resend, (number + 1, exc))
                timer.daemon = True
                timer.start()
            else:
                outer.set_exception(exc)

        def resend(number: int, last: BaseException) -> None:
            try:
                to = self._other_host(target)
            except BaseException as exc:
                outer.set_exception(exc)
                return
            if to is None:  # served here now
                local = self._client.request(action, target, data, timeout=timeout, priority=priority,
                                             retries=retries - number, retry_delay=retry_delay)
                local.add_done_callback(lambda done: _copy(done, outer))
            else:
                attempt(number, to)

        attempt(0, host)
        return outer

    def _ask_host(self, host: int, action: str, target: str | int, data: object, *, timeout: float | None,
                  retries: int, retry_delay: float, priority: int,
                  retry_on: tuple[type[BaseException], ...]) -> object:
        """``_cross_host`` waited for in this thread (the reply comes straight to it)."""
        assert self._remote is not None
        again: tuple[type[BaseException], ...] = (WorkerLost, RequestTimeout, *retry_on)
        number = 0
        while True:
            try:
                return self._remote.ask(host, action, target, data, timeout=timeout, priority=priority)
            except again as exc:
                if number >= retries or self._closed:
                    raise
                number += 1
                self._emit("request-retry", {"action": action, "target": target, "attempt": number + 1,
                                             "attempts": retries + 1, "reason": str(exc)})
            time.sleep(retry_delay)  # the retry delay the caller asked for
            found = self._other_host(target)
            if found is None:  # served here now
                return self._client.call(action, target, data, timeout=timeout, priority=priority,
                                         retries=retries - number, retry_delay=retry_delay)
            host = found

    def _serve_remote(self, action: str, target: str | int, data: object, priority: int,
                      timeout: float | None) -> object:
        """Run a request another host sent here.

        One that a child here can take at once runs with no timeout: its caller keeps
        waiting while this host beats for it, however long the handler takes. One that
        must queue waits at most its caller's ``timeout``, and never runs once that passed.
        """
        self._check_open()
        free = self._core.serves(target, free_only=True)  # a hint: see _other_host
        return self._client.call(action, target, data, timeout=None if free else timeout, priority=priority)

    def _record(self) -> dict[str, Any]:
        """What this host's node says in the registry: its processes, and which of its
        groups and children could take a request now."""
        nodes = [list(row) for row in self._host_nodes()]
        with self._loop.locked():
            groups, children = self._core.free_members()
        return {"iid": self.instance_id, "role": "master", "hostname": socket.gethostname(),
                "nodes": nodes, "groups": groups, "children": children}

    def _host_nodes(self) -> list[tuple[Any, ...]]:
        """(instance_id, name, group, pid, hostname, role) of every process of this host."""
        call = self._client.op("admin", "nodes", payload=pack(()))
        found = self._client.wait(call, self._client.due())
        return list(found[1])  # type: ignore[index]

    def _node_left(self, record: dict[str, Any]) -> None:
        from .._state._shared import Node

        iid = record["iid"]
        row = next((r for r in record["nodes"] if r[0] == iid), [iid, "", None, 0, record.get("hostname", ""),
                                                                  record.get("role", "")])
        node = Node(row[0], row[1], row[2], row[3], row[4], False, row[5])
        self.log.warning("node %d on %s left the mesh", iid, node.hostname)
        for callback in self._callbacks["node-left"]:
            dispatcher.submit(callback, node)

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
        members = [w.name for w in self._group(group).members if w.state is not WorkerState.DOWN]
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
                name = str(info["name"])
                spec = self._specs.get(name)
                restart = spec is not None and spec.auto_restart and not self._closed
                self.log.warning("child %r (pid %s) missed its heartbeats for %.1f s%s", name,
                                 info["pid"], info["silent_for"], "; killing it to restart it" if restart else "")
                if restart:
                    self._supervisor.kill(name)
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
        """A child process ended (broker thread): restart it, or mark it down for good."""
        how = describe_exit(exitcode)
        spec = self._specs.get(name)
        worker = self._core.child(name)
        stopping = worker is None or worker.state is WorkerState.STOPPING
        delay: float | None = None
        if spec is not None and spec.auto_restart and not self._closed and not stopping:
            delay = self._restarts.next_delay(name, time.monotonic())
        level = logging.INFO if exitcode == 0 or self._closed or stopping else logging.WARNING
        self.log.log(level, "child %r (pid %d) %s", name, pid, how)
        self._emit("child-exit", {"name": name, "pid": pid, "exitcode": exitcode,
                                  "signal": -exitcode if exitcode < 0 else None,
                                  "group": spec.group if spec else None})
        restarting = delay is not None
        if spec is not None and spec.auto_restart and not restarting and not self._closed and not stopping:
            why = (f"restarted {self._restarts.limit} times within {self._restarts.window:g} s; "
                   f"giving up (last: {how})")
            self.log.error("child %r %s", name, why)
            self._emit("auto-restart", {"name": name, "given_up": True, "reason": why})
            how = f"{how}; not restarted: {why}"

        if worker is not None and worker.peer is not None:
            self._loop.drain(worker.peer)  # its last replies first
        self._loop.run_core(lambda now: self._core.child_down(name, how, now, restarting=restarting))
        if restarting:
            assert delay is not None
            timer = threading.Timer(delay, self._restart, (name, delay, how))
            timer.daemon = True
            timer.start()

    def _restart(self, name: str, delay: float, how: str) -> None:
        """Start child ``name`` again from its original spec (on a timer thread)."""
        spec = self._specs.get(name)
        worker = self._core.child(name)
        if (self._closed or spec is None or not spec.auto_restart or worker is None
                or worker.state is not WorkerState.STARTING):
            return
        try:
            pid = self._supervisor.wait_started(name, self._start(spec))
        except Exception as exc:
            if self._closed:
                return
            self.log.error("could not restart child %r: %s", name, exc)
            reason = f"{how}; restart failed: {exc}"
            self._loop.run_core(lambda now: self._core.child_down(name, reason, now))
            return
        worker.restarts += 1
        self.log.warning("restarted child %r as pid %d (restart %d, after %.2f s)", name, pid, worker.restarts, delay)
        self._emit("auto-restart", {"name": name, "pid": pid, "restarts": worker.restarts,
                                    "delay": delay, "reason": how, "given_up": False})

    # -- introspection ------------------------------------------------------------------------------

    def children(self) -> list[str]:
        """Names of the children that are running or being restarted, in spawn order."""
        with self._loop.locked():  # a Pool's thread may add or forget children meanwhile
            workers = self._core.children()
            return [n for n in self._specs
                    if (w := workers.get(n)) is not None and w.state is not WorkerState.DOWN]

    def is_alive(self, name: str) -> bool:
        """Whether child ``name``'s process is running."""
        if self._worker(name).state is WorkerState.DOWN:
            # The router knows it ended (a request it held has failed) a moment before the
            # supervisor's record says so.
            return False
        return self._supervisor.alive(name)

    def unhealthy(self) -> list[str]:
        """Children whose heartbeats stopped (they leave the list when beats resume)."""
        with self._loop.locked():
            return self._unhealthy()

    def _unhealthy(self) -> list[str]:
        """``unhealthy()`` with the core lock held."""
        return [n for n, w in self._core.children().items()
                if n in self._specs and not w.healthy and w.state is not WorkerState.DOWN]

    def process_stats(self, name: str) -> ProcessStats:
        """Counters for one child: requests handled and active, response time, errors, restarts."""
        return self._process_stats(self._worker(name))

    def _process_stats(self, w: Worker) -> ProcessStats:
        return ProcessStats(w.name, self._supervisor.pid(w.name), self._supervisor.alive(w.name),
                            w.handled, len(w.running), w.ema, w.errors, w.restarts, w.healthy,
                            w.group.name if w.group else None)

    def group_stats(self, group: str) -> GroupStats:
        """Totals for a group: members, strategy, cap, queue length, requests and errors."""
        with self._loop.locked():
            g = self._group(group)
            return GroupStats(g.name, g.strategy, [w.name for w in g.members], g.max_concurrency,
                              len(g.queue), g.busy, sum(w.handled for w in g.members),
                              sum(w.errors for w in g.members), sum(w.restarts for w in g.members))

    def stats(self) -> dict[str, Any]:
        """A snapshot of the whole mesh (cheap enough to poll every second)."""
        with self._loop.locked():
            core = self._core
            children = {n: self._process_stats(w) for n, w in core.children().items() if n in self._specs}
            groups = list(core.groups())
            queued, in_flight = core.requests()
            snapshot: dict[str, Any] = {
                "mesh": self.name, "address": self.address, "children": children,
                "requests_queued": queued, "requests_in_flight": in_flight,
                "connections": len(self._core.peers) - 1, "unhealthy": self._unhealthy(),
            }
        snapshot["groups"] = {g: self.group_stats(g) for g in groups}
        # The shared-state counters (and the memory and CPU of the broker that keeps them);
        # the mesh's own figures above win where names meet (its connections).
        shared: dict[str, Any] = super().stats()
        shared.update(snapshot)
        return shared

    def _worker(self, name: str) -> Worker:
        worker = self._core.child(name)
        if worker is None or name not in self._specs:
            raise NotFound(f"no child named {name!r}")
        return worker

    def _group(self, group: str) -> Any:
        g = self._core.group(group)
        if g is None:
            raise NotFound(f"no group named {group!r}")
        return g

    # -- shutting down ------------------------------------------------------------------------------

    def shutdown_child(self, name: str, timeout: float = 10.0) -> None:
        """Stop child ``name`` for good: let it finish what it holds, then terminate, then kill."""
        _deadline.check_timeout(timeout)
        self._check_open()
        self._worker(name)
        self._specs[name].auto_restart = False
        self._stop([name], timeout)
        if not self._supervisor.alive(name):
            self._loop.run_core(lambda now: self._core.child_down(name, "was shut down", now, unless_down=True))

    def _stop(self, names: list[str], timeout: float | None) -> None:
        self._loop.run_core(lambda now: self._core.stop_children(names, timeout))
        live = [n for n in names if self._supervisor.alive(n)]
        if self._supervisor.wait_exited(live, timeout):
            return
        sup = self._supervisor

        def send(sig: int) -> None:
            for name in live:
                sup.kill(name, sig)

        if stop_in_turn(send, lambda t: sup.wait_exited(live, t)):
            return
        self.log.error("children %s did not exit after SIGKILL", [n for n in live if self._supervisor.alive(n)])

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
            with self._loop.locked():
                specs = list(self._specs.values())
            for spec in specs:
                spec.auto_restart = False
            self._stop([spec.name for spec in specs], timeout)
            self._loop.run_core(lambda now: self._core.fail_all(ErrorCode.CLOSED, "the mesh was shut down"))
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


def _copy(source: concurrent.futures.Future[Any], target: concurrent.futures.Future[Any]) -> None:
    exc = source.exception()
    if exc is None:
        target.set_result(source.result())
    else:
        target.set_exception(exc)
