"""Handles on shared objects, and how proxies cross the broker: ``Token``, ``TypeSpec``,
``rebuild_ref`` (what every pickled proxy calls when unpickled) and ``ProxyRef`` (a proxy
stored inside another shared object).

The core may not import the proxies (they live in the runtime layer, above it), so the
runtime hands in how a real proxy is built (``install_proxy_builder``), and the broker
reads pickled proxies as ``ProxyRef``s while ``_LOADING`` names its table. Nothing here
does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._objects import ObjectTable

__all__ = [
    "NewRef", "ProxyRef", "Token", "TypeSpec", "install_proxy_builder", "loading", "public_methods",
    "rebuild_ref", "same_address",
]


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

_LOADING: ContextVar[ObjectTable | None] = ContextVar("mpmesh_objects_loading", default=None)
loading = _LOADING  # the table reading a payload now (set by ObjectTable._load)
_proxy_builder: Callable[..., object] | None = None


def install_proxy_builder(fn: Callable[..., object]) -> None:
    """``mpmesh._proxies`` hands in how a real proxy is built (the core may not import it)."""
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

    def __init__(self, table: ObjectTable, factory: object, token: Token,
                 exposed: tuple[str, ...] | None, counted: bool) -> None:
        self.table, self.factory, self.token, self.exposed = table, factory, token, exposed
        self.counted = counted

    def __reduce__(self) -> tuple[object, ...]:
        gid = self.table.issue_grace(self.token.id) if self.counted else 0
        return (rebuild_ref, (self.factory, self.token, self.exposed, gid, None))

    def __del__(self) -> None:
        if self.counted:
            self.table.dead.append(self.token.id)  # list.append: safe from any GC point

    def __repr__(self) -> str:
        return f"<ProxyRef {self.token!r}>"


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
