"""Drop-in for ``multiprocessing.managers``: ``BaseManager``, ``SyncManager``, the proxy
types and ``Token``, over an mpmesh broker (see ``mpmesh._managers._manager`` for where it runs).

    from mpmesh.managers import BaseManager, SyncManager, BaseProxy
"""

from __future__ import annotations

from ._broker._natives import Array as Array
from ._broker._natives import Namespace as Namespace
from ._broker._natives import Value as Value
from ._broker._refs import Token as Token
from ._errors import RemoteError as RemoteError
from ._managers._manager import BaseManager as BaseManager
from ._managers._manager import State as State
from ._managers._proxies import AutoProxy as AutoProxy
from ._managers._proxies import BaseProxy as BaseProxy
from ._managers._proxies import MakeProxyType as MakeProxyType
from ._managers._proxy_types import AcquirerProxy as AcquirerProxy
from ._managers._proxy_types import ArrayProxy as ArrayProxy
from ._managers._proxy_types import BarrierProxy as BarrierProxy
from ._managers._proxy_types import ConditionProxy as ConditionProxy
from ._managers._proxy_types import DictProxy as DictProxy
from ._managers._proxy_types import EventProxy as EventProxy
from ._managers._proxy_types import IteratorProxy as IteratorProxy
from ._managers._proxy_types import ListProxy as ListProxy
from ._managers._proxy_types import NamespaceProxy as NamespaceProxy
from ._managers._proxy_types import PoolProxy as PoolProxy
from ._managers._proxy_types import QueueProxy as QueueProxy
from ._managers._proxy_types import ValueProxy as ValueProxy
from ._managers._server import Server as Server
from ._managers._sync import SyncManager as SyncManager

__all__ = [
    "AcquirerProxy", "Array", "ArrayProxy", "AutoProxy", "BarrierProxy", "BaseManager",
    "BaseProxy", "ConditionProxy", "DictProxy", "EventProxy", "IteratorProxy", "ListProxy",
    "MakeProxyType", "Namespace", "NamespaceProxy", "PoolProxy", "QueueProxy", "RemoteError",
    "Server", "State", "SyncManager", "Token", "Value", "ValueProxy",
]


def _fixup_module_metadata() -> None:
    """Reprs, tracebacks and pickles show ``mpmesh.managers.X``, the public path."""
    for name in __all__:
        obj = globals()[name]
        if name != "RemoteError" and getattr(obj, "__module__", "").startswith("mpmesh._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
