"""A Master's routing across hosts: which host a request goes to, sending it there and
re-sending it by one retry policy, serving what other hosts send here, and what this
host says of itself in the registry."""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .._broker._core import BrokerCore
from .._broker._payload import pack
from .._client._futures import MeshFuture
from .._client._local import LocalClient
from .._errors import MeshError, RequestTimeout, WorkerLost
from .._io._loop import BrokerLoop
from .._redis._link import Link
from .._redis._remote import Remote
from .._state._shared import Node

__all__ = ["Across", "Retry"]


class Retry:
    """When and where one request to another host goes again: the one policy both
    drivers follow (``Across.ask`` in the caller's thread, ``Across.request`` on
    callbacks). It decides which errors retry, counts the attempts, gives up, says how
    long to wait and where the next attempt goes (another host, or this host's broker
    with the retries left)."""

    __slots__ = ("_across", "action", "again", "delay", "number", "priority", "retries", "target", "timeout")

    def __init__(self, across: Across, action: str, target: str | int, *, timeout: float | None,
                 priority: int, retries: int, retry_delay: float,
                 retry_on: tuple[type[BaseException], ...]) -> None:
        self._across = across
        self.action, self.target, self.timeout, self.priority = action, target, timeout, priority
        self.retries, self.delay = retries, retry_delay
        self.again: tuple[type[BaseException], ...] = (WorkerLost, RequestTimeout, *retry_on)
        self.number = 0  # retries made so far

    def after(self, exc: BaseException) -> float | None:
        """The delay before the next attempt after ``exc`` (and the retry counted and
        told to ``request-retry`` listeners); None: give up with ``exc``."""
        if not isinstance(exc, self.again) or self.number >= self.retries or self._across.closed():
            return None
        self.number += 1
        self._across.emit("request-retry", {"action": self.action, "target": self.target,
                                            "attempt": self.number + 1, "attempts": self.retries + 1,
                                            "reason": str(exc)})
        return self.delay

    def next_host(self) -> int | None:
        """The host of the next attempt; None: this host serves the target now."""
        return self._across.other_host(self.target)

    def here(self) -> dict[str, Any]:
        """The options of the rest of the attempts, made by this host's broker."""
        return {"timeout": self.timeout, "priority": self.priority,
                "retries": self.retries - self.number, "retry_delay": self.delay}


class Across:
    """A Master's half of a mesh across hosts: its ``Remote``, and every request that
    crosses hosts from or to it.

    The Master owns one when its mesh has a Redis backend, and hands it its broker
    (core, loop, local client), whether it is closed, and how to tell its listeners.
    """

    def __init__(self, link: Link, iid: int, id_floor: int, *, core: BrokerCore, loop: BrokerLoop,
                 client: LocalClient, closed: Callable[[], bool], check_open: Callable[[], None],
                 emit: Callable[[str, Any], None], log: logging.Logger) -> None:
        self._iid, self._core, self._loop, self._client = iid, core, loop, client
        self.closed, self._check_open, self.emit, self.log = closed, check_open, emit, log
        self.remote = Remote(link, iid, role="master", name="master", record=self.record, serve=self.serve,
                             on_left=self.node_left, id_floor=id_floor)

    def other_host(self, target: str | int) -> int | None:
        """The node of another host a request for ``target`` goes to; None: this host's.

        This host's children come first; another host's when none here is free (or
        none here serves ``target``), and this host's queue when no other has room.
        """
        if target == "":
            return None
        # Read without the core lock: a routing hint, and the lock would cost the loop.
        if self._core.serves(target, free_only=True):
            return None
        here = self._core.serves(target, free_only=False)
        try:
            return self.remote.host_for(target, free_only=here)
        except MeshError:
            if here:  # Redis is away: what this host serves still works
                return None
            raise

    def request(self, host: int, action: str, target: str | int, data: object, *, timeout: float | None,
                retries: int, retry_delay: float, priority: int,
                retry_on: tuple[type[BaseException], ...]) -> MeshFuture:
        """A request sent to another host's node, re-sent by ``Retry`` on callbacks."""
        remote = self.remote
        outer = MeshFuture()
        policy = Retry(self, action, target, timeout=timeout, priority=priority, retries=retries,
                       retry_delay=retry_delay, retry_on=retry_on)

        def attempt(to: int) -> None:
            try:
                fut = remote.send(to, action, target, data, timeout=timeout, priority=priority)
            except BaseException as exc:
                outer.set_exception(exc)
                return
            fut.add_done_callback(settle)

        def settle(done: concurrent.futures.Future[Any]) -> None:
            exc = done.exception()
            if exc is None:
                outer.set_result(done.result())
                return
            delay = policy.after(exc)
            if delay is None:
                outer.set_exception(exc)
                return
            timer = threading.Timer(delay, resend)
            timer.daemon = True
            timer.start()

        def resend() -> None:
            try:
                to = policy.next_host()
            except BaseException as exc:
                outer.set_exception(exc)
                return
            if to is None:
                local = self._client.request(action, target, data, **policy.here())
                local.add_done_callback(lambda done: _copy(done, outer))
            else:
                attempt(to)

        attempt(host)
        return outer

    def ask(self, host: int, action: str, target: str | int, data: object, *, timeout: float | None,
            retries: int, retry_delay: float, priority: int,
            retry_on: tuple[type[BaseException], ...]) -> object:
        """``request`` waited for in this thread (the reply comes straight to it); the
        policy is made only once an attempt failed."""
        policy: Retry | None = None
        while True:
            try:
                return self.remote.ask(host, action, target, data, timeout=timeout, priority=priority)
            except BaseException as exc:
                if policy is None:
                    policy = Retry(self, action, target, timeout=timeout, priority=priority, retries=retries,
                                   retry_delay=retry_delay, retry_on=retry_on)
                delay = policy.after(exc)
                if delay is None:
                    raise
            time.sleep(delay)
            found = policy.next_host()
            if found is None:
                return self._client.call(action, target, data, **policy.here())
            host = found

    def serve(self, action: str, target: str | int, data: object, priority: int,
              timeout: float | None) -> object:
        """Run a request another host sent here.

        One that a child here can take at once runs with no timeout: its caller keeps
        waiting while this host beats for it, however long the handler takes. One that
        must queue waits at most its caller's ``timeout``, and never runs once that passed.
        """
        self._check_open()
        free = self._core.serves(target, free_only=True)  # a hint: see other_host
        return self._client.call(action, target, data, timeout=None if free else timeout, priority=priority)

    def record(self) -> dict[str, Any]:
        """What this host's node says in the registry: its processes, and which of its
        groups and children could take a request now."""
        nodes = [list(row) for row in self._host_nodes()]
        with self._loop.locked():
            groups, children = self._core.free_members()
        return {"iid": self._iid, "role": "master", "hostname": socket.gethostname(),
                "nodes": nodes, "groups": groups, "children": children}

    def _host_nodes(self) -> list[tuple[Any, ...]]:
        """(instance_id, name, group, pid, hostname, role) of every process of this host."""
        call = self._client.op("admin", "nodes", payload=pack(()))
        found = self._client.wait(call, self._client.due())
        return list(found[1])  # type: ignore[index]

    def node_left(self, record: dict[str, Any]) -> None:
        """Another host's node left the mesh: tell the ``node-left`` listeners."""
        iid = record["iid"]
        row = next((r for r in record["nodes"] if r[0] == iid), [iid, "", None, 0, record.get("hostname", ""),
                                                                  record.get("role", "")])
        node = Node(row[0], row[1], row[2], row[3], row[4], False, row[5])
        self.log.warning("node %d on %s left the mesh", iid, node.hostname)
        self.emit("node-left", node)


def _copy(source: concurrent.futures.Future[Any], target: concurrent.futures.Future[Any]) -> None:
    exc = source.exception()
    if exc is None:
        target.set_result(source.result())
    else:
        target.set_exception(exc)
