"""The typed factories (``dict()``, ``Lock()``, ...) shared by ``SyncManager`` and a
``Master``, whose broker has no registry of its own: it gets its proxy types here."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any, Final

from .._broker._objects import COMPONENT, ObjectTable
from .._client import _binding
from .._client._base import ClientBase
from ._proxies import create_proxy
from ._proxy_types import (
    AcquirerProxy, ArrayProxy, BarrierProxy, ConditionProxy, DictProxy, EventProxy, ListProxy,
    NamespaceProxy, QueueProxy, ValueProxy,
)

__all__ = ["ObjectFactories", "SharedObjects"]

# Proxy types for a Master's factories (its broker has no registry of its own).
_DEFAULT_PROXIES: Final[dict[str, Any]] = {
    "dict": DictProxy, "list": ListProxy, "Namespace": NamespaceProxy, "Value": ValueProxy,
    "Array": ArrayProxy, "Lock": AcquirerProxy, "RLock": AcquirerProxy,
    "Semaphore": AcquirerProxy, "BoundedSemaphore": AcquirerProxy, "Condition": ConditionProxy,
    "Event": EventProxy, "Barrier": BarrierProxy, "Queue": QueueProxy, "JoinableQueue": QueueProxy,
}


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

