"""BaseManager / SyncManager: the ``multiprocessing.managers`` API over an mpmesh broker.

Where the broker runs:

- ``start()`` (and ``mpmesh.Manager()``): in a broker process of its own, as the
  standard library's server is, with every process (this one included) connected to
  its Unix socket; with ``broker="thread"``, on a thread of *this* process instead,
  whose proxies then call the broker core directly (``LocalClient``: no socket).
- ``start(initializer, initargs)``: in a server process of its own that runs
  ``initializer`` first (e.g. to ignore SIGINT), as the standard library does.
- ``get_server().serve_forever()``: in the calling thread, until SIGINT/SIGTERM.
- ``connect()``: nowhere; this process joins a manager served elsewhere.

``address`` is a Unix socket path, or ``(host, port)`` to serve other machines over TCP
(``port`` 0 picks a free one; read it back from ``address``).

Registered typeids that name a type the broker implements natively (``dict``,
``threading.Lock``, ``queue.Queue``, ...) are built in the broker; any other callable is
user code, which runs on a worker thread of the hosting process (``Offload``), never on
the broker's loop.
"""

from __future__ import annotations

import builtins
import multiprocessing
import multiprocessing.managers
import os
import queue
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from multiprocessing import connection, process
from multiprocessing.context import BaseContext, ProcessError
from typing import Any, ClassVar, Final

from .._broker._natives import NATIVE, Array, Namespace, Value
from .._broker._objects import COMPONENT, ObjectTable
from .._broker._refs import Token, TypeSpec
from .._io import _deadline
from .._client._base import ClientBase, make_hello
from .._client._socket import DEFAULT_TIMEOUT_S, SocketClient
from .._errors import BrokerUnavailable, MeshClosed
from .._client import _binding, _near
from .._client._futures import dispatcher
from .._host import _process as _broker_process
from .._io import _paths
from .._io._forking import stop_in_turn
from .._host._inproc import BrokerHost
from ._proxies import AutoProxy, _wait, create_proxy, flush_releases, pack
from ._proxy_types import (
    AcquirerProxy, ArrayProxy, BarrierProxy, ConditionProxy, DictProxy, EventProxy, IteratorProxy,
    ListProxy, NamespaceProxy, PoolProxy, QueueProxy, ValueProxy,
)
from .._wire._messages import Role

__all__ = ["BaseManager", "Manager", "ObjectFactories", "Server", "SharedObjects", "State", "SyncManager"]

# Callables the broker implements natively when a typeid is registered with them.
_NATIVE_KINDS: Final[dict[object, str]] = {
    builtins.dict: "dict", builtins.list: "list", threading.Lock: "Lock",
    threading.RLock: "RLock", threading.Semaphore: "Semaphore",
    threading.BoundedSemaphore: "BoundedSemaphore", threading.Condition: "Condition",
    threading.Event: "Event", threading.Barrier: "Barrier", queue.Queue: "Queue",
    Namespace: "Namespace", Value: "Value", Array: "Array",
    multiprocessing.managers.Namespace: "Namespace",
    getattr(multiprocessing.managers, "Value"): "Value",  # not in typeshed
    getattr(multiprocessing.managers, "Array"): "Array",
}
# Proxy types for a Master's factories (its broker has no registry of its own).
_DEFAULT_PROXIES: Final[dict[str, Any]] = {
    "dict": DictProxy, "list": ListProxy, "Namespace": NamespaceProxy, "Value": ValueProxy,
    "Array": ArrayProxy, "Lock": AcquirerProxy, "RLock": AcquirerProxy,
    "Semaphore": AcquirerProxy, "BoundedSemaphore": AcquirerProxy, "Condition": ConditionProxy,
    "Event": EventProxy, "Barrier": BarrierProxy, "Queue": QueueProxy, "JoinableQueue": QueueProxy,
}


class State:
    """The manager's state, as ``multiprocessing.managers.State``."""

    __slots__ = ["value"]
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2

    def __init__(self) -> None:
        self.value = State.INITIAL


# -- the typed factories, shared by SyncManager and Master -------------------------------------

class ObjectFactories:
    """``dict()``, ``list()``, ``Lock()``... as typed methods over ``_new_object``."""

    def _new_object(self, typeid: str, args: tuple[Any, ...], kwargs: builtins.dict[str, Any]) -> Any:
        raise NotImplementedError

    def dict(self, *args: Any, **kwargs: Any) -> DictProxy[Any, Any]:
        """A shared ``dict``."""
        return self._new_object("dict", args, kwargs)  # type: ignore[no-any-return]

    def list(self, *args: Any) -> ListProxy[Any]:
        """A shared ``list``."""
        return self._new_object("list", args, {})  # type: ignore[no-any-return]

    def Namespace(self, **kwargs: Any) -> NamespaceProxy:  # noqa: N802
        """A shared namespace: attributes read and written through the proxy."""
        return self._new_object("Namespace", (), kwargs)  # type: ignore[no-any-return]

    def Value(self, typecode: str, value: Any, lock: bool = True) -> ValueProxy[Any]:  # noqa: N802
        """A shared value with ``get()``, ``set()`` and ``.value``."""
        return self._new_object("Value", (typecode, value, lock), {})  # type: ignore[no-any-return]

    def Array(self, typecode: str, sequence: Any, lock: bool = True) -> ArrayProxy:  # noqa: N802
        """A shared ``array.array``."""
        return self._new_object("Array", (typecode, sequence, lock), {})  # type: ignore[no-any-return]

    def Lock(self) -> AcquirerProxy:  # noqa: N802
        """A lock; released when the process holding it dies."""
        return self._new_object("Lock", (), {})  # type: ignore[no-any-return]

    def RLock(self) -> AcquirerProxy:  # noqa: N802
        """A re-entrant lock, owned by one thread of one process."""
        return self._new_object("RLock", (), {})  # type: ignore[no-any-return]

    def Semaphore(self, value: int = 1) -> AcquirerProxy:  # noqa: N802
        return self._new_object("Semaphore", (value,), {})  # type: ignore[no-any-return]

    def BoundedSemaphore(self, value: int = 1) -> AcquirerProxy:  # noqa: N802
        return self._new_object("BoundedSemaphore", (value,), {})  # type: ignore[no-any-return]

    def Condition(self, lock: AcquirerProxy | None = None) -> ConditionProxy:  # noqa: N802
        """A condition variable, over its own RLock or a Lock/RLock of the same manager."""
        return self._new_object("Condition", (lock,) if lock is not None else (), {})  # type: ignore[no-any-return]

    def Event(self) -> EventProxy:  # noqa: N802
        return self._new_object("Event", (), {})  # type: ignore[no-any-return]

    def Barrier(self, parties: int, action: Callable[[], object] | None = None,  # noqa: N802
                timeout: float | None = None) -> BarrierProxy:
        return self._new_object("Barrier", (parties, action, timeout), {})  # type: ignore[no-any-return]

    def Queue(self, maxsize: int = 0) -> QueueProxy:  # noqa: N802
        return self._new_object("Queue", (maxsize,), {})  # type: ignore[no-any-return]

    def JoinableQueue(self, maxsize: int = 0) -> QueueProxy:  # noqa: N802
        return self._new_object("JoinableQueue", (maxsize,), {})  # type: ignore[no-any-return]


class SharedObjects(ObjectFactories):
    """``Master`` mixin: the factories, on the mesh's own broker, shared with its children."""

    _client: ClientBase
    address: str
    authkey: bytes

    def _objects_home(self) -> tuple[ClientBase, str]:
        """The connection and address of the broker that holds the objects."""
        return self._client, self.address

    def _new_object(self, typeid: str, args: tuple[Any, ...], kwargs: builtins.dict[str, Any]) -> Any:
        client, address = self._objects_home()
        if not getattr(self, "_objects_bound", False):
            host = getattr(self, "_host", None)
            if host is not None and address == self.address:  # its own broker holds them
                table = host.core.components.get(COMPONENT)
                if isinstance(table, ObjectTable):
                    table.address = self.address
            _binding.bind(address, client)
            self._objects_bound = True
        return create_proxy(client, address, self.authkey, typeid, _DEFAULT_PROXIES[typeid], args, kwargs)


# -- hosting ------------------------------------------------------------------------------

def _new_host(address: object, authkey: bytes, registry: builtins.dict[str, TypeSpec],
              near_cache: bool = True) -> BrokerHost:
    host = BrokerHost(_paths.new_mesh_name(), authkey, host_name="manager",
                      address=address, near_cache=near_cache)  # type: ignore[arg-type]
    table = host.core.components[COMPONENT]
    assert isinstance(table, ObjectTable)
    table.address = host.address
    table.registry = builtins.dict(registry)
    return host


def _close_host(host: BrokerHost, pid: int) -> None:
    """Finalizer of a manager that hosts its broker (never acts in a forked child)."""
    if os.getpid() != pid:
        return
    _binding.unbind(host.address, host.client)
    host.close()


class Server:
    """What ``get_server()`` returns: a broker bound to the manager's address.

    ``serve_forever()`` runs it in the calling thread until SIGINT or SIGTERM.
    """

    def __init__(self, registry: builtins.dict[str, TypeSpec], address: object, authkey: bytes,
                 serializer: str = "pickle") -> None:
        self.registry = registry
        self._host = _new_host(address, authkey, registry)
        self.address = self._host.address

    def serve_forever(self) -> None:
        _binding.bind(self.address, self._host.client)
        try:
            self._host.serve_forever()
        finally:
            _binding.unbind(self.address, self._host.client)
            self._host.close()

    def close(self) -> None:
        """Stop serving (from another thread) and release the address."""
        self._host.close()


# -- managers -------------------------------------------------------------------------------

class BaseManager:
    """A manager of shared objects: ``multiprocessing.managers.BaseManager``'s API.

    ``timeout`` (an mpmesh addition): a proxy call waits as long as its method takes, as
    with the standard library, but ends with BrokerUnavailable once the broker has been
    silent this long (stopped, wedged); a server process must also start within it.

    Raises:
        multiprocessing.ProcessError: ``start``/``get_server`` in the wrong state.
    """

    _registry: ClassVar[builtins.dict[str, TypeSpec]] = {}
    _Server: ClassVar[type[Server]] = Server

    def __init__(self, address: object = None, authkey: bytes | None = None,
                 serializer: str = "pickle", ctx: BaseContext | None = None, *,
                 shutdown_timeout: float = 1.0, broker: str = "process", near_cache: bool = True,
                 near_cache_bytes: int | None = None, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        _deadline.check_timeout(timeout)
        if serializer != "pickle":
            raise ValueError(f"mpmesh managers speak pickle only, not {serializer!r}")
        if authkey is None:
            authkey = process.current_process().authkey
        if not isinstance(authkey, (bytes, bytearray)):
            raise TypeError(f"Authkey {authkey!r} is type {type(authkey)!s}, not bytes")
        self._address = address
        self._authkey = bytes(authkey)
        self._state = State()
        self._serializer = serializer
        self._ctx = ctx
        self._shutdown_timeout = shutdown_timeout
        self._timeout = timeout
        self._client: ClientBase | None = None
        self._host: BrokerHost | None = None
        self._process: Any = None
        if broker not in ("process", "thread"):
            raise ValueError(f"broker must be 'process' or 'thread', not {broker!r}")
        self._broker = broker
        if near_cache_bytes is not None:
            _near.set_budget(near_cache_bytes)
        self._near_cache = bool(near_cache)
        self._broker_proc: _broker_process.BrokerProcess | None = None
        self._pid = os.getpid()
        self._finalizer: weakref.finalize | None = None  # type: ignore[type-arg]

    # -- lifecycle ------------------------------------------------------------------------------

    def _check_initial(self, what: str) -> None:
        if self._state.value == State.STARTED:
            raise ProcessError(f"Already started {what}")
        if self._state.value == State.SHUTDOWN:
            raise ProcessError("Manager has shut down")

    def get_server(self) -> Server:
        """A server bound to this manager's address; call its ``serve_forever()``."""
        self._check_initial("server")
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def connect(self) -> None:
        """Join the manager served at ``address`` (one connection for this process)."""
        client = SocketClient(self._address, self._authkey, make_hello(Role.CLIENT),  # type: ignore[arg-type]
                              timeout=self._timeout)
        self._client = client
        self._pid = os.getpid()
        _binding.bind(self._address, client)
        self._state.value = State.STARTED
        self._finalizer = weakref.finalize(self, _close_client, self._address, client, self._pid)

    def start(self, initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = ()) -> None:
        """Start the broker: on a thread of this process, or with ``initializer`` in a
        server process of its own."""
        self._check_initial("server")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if initializer is not None:
            self._start_process(initializer, initargs)
            return
        if self._broker == "process":
            self._start_broker_process()
            return
        host = _new_host(self._address, self._authkey, self._registry, self._near_cache)
        host.start_thread()
        self._host = host
        self._address = host.address
        self._client = host.client
        self._pid = os.getpid()
        _binding.bind(host.address, host.client)
        self._state.value = State.STARTED
        self._finalizer = weakref.finalize(self, _close_host, host, self._pid)

    def _start_broker_process(self) -> None:
        dispatcher.retire()  # our idle callback thread would cost the fork
        proc = _broker_process.start(_broker_process.Config(
            _paths.new_mesh_name(), self._authkey, address=self._address,
            registry=builtins.dict(self._registry),
            sys_path=[os.path.abspath(p) for p in sys.path], cwd=os.getcwd(), near_cache=self._near_cache))
        try:
            client = SocketClient(proc.address, self._authkey, make_hello(Role.CLIENT), sock=proc.sock,
                                  timeout=self._timeout)
        except BaseException:
            proc.stop()
            raise
        self._address = proc.address
        self._client = client
        self._broker_proc = proc
        self._process = proc  # what code written for the standard library reads (pid, exitcode)
        self._pid = os.getpid()
        _binding.bind(proc.address, client)
        self._state.value = State.STARTED
        self._finalizer = weakref.finalize(self, _stop_broker, proc, client, self._pid)

    def _start_process(self, initializer: Callable[..., object], initargs: tuple[Any, ...]) -> None:
        reader, writer = connection.Pipe(duplex=False)
        ctx = self._ctx or multiprocessing.get_context()
        proc = ctx.Process(target=type(self)._run_server,  # type: ignore[attr-defined]
                           args=(self._registry, self._address, self._authkey, writer,
                                 initializer, initargs))
        proc.name = f"{type(self).__name__}-{'-'.join(map(str, proc._identity))}"
        proc.start()
        writer.close()
        try:
            # It reports its address once ``initializer`` ran: within the timeout, or it is
            # taken for hung (the standard library would wait forever).
            limit = self._timeout or DEFAULT_TIMEOUT_S
            if not reader.poll(limit):
                _end_process(proc, self._shutdown_timeout)
                raise BrokerUnavailable(f"the manager's server process did not start within {limit:g} s "
                                        f"(does its initializer hang?); it was stopped")
            self._address = reader.recv()
        except EOFError:
            proc.join()
            raise ProcessError(f"the manager's server process exited with code {proc.exitcode}") from None
        finally:
            reader.close()
        self._process = proc
        self.connect()
        assert self._client is not None
        self._finalizer = weakref.finalize(self, _stop_server, self._address, self._client, proc,
                                           self._shutdown_timeout, self._pid)

    @classmethod
    def _run_server(cls, registry: builtins.dict[str, TypeSpec], address: object, authkey: bytes,
                    writer: Any, initializer: Callable[..., object] | None = None,
                    initargs: tuple[Any, ...] = ()) -> None:
        """The server process: run ``initializer``, bind, report the address, serve."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # bpo-36368: the parent stops us in order
        if initializer is not None:
            initializer(*initargs)
        server = cls._Server(registry, address, authkey)
        writer.send(server.address)
        writer.close()
        server.serve_forever()

    def shutdown(self) -> None:
        """Stop the broker this manager started (or close this process's connection to a
        manager it only connected to). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        if self._state.value == State.STARTED:
            self._state.value = State.SHUTDOWN

    def join(self, timeout: float | None = None) -> None:
        """Wait for the manager's server process, if it has one, to exit."""
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def __enter__(self) -> BaseManager:
        if self._state.value == State.INITIAL:
            self.start()
        if self._state.value != State.STARTED:
            raise ProcessError("Manager has shut down")
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def address(self) -> Any:
        return self._address

    # -- objects --------------------------------------------------------------------------------

    def _client_here(self) -> ClientBase:
        if self._state.value != State.STARTED or self._client is None:
            if self._state.value == State.SHUTDOWN:
                raise MeshClosed("the manager was shut down")
            raise ProcessError("server not yet started")
        if os.getpid() == self._pid:
            return self._client
        from ._proxies import client_for  # a forked child: its own connection
        return client_for(self._address, self._authkey)

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple[str, ...]]:
        """Create a shared object; return ``(token, exposed)``. The reference it counts
        for this process is the caller's to drop (standard-library helper)."""
        client = self._client_here()
        fut = client.op(COMPONENT, "create", payload=pack((typeid, args, kwds)))
        oid, exposed = _wait(client, fut, _deadline.FOREVER)
        return Token(typeid, self._address, oid), tuple(exposed)

    def _new_object(self, typeid: str, args: tuple[Any, ...], kwargs: builtins.dict[str, Any]) -> Any:
        spec = self._registry.get(typeid)
        if spec is None:
            raise KeyError(typeid)
        return create_proxy(self._client_here(), self._address, self._authkey, typeid,
                            spec.proxytype, args, kwargs, manager=self)

    def _number_of_objects(self) -> int:
        """How many shared objects the broker holds."""
        flush_releases()
        client = self._client_here()
        return _wait(client, client.op(COMPONENT, "count"), _deadline.FOREVER)  # type: ignore[no-any-return]

    def _debug_info(self) -> str:
        flush_releases()
        client = self._client_here()
        return _wait(client, client.op(COMPONENT, "debug"), _deadline.FOREVER)  # type: ignore[no-any-return]

    @classmethod
    def register(cls, typeid: str, callable: Callable[..., object] | None = None,  # noqa: A002
                 proxytype: Any = None, exposed: Any = None,
                 method_to_typeid: builtins.dict[str, str] | None = None,
                 create_method: bool = True) -> None:
        """Register ``typeid``: ``manager.<typeid>(*args)`` then creates one and returns
        its proxy.

        Raises:
            TypeError: ``method_to_typeid`` is not a dict of strings.
        """
        if "_registry" not in cls.__dict__:
            cls._registry = cls._registry.copy()
        if proxytype is None:
            proxytype = AutoProxy
        exposed = exposed or getattr(proxytype, "_exposed_", None)
        method_to_typeid = method_to_typeid or getattr(proxytype, "_method_to_typeid_", None)
        if method_to_typeid is not None:
            if not isinstance(method_to_typeid, builtins.dict):
                raise TypeError(f"Method_to_typeid {method_to_typeid!r}: type {type(method_to_typeid)!s}, not dict")
            for key, value in method_to_typeid.items():
                if type(key) is not str or type(value) is not str:
                    raise TypeError(f"method_to_typeid must map str to str, not {key!r}: {value!r}")
        native = None if method_to_typeid else _NATIVE_KINDS.get(callable)
        if native is not None and typeid == "JoinableQueue":
            native = "JoinableQueue"
        if native is not None and native not in NATIVE:  # pragma: no cover - table drift
            native = None
        cls._registry[typeid] = TypeSpec(
            typeid, callable, tuple(exposed) if exposed else None,
            builtins.dict(method_to_typeid) if method_to_typeid else None, proxytype, native)
        if create_method:
            setattr(cls, typeid, _factory_method(typeid))


def _factory_method(typeid: str) -> Callable[..., Any]:
    def create(self: BaseManager, /, *args: Any, **kwds: Any) -> Any:
        return self._new_object(typeid, args, kwds)
    create.__name__ = create.__qualname__ = typeid
    create.__doc__ = f"Create a shared {typeid!r} object and return a proxy for it."
    return create




def _close_client(address: object, client: ClientBase, pid: int) -> None:
    if os.getpid() != pid:
        return
    _binding.unbind(address, client)
    client.close()


def _stop_broker(proc: _broker_process.BrokerProcess, client: ClientBase, pid: int) -> None:
    """Stop a manager's broker process: close our connection and its life pipe, reap it."""
    if os.getpid() != pid:
        return
    _close_client(proc.address, client, pid)
    proc.stop()


def _stop_server(address: object, client: ClientBase, proc: Any, timeout: float, pid: int) -> None:
    """Stop a manager's server process: SIGTERM (it finishes its loop), then SIGKILL."""
    if os.getpid() != pid:
        return
    _close_client(address, client, pid)
    _end_process(proc, timeout)


def _end_process(proc: Any, timeout: float) -> None:
    """SIGTERM ``proc`` (a stopped one too), then SIGKILL if it lives on after ``timeout``."""
    def gone(wait: float) -> bool:
        proc.join(wait)
        return not proc.is_alive()

    if proc.is_alive() and not stop_in_turn(
            lambda sig: proc.terminate() if sig == signal.SIGTERM else proc.kill(), gone, timeout):
        proc.join()  # as Process.kill() leaves it: it ends


class SyncManager(ObjectFactories, BaseManager):
    """The manager ``mpmesh.Manager()`` returns: every ``multiprocessing`` SyncManager type."""

    def _new_object(self, typeid: str, args: tuple[Any, ...], kwargs: builtins.dict[str, Any]) -> Any:
        return BaseManager._new_object(self, typeid, args, kwargs)

    def Pool(self, processes: int | None = None, *args: Any, **kwargs: Any) -> PoolProxy:  # noqa: N802
        """A process pool hosted by the manager (``mpmesh.Pool`` when available)."""
        return self._new_object("Pool", (processes, *args), kwargs)  # type: ignore[no-any-return]


def _pool(*args: Any, **kwargs: Any) -> object:
    """The ``Pool`` typeid: mpmesh's Pool when present, else the standard library's."""
    pool_type: Any
    try:
        from .._pool import Pool as pool_type
    except ImportError:  # pragma: no cover - before the Pool drop-in exists
        from multiprocessing.pool import Pool as pool_type
    return pool_type(*args, **kwargs)


for _typeid, _callable, _proxy in (
    ("Queue", queue.Queue, QueueProxy), ("JoinableQueue", queue.Queue, QueueProxy),
    ("Event", threading.Event, EventProxy), ("Lock", threading.Lock, AcquirerProxy),
    ("RLock", threading.RLock, AcquirerProxy), ("Semaphore", threading.Semaphore, AcquirerProxy),
    ("BoundedSemaphore", threading.BoundedSemaphore, AcquirerProxy),
    ("Condition", threading.Condition, ConditionProxy), ("Barrier", threading.Barrier, BarrierProxy),
    ("Pool", _pool, PoolProxy), ("list", builtins.list, ListProxy), ("dict", builtins.dict, DictProxy),
    ("Value", Value, ValueProxy), ("Array", Array, ArrayProxy), ("Namespace", Namespace, NamespaceProxy),
):
    # Typed methods are defined on the class; register only records the typeid.
    SyncManager.register(_typeid, _callable, _proxy, create_method=False)
SyncManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
SyncManager.register("AsyncResult", create_method=False)
del _typeid, _callable, _proxy


def Manager(*, ctx: BaseContext | None = None, broker: str = "process", near_cache: bool = True,  # noqa: N802
            near_cache_bytes: int | None = None, timeout: float | None = DEFAULT_TIMEOUT_S) -> SyncManager:
    """A started ``SyncManager``: a drop-in for ``multiprocessing.Manager()``.

    Its broker runs in a process of its own (``broker="process"``), as the standard
    library's server does, so nothing this process does slows other processes' calls;
    ``broker="thread"`` runs it on a thread of this process instead, whose own calls then
    skip the socket, but which stalls everyone while this process's code holds the GIL.
    With ``near_cache`` (the default), every process on this host serves reads of the
    manager's dict, list, Namespace, Value and Array from its own copy while they are
    unchanged; ``near_cache_bytes`` bounds what this process keeps (64 MiB by default).
    No call hangs on a broker that stopped answering: a proxy call (even ``Lock.acquire()``
    or ``Queue.get()``, which wait as long as they must) ends with BrokerUnavailable once
    the broker has been silent for ``timeout`` seconds (30 by default; None: 30 as well,
    it cannot be turned off). Shut it down with ``shutdown()`` or a ``with`` block.
    """
    manager = SyncManager(ctx=ctx, broker=broker, near_cache=near_cache, near_cache_bytes=near_cache_bytes,
                          timeout=timeout)
    manager.start()
    return manager
