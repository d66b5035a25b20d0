"""``RedisHandle``: a process in a mesh across hosts, on a host where no Master runs.

``mpmesh.connect(name, backend=...)`` returns one when this host has no broker of that
mesh: it has no local broker to go through, so every request goes to another host's
node, and shared state is Redis's, as everywhere in such a mesh.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

from .._io import _deadline
from .._state._shared import SharedState
from ._link import Link
from ._remote import Remote, missing, take_id

__all__ = ["RedisHandle"]


class RedisHandle(SharedState):
    """A handle on a mesh across hosts, joined through Redis alone (see the module docstring).

    Offers what ``connect()``'s handle offers: requests to children, groups and nodes of
    every host, and the shared state. Close it, or use it as a context manager.
    """

    _remote: Remote | None

    def __init__(self, name: str, backend: str, authkey: bytes, *, timeout: float | None) -> None:
        self.name = name
        self.address = backend
        self.timeout = timeout
        self.spawned = False
        self.pid = os.getpid()
        link = Link(backend, name, authkey, timeout=timeout)
        try:
            self.instance_id = take_id(link)
            self._remote = Remote(link, self.instance_id, role="client", name=f"client-{self.instance_id}")
        except BaseException:
            link.close()
            raise

    def _host(self, target: str | int) -> int:
        if not isinstance(target, (str, int)) or isinstance(target, bool):
            raise TypeError(f"a target is a child or group name or an instance id, not {target!r}")
        assert self._remote is not None
        host = self._remote.host_for(target, free_only=False)
        if host is None:
            raise missing(target)
        return host

    def request(self, action: str, target: str | int, data: object = None, *,
                timeout: float | None = None, priority: int = 0) -> concurrent.futures.Future[Any]:
        """Send a request to a child, a group or a node's instance id on any host."""
        _deadline.check_timeout(timeout)
        assert self._remote is not None
        return self._remote.send(self._host(target), action, target, data, priority=priority,
                                 timeout=self.timeout if timeout is None else timeout)

    def send_request(self, action: str, target: str | int, data: object = None, *,
                     timeout: float | None = None, priority: int = 0) -> object:
        """``request`` and wait for the result."""
        _deadline.check_timeout(timeout)
        assert self._remote is not None
        return self._remote.ask(self._host(target), action, target, data, priority=priority,
                                       timeout=self.timeout if timeout is None else timeout)

    async def arequest(self, action: str, target: str | int, data: object = None, *,
                       timeout: float | None = None, priority: int = 0) -> object:
        """``send_request`` for asyncio code."""
        import asyncio

        return await asyncio.wrap_future(self.request(action, target, data, timeout=timeout, priority=priority))

    def stats(self) -> dict[str, Any]:
        """This process's view: its instance id, its backend, its pub/sub counters."""
        assert self._remote is not None
        return self._remote.stats()

    def close(self) -> None:
        """Leave the mesh (idempotent)."""
        if self._remote is not None:
            self._remote.close()

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpmesh mesh {self.name!r} on {self.address} as instance {self.instance_id}>"


