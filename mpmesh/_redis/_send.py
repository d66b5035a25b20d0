"""The sending end of requests across hosts: queueing a request or RPC call, and reading
its reply, in the caller's thread (``ask``) or on the node's reply thread (``send``,
``call``); a request whose timeout passed while queued is taken back (it never runs)."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._errors import (
    BrokerUnavailable,
    MeshClosed,
    MeshError,
    MessageTooLarge,
    NotFound,
    RequestTimeout,
    WorkerLost,
)
from .._wire import _codec
from ._mail import CALL, LISTEN_S, MAX_REDIS_VALUE_BYTES, REQUEST, RETRY_S, Mail

__all__ = ["Attempt", "HostGone", "Sender"]

log = logging.getLogger("mpmesh.redis")

# Whether request ARGV[3], queued for node ARGV[2], is stranded: that node has left
# the registry (removed before it was queued, so nobody answers it), and the request
# was still in its inbox. Then it is taken back (it never runs): 1.
_STRANDED = """
if redis.call('ZSCORE', ARGV[1] .. 'nodes', ARGV[2]) then return 0 end
return redis.call('LREM', ARGV[1] .. 'inbox:' .. ARGV[2], 1, ARGV[3])
"""

# An RPC call to the least busy process that registered ARGV[2]: count it busy and
# queue the call in its inbox. Returns its id, or false when nobody serves the name.
_CALL = """
local p = ARGV[1]
local k = p .. 'rpc:' .. ARGV[2]
local m = redis.call('ZRANGE', k, 0, 0)
if #m == 0 then return false end
redis.call('ZINCRBY', k, 1, m[1])
redis.call('LPUSH', p .. 'inbox:' .. m[1], ARGV[3])
return m[1]
"""

# Whether request ARGV[2], sent to node ARGV[3] as ARGV[4], still runs: its server
# keeps it alive, or took it less than a beat ago.
_RUNNING = """
local p = ARGV[1]
if redis.call('EXISTS', p .. 'alive:' .. ARGV[2]) == 1 then return 1 end
if redis.call('LPOS', p .. 'taken:' .. ARGV[3], ARGV[4]) then return 1 end
return 0
"""


class HostGone(NotFound):
    """The node a request was for left the registry before it was queued (it never ran)."""


@dataclass
class Attempt:
    """One request this node sent across hosts, waiting for its reply."""

    rid: str
    host: int
    envelope: bytes
    deadline: float | None            # time.monotonic(); None: no timeout
    checked: float = field(default_factory=time.monotonic)  # when it was last found not stranded
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class Sender:
    """One node's requests to other nodes, and their replies.

    ``beat_s``: how much longer a caller whose timeout passed waits while its request runs.
    """

    def __init__(self, mail: Mail, beat_s: float) -> None:
        self._mail, self.link, self.iid = mail, mail.link, mail.iid
        self.beat_s = beat_s
        self._seq = itertools.count(1)
        self._waiting: dict[str, Attempt] = {}
        self.woken = threading.Event()
        self._local = threading.local()
        self._blocking: list[Any] = []
        self._call = self.link.script(_CALL)
        self._running_script = self.link.script(_RUNNING)
        self._stranded_script = self.link.script(_STRANDED)

    def send(self, host: int, action: str, target: str | int, data: object, *,
             timeout: float | None, priority: int = 0) -> concurrent.futures.Future[Any]:
        """Queue a request for node ``host``; a future of its reply.

        Raises:
            SerializationError: ``data`` cannot be pickled (nothing was sent).
            BrokerUnavailable, RequestTimeout: Redis did not take it.
        """
        rid = self._new_rid()
        envelope = self._request(rid, self.iid, action, target, data, priority, timeout)
        attempt = self._expect(rid, host, envelope, timeout)
        try:
            self._queue(host, envelope, action)
        except BaseException:
            self._forget(rid)
            raise
        return attempt.future

    def _new_rid(self) -> str:
        return f"{self.iid}:{next(self._seq)}"

    def _request(self, rid: str, reply_to: str | int, action: str, target: str | int, data: object,
                 priority: int, timeout: float | None) -> bytes:
        """A request's envelope; its reply goes to list ``reply:<reply_to>``."""
        return REQUEST + self.link.seal(_codec.dumps((rid, reply_to, action, target, data, priority, timeout)))

    def _queue(self, host: int, envelope: bytes, action: str) -> None:
        # A plain LPUSH (no script on the hot path): a request queued for a node that
        # left meanwhile is found stranded a second later, and taken back.
        if len(envelope) > MAX_REDIS_VALUE_BYTES:
            raise MessageTooLarge(f"request {action!r} is {len(envelope):,} bytes; a request to another "
                                  f"host may be at most {MAX_REDIS_VALUE_BYTES:,} (what Redis keeps in one value)")
        with self.link.errors(f"sending {action!r} to node {host}"):
            self.link.redis.lpush(self.link.key("inbox", host), envelope)

    def _stranded(self, host: int, envelope: bytes) -> bool:
        return bool(self._stranded_script(args=[self.link.prefix, host, envelope]))

    def ask(self, host: int, action: str, target: str | int, data: object, *,
            timeout: float | None, priority: int = 0) -> Any:
        """``send``, waited for in the calling thread: the reply comes to a list of the
        request's own, read by this thread (no hand-off from the reply thread)."""
        closed = self._mail.closed
        if closed.is_set():
            raise MeshClosed("this process left the mesh")
        rid = self._new_rid()
        envelope = self._request(rid, rid, action, target, data, priority, timeout)
        redis = self._own_blocking()
        reply = self.link.key("reply", rid)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._queue(host, envelope, action)
        checked = time.monotonic()
        with self.link.errors(f"waiting for {action!r} from node {host}"):
            while True:
                wait = LISTEN_S if deadline is None else min(LISTEN_S, deadline - time.monotonic())
                item = redis.blpop([reply], timeout=max(wait, 0.001)) if wait > 0 else None
                if item is not None:
                    return self._outcome(item[1], rid)
                if closed.is_set():
                    raise MeshClosed("this process left the mesh")
                if time.monotonic() - checked >= LISTEN_S:
                    checked = time.monotonic()
                    if self._stranded(host, envelope):
                        raise HostGone(f"node {host} left the mesh before it took the request")
                if deadline is None or time.monotonic() < deadline:
                    continue
                if self._running_script(args=[self.link.prefix, rid, host, envelope]):
                    deadline = time.monotonic() + self.beat_s  # it runs: its server keeps it alive
                    continue
                redis.lrem(self.link.key("inbox", host), 1, envelope)
                item = redis.lpop(reply)  # answered meanwhile after all?
                if item is not None:
                    return self._outcome(item, rid)
                raise RequestTimeout(f"no answer from node {host} in time")

    def _own_blocking(self) -> Any:
        """This thread's client for its blocking reads."""
        redis = getattr(self._local, "redis", None)
        if redis is None:
            redis = self._local.redis = self.link.blocking(LISTEN_S)
            with self._mail.lock:
                self._blocking.append(redis)  # closed with the node
        return redis

    def _outcome(self, blob: bytes, rid: str) -> Any:
        got, ok, value = self._mail.unseal(blob)
        if got != rid:
            raise MeshError(f"a reply for request {got} came to request {rid}")
        if not ok:
            raise value
        return value

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
             timeout: float | None) -> concurrent.futures.Future[Any]:
        """Run RPC ``name`` in the least busy process that registered it, on any host."""
        rid = self._new_rid()
        envelope = CALL + self.link.seal(_codec.dumps((rid, self.iid, name, args, kwargs)))
        attempt = self._expect(rid, -1, envelope, timeout)
        try:
            with self.link.errors(f"calling {name!r}"):
                host = self._call(args=[self.link.prefix, name, envelope])
        except BaseException:
            self._forget(rid)
            raise
        if host is None:
            self._forget(rid)
            raise NotFound(f"no process registered {name!r}")
        attempt.host = int(host)
        return attempt.future

    def _expect(self, rid: str, host: int, envelope: bytes, timeout: float | None) -> Attempt:
        if self._mail.closed.is_set():
            raise MeshClosed("this process left the mesh")
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = Attempt(rid, host, envelope, deadline)
        with self._mail.lock:
            self._waiting[rid] = attempt
        if deadline is not None:
            self.woken.set()  # the reply thread may be blocked past this deadline
        return attempt

    def _forget(self, rid: str) -> Attempt | None:
        with self._mail.lock:
            return self._waiting.pop(rid, None)

    def reply_loop(self) -> None:
        """The node's reply thread: settles what ``send`` and ``call`` wait for."""
        redis = self.link.blocking(LISTEN_S)
        key = self.link.key("reply", self.iid)
        closed = self._mail.closed
        while not closed.is_set():
            self.woken.clear()
            try:
                self._expire()
                item = redis.blpop([key], timeout=self._listen_for())
            except Exception as exc:
                if closed.is_set():
                    break
                self._fail_waiting(BrokerUnavailable(f"Redis at {self.link.url} went away: {exc}"))
                closed.wait(RETRY_S)
                continue
            if item is not None:
                self._settle(item[1])
        redis.close()

    def _listen_for(self) -> float:
        """How long the reply thread may block: until the nearest deadline, at most LISTEN_S."""
        with self._mail.lock:
            deadlines = [a.deadline for a in self._waiting.values() if a.deadline is not None]
        wait = LISTEN_S if not deadlines else min(LISTEN_S, min(deadlines) - time.monotonic())
        return max(wait, 0.01)

    def _settle(self, blob: bytes) -> None:
        try:
            rid, ok, value = self._mail.unseal(blob)
        except MeshError as exc:
            log.warning("node %d dropped a reply it could not read: %s", self.iid, exc)
            return
        attempt = self._forget(rid)
        if attempt is None or attempt.future.done():
            return  # it timed out meanwhile
        if ok:
            attempt.future.set_result(value)
        else:
            attempt.future.set_exception(value)

    def _expire(self) -> None:
        """Time out the requests whose deadline passed: unless their server keeps them
        alive, or they were still queued (then taken back: they never run)."""
        now = time.monotonic()
        with self._mail.lock:
            due = [a for a in self._waiting.values() if a.deadline is not None and a.deadline <= now]
            old = [a for a in self._waiting.values() if a.host >= 0 and now - a.checked >= LISTEN_S]
        hosts: dict[int, list[Attempt]] = {}
        for attempt in old:
            attempt.checked = now
            hosts.setdefault(attempt.host, []).append(attempt)
        for host, attempts in hosts.items():
            if self.link.redis.zscore(self.link.key("nodes"), host) is not None:
                continue
            for attempt in attempts:
                if (self.link.redis.lrem(self.link.key("inbox", host), 1, attempt.envelope)
                        and self._forget(attempt.rid) is not None):
                    attempt.future.set_exception(WorkerLost(f"node {host} left the mesh before it "
                                                            "took the request"))
        for attempt in due:
            if self._running_script(args=[self.link.prefix, attempt.rid, attempt.host, attempt.envelope]):
                attempt.deadline = now + self.beat_s  # still running: ask again later
                continue
            if attempt.host >= 0:
                self.link.redis.lrem(self.link.key("inbox", attempt.host), 1, attempt.envelope)
            if self._forget(attempt.rid) is not None:
                attempt.future.set_exception(RequestTimeout(f"no answer from node {attempt.host} in time"))

    def _fail_waiting(self, exc: BaseException) -> None:
        with self._mail.lock:
            waiting, self._waiting = self._waiting, {}
        for attempt in waiting.values():
            if not attempt.future.done():
                attempt.future.set_exception(exc)

    def close(self) -> None:
        """Fail what still waits (the node left) and close the callers' blocking clients."""
        self._fail_waiting(MeshClosed("this process left the mesh"))
        with self._mail.lock:
            blocking, self._blocking = self._blocking, []
        for redis in blocking:
            redis.close()
