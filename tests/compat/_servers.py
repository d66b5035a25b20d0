"""Manager classes and server processes for the BaseManager tests (importable in children)."""

from __future__ import annotations

import multiprocessing.managers
import os
import signal
from typing import Any

import mpmesh.managers

from ._workers import Box, Counter


class StdCounterProxy(multiprocessing.managers.BaseProxy):
    _exposed_ = ("incr", "get")

    def incr(self, by: int = 1) -> int:
        return self._callmethod("incr", (by,))  # type: ignore[no-any-return]

    def get(self) -> int:
        return self._callmethod("get")  # type: ignore[no-any-return]


class MeshCounterProxy(mpmesh.managers.BaseProxy):
    _exposed_ = ("incr", "get")

    def incr(self, by: int = 1) -> int:
        return self._callmethod("incr", (by,))  # type: ignore[no-any-return]

    def get(self) -> int:
        return self._callmethod("get")  # type: ignore[no-any-return]


class StdCounterManager(multiprocessing.managers.BaseManager):
    pass


class MeshCounterManager(mpmesh.managers.BaseManager):
    pass


for _cls, _proxy, _managers in ((StdCounterManager, StdCounterProxy, multiprocessing.managers),
                                (MeshCounterManager, MeshCounterProxy, mpmesh.managers)):
    _cls.register("Counter", Counter)                               # AutoProxy
    _cls.register("TypedCounter", Counter, _proxy)                  # a BaseProxy subclass
    _cls.register("Parent", Counter, method_to_typeid={"make_child": "ChildCounter"},
                  exposed=("get", "make_child"))
    _cls.register("ChildCounter", create_method=False)  # results of make_child, as they are
    _cls.register("Narrow", Counter, exposed=("get",))
    _cls.register("ns", _managers.Namespace, _managers.NamespaceProxy)
    _cls.register("Box", Box)

MANAGERS: dict[str, Any] = {"multiprocessing": StdCounterManager, "mpmesh": MeshCounterManager}


def serve(impl_name: str, address: Any, authkey: bytes, ready: Any) -> None:
    """Serve a counter manager in this process until SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0)) if impl_name == "multiprocessing" else None
    server = MANAGERS[impl_name](address=address, authkey=authkey).get_server()
    ready.send(server.address)
    ready.close()
    server.serve_forever()


def ignore_sigint(marker: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    marker.put(os.getpid()) if marker is not None else None
