"""The serving end of requests across hosts: taker threads that move requests from a
node's inbox to its taken list, run them and answer them; RPC registrations."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Final

from .._errors import MeshError, NotFound
from ._mail import CALL, LEFT, LISTEN_S, RETRY_S, Mail, Running

__all__ = ["TAKERS", "Serve", "Server"]

log = logging.getLogger("mpmesh.redis")

# Threads that take requests from this node's inbox and run them, each one at a time:
# how many requests from other hosts a node runs at once (others wait in Redis).
TAKERS: Final = 16

Serve = Callable[[str, "str | int", object, int, "float | None"], Any]


class Server:
    """What one node runs for other nodes: requests (``serve(action, target, data,
    priority, timeout)``; None: it serves only RPC calls), RPC calls to the functions it
    registered, and the departures it hears of (``on_left(record)``)."""

    def __init__(self, mail: Mail, serve: Serve | None,
                 on_left: Callable[[dict[str, Any]], None] | None) -> None:
        self._mail, self.link, self.iid = mail, mail.link, mail.iid
        self._serve, self._on_left = serve, on_left
        self._running: dict[str, Running] = {}
        self.fns: dict[str, Callable[..., Any]] = {}
        self._takers_started = False

    def alive(self) -> list[str]:
        """The ids of the requests this node runs now (the beat keeps them alive)."""
        with self._mail.lock:
            return list(self._running)

    def serving(self) -> None:
        """Start the takers (once): this node serves requests, or RPC calls, or hears of
        departures. A node that only sends runs none."""
        if not self._takers_started:
            self._takers_started = True
            self._mail.start([("taker", self._taker_loop)] * TAKERS)

    def _taker_loop(self) -> None:
        """Take requests from this node's inbox, one at a time, and answer them. A request
        runs in the taker's own thread: its answer wakes no other thread on the way."""
        redis = self.link.blocking(LISTEN_S)
        inbox, taken = self.link.key("inbox", self.iid), self.link.key("taken", self.iid)
        closed = self._mail.closed
        while not closed.is_set():
            try:
                envelope = redis.blmove(inbox, taken, LISTEN_S, "RIGHT", "LEFT")
            except Exception:
                if closed.is_set():
                    break
                closed.wait(RETRY_S)
                continue
            if envelope is not None:
                try:
                    self._take(envelope)
                except Exception:
                    log.exception("node %d could not take a request", self.iid)
                    with contextlib.suppress(Exception):
                        self.link.redis.lrem(taken, 1, envelope)
        redis.close()

    def _take(self, envelope: bytes) -> None:
        kind = envelope[:1]
        if kind == LEFT:
            self.link.redis.lrem(self.link.key("taken", self.iid), 1, envelope)
            if self._on_left is not None:
                self._on_left(self._mail.unseal(envelope[1:]))
            return
        fields = self._mail.open(envelope)
        rid, reply_to = fields[0], fields[1]
        running = Running(envelope, reply_to, fields[2] if kind == CALL else None)
        with self._mail.lock:
            self._running[rid] = running
        try:
            if kind == CALL:
                value, ok = self._run_rpc(*fields[2:]), True
            elif self._serve is None:
                raise NotFound(f"node {self.iid} serves no requests")
            else:
                value, ok = self._serve(*fields[2:]), True
        except Exception as exc:
            value, ok = exc, False
        finally:
            with self._mail.lock:
                self._running.pop(rid, None)
        try:
            self._mail.reply(reply_to, rid, ok, value, running=running)
        except MeshError as error:
            log.warning("node %d could not answer request %s: %s", self.iid, rid, error)

    def _run_rpc(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn = self.fns.get(name)
        if fn is None:
            raise NotFound(f"{name!r} is no longer registered in process {os.getpid()}")
        return fn(*args, **kwargs)

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Serve ``call(name, ...)`` from this process, for callers on every host."""
        self.fns[name] = fn
        self.serving()
        with self.link.errors(f"registering {name!r}"):
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.zadd(self.link.key("rpc", name), {str(self.iid): 0}, nx=True)
            pipe.sadd(self.link.key("rpcnames", self.iid), name)
            pipe.execute()

    def unregister(self, name: str) -> bool:
        found = self.fns.pop(name, None) is not None
        with self.link.errors(f"unregistering {name!r}"):
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.zrem(self.link.key("rpc", name), str(self.iid))
            pipe.srem(self.link.key("rpcnames", self.iid), name)
            pipe.execute()
        return found
