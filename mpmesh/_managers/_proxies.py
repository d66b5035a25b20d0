"""Proxies of Manager objects: explicit, typed classes whose methods call the broker.

A proxy holds a ``Token`` (typeid, manager address, oid) and reaches its object through
the one client its process has for that address (``client_for``): in the process that
hosts the broker that is the in-process ``LocalClient`` (no socket hop); anywhere else
one ``SocketClient`` per process, shared by every proxy and thread, made on first use.
The standard library opens a connection per thread and a fresh one for every
create/incref/decref (managers.py 604-614, 850-856, 871-880).

Each proxy object counts as one reference of its process (see ``_broker/_objects``):
``create`` counts the first; a proxy rebuilt from a pickle posts ``incref``; one that is
garbage queues a ``decref``, sent with the process's next call (``_ops``). A proxy used
in a forked child notices the new pid, connects that process's own client and takes a
reference of its own.

Authkey: as in the standard library, a proxy pickled while a process is being spawned
carries its manager's authkey. Otherwise the receiver uses the client its process already
has for that address (``_binding``: a Master, a Child, a connected manager), or connects
with the key file in the private runtime directory (same user only), or, for an address
without one (TCP, a custom path), with ``current_process().authkey``.
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.context import get_spawning_popen
from typing import Any, ClassVar, Final

from .._broker._limits import FOREVER
from .._broker._objects import COMPONENT
from .._broker._refs import Token, install_proxy_builder, rebuild_ref
from .._broker._versions import bulk_slot, key_slot, stable_hash, whole_slot
from .._client._base import ClientBase
from .._client._near import ETERNAL, immutable
from .._io import _deadline
from ._ops import (
    client_for, flush_releases, pack, pending_releases, post, release, wait_call, withdraw,
)

__all__ = ["AutoProxy", "BaseProxy", "MakeProxyType", "Token", "create_proxy"]

_getpid = os.getpid
_WHOLE: Final[Any] = object()  # a read that covers the whole object, not one key
_get_ident = threading.get_ident
# Client grace ids are drawn below the broker's own (``_objects.BROKER_GIDS``).
_GID_BITS: Final = 62
# The built-in typeids whose plain writes may go through the write ring (``_write``).
_RING_TYPEIDS: Final = frozenset({"dict", "list", "Namespace", "Value"})
_SCALARS: Final = frozenset({type(None), bool, int, float, complex, str, bytes})
_CONTAINERS: Final = frozenset({tuple, list, dict, set, frozenset})
_PLAIN_BUDGET: Final = 256  # values ``_plain`` looks at before it says no


def _plain(values: tuple[Any, ...]) -> bool:
    """Whether ``values`` are built-in scalars and containers of them all through (and
    few): what the broker reads without running anyone's code, and stores as it is."""
    todo = list(values)
    budget = _PLAIN_BUDGET
    while todo:
        value = todo.pop()
        t = type(value)
        if t in _SCALARS:
            continue
        if t not in _CONTAINERS:
            return False
        budget -= len(value)
        if budget < 0:
            return False
        if t is dict:
            todo.extend(value)
            todo.extend(value.values())
        else:
            todo.extend(value)
    return True


# -- the base proxy ------------------------------------------------------------------------

class BaseProxy:
    """A proxy for a shared object; subclasses add methods that call ``_callmethod``.

    The constructor's signature is the standard library's, so user proxy types that
    subclass ``BaseProxy`` (``register(..., proxytype=MyProxy)``) keep working.
    """

    _exposed_: ClassVar[tuple[str, ...] | None] = None
    _method_to_typeid_: ClassVar[dict[str, str] | None] = None
    _isauto: bool = False

    def __init__(self, token: Token, serializer: str = "pickle", manager: Any = None,
                 authkey: bytes | None = None, exposed: tuple[str, ...] | None = None,
                 incref: bool = True, manager_owned: bool = False) -> None:
        self._token = token
        self._id = token.id
        self._manager = manager
        self._serializer = serializer
        # A key we were given wins; without one, this process's own binding for the
        # address decides (``client_for``), and current_process().authkey is the last resort.
        if authkey is not None:
            self._authkey: bytes | None = bytes(authkey)
        elif manager is not None:
            self._authkey = bytes(manager._authkey)
        else:
            self._authkey = None
        self._box: list[Any] | None = None
        self._bind()
        if incref:
            self._take_ref(0)

    def _bind(self) -> ClientBase:
        manager = self._manager
        if manager is not None and manager._pid == _getpid() and manager._client is not None:
            client: ClientBase = manager._client
        else:
            client = client_for(self._token.address, self._authkey)
        self._client = client
        self._pid = _getpid()
        return client

    def _adopt(self) -> None:
        """Count this proxy as one reference of this process (already counted by the broker)."""
        self._box = box = [self._client, self._id, self._pid]
        weakref.finalize(self, release, box).atexit = False

    def _take_ref(self, gid: int) -> None:
        post(self._client, "incref", (self._id, gid))
        self._adopt()

    def _rebind(self) -> ClientBase:
        """First use in a forked child: this process's own client, and its own reference."""
        client = self._bind()
        box = self._box
        if box is not None:
            post(client, "incref", (self._id, 0))
            box[0], box[2] = client, self._pid  # the finalizer copied with the fork sees this
        return client

    def _callmethod(self, methodname: str, args: tuple[Any, ...] = (),
                    kwds: dict[str, Any] | None = None) -> Any:
        """Call ``methodname`` on the shared object; return a copy of its result."""
        client = self._client if self._pid == _getpid() else self._rebind()
        if pending_releases:
            flush_releases()
        return client.call_op(COMPONENT, "call", pack((self._id, methodname, args, kwds or {}, _get_ident())),
                              withdraw)

    def _write(self, methodname: str, args: tuple[Any, ...], key: Any = _WHOLE,
               reads: tuple[str, tuple[Any, ...], Any] | None = None) -> None:
        """``_callmethod`` for a write that returns nothing and cannot fail when its
        arguments are plain (``d[k] = v``, ``ns.x = v``, ``value.set(v)``, ``l.append(v)``):
        left in the write ring, with no round trip, where this process has one (see
        ``_broker/_ring``); sent as any call otherwise. ``key``: the key it writes.
        ``reads``: ``(method, args, value)``, a read that now returns ``value`` (of
        ``key``, or of the whole object): kept as this process's copy, so reading back
        what it wrote costs no round trip either."""
        client = self._client if self._pid == _getpid() else self._rebind()
        if client.ring is not None and self._token.typeid in _RING_TYPEIDS and _plain(args):
            if self._wslot < 0:
                self._find_slots()
            s1 = s2 = n2 = self._wslot
            khash = None if key is _WHOLE else stable_hash(key)
            if khash is not None:
                s1, n2 = key_slot(self._id, khash), self._bslot
            if khash is not None or key is _WHOLE:
                left = client.leave(pack((self._id, methodname, args, {}, 0)), s1, s2, s1, n2)
                if left is not None:
                    near = client.near
                    if reads is not None and near is not None and immutable(reads[2]):
                        try:
                            near.keep((self._id, reads[0], reads[1]), *left, ETERNAL, reads[2], None)
                        except TypeError:  # an unhashable argument: nothing to keep
                            pass
                    return
        self._callmethod(methodname, args)

    def _callmethod_timeout(self, methodname: str, args: tuple[Any, ...],
                            timeout: float | None, kwds: dict[str, Any] | None = None) -> Any:
        """``_callmethod`` for a call that may wait up to ``timeout`` in the broker."""
        if timeout is None:
            return self._callmethod(methodname, args, kwds)
        client = self._client if self._pid == _getpid() else self._rebind()
        if pending_releases:
            flush_releases()
        fut = client.op(COMPONENT, "call", timeout=max(0.0, timeout), payload=pack(
            (self._id, methodname, args, kwds or {}, _get_ident())))
        return wait_call(client, fut, time.monotonic() + max(0.0, timeout) + _deadline.GUARD_SLACK_S)

    def _callmethod_waking(self, methodname: str, args: tuple[Any, ...] = ()) -> Any:
        """``_callmethod`` for a call that may wait until a deadline only the broker knows
        (a Barrier's default timeout): op timeout 0 wakes the broker's loop to look."""
        client = self._client if self._pid == _getpid() else self._rebind()
        if pending_releases:
            flush_releases()
        fut = client.op(COMPONENT, "call", timeout=0.0, payload=pack(
            (self._id, methodname, args, {}, _get_ident())))
        return wait_call(client, fut, FOREVER)

    # -- reads served from this process's copy (``_near``) --------------------------------

    _wslot = -1  # the object's whole and bulk slots in the version table, once computed
    _bslot = -1

    def _near_read(self, methodname: str, args: tuple[Any, ...] = (), key: Any = _WHOLE) -> Any:
        """``_callmethod`` for a method that only reads: served from this process's copy
        while the object (or, given ``key``, that key of it) is unchanged."""
        client = self._client if self._pid == _getpid() else self._rebind()
        near = client.near
        if near is None:
            return self._callmethod(methodname, args)
        oid = self._id
        if self._wslot < 0:
            self._find_slots()
        if key is _WHOLE:
            s1 = s2 = self._wslot
        else:
            khash = stable_hash(key)
            s1 = self._wslot if khash is None else key_slot(oid, khash)
            s2 = self._bslot
        copy_key = (oid, methodname, args)
        try:
            entry = near.lookup(copy_key, s1, s2)
        except TypeError:  # an unhashable argument: nothing to look up or keep
            return self._callmethod(methodname, args)
        if entry is not None:
            return near.serve(entry)
        return near.fill(copy_key, s1, s2, lambda: self._fetch(client, methodname, args))

    def _fetch(self, client: ClientBase, methodname: str, args: tuple[Any, ...]) -> tuple[Any, bytes | None]:
        """Call a reading method; its result and the pickle it came as."""
        if pending_releases:
            flush_releases()
        return client.fetch_op(COMPONENT, "call", pack((self._id, methodname, args, {}, _get_ident())),
                               withdraw)

    def _whole_version(self) -> int | None:
        """The object's whole version in this process's table (None: no table)."""
        near = self._client.near if self._pid == _getpid() else self._rebind().near
        if near is None:
            return None
        if self._wslot < 0:
            self._find_slots()
        return near.version(self._wslot)

    def _find_slots(self) -> None:
        self._wslot, self._bslot = whole_slot(self._id), bulk_slot(self._id)

    def _getvalue(self) -> Any:
        """A copy of the referent."""
        return self._callmethod("#GETVALUE")

    def __reduce__(self) -> tuple[Any, ...]:
        client = self._client if self._pid == _getpid() else self._rebind()
        gid = random.getrandbits(_GID_BITS) or 1
        # The grace covers the token until its receiver's incref (same connection as any
        # later decref of ours, so it always arrives first).
        post(client, "grace", (self._id, gid), timeout=60.0)
        authkey = self._authkey if get_spawning_popen() is not None else None
        factory: Any = AutoProxy if self._isauto else type(self)
        exposed = self._exposed_ if self._isauto else None
        return (rebuild_ref, (factory, self._token, exposed, gid, authkey))

    def __deepcopy__(self, memo: Any) -> Any:
        return self._getvalue()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} object, typeid {self._token.typeid!r} at {id(self):#x}>"

    def __str__(self) -> str:
        try:
            return str(self._callmethod("__repr__"))
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


def rebuild_proxy(factory: Any, token: Token, exposed: tuple[str, ...] | None, gid: int,
                  authkey: bytes | None) -> BaseProxy:
    """Build the proxy a pickle describes (installed into ``_objects.rebuild_ref``)."""
    proxy: BaseProxy = (factory or AutoProxy)(token, "pickle", authkey=authkey, exposed=exposed, incref=False)
    if gid == -1:
        proxy._adopt()
    else:
        proxy._take_ref(gid)
    return proxy


install_proxy_builder(rebuild_proxy)


def create_proxy(client: ClientBase, address: object, authkey: bytes, typeid: str,
                 proxytype: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 manager: Any = None) -> Any:
    """Create a shared object of ``typeid`` (one round trip) and return its proxy."""
    if pending_releases:
        flush_releases()
    fut = client.op(COMPONENT, "create", payload=pack((typeid, args, kwargs)))
    oid, exposed = wait_call(client, fut, FOREVER)
    proxy = proxytype(Token(typeid, address, oid), "pickle", manager=manager, authkey=authkey,
                      exposed=exposed, incref=False)
    proxy._adopt()
    return proxy


# -- proxies for registered types without a proxy type -------------------------------------

_proxy_types: dict[tuple[str, tuple[str, ...]], type[BaseProxy]] = {}


def _forwarder(name: str) -> Callable[..., Any]:
    def method(self: BaseProxy, /, *args: Any, **kwds: Any) -> Any:
        return self._callmethod(name, args, kwds)
    method.__name__ = name
    return method


def _iter_self(self: BaseProxy) -> BaseProxy:
    return self


def MakeProxyType(name: str, exposed: tuple[str, ...] | list[str]) -> type[BaseProxy]:  # noqa: N802
    """A proxy type whose methods forward ``exposed`` (closures, not ``exec``)."""
    exposed = tuple(exposed)
    cached = _proxy_types.get((name, exposed))
    if cached is not None:
        return cached
    namespace: dict[str, Any] = {meth: _forwarder(meth) for meth in exposed}
    if "__next__" in exposed and "__iter__" not in exposed:
        namespace["__iter__"] = _iter_self  # a proxy of an iterator is one (a Master's dict iterators)
    namespace["_exposed_"] = exposed
    proxy_type = type(name, (BaseProxy,), namespace)
    _proxy_types[(name, exposed)] = proxy_type
    return proxy_type


def AutoProxy(token: Token, serializer: str = "pickle", manager: Any = None,  # noqa: N802
              authkey: bytes | None = None, exposed: tuple[str, ...] | None = None,
              incref: bool = True, manager_owned: bool = False) -> BaseProxy:
    """A proxy forwarding the methods the broker reported as exposed for this object."""
    if exposed is None:
        raise TypeError(f"AutoProxy for {token.typeid!r} needs the exposed method names")
    proxy_type = MakeProxyType(f"AutoProxy[{token.typeid}]", exposed)
    proxy = proxy_type(token, serializer, manager=manager, authkey=authkey, incref=incref,
                       manager_owned=manager_owned)
    proxy._isauto = True
    return proxy
