"""``SyncManager``, with every type of ``multiprocessing``'s, and ``Manager()``, which
starts one."""

from __future__ import annotations

import builtins
import queue
import threading
from multiprocessing.context import BaseContext
from typing import Any

from .._broker._natives import Array, Namespace, Value
from .._client._socket import DEFAULT_TIMEOUT_S
from ._factories import ObjectFactories
from ._manager import BaseManager
from ._proxy_types import (
    AcquirerProxy, ArrayProxy, BarrierProxy, ConditionProxy, DictProxy, EventProxy,
    IteratorProxy, ListProxy, NamespaceProxy, PoolProxy, QueueProxy, ValueProxy,
)

__all__ = ["Manager", "SyncManager"]


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
