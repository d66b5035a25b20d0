"""``Remote``: one process's mesh-wide half, when its mesh has a Redis backend.

A Master, a Child and a ``connect()`` handle each hold one. It owns the process's
``Link``, its ``RedisNode`` (made at once for a Master and a handle, on first use of
``register``/``call`` in a child), its lock table and its pub/sub connection, and it
serves the shared-state API (``SharedState`` hands every call here) and the routing of
requests to other hosts.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from .._errors import MeshError, NotFound
from .._wire import _codec
from ._link import Link
from ._locks import remember_link
from ._node import ID_BLOCK, HostGone, RedisNode, Serve

if TYPE_CHECKING:
    import concurrent.futures

    from .._state._shared import Node
    from ._locks import RedisGrant, RedisLocks
    from ._pubsub import RedisPubSub, RedisSubscription
    from ._state import RedisCache

__all__ = ["Remote", "reserve_ids", "take_id"]

# Every node's record: the processes each stands for, in one round trip.
_RECORDS = """
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGE', p .. 'nodes', 0, -1)) do
  local info = redis.call('GET', p .. 'node:' .. id)
  if info then table.insert(out, info) end
end
return out
"""

# How old the registry view used for routing may be, at most.
VIEW_S: Final = 1.0
# The lease of a lock taken without a TTL: renewed every beat while its holder lives.
LEASE_MS: Final = 5000


def reserve_ids(link: Link) -> int:
    """The first of ``ID_BLOCK`` instance ids reserved for one host's broker (``INCRBY``)."""
    with link.errors("reserving instance ids"):
        end = int(link.redis.incrby(link.key("ids"), ID_BLOCK))
    return end - ID_BLOCK + 1


def take_id(link: Link) -> int:
    """One instance id, for a process that joins the mesh with no broker of its host."""
    with link.errors("taking an instance id"):
        return int(link.redis.incr(link.key("ids")))


class Remote:
    """The Redis side of one process of a mesh (see the module docstring)."""

    def __init__(self, link: Link, iid: int, *, role: str, name: str, group: str | None = None,
                 record: Callable[[], dict[str, Any]] | None = None, serve: Serve | None = None,
                 on_left: Callable[[dict[str, Any]], None] | None = None,
                 id_floor: int = 0, eager: bool = True) -> None:
        self.link = link
        remember_link(link)  # a cache or lock grant that arrives pickled uses it
        self.iid = iid
        self.role, self.name, self.group = role, name, group
        self._record = record or self.own_record
        self._serve, self._on_left, self._id_floor = serve, on_left, id_floor
        self._lock = threading.Lock()
        self._node: RedisNode | None = None
        self._locks: RedisLocks | None = None
        self._pubsub: RedisPubSub | None = None
        self._view: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._rr = itertools.count()
        self._closed = False
        if eager:
            self.node()

    # -- parts, made on first use ------------------------------------------------------------

    def node(self) -> RedisNode:
        """This process's node: registered, beating, listening."""
        with self._lock:
            if self._node is None:
                if self._closed:
                    raise MeshError("this process left the mesh")
                self._node = RedisNode(self.link, self.iid, record=self._record,
                                       announce=self.role == "master", serve=self._serve,
                                       on_left=self._on_left, on_beat=self._renew,
                                       id_floor=self._id_floor)
            return self._node

    def locks(self) -> RedisLocks:
        from ._locks import RedisLocks

        with self._lock:
            if self._locks is None:
                self._locks = RedisLocks(self.link, self.iid)
        # Leases of locks held without a TTL are renewed by the node's beat.
        self.node()
        return self._locks

    def pubsub(self) -> RedisPubSub:
        from ._pubsub import RedisPubSub

        with self._lock:
            if self._pubsub is None:
                self._pubsub = RedisPubSub(self.link)
            return self._pubsub

    def _renew(self) -> None:
        locks = self._locks
        if locks is not None:
            locks.renew(LEASE_MS)

    def own_record(self) -> dict[str, Any]:
        """What a process that stands only for itself says in the registry."""
        return {"iid": self.iid, "role": self.role, "hostname": socket.gethostname(),
                "nodes": [[self.iid, self.name, self.group, os.getpid(), socket.gethostname(), self.role]],
                "groups": {}, "children": {}}

    # -- shared state ------------------------------------------------------------------------

    def cache(self, name: str, maxsize: int | None, ttl: float | None, maxbytes: int | None) -> RedisCache:
        from ._state import RedisCache

        return RedisCache(self.link, name, maxsize, ttl, maxbytes)

    def acquire(self, name: str, ttl: float | None, wait: float | None) -> RedisGrant | None:
        return self.locks().acquire(name, ttl, wait)

    def subscribe(self, pattern: str, callback: Callable[[Any, str], object]) -> RedisSubscription:
        return self.pubsub().subscribe(pattern, callback)

    def publish(self, channel: str, payload: object) -> int:
        return self.pubsub().publish(channel, payload)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self.node().register(name, fn)

    def unregister(self, name: str) -> bool:
        return self.node().unregister(name)

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: float | None) -> Any:
        fut = self.node().call(name, args, kwargs, timeout=timeout)
        return fut.result()

    def nodes(self) -> list[Node]:
        """Every process of the mesh on every host, once each."""
        from .._state._shared import Node

        seen: dict[int, Node] = {}
        for record in self.records(fresh=True):
            for iid, name, group, pid, host, role in record["nodes"]:
                seen.setdefault(iid, Node(iid, name, group, pid, host, iid == self.iid, role))
        return sorted(seen.values(), key=lambda n: n.instance_id)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.link.url, "instance_id": self.iid}
        node = self._node
        if node is not None:
            out.update(redis_ok=node.redis_ok, leader=node.leader)
        if self._pubsub is not None:
            out.update(self._pubsub.stats())
        return out

    # -- routing -----------------------------------------------------------------------------

    def records(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        """The registry: what every live node says of itself (cached for ``VIEW_S``
        unless ``fresh``)."""
        at, view = self._view
        now = time.monotonic()
        if fresh or now - at > VIEW_S:
            with self.link.errors("listing nodes"):
                blobs = self.link.script(_RECORDS)(args=[self.link.prefix])
            view = [cast("dict[str, Any]", _codec.loads(self.link.unseal(b))) for b in blobs]
            self._view = (now, view)
        return view

    def host_for(self, target: str | int, *, free_only: bool) -> int | None:
        """A node of another host that serves ``target``: the one that lists it (an
        instance id, a child), or one whose group of that name has a free member
        (``free_only``) or any member; round-robin among equals. None: no other host does."""
        for fresh in (False, True):
            found = self._hosts_for(target, free_only, self.records(fresh=fresh))
            if found:
                return found[next(self._rr) % len(found)]
        return None

    def record_of(self, iid: int) -> dict[str, Any] | None:
        """The record of the Master whose host runs process ``iid``."""
        for record in self.records():
            if record.get("role") == "master" and any(row[0] == iid for row in record["nodes"]):
                return record
        return None

    @staticmethod
    def serves(record: dict[str, Any], target: str | int) -> bool:
        """Whether the Master of ``record`` serves ``target`` (an instance id, a child, a group)."""
        if isinstance(target, int):
            return any(row[0] == target for row in record["nodes"])
        return target in record["children"] or target in record["groups"]

    def _hosts_for(self, target: str | int, free_only: bool, records: list[dict[str, Any]]) -> list[int]:
        found = []
        for record in records:
            if record["iid"] == self.iid or record.get("role") != "master":
                continue
            if isinstance(target, int):
                if any(row[0] == target for row in record["nodes"]):
                    return [record["iid"]]
            elif target in record["children"]:
                if record["children"][target] or not free_only:
                    found.append(record["iid"])
            elif target in record["groups"]:
                if record["groups"][target] > 0 or not free_only:
                    found.append(record["iid"])
        return found

    def send(self, host: int, action: str, target: str | int, data: object, *,
             timeout: float | None, priority: int) -> concurrent.futures.Future[Any]:
        """Queue a request for ``target`` on node ``host``; a future of its result."""
        node = self.node()
        try:
            return node.send(host, action, target, data, timeout=timeout, priority=priority)
        except HostGone:
            return node.send(self._instead(target), action, target, data, timeout=timeout, priority=priority)

    def ask(self, host: int, action: str, target: str | int, data: object, *,
            timeout: float | None, priority: int) -> Any:
        """``send`` and wait for the result in this thread."""
        node = self.node()
        try:
            return node.ask(host, action, target, data, timeout=timeout, priority=priority)
        except HostGone:
            return node.ask(self._instead(target), action, target, data, timeout=timeout, priority=priority)

    def _instead(self, target: str | int) -> int:
        """Another host for ``target``, the one chosen having left (our view was old)."""
        self.records(fresh=True)
        host = self.host_for(target, free_only=False)
        if host is None:
            raise missing(target)
        return host

    # -- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            node, pubsub, locks = self._node, self._pubsub, self._locks
        if pubsub is not None:
            pubsub.close()
        if locks is not None:
            locks.close()
        if node is not None:
            node.close()
        self.link.close()

    def __repr__(self) -> str:
        return f"<mpmesh Remote {self.link.url} instance={self.iid}>"


def missing(target: str | int) -> NotFound:
    """The error for a target no host serves."""
    kind = "node" if isinstance(target, int) else "child or group"
    return NotFound(f"no {kind} {target!r} on any host of the mesh")
