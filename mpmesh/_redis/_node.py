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
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import (
    BrokerUnavailable, MeshClosed, MeshError, MessageTooLarge, NotFound, RemoteError, RequestTimeout, WorkerLost,
)
from .._wire import _codec
from ._link import Link

__all__ = ["BEAT_S", "LAPSE_S", "Attempt", "HostGone", "RedisNode"]

log = logging.getLogger("mpmesh.redis")

BEAT_S: Final = 1.0     # how often a node beats
LAPSE_S: Final = 5.0    # a node silent this long is gone
# Instance ids a host's broker hands out, taken from the mesh's counter in one block.
ID_BLOCK: Final = 1_000_000
# Kinds of what lands in an inbox (the first byte).
REQUEST: Final = b"Q"
CALL: Final = b"C"
LEFT: Final = b"L"
# A reply list nobody reads any more (its caller died) expires.
REPLY_TTL_MS: Final = 60_000
# How long an idle listener blocks in Redis before it looks at its own state again.
LISTEN_S: Final = 1.0
# Threads that take requests from this node's inbox and run them, each one at a time:
# how many requests from other hosts a node runs at once (others wait in Redis).
TAKERS: Final = 16
# The largest request or reply sent through Redis: Redis's own limit on one value
# (proto-max-bulk-len, 512 MiB by default), below the mesh's MAX_MESSAGE_BYTES.
MAX_REDIS_VALUE_BYTES: Final = 512 * 1024 * 1024
# After Redis failed, a listener or the beat tries again this often.
RETRY_S: Final = 0.5

# Beat: refresh this node's score and record (and the alive keys of what it runs);
# keep the id counter past every id handed out (a Redis that lost its data starts it
# again from 0). Returns Redis's time in ms.
_BEAT = """
local p, me = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', p .. 'nodes', ms, me)
redis.call('SET', p .. 'node:' .. me, ARGV[3], 'PX', ARGV[4])
if ARGV[5] == '1' then redis.call('SADD', p .. 'hosts', me) end
local ids = tonumber(redis.call('GET', p .. 'ids') or '0')
if ids < tonumber(ARGV[6]) then redis.call('SET', p .. 'ids', ARGV[6]) end
for i = 7, #ARGV do redis.call('SET', p .. 'alive:' .. ARGV[i], '1', 'PX', ARGV[4]) end
return ms
"""

# The leader's lease: take it if free, keep it if ours. 1: we lead.
_LEASE = """
local k = ARGV[1] .. 'leader'
if redis.call('SET', k, ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
if redis.call('GET', k) == ARGV[2] then redis.call('PEXPIRE', k, ARGV[3]) return 1 end
return 0
"""

# Remove every node whose last beat is at or before ARGV[2]; return, per node, its id
# and the requests it held (taken, then still queued) for the leader to answer.
_REAP = """
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'nodes', '-inf', ARGV[2])) do
  redis.call('ZREM', p .. 'nodes', id)
  local info = redis.call('GET', p .. 'node:' .. id)
  local announce = redis.call('SREM', p .. 'hosts', id) == 1
  local held = redis.call('LRANGE', p .. 'taken:' .. id, 0, -1)
  for _, e in ipairs(redis.call('LRANGE', p .. 'inbox:' .. id, 0, -1)) do table.insert(held, e) end
  redis.call('DEL', p .. 'node:' .. id, p .. 'taken:' .. id, p .. 'inbox:' .. id)
  for _, name in ipairs(redis.call('SMEMBERS', p .. 'rpcnames:' .. id)) do
    redis.call('ZREM', p .. 'rpc:' .. name, id)
  end
  redis.call('DEL', p .. 'rpcnames:' .. id)
  if announce and info then
    for _, other in ipairs(redis.call('SMEMBERS', p .. 'hosts')) do
      redis.call('LPUSH', p .. 'inbox:' .. other, 'L' .. info)
    end
  end
  table.insert(out, id)
  table.insert(out, held)
end
return out
"""

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

# Answer request ARGV[3] (reply ARGV[4] to list ARGV[2]) and drop its record ARGV[5]
# from this node's taken list; an RPC call (ARGV[6] its name) is one less busy call.
_ANSWER = """
local p = ARGV[1]
redis.call('LPUSH', p .. 'reply:' .. ARGV[2], ARGV[4])
redis.call('PEXPIRE', p .. 'reply:' .. ARGV[2], ARGV[7])
redis.call('LREM', p .. 'taken:' .. ARGV[8], 1, ARGV[5])
redis.call('DEL', p .. 'alive:' .. ARGV[3])
if ARGV[6] ~= '' then redis.call('ZADD', p .. 'rpc:' .. ARGV[6], 'XX', 'INCR', -1, ARGV[8]) end
return 1
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


@dataclass
class Running:
    """A request this node took from its inbox and has not answered yet."""

    envelope: bytes
    reply_to: int
    rpc: str | None = None


Serve = Callable[[str, "str | int", object, int, "float | None"], Any]


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
        self.beat_s, self.lapse_s = beat_s, lapse_s
        self._record, self._announce, self._serve = record, announce, serve
        self._on_left, self._on_beat = on_left, on_beat
        self._id_floor = id_floor
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[str, Attempt] = {}
        self._running: dict[str, Running] = {}
        self.fns: dict[str, Callable[..., Any]] = {}
        self._closed = threading.Event()
        self._woken = threading.Event()
        self._nudged = threading.Event()
        self._local = threading.local()
        self._blocking: list[Any] = []
        self._takers_started = False
        self._beat_script = link.script(_BEAT)
        self._lease = link.script(_LEASE)
        self._reap = link.script(_REAP)
        self._call = link.script(_CALL)
        self._answer_script = link.script(_ANSWER)
        self._running_script = link.script(_RUNNING)
        self._stranded_script = link.script(_STRANDED)
        self.leader = False
        self.redis_ok = True
        self._beat()  # registered before the constructor returns: nodes() sees us at once
        self._threads: list[threading.Thread] = []
        self._start([("beat", self._beat_loop), ("replies", self._reply_loop)])
        if serve is not None or announce:
            self._serving()

    def _start(self, loops: list[tuple[str, Callable[[], None]]]) -> None:
        with self._lock:
            for what, fn in loops:
                thread = threading.Thread(target=fn, name=f"mpmesh-redis-{what}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serving(self) -> None:
        """Start the takers (once): this node serves requests, or RPC calls, or hears of
        departures. A node that only sends runs none."""
        if not self._takers_started:
            self._takers_started = True
            self._start([("taker", self._taker_loop)] * TAKERS)

    # -- the registry ------------------------------------------------------------------------

    def _beat(self) -> None:
        with self._lock:
            alive = list(self._running)
        info = self.link.seal(_codec.dumps(self._record()))
        px = int(self.lapse_s * 2000)
        with self.link.errors("a beat"):
            self._beat_script(args=[self.link.prefix, self.iid, info, px, int(self._announce),
                                    self._id_floor, *alive])

    def nudge(self) -> None:
        """Beat now: what this node stands for changed (a child started)."""
        self._nudged.set()

    def _beat_loop(self) -> None:
        while True:
            self._nudged.wait(self.beat_s)
            self._nudged.clear()
            if self._closed.is_set():
                return
            try:
                self._beat()
                self._lead()
                self.redis_ok = True
                if self._on_beat is not None:
                    self._on_beat()
            except MeshError as exc:
                if self.redis_ok:
                    log.warning("node %d cannot reach Redis: %s", self.iid, exc)
                self.redis_ok = False
            except Exception:  # a bug must not stop the beat: this node would be reaped
                log.exception("node %d: beat failed", self.iid)

    def _lead(self) -> None:
        with self.link.errors("the leader's lease"):
            self.leader = bool(self._lease(args=[self.link.prefix, self.iid, int(self.lapse_s * 1000)]))
        if self.leader:
            self.reap(self.link.now_ms() - int(self.lapse_s * 1000))

    def reap(self, cutoff_ms: int) -> list[int]:
        """Remove the nodes silent since ``cutoff_ms`` (Redis time); answer what they held."""
        with self.link.errors("removing silent nodes"):
            found = self._reap(args=[self.link.prefix, cutoff_ms])
        gone = []
        for i in range(0, len(found), 2):
            iid, held = int(found[i]), found[i + 1]
            gone.append(iid)
            log.info("node %d stopped beating; %d request(s) it held fail", iid, len(held))
            for envelope in held:
                if envelope[:1] in (REQUEST, CALL):
                    rid, reply_to = self._open(envelope)[:2]
                    self._reply(reply_to, rid, False, WorkerLost(f"node {iid} left the mesh"))
        return gone

    # -- requests to other hosts -------------------------------------------------------------

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
        if self._closed.is_set():
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
                if self._closed.is_set():
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
            with self._lock:
                self._blocking.append(redis)  # closed with the node
        return redis

    def _outcome(self, blob: bytes, rid: str) -> Any:
        got, ok, value = self._unseal(blob)
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
        if self._closed.is_set():
            raise MeshClosed("this process left the mesh")
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = Attempt(rid, host, envelope, deadline)
        with self._lock:
            self._waiting[rid] = attempt
        if deadline is not None:
            self._woken.set()  # the reply thread may be blocked past this deadline
        return attempt

    def _forget(self, rid: str) -> Attempt | None:
        with self._lock:
            return self._waiting.pop(rid, None)

    def _reply_loop(self) -> None:
        redis = self.link.blocking(LISTEN_S)
        key = self.link.key("reply", self.iid)
        while not self._closed.is_set():
            self._woken.clear()
            try:
                self._expire()
                item = redis.blpop([key], timeout=self._listen_for())
            except Exception as exc:
                if self._closed.is_set():
                    break
                self._fail_waiting(BrokerUnavailable(f"Redis at {self.link.url} went away: {exc}"))
                self._closed.wait(RETRY_S)
                continue
            if item is not None:
                self._settle(item[1])
        redis.close()

    def _listen_for(self) -> float:
        """How long the reply thread may block: until the nearest deadline, at most LISTEN_S."""
        with self._lock:
            deadlines = [a.deadline for a in self._waiting.values() if a.deadline is not None]
        wait = LISTEN_S if not deadlines else min(LISTEN_S, min(deadlines) - time.monotonic())
        return max(wait, 0.01)

    def _settle(self, blob: bytes) -> None:
        try:
            rid, ok, value = self._unseal(blob)
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
        with self._lock:
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
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for attempt in waiting.values():
            if not attempt.future.done():
                attempt.future.set_exception(exc)

    # -- requests from other hosts -----------------------------------------------------------

    def _taker_loop(self) -> None:
        """Take requests from this node's inbox, one at a time, and answer them. A request
        runs in the taker's own thread: its answer wakes no other thread on the way."""
        redis = self.link.blocking(LISTEN_S)
        inbox, taken = self.link.key("inbox", self.iid), self.link.key("taken", self.iid)
        while not self._closed.is_set():
            try:
                envelope = redis.blmove(inbox, taken, LISTEN_S, "RIGHT", "LEFT")
            except Exception:
                if self._closed.is_set():
                    break
                self._closed.wait(RETRY_S)
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
                self._on_left(self._unseal(envelope[1:]))
            return
        fields = self._open(envelope)
        rid, reply_to = fields[0], fields[1]
        running = Running(envelope, reply_to, fields[2] if kind == CALL else None)
        with self._lock:
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
            with self._lock:
                self._running.pop(rid, None)
        try:
            self._reply(reply_to, rid, ok, value, running=running)
        except MeshError as error:
            log.warning("node %d could not answer request %s: %s", self.iid, rid, error)

    def _run_rpc(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn = self.fns.get(name)
        if fn is None:
            raise NotFound(f"{name!r} is no longer registered in process {os.getpid()}")
        return fn(*args, **kwargs)

    def _reply(self, reply_to: int, rid: str, ok: bool, value: object, *,
               running: Running | None = None) -> None:
        blob = self.link.seal(_outcome(rid, ok, value))
        if len(blob) > MAX_REDIS_VALUE_BYTES:
            blob = self.link.seal(_outcome(rid, False, MessageTooLarge(
                f"the reply is {len(blob):,} bytes; a reply to another host may be at most "
                f"{MAX_REDIS_VALUE_BYTES:,} (what Redis keeps in one value)")))
        envelope = running.envelope if running is not None else b""
        rpc = (running.rpc or "") if running is not None else ""
        with self.link.errors("a reply"):
            self._answer_script(args=[self.link.prefix, reply_to, rid, blob, envelope, rpc,
                                      REPLY_TTL_MS, self.iid])

    # -- RPC registrations -------------------------------------------------------------------

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Serve ``call(name, ...)`` from this process, for callers on every host."""
        self.fns[name] = fn
        self._serving()
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

    # -- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the mesh: this node is removed at once (its departure announced, what it
        still held answered), and its threads end."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._woken.set()
        self._nudged.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(LISTEN_S + self.link.timeout)
        try:
            with self.link.errors("leaving the mesh"):
                self.link.redis.zadd(self.link.key("nodes"), {str(self.iid): 0})
            self.reap(0)
        except MeshError as exc:
            log.info("node %d left without telling Redis (%s); it lapses there", self.iid, exc)
        self._fail_waiting(MeshClosed("this process left the mesh"))
        with self._lock:
            blocking, self._blocking = self._blocking, []
        for redis in blocking:
            redis.close()

    # -- encoding ----------------------------------------------------------------------------

    def _unseal(self, blob: bytes) -> Any:
        return _codec.loads(self.link.unseal(blob))

    def _open(self, envelope: bytes) -> Any:
        return self._unseal(envelope[1:])


def _outcome(rid: str, ok: bool, value: object) -> bytes:
    """A reply's bytes; an exception that cannot be pickled travels as a RemoteError."""
    try:
        return _codec.dumps((rid, ok, value))
    except MeshError as exc:
        if ok:
            value = exc
        return _codec.dumps((rid, False, RemoteError(f"{type(value).__name__}: {value}")))
