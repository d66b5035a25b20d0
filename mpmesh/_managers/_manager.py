"""BaseManager: the ``multiprocessing.managers`` API over an mpmesh broker (``_sync``
holds SyncManager and its typeids, ``_server`` the hosts this module starts and stops).

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
from .._broker._objects import COMPONENT
from .._broker._refs import Token, TypeSpec
from .._client import _binding, _near
from .._client._base import ClientBase, make_hello
from .._client._futures import dispatcher
from .._client._socket import DEFAULT_TIMEOUT_S, SocketClient
from .._errors import BrokerUnavailable, MeshClosed
from .._host import _process as _broker_process
from .._host._inproc import BrokerHost
from .._io import _deadline, _paths
from .._wire._messages import Role
from ._ops import client_for, flush_releases, pack, wait_call
from ._proxies import AutoProxy, create_proxy
from ._server import (
    Server, close_client, close_host, end_process, new_host, stop_broker, stop_server,
)

__all__ = ["BaseManager", "State"]

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


class State:
    """The manager's state, as ``multiprocessing.managers.State``."""

    __slots__ = ["value"]
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2

    def __init__(self) -> None:
        self.value = State.INITIAL



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
        self._finalizer = weakref.finalize(self, close_client, self._address, client, self._pid)

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
        host = new_host(self._address, self._authkey, self._registry, self._near_cache)
        host.start_thread()
        self._host = host
        self._address = host.address
        self._client = host.client
        self._pid = os.getpid()
        _binding.bind(host.address, host.client)
        self._state.value = State.STARTED
        self._finalizer = weakref.finalize(self, close_host, host, self._pid)

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
        self._finalizer = weakref.finalize(self, stop_broker, proc, client, self._pid)

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
                end_process(proc, self._shutdown_timeout)
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
        self._finalizer = weakref.finalize(self, stop_server, self._address, self._client, proc,
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
        return client_for(self._address, self._authkey)  # a forked child: its own connection

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple[str, ...]]:
        """Create a shared object; return ``(token, exposed)``. The reference it counts
        for this process is the caller's to drop (standard-library helper)."""
        client = self._client_here()
        fut = client.op(COMPONENT, "create", payload=pack((typeid, args, kwds)))
        oid, exposed = wait_call(client, fut, _deadline.FOREVER)
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
        return wait_call(client, client.op(COMPONENT, "count"), _deadline.FOREVER)  # type: ignore[no-any-return]

    def _debug_info(self) -> str:
        flush_releases()
        client = self._client_here()
        return wait_call(client, client.op(COMPONENT, "debug"), _deadline.FOREVER)  # type: ignore[no-any-return]

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
