"""Handles on shared objects, and how proxies cross the broker: ``Token``, ``TypeSpec``,
``rebuild_ref`` (what every pickled proxy calls when unpickled) and ``ProxyRef`` (a proxy
stored inside another shared object).

The core may not import the proxies (they live in the runtime layer, above it), so the
runtime hands in how a real proxy is built (``install_proxy_builder``), and the broker
reads pickled proxies as ``ProxyRef``s while ``_LOADING`` names its table. User code that
runs in the broker's process (on a worker thread, never the loop) gets real proxies, as
the standard library's ``RebuildProxy`` gives code in its manager's process: what it is
handed is pickled again under the core lock and rebuilt on the worker (``WorkerSide``).
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .._wire import _codec

__all__ = [
    "AttributeRef", "NewRef", "ProxyRef", "RefOwner", "RefReader", "Token", "TypeSpec", "WorkerSide", "grants",
    "install_proxy_builder", "loading", "public_methods", "rebuild_ref", "same_address",
]

T = TypeVar("T")


class Token:
    """Identifies a shared object: ``(typeid, address of its manager, id)``."""

    __slots__ = ("typeid", "address", "id")

    def __init__(self, typeid: str, address: object, id: int) -> None:  # noqa: A002
        self.typeid, self.address, self.id = typeid, address, id

    def __getstate__(self) -> tuple[str, object, int]:
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state: tuple[str, object, int]) -> None:
        self.typeid, self.address, self.id = state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(typeid={self.typeid!r}, address={self.address!r}, id={self.id!r})"


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """A registered typeid, as the broker needs it (``BaseManager.register`` builds these)."""

    typeid: str
    callable: Callable[..., object] | None
    exposed: tuple[str, ...] | None = None
    method_to_typeid: dict[str, str] | None = None
    proxytype: object = None      # opaque here: what a method_to_typeid result is rebuilt with
    native: str | None = None     # build this NATIVE typeid instead of calling ``callable``


# -- proxies inside the broker -------------------------------------------------------------

class RefOwner(Protocol):
    """Where a ``ProxyRef`` counts its reference: the table, or a payload's reader on a
    worker thread until the table takes the reference over."""

    dead: list[int]

    def issue_grace(self, oid: int, gid: int = 0) -> int: ...

    def next_gid(self) -> int: ...


class RefReader(Protocol):
    """What reads the proxies of a payload the broker unpickles (``loading``)."""

    def ref_from_pickle(self, factory: object, token: Token, exposed: tuple[str, ...] | None,
                        gid: int) -> ProxyRef: ...


_LOADING: ContextVar[RefReader | None] = ContextVar("mpmesh_objects_loading", default=None)
loading = _LOADING  # what reads a payload's proxies now, on this thread (set by ObjectTable)
# Set on a worker thread that pickles a broker-held value: a ``ProxyRef`` pickled there
# draws its grace id at once but leaves the grace to be registered under the core lock
# (``ObjectTable.grant``), before the bytes leave.
_GRANTS: ContextVar[list[tuple[ProxyRef, int]] | None] = ContextVar("mpmesh_objects_grants", default=None)
grants = _GRANTS
_proxy_builder: Callable[..., object] | None = None


def install_proxy_builder(fn: Callable[..., object]) -> None:
    """``mpmesh._managers._proxies`` hands in how a real proxy is built (the core may not import it)."""
    global _proxy_builder
    _proxy_builder = fn


def rebuild_ref(factory: object, token: Token, exposed: tuple[str, ...] | None, gid: int,
                authkey: bytes | None) -> object:
    """What every pickled proxy calls when unpickled.

    In a process: a real proxy (``gid`` -1: the broker already counted it for us; else
    the proxy posts ``incref(oid, gid)``). While the broker reads a call's arguments:
    a ``ProxyRef`` holding one internal reference.
    """
    table = _LOADING.get()
    if table is not None:
        return table.ref_from_pickle(factory, token, exposed, gid)
    if _proxy_builder is None:  # pragma: no cover - importing mpmesh installs it
        raise RuntimeError("import mpmesh before unpickling its proxies")
    return _proxy_builder(factory, token, exposed, gid, authkey)


class ProxyRef:
    """A proxy stored in a broker-held object; pickles back into a real proxy."""

    __slots__ = ("table", "factory", "token", "exposed", "counted")

    def __init__(self, table: RefOwner, factory: object, token: Token,
                 exposed: tuple[str, ...] | None, counted: bool) -> None:
        self.table, self.factory, self.token, self.exposed = table, factory, token, exposed
        self.counted = counted

    def __reduce__(self) -> tuple[object, ...]:
        gid = 0
        if self.counted:
            pending = _GRANTS.get()
            if pending is None:
                gid = self.table.issue_grace(self.token.id)
            else:  # on a worker thread: the table is the loop's until ``grant``
                gid = self.table.next_gid()
                pending.append((self, gid))
        return (rebuild_ref, (self.factory, self.token, self.exposed, gid, None))

    def __del__(self) -> None:
        if self.counted:
            self.table.dead.append(self.token.id)  # list.append: safe from any GC point

    def __getattr__(self, name: str) -> AttributeRef:
        # A bound method of a proxy (``lst.append`` as a Pool callback) pickles as
        # getattr(proxy, name); read here, it stays a reference to the proxy's attribute.
        if name.startswith("_"):
            raise AttributeError(name)
        return AttributeRef(self, name)

    def __repr__(self) -> str:
        return f"<ProxyRef {self.token!r}>"


class AttributeRef:
    """``getattr(proxy, name)`` read in the broker: pickles back into the real proxy's
    attribute (a bound method, usually) wherever it is rebuilt."""

    __slots__ = ("ref", "name")

    def __init__(self, ref: ProxyRef, name: str) -> None:
        self.ref, self.name = ref, name

    def __reduce__(self) -> tuple[object, ...]:
        return (getattr, (self.ref, self.name))

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise TypeError(f"{self.name!r} of a proxy cannot be called inside the broker (a shared "
                        f"object's method got a proxy's method to call)")

    def __repr__(self) -> str:
        return f"<AttributeRef {self.name!r} of {self.ref!r}>"


_UNBUILT: Any = object()


class WorkerSide(Generic[T]):
    """``value``, read in the broker (its proxies ``ProxyRef``s), as user code on a worker
    thread must see it: with real proxies.

    It is pickled here, under the core lock (a ``ProxyRef`` issues a grace as it is
    pickled), and rebuilt on a worker thread at first use (``get``), where every
    proxy is a real one of this process. ``value`` is kept: its ``ProxyRef``s keep the
    objects alive however late that first use comes. Called, it calls the rebuilt value
    (a Barrier's action).

    Raises:
        SerializationError: ``value`` cannot be pickled again.
    """

    __slots__ = ("_keep", "_blob", "_built")

    def __init__(self, value: T) -> None:
        self._keep = value
        self._blob = _codec.dumps(value)
        self._built: T = _UNBUILT

    def get(self) -> T:
        """The rebuilt value (worker threads only: rebuilding a proxy posts to the broker).
        Two threads may rebuild it at once; each copy's proxies count on their own."""
        built = self._built
        if built is _UNBUILT:
            built = self._built = _codec.loads(self._blob)  # type: ignore[assignment]
        return built

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.get()(*args, **kwargs)  # type: ignore[operator]


class NewRef:
    """A proxy for an object just created for the receiving peer (already counted)."""

    __slots__ = ("factory", "token", "exposed")

    def __init__(self, factory: object, token: Token, exposed: tuple[str, ...]) -> None:
        self.factory, self.token, self.exposed = factory, token, exposed

    def __reduce__(self) -> tuple[object, ...]:
        return (rebuild_ref, (self.factory, self.token, self.exposed, -1, None))


def same_address(a: object, b: object) -> bool:
    if isinstance(a, list):
        a = tuple(a)
    if isinstance(b, list):
        b = tuple(b)
    return a == b


def public_methods(obj: object) -> tuple[str, ...]:
    """The callable attributes of ``obj`` not starting with ``_`` (AutoProxy's exposed)."""
    return tuple(name for name in dir(obj) if name[0] != "_" and callable(getattr(obj, name, None)))
