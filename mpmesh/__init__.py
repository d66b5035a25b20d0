"""mpmesh: a faster, hang-proof replacement for ``multiprocessing.Manager`` and ``Pool``.

A ``Master`` hosts a broker and spawns named worker groups; master and children send
each other requests; every process of the mesh shares state through the broker.
"""

from __future__ import annotations

import logging

from ._errors import AuthenticationError as AuthenticationError
from ._errors import BrokerUnavailable as BrokerUnavailable
from ._errors import FencedError as FencedError
from ._errors import LockTimeout as LockTimeout
from ._errors import MeshClosed as MeshClosed
from ._errors import MeshError as MeshError
from ._errors import MessageTooLarge as MessageTooLarge
from ._errors import NoHandler as NoHandler
from ._errors import NotFound as NotFound
from ._errors import RemoteError as RemoteError
from ._errors import RequestTimeout as RequestTimeout
from ._errors import SerializationError as SerializationError
from ._errors import WorkerLost as WorkerLost
from ._managers._sync import Manager as Manager
from ._mesh._connect import connect as connect
from ._mesh._master import Master as Master
from ._mesh._stats import ProcessStats as ProcessStats
from ._pool import Pool as Pool
from ._procs._child import Child as Child
from ._wire._messages import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES

__version__ = "0.1.0.dev0"

__all__ = [
    "MAX_MESSAGE_BYTES",
    "AuthenticationError",
    "BrokerUnavailable",
    "Child",
    "FencedError",
    "LockTimeout",
    "Manager",
    "MeshClosed",
    "MeshError",
    "Master",
    "MessageTooLarge",
    "NoHandler",
    "NotFound",
    "Pool",
    "ProcessStats",
    "RemoteError",
    "RequestTimeout",
    "SerializationError",
    "WorkerLost",
    "connect",
]


def _fixup_module_metadata() -> None:
    """Make reprs, tracebacks and pickles show ``mpmesh.X``, the public path."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("mpmesh._"):
            obj.__module__ = "mpmesh"


_fixup_module_metadata()

# A library stays quiet unless the application configures logging (the logging HOWTO's advice).
logging.getLogger("mpmesh").addHandler(logging.NullHandler())
del _fixup_module_metadata
