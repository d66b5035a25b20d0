"""The shared-state API (cache, locks, pub/sub, RPC pools, ``nodes()``) offered alike by
Master, Child and ``mpmesh.connect()``.

Every method reaches the broker that holds shared state through ``self._state_conn``:
a Master's state broker (a process of its own, found beside the mesh's socket), or the
mesh's own broker where there is none (a standalone ``python -m mpmesh serve``). Each
operation is one ``Op`` to a broker component (``_broker/_cache.py``, ``_locks.py``,
``_pubsub.py``, ``_rpc.py``, ``_admin.py``), pickled here, at the call site.

Assigning ``self._client`` (as Master and Child do in their constructors) also makes
that client this process's connection to the mesh for proxies that arrive pickled from
elsewhere (see ``_binding``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from .._broker._payload import pack
from .._broker._pubsub import pack_publish
from .._broker._rpc import pack_call
from .._client import _binding, _near
from .._errors import LockTimeout, MeshError, RequestTimeout
from .._io import _deadline
from .._wire import _codec
from .._wire._messages import Op
from ._cache import Cache, open_cache
from ._grant import LockGrant
from ._session import Subscription, session_for

if TYPE_CHECKING:
    from .._client._base import ClientBase

__all__ = ["Cache", "LockGrant", "Node", "SharedState", "Subscription"]


@dataclass(frozen=True)
class Node:
    """One process connected to the mesh (``nodes()``)."""

    instance_id: int
    name: str
    group: str | None
    pid: int
    hostname: str
    is_self: bool
    role: str = "client"


def state_address(mesh_address: str) -> str:
    """The socket of the state broker of the mesh at ``mesh_address``: beside it, named
    after it (``<name>.state.sock``), so any process that finds the mesh finds it."""
    base = mesh_address[: -len(".sock")] if mesh_address.endswith(".sock") else mesh_address
    return base + ".state.sock"


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str, not {name!r}")
    return name


class Backend(Protocol):
    """Where shared state lives when it is not this host's broker (Redis, across hosts);
    what it returns duck-types the local ``Cache``, ``LockGrant`` and ``Subscription``."""

    def cache(self, name: str, maxsize: int | None, ttl: float | None, maxbytes: int | None) -> Any: ...

    def acquire(self, name: str, ttl: float | None, wait: float | None) -> Any: ...

    def subscribe(self, pattern: str, callback: Callable[[Any, str], object]) -> Any: ...

    def publish(self, channel: str, payload: object) -> int: ...

    def register(self, name: str, fn: Callable[..., Any]) -> None: ...

    def unregister(self, name: str) -> bool: ...

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any: ...

    def nodes(self) -> list[Node]: ...

    def stats(self) -> dict[str, Any]: ...


class SharedState:
    """Mixin: cache, locks, pub/sub, RPC pools and ``nodes()`` over ``self._client``."""

    # The mesh-wide half of this process, when the mesh has a Redis backend: then shared
    # state lives in Redis, and every method below hands its call there.
    _remote: Backend | None = None

    @property
    def _client(self) -> ClientBase:
        try:
            return self.__dict__["_mesh_client"]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError("_client") from None

    @_client.setter
    def _client(self, client: ClientBase) -> None:
        self.__dict__["_mesh_client"] = client
        address = getattr(client, "address", None) or getattr(self, "address", None)
        if address:
            _binding.bind(address, client)

    def _mesh_address(self) -> str:
        return getattr(self._client, "address", None) or self.address  # type: ignore[attr-defined,no-any-return]

    @property
    def _state_conn(self) -> ClientBase:
        """The connection to the broker that holds shared state, opened on first use."""
        client: ClientBase | None = self.__dict__.get("_state_client")
        if client is None:
            client = self.__dict__["_state_client"] = self._open_state_conn()
        return client

    def _open_state_conn(self) -> ClientBase:
        """A Master's state broker (a process of its own) where the mesh has one; else the
        mesh's own broker."""
        address = self._state_broker_address()
        return self._client if address is None else _binding.client_for(address)

    def _state_broker_address(self) -> str | None:
        """Where this mesh's state broker listens, if it has one (see ``state_address``)."""
        mesh = self._mesh_address()
        if not isinstance(mesh, str):
            return None  # a TCP mesh: its broker holds its state
        path = state_address(mesh)
        return path if os.path.exists(path) else None

    def _state_address(self) -> str:
        return getattr(self._state_conn, "address", None) or self._mesh_address()

    def _run(self, component: str, op: str, payload: bytes, *, timeout: float | None = None,
             deadline: float | None = None) -> Any:
        """One operation; by default one the broker answers at once (see ``ClientBase.due``)."""
        client = self._client if component == "admin" else self._state_conn
        call = client.op(component, op, payload=payload, timeout=timeout)
        return client.wait(call, client.due() if deadline is None else deadline)

    def _shared_timeout(self) -> float | None:
        """The default timeout of ``call`` (the Master's or the child's ``timeout``)."""
        return getattr(self, "timeout", getattr(self, "_timeout", None))

    # -- cache --------------------------------------------------------------------------------

    def cache(self, name: str, maxsize: int | None = None, ttl: float | None = None, *,
              maxbytes: int | None = None, near: bool = True) -> Cache:
        """The named cache of this mesh, created on first use with these options.

        ``maxsize`` bounds the entries (least recently used go first), ``maxbytes`` the
        total size of the values, ``ttl`` is the default expiry in seconds. With ``near``
        (the default), this handle serves reads from this process's copy while the entry
        is unchanged (on the broker's host; see ``docs/architecture.md``).

        Raises:
            ValueError: it exists with different options, or an option is invalid.
        """
        _check_name("a cache name", name)
        if self._remote is not None:
            return cast(Cache, self._remote.cache(name, maxsize, ttl, maxbytes))
        return open_cache(self._state_conn, self._state_address(), name, maxsize, ttl, maxbytes, near=near)

    # -- locks ----------------------------------------------------------------------------------

    def lock(self, name: str, ttl: float | None = None, wait: float | None = None) -> LockGrant:
        """Acquire lock ``name`` (FIFO), waiting up to ``wait`` seconds (None: forever).

        The grant expires after ``ttl`` seconds (None: held until released or until this
        process exits). Use it as a context manager to release it.

        Raises:
            LockTimeout: not granted within ``wait``.
        """
        _check_name("a lock name", name)
        _deadline.check_timeout(ttl, "ttl")
        _deadline.check_timeout(wait, "wait")
        grant = self._acquire(name, ttl, wait)
        if grant is None:
            raise LockTimeout(f"lock {name!r} is held by another holder")
        return grant

    def try_lock(self, name: str, ttl: float | None = None) -> LockGrant | None:
        """Acquire lock ``name`` if it is free right now; None if it is not."""
        _check_name("a lock name", name)
        _deadline.check_timeout(ttl, "ttl")
        return self._acquire(name, ttl, 0.0)

    def _acquire(self, name: str, ttl: float | None, wait: float | None) -> LockGrant | None:
        if self._remote is not None:
            return cast("LockGrant | None", self._remote.acquire(name, ttl, wait))
        client = self._state_conn
        payload = pack((name, ttl, wait))
        fut = client.op("locks", "acquire", payload=payload)
        guard = _deadline.FOREVER if wait is None else _deadline.after(wait + _deadline.GUARD_SLACK_S)
        try:
            result = client.wait(fut, guard)
        except LockTimeout:
            raise
        except BaseException as exc:
            # Interrupted, or the broker stopped answering: whatever it grants us later
            # must not stay held by nobody.
            try:
                client._send(Op(0, -1.0, "locks", "withdraw", pack((name, fut._rid))))
            except MeshError:
                pass
            if isinstance(exc, RequestTimeout):
                raise LockTimeout(f"lock {name!r}: the broker did not answer in time") from exc
            raise
        if result is None:
            return None
        token, granted_ttl = cast("tuple[int, float | None]", result)
        return LockGrant(self._state_address(), name, token, granted_ttl, client)

    # -- pub/sub ------------------------------------------------------------------------------

    def subscribe(self, pattern: str, callback: Callable[[Any, str], object]) -> Subscription:
        """Call ``callback(payload, channel)`` for every message published to a matching channel.

        ``pattern`` is a channel, or a prefix followed by ``*`` (``"orders.*"``). Callbacks
        run on a helper thread, one at a time, in publish order per publisher.
        """
        _check_name("a pattern", pattern)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if self._remote is not None:
            return cast(Subscription, self._remote.subscribe(pattern, callback))
        return session_for(self._state_conn).subscribe(pattern, callback)

    def publish(self, channel: str, payload: object = None) -> int:
        """Send ``payload`` to every subscriber of ``channel``; return how many it reached.

        A subscriber too far behind (past its high-water mark) misses it, and is not counted.
        """
        _check_name("a channel", channel)
        if channel.endswith("*"):
            raise ValueError(f"publish to a channel, not a pattern: {channel!r}")
        if self._remote is not None:
            return self._remote.publish(channel, payload)
        return int(self._run("pubsub", "publish", pack_publish(channel, _codec.dumps(payload))))

    # -- RPC pools -----------------------------------------------------------------------------

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Serve ``call(name, ...)`` from this process with ``fn(*args, **kwargs)``.

        Calls run on a pool of helper threads; several processes may register the same
        name, and each call goes to the least busy of them.
        """
        _check_name("an RPC name", name)
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if self._remote is not None:
            return self._remote.register(name, fn)
        session = session_for(self._state_conn)
        session.fns[name] = fn
        try:
            self._run("rpc", "register", pack(name))
        except BaseException:
            session.fns.pop(name, None)
            raise

    def unregister(self, name: str) -> bool:
        """Stop serving ``name`` from this process; whether it was registered here."""
        _check_name("an RPC name", name)
        if self._remote is not None:
            return self._remote.unregister(name)
        found = bool(self._run("rpc", "unregister", pack(name)))
        session_for(self._state_conn).fns.pop(name, None)
        return found

    def call(self, name: str, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the least busy process that registered ``name``.

        Raises:
            NotFound: nobody registered ``name``.  RequestTimeout: no answer in ``timeout``.
            WorkerLost: the serving process died during the call.  Whatever ``fn`` raised.
        """
        _check_name("an RPC name", name)
        _deadline.check_timeout(timeout)
        if timeout is None:
            timeout = self._shared_timeout()
        if self._remote is not None:
            return self._remote.call(name, args, kwargs, timeout)
        payload = pack_call(name, _codec.dumps((args, kwargs)))
        guard = _deadline.FOREVER if timeout is None else _deadline.after(timeout + _deadline.GUARD_SLACK_S)
        return self._run("rpc", "call", payload, timeout=timeout, deadline=guard)

    # -- the mesh ------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        """Every process connected to the mesh, this one included (``is_self``); on
        every host, when the mesh has a Redis backend."""
        if self._remote is not None:
            return self._remote.nodes()
        me, found = self._run("admin", "nodes", pack(()))
        return [Node(iid, name, group, pid, host, iid == me, role)
                for iid, name, group, pid, host, role in found]

    def stats(self) -> dict[str, Any]:
        """The broker's shared-state counters, connections, memory and CPU."""
        from .._io._usage import process_usage

        client = self._state_conn  # its counters are the state broker's, where there is one
        call = client.op("admin", "stats", payload=pack(()))
        snapshot = cast("dict[str, Any]", client.wait(call, client.due()))
        pid = snapshot.get("broker_pid")
        if pid:
            snapshot.update(process_usage(int(pid)))
        snapshot.update(_near.counters())  # this process's reads from its own copies
        if self._remote is not None:
            snapshot.update(self._remote.stats())
        return snapshot
