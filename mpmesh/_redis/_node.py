"""A process's place in a mesh that spans hosts: registry, beats, leader, requests.

Every process that serves or sends requests across hosts runs one ``RedisNode``:

- **Registry.** A sorted set ``nodes`` holds each node's instance id scored by its last
  beat, in Redis's own clock (``TIME``, so hosts need not agree on theirs); ``node:<id>``
  holds what the node says of itself and of the processes it stands for (a Master lists
  its children and their groups). A beat every ``beat_s`` refreshes both.
- **Leader.** Each beat a node tries the lease ``leader`` (``SET NX PX``); its holder
  removes the nodes whose beats lapsed (``lapse_s``), in one script, so each departure
  is handled once: their queued and taken requests are answered with ``WorkerLost``,
  their RPC registrations dropped, and a ``node-left`` note is queued for every other
  announcing node.
- **Requests.** A request for node ``n`` is pushed onto ``inbox:<n>``; ``n`` moves it
  to ``taken:<n>`` (``BLMOVE``) while it runs, so a host that dies with it leaves a
  record the leader answers from. The reply goes to the caller's ``reply:<id>`` list.
  While a request runs, its server keeps ``alive:<rid>`` fresh (request heartbeats): a
  caller whose timeout passes keeps waiting while the key lives, and a request still
  queued when its timeout passes is taken back (``LREM``) and never runs.

Every blob a node writes is sealed with the mesh's key (``Link.seal``) and checked
before it is unpickled.

``RedisNode`` is the facade over one part per job: the registry, leader and reaper
(``_registry``), the takers that serve requests and RPC calls (``_serve``), the sending
end and its replies (``_send``), and what they share (``_mail``).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from .._errors import MeshError
from ._link import Link
from ._mail import LISTEN_S, Mail
from ._registry import BEAT_S, ID_BLOCK, LAPSE_S, Registry
from ._send import Attempt, HostGone, Sender
from ._serve import Serve, Server

__all__ = ["BEAT_S", "ID_BLOCK", "LAPSE_S", "Attempt", "HostGone", "RedisNode", "Serve"]

log = logging.getLogger("mpmesh.redis")


class RedisNode:
    """One process's node in a mesh on Redis (see the module docstring).

    ``record()`` says what the node stands for (refreshed every beat); ``serve(action,
    target, data, priority, timeout)`` runs a request from another host here and returns
    its result (None: this node serves only RPC calls); ``on_left(record)``
    hears of every announcing node that left; ``on_beat()`` runs after each beat (lock
    leases are renewed there).
    """

    def __init__(self, link: Link, iid: int, *, record: Callable[[], dict[str, Any]],
                 announce: bool, serve: Serve | None = None,
                 on_left: Callable[[dict[str, Any]], None] | None = None,
                 on_beat: Callable[[], None] | None = None, id_floor: int = 0,
                 beat_s: float = BEAT_S, lapse_s: float = LAPSE_S) -> None:
        self.link = link
        self.iid = iid
        self._mail = Mail(link, iid)
        self._server = Server(self._mail, serve, on_left)
        self._sender = Sender(self._mail, beat_s)
        self._registry = Registry(self._mail, record=record, announce=announce, alive=self._server.alive,
                                  on_beat=on_beat, id_floor=id_floor, beat_s=beat_s, lapse_s=lapse_s)
        self._registry.beat()  # registered before the constructor returns: nodes() sees us at once
        self._mail.start([("beat", self._registry.beat_loop), ("replies", self._sender.reply_loop)])
        if serve is not None or announce:
            self._server.serving()

    @property
    def leader(self) -> bool:
        """Whether this node held the leader's lease at its last beat."""
        return self._registry.leader

    @property
    def redis_ok(self) -> bool:
        """Whether this node's last beat reached Redis."""
        return self._registry.redis_ok

    def nudge(self) -> None:
        """Beat now: what this node stands for changed (a child started)."""
        self._registry.nudged.set()

    def reap(self, cutoff_ms: int) -> list[int]:
        """Remove the nodes silent since ``cutoff_ms`` (Redis time); answer what they held."""
        return self._registry.reap(cutoff_ms)

    def send(self, host: int, action: str, target: str | int, data: object, *,
             timeout: float | None, priority: int = 0) -> concurrent.futures.Future[Any]:
        """Queue a request for node ``host``; a future of its reply (see ``Sender.send``)."""
        return self._sender.send(host, action, target, data, timeout=timeout, priority=priority)

    def ask(self, host: int, action: str, target: str | int, data: object, *,
            timeout: float | None, priority: int = 0) -> Any:
        """``send``, waited for in the calling thread."""
        return self._sender.ask(host, action, target, data, timeout=timeout, priority=priority)

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
             timeout: float | None) -> concurrent.futures.Future[Any]:
        """Run RPC ``name`` in the least busy process that registered it, on any host."""
        return self._sender.call(name, args, kwargs, timeout=timeout)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Serve ``call(name, ...)`` from this process, for callers on every host."""
        self._server.register(name, fn)

    def unregister(self, name: str) -> bool:
        return self._server.unregister(name)

    def close(self) -> None:
        """Leave the mesh: this node is removed at once (its departure announced, what it
        still held answered), and its threads end."""
        if self._mail.closed.is_set():
            return
        self._mail.closed.set()
        self._sender.woken.set()
        self._registry.nudged.set()
        self._mail.join(LISTEN_S + self.link.timeout)
        try:
            with self.link.errors("leaving the mesh"):
                self.link.redis.zadd(self.link.key("nodes"), {str(self.iid): 0})
            self._registry.reap(0)
        except MeshError as exc:
            log.info("node %d left without telling Redis (%s); it lapses there", self.iid, exc)
        self._sender.close()
