"""Drive a BrokerCore with fake peers and a fake clock, and read the actions it returns.

Peers are plain ints (as the I/O loop uses them); nothing here opens a socket or reads a
clock. Requests are told apart by their ``action`` name.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

from mpmesh._broker._actions import Action, Close, Notify, Send
from mpmesh._broker._core import BrokerCore
from mpmesh._broker._jobs import Group, Worker
from mpmesh._broker._routing import Router
from mpmesh._wire._messages import (
    Cancel, ErrorCode, Failure, Hello, Message, Ready, Reply, Request, Role, Serve,
)

__all__ = [
    "ORIGIN", "Harness", "cancels_to", "closes", "failures_to", "notes", "replies_to",
    "requests_to", "where_sent",
]

ORIGIN = 100  # peer id of the client that submits requests in most tests


class Harness:
    """A BrokerCore plus the bookkeeping of a fake mesh (peer ids, request ids, time)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.core = BrokerCore(rng=self.rng)
        self.now = 0.0
        self._rids = itertools.count(1)
        self.instance: dict[int, int] = {}   # peer -> instance id from its Ready

    @property
    def router(self) -> Router:
        return self.core.router

    # -- the mesh's owner ---------------------------------------------------------------

    def group(self, name: str, size: int, *, strategy: str = "round-robin", capacity: int = 1,
              max_concurrency: int | None = None, first_peer: int = 1) -> list[int]:
        """Declare a group of ``size`` children ``name-i``, connect them; return their peers."""
        self.core.declare_group(name, strategy, max_concurrency)
        peers = []
        for i in range(size):
            self.core.declare_child(f"{name}-{i}", name, capacity)
            peers.append(first_peer + i)
            self.connect_child(f"{name}-{i}", first_peer + i, capacity)
        return peers

    def child(self, name: str, peer: int, *, capacity: int = 1) -> Worker:
        worker = self.core.declare_child(name, None, capacity)
        self.connect_child(name, peer, capacity)
        return worker

    def worker(self, name: str) -> Worker:
        return self.router.workers[name]

    def group_of(self, name: str) -> Group:
        return self.router.groups[name]

    # -- peers ---------------------------------------------------------------------------

    def hello(self, peer: int, name: str = "", *, role: Role = Role.CLIENT, capacity: int = 0,
              pid: int | None = None) -> list[Action]:
        pid = 1000 + peer if pid is None else pid
        worker = self.router.workers.get(name) if name else None
        if worker is not None and worker.supervised and not worker.started_pid:
            self.core.child_started(name, pid, self.now)  # as a Master's supervisor reports it
        self.core.on_connect(peer, self.now)
        actions = self.core.on_message(peer, Hello(pid, int(role), capacity, name, "", "host"), self.now)
        for a in actions:
            if isinstance(a, Send) and isinstance(a.msg, Ready):
                self.instance[peer] = a.msg.instance_id
        return actions

    def connect_child(self, name: str, peer: int, capacity: int) -> list[Action]:
        """A child connects: Hello with capacity 0, then Serve from its run()."""
        actions = self.hello(peer, name, role=Role.CHILD, capacity=0)
        assert requests_to(actions, peer) == [], "nothing may reach a child before it serves"
        return actions + self.serve(peer, capacity)

    def client(self, peer: int = ORIGIN) -> int:
        self.hello(peer)
        return peer

    def serve(self, peer: int, capacity: int) -> list[Action]:
        return self.core.on_message(peer, Serve(capacity), self.now)

    def lose(self, peer: int) -> list[Action]:
        return self.core.on_peer_lost(peer, self.now)

    # -- traffic -------------------------------------------------------------------------

    def request(self, target: str, action: str = "job", *, origin: int = ORIGIN, priority: int = 0,
                timeout: float | None = None, retries: int = 0, retry_delay: float = 0.0,
                target_id: int = -1, payload: bytes = b"data",
                rid: int | None = None) -> tuple[int, list[Action]]:
        rid = next(self._rids) if rid is None else rid
        req = Request(rid, priority, target_id, retries, -1.0 if timeout is None else timeout,
                      retry_delay, action, target, payload)
        return rid, self.core.on_message(origin, req, self.now)

    def reply(self, peer: int, brid: int, payload: bytes = b"result") -> list[Action]:
        return self.core.on_message(peer, Reply(brid, payload), self.now)

    def fail(self, peer: int, brid: int, code: ErrorCode = ErrorCode.REMOTE) -> list[Action]:
        return self.core.on_message(peer, Failure(brid, code, "remote says no", b"exc"), self.now)

    def tick(self, now: float) -> list[Action]:
        self.now = now
        return self.core.on_tick(now)

    def settled(self) -> None:
        """Assert nothing is left over: no jobs, no capacity held, no queued work, no timers."""
        assert self.router.jobs == {}
        for worker in self.router.workers.values():
            assert worker.busy == 0 and worker.running == {} and len(worker.queue) == 0, worker.name
        for group in self.router.groups.values():
            assert group.busy == 0 and len(group.queue) == 0, group.name
        assert self.core.next_deadline() is None


# -- reading actions ----------------------------------------------------------------------

def _sent(actions: Iterable[Action], peer: int, cls: type[Message]) -> list[Message]:
    return [a.msg for a in actions if isinstance(a, Send) and a.peer == peer and isinstance(a.msg, cls)]


def requests_to(actions: Iterable[Action], peer: int) -> list[Request]:
    return _sent(actions, peer, Request)  # type: ignore[return-value]


def replies_to(actions: Iterable[Action], peer: int = ORIGIN) -> list[Reply]:
    return _sent(actions, peer, Reply)  # type: ignore[return-value]


def failures_to(actions: Iterable[Action], peer: int = ORIGIN) -> list[Failure]:
    return _sent(actions, peer, Failure)  # type: ignore[return-value]


def cancels_to(actions: Iterable[Action], peer: int) -> list[Cancel]:
    return _sent(actions, peer, Cancel)  # type: ignore[return-value]


def notes(actions: Iterable[Action], event: str) -> list[Notify]:
    return [a for a in actions if isinstance(a, Notify) and a.event == event]


def closes(actions: Iterable[Action]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def where_sent(actions: Iterable[Action]) -> list[tuple[int, str]]:
    """``(peer, action)`` of every Request sent to a worker, in order."""
    return [(a.peer, a.msg.action) for a in actions if isinstance(a, Send) and isinstance(a.msg, Request)]
