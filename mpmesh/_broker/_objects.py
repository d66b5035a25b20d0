"""The Manager's object table: typeids, oid -> object, references per peer, and calls.

Theory of operation
-------------------
Every shared object lives here under an integer ``oid`` (a counter, never ``id()``).
Its *references* are counted by holder, and it is freed when the total reaches zero:

- **peers**: each proxy object in a process is one reference of that process's peer.
  ``create`` counts the creator's; ``incref``/``decref`` (posted by proxies as they are
  rebuilt and collected) count the others. A peer that disconnects loses all of them at
  once (``on_peer_lost``): nothing leaks when a process dies (cf. cpython#103136). The
  locks and semaphore units it holds are released only if it died abnormally (see
  ``on_peer_lost``).
- **graces**: a proxy pickled by one process for another is in transit, counted by
  nobody. Its sender posts ``grace(oid, gid)`` before the bytes leave, on the same
  connection as any later ``decref``; the receiver's ``incref(oid, gid)`` takes the
  grace over, or it expires after ``GRACE_S``. So the sender may drop its proxy at once.
- **internal**: a proxy stored inside another shared object (a dict proxy in a list
  proxy) is unpickled here as a ``ProxyRef``, which holds one reference until it is
  garbage (``ProxyRef.__del__`` queues the oid on ``dead``; drained on the next call).

Calls (``op="call"``, payload ``(oid, method, args, kwargs, thread id)``) take one of
three paths by the object's kind:

    DATA    dict, list, Namespace, Value, Array    obj.method(*args) here, at once
    SYNC    locks, Event, Barrier, Queue (_sync)   obj.call(...) here; may PARK the caller
    CUSTOM  types a user registered                user code: ``Offload`` to a worker thread

The loop never runs user code
-----------------------------
One slow ``__setstate__``, ``__eq__`` or ``__reduce__`` on the loop would stall every
process of the mesh, so the loop runs only what built-in values do. A payload is read
with ``_codec.loads_builtin`` (no globals: nothing of the user's can run). If that works,
and the object holds built-in values only (its ``Lane.user`` is clear), the call runs here
at once: the common case, and the fast one. Otherwise (a *foreign* payload, or an object
that holds user values) it runs on a worker thread (``Offload``), and its object's lane
is *busy* until it is done: later calls on that object wait in the lane and then run in
order, so each object's calls stay atomic and in arrival order while others go on. What
decides which call a foreign payload is, its oid and method, is read off its first bytes
(``_peek``) without unpickling it. On the worker the payload is unpickled, the call runs
and its reply (or exception) is pickled; the lane's ``done`` then, under the core lock,
takes the proxies read (``_Pending.adopt``) and the graces of those pickled (``grant``),
bumps the object's versions and queues the reply in one step. A write that stored a value
that is not plain (``_plain``: built-in values and proxies all through) marks the object
``user``; a later write that leaves it plain again (emptied, say) clears it. A queue's
item that is not plain is pickled on the worker as it is put (a ``Blob``) and sent as
those bytes. A dict's iterator shares its dict's lane. User code of registered types
(factory, methods, a Barrier's action) runs on worker threads with real proxies: their
payloads are unpickled there.

Posted ops (request id 0: ``incref``, ``decref``, ``grace``, ``cancel``) get no answer.
Nothing here does I/O.
"""

from __future__ import annotations

import array
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Op, Reply
from ._actions import WARNING, Action, Notify, Offload, Send
from ._limits import MAX_OBJECTS, MAX_PARKED_PER_PEER, TooMany
from ._natives import DATA, KEYED, KEYED_WRITES, NATIVE, READS, SYNC, Namespace, Value
from ._lockcells import LockCells
from ._versions import VersionTable
from ._refs import (
    AttributeRef, NewRef, ProxyRef, Token, TypeSpec, grants, loading, public_methods, same_address,
)
from ._queues import Queue
from ._sync import Condition, Lock, SharedLock
from ._waiters import PARKED, Effects, ParkingLot, Waiter

__all__ = ["COMPONENT", "CUSTOM", "GRACE_S", "ObjectTable"]

COMPONENT: Final = "objects"
CUSTOM: Final = 3
# How long a pickled proxy that nobody has unpickled yet keeps its object alive. Long
# enough for a token to sit in a queue or a process's start-up; a token never unpickled
# costs its object this long, no more.
GRACE_S: Final = 60.0
# Grace ids the broker issues itself (for proxies it pickles) live above this; clients
# draw theirs at random below it.
BROKER_GIDS: Final = 1 << 62
_VIEWS: Final[tuple[type, ...]] = (type({}.keys()), type({}.values()), type({}.items()))
_FALLBACKS: Final = frozenset({"#GETVALUE", "__repr__", "__str__"})
_loads_builtin: Final = _codec.loads_builtin
# Values whose hash, equality, repr and pickling are the interpreter's or mpmesh's own.
_LEAVES: Final = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, range,
                            type(...), type(NotImplemented), ProxyRef, AttributeRef})
_NESTS: Final = frozenset({tuple, list, dict, set, frozenset, slice})
# How many values ``_plain`` looks at: a call's arguments; what a written object holds.
ARGS_BUDGET: Final = 10_000
HOLDS_BUDGET: Final = 256
_QUEUE_PUTS: Final = frozenset({"put", "put_nowait"})
# How soon a shared Lock whose cell was busy is looked at again (``_lockcells``).
RETRY_S: Final = 0.001


# -- the table ---------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class Lane:
    """The order of calls on one native object while one of them runs off the loop."""

    busy: bool = False   # a call of its object runs on a worker thread
    user: bool = False   # its object may hold values whose methods are user code
    # Calls that came while busy: (peer, rid, args, payload); for a foreign payload,
    # args is the (oid, method) read off it.
    held: deque[tuple[int, int, Any, bytes | None]] = field(default_factory=deque)


@dataclass(eq=False, slots=True)
class Entry:
    oid: int
    typeid: str
    obj: object
    kind: int
    exposed: frozenset[str]
    spec: TypeSpec | None
    total: int = 0   # references of every kind
    makes: dict[str, tuple[str, tuple[str, ...]]] | None = None  # a native's (``NativeType.makes``)
    pure: frozenset[str] | None = None  # methods that only read, if writes bump versions
    keyed: bool = False  # its reads may be covered by one key's slot (a dict, a Namespace)
    lane: Lane | None = None  # a native's (a dict's iterator shares the dict's); None: CUSTOM
    reads: frozenset[str] = frozenset()  # a native's methods that only read


class ObjectTable:
    """The ``objects`` component (``Component`` protocol of ``_core``).

    ``left_cleanly(peer)``: whether a lost peer said Goodbye first (the core's record of
    it; without one, every loss counts as a crash); ``describe(peer)`` names it in the
    warning about what a crashed peer held.
    """

    def __init__(self, *, left_cleanly: Callable[[int], bool] | None = None,
                 describe: Callable[[int], str] | None = None,
                 versions: VersionTable | None = None, cells: LockCells | None = None, pid_of: Callable[[int], int] | None = None) -> None:
        self._left_cleanly = left_cleanly
        self.versions = versions
        # Lock cells in shared memory, and the pid of a peer (who holds a cell's lock).
        self.cells = cells if pid_of is not None else None
        self._pid_of = pid_of or (lambda peer: 0)
        self._retry: set[SharedLock] = set()
        self._describe = describe or (lambda peer: f"peer {peer}")
        self.address: object = None          # set by the host's owner: to know our own tokens
        self.registry: dict[str, TypeSpec] = {}
        self.objects: dict[int, Entry] = {}
        self.refs: dict[int, dict[int, int]] = {}   # peer -> oid -> count
        self.graces: dict[int, int] = {}            # gid -> oid
        self.lot = ParkingLot()
        self.dead: list[int] = []
        self.now = 0.0
        self._sync: dict[int, Entry] = {}
        self._grace_heap: list[tuple[float, int]] = []
        self._alive: set[int] = set()
        self.timers = 0   # deadlines set so far (``Component.timers``)
        self._ids = itertools.count(1)
        self._gids = itertools.count(BROKER_GIDS)
        self._ops: dict[str, Callable[[int, int, Any], list[Action]]] = {
            "call": self._call, "create": self._create, "incref": self._incref,
            "decref": self._decref, "grace": self._grace, "cancel": self._cancel,
            "count": self._count, "debug": self._debug, "drain": self._drained,
            "wake": self._wake,
        }

    # -- Component protocol -----------------------------------------------------------------

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        self.now = now
        if peer not in self._alive:
            self._alive.add(peer)
        handler = self._ops.get(msg.op)
        rid = msg.rid
        if handler is None:
            return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST, f"unknown objects op {msg.op!r}", b""))]
        try:
            args = _loads_builtin(msg.payload)
        except TypeError:  # not built-in values only: read off the loop, if at all
            try:
                actions = self._foreign(peer, msg)
            except Exception as exc:
                return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                           f"bad {msg.op!r} op: {type(exc).__name__}: {exc}", b""))] if rid else []
            return actions + self._drain() if self.dead else actions
        try:
            actions = handler(peer, rid, args)
        except Exception as exc:  # a malformed op from a peer: fail it, keep serving the rest
            return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                       f"bad {msg.op!r} op: {type(exc).__name__}: {exc}", b""))] if rid else []
        if self.dead:
            actions += self._drain()
        return actions

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        """Drop what ``peer`` held. Its locks and semaphore units are released only if it
        died abnormally (its connection closed without a Goodbye: killed, or ended by an
        error), with a warning; one that exited cleanly leaves them held, as the standard
        library does, for another process to release."""
        self.now = now
        self._alive.discard(peer)
        fx = Effects()
        for w in self.lot.of_peer(peer):
            if w.owner is not None:
                w.owner.discard(w, fx)
            self.lot.unpark(w)
        notes: list[Action] = []
        if self._left_cleanly is None or not self._left_cleanly(peer):
            sync: list[Any] = list(self._sync.values())
            released = [e for e in sync if e.obj.drop_peer(peer, fx)]
            if released:
                held = ", ".join(f"{e.typeid} {e.oid}" for e in released)
                notes.append(Notify(WARNING, {"message": (
                    f"{self._describe(peer)} ended abnormally (killed, or exited with an error) "
                    f"while holding Manager {held}: released")}))
        refs = self.refs.pop(peer, None)
        if refs:
            for oid, n in refs.items():
                self._release(oid, n, fx)
        return self._effects(fx) + notes + self._drain()

    def on_idle(self, now: float) -> list[Action]:
        return self._retry_locks(now) if self._retry else []

    def _retry_locks(self, now: float) -> list[Action]:
        self.now = now
        fx = Effects()
        locks, self._retry = self._retry, set()
        for lock in locks:
            lock.grant_next(fx)
        return self._effects(fx)

    def _on_retry(self, lock: SharedLock) -> None:
        if lock not in self._retry:
            self._retry.add(lock)
            self.timers += 1

    def on_tick(self, now: float) -> list[Action]:
        self.now = now
        if self._retry:
            return self._retry_locks(now) + self._tick(now)
        return self._tick(now)

    def _tick(self, now: float) -> list[Action]:
        fx = Effects()
        for w in self.lot.expired(now):
            if w.owner is not None:
                w.owner.expire(w, now, fx)
        heap = self._grace_heap
        while heap and heap[0][0] <= now:
            _, gid = heapq.heappop(heap)
            oid = self.graces.pop(gid, None)
            if oid is not None:
                self._release(oid, 1, fx)
        return self._effects(fx) + self._drain()

    def next_deadline(self) -> float | None:
        soon = self.now + RETRY_S if self._retry else None
        deadline = self._next_deadline()
        return soon if deadline is None else deadline if soon is None else min(soon, deadline)

    def _next_deadline(self) -> float | None:
        heap = self._grace_heap
        while heap and heap[0][1] not in self.graces:
            heapq.heappop(heap)
        parked = self.lot.next_deadline()
        if not heap:
            return parked
        return heap[0][0] if parked is None else min(parked, heap[0][0])

    # -- reading payloads ---------------------------------------------------------------------

    def _foreign(self, peer: int, msg: Op) -> list[Action]:
        """An op whose payload is not built-in values only: a call or a create, routed by
        what ``_peek`` reads off it, then unpickled on a worker thread; any other op fails."""
        rid, payload = msg.rid, msg.payload
        if msg.op == "call":
            head = _peek(payload, call=True)
            if head is not None:
                return self._foreign_call(peer, rid, head[0], head[1], payload)  # type: ignore[arg-type]
        elif msg.op == "create":
            head = _peek(payload, call=False)
            if head is not None:
                return self._foreign_create(peer, rid, head[1], payload)
        elif not rid:
            return []
        else:
            return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                       f"the payload of the {msg.op!r} op must be built-in values", b""))]
        return [Send(peer, Failure(rid, ErrorCode.SERIALIZATION,
                                   f"cannot read this {msg.op!r} payload ({len(payload)} bytes)", b""))]

    # -- answers ------------------------------------------------------------------------------

    @staticmethod
    def _reply(rid: int, value: object) -> Reply | Failure:
        if value is None:  # what every write returns
            return Reply(rid, _NONE)
        if value is True:  # what an acquire returns
            return Reply(rid, _TRUE)
        if type(value) is Blob:
            return value.reply(rid)
        if type(value) in _VIEWS:
            value = list(value)  # type: ignore[call-overload]
        try:
            return Reply(rid, _codec.dumps(value))
        except SerializationError as exc:
            return Failure(rid, ErrorCode.SERIALIZATION, f"the result cannot be sent back: {exc}", b"")

    @staticmethod
    def _failure(rid: int, exc: BaseException, *, keep_traceback: bool = False) -> Failure:
        if isinstance(exc, SerializationError):
            return Failure(rid, ErrorCode.SERIALIZATION, str(exc), b"")
        if not keep_traceback:
            exc.__traceback__ = None  # the broker's own frames are not the caller's business
        payload, text = _codec.pack_exception(exc)
        if payload is None:
            return Failure(rid, ErrorCode.REMOTE_TEXT, text, b"")
        return Failure(rid, ErrorCode.REMOTE, f"{type(exc).__name__}: {exc}", payload)

    def _effects(self, fx: Effects) -> list[Action]:
        actions: list[Action] = []
        for w, value, exc in fx.wakes:
            self.lot.unpark(w)
            if w.rid:
                actions.append(Send(w.peer, self._reply(w.rid, value) if exc is None
                                    else self._failure(w.rid, exc)))
        for job, done in fx.jobs:
            actions.append(Offload(job, self._resume(done)))
        return actions

    def _resume(self, done: Callable[[object, Effects], object]) -> Callable[[object, float], list[Action]]:
        def finish(outcome: object, now: float) -> list[Action]:
            self.now = now
            fx = Effects()
            extra = done(outcome, fx)
            actions = self._effects(fx)
            if isinstance(extra, list):
                actions += extra
            return actions + self._drain()
        return finish

    # -- ops ------------------------------------------------------------------------------------

    def _wake(self, peer: int, rid: int, args: Any) -> list[Action]:
        """A process released a shared Lock that callers wait for here: grant the next."""
        (oid,) = args
        entry = self.objects.get(oid)
        if entry is None or not isinstance(entry.obj, SharedLock):
            return []
        fx = Effects()
        entry.obj.grant_next(fx)
        return self._effects(fx)

    def _drained(self, peer: int, rid: int, args: Any) -> list[Action]:
        """A writer's nudge: the ring filled up (the core emptied it before this op)."""
        return []

    def _call(self, peer: int, rid: int, args: Any) -> list[Action]:
        oid, method, a, kw, tid = args
        entry = self.objects.get(oid)
        if entry is None:
            return [Send(peer, _gone(rid, oid))]
        if method not in entry.exposed and method not in _FALLBACKS:
            return [Send(peer, _not_exposed(rid, entry, method))]
        kind = entry.kind
        if kind == CUSTOM:
            return self._offload_call(peer, rid, entry, method, a, kw)
        lane: Any = entry.lane
        if lane.busy:
            lane.held.append((peer, rid, args, None))
            return []
        if kind == DATA:
            if lane.user:
                return self._offload_data(peer, rid, entry, method, (a, kw), None)
            if method in _FALLBACKS:
                return [Send(peer, self._fallback(rid, entry, method))]
            pure = entry.pure
            try:
                result = getattr(entry.obj, method)(*a, **kw)
            except Exception as exc:
                if pure is not None and method not in pure:
                    self._wrote(entry, method, a)  # it may have changed some before it failed
                return [Send(peer, self._failure(rid, exc))]
            if pure is not None and method not in pure:
                self._wrote(entry, method, a)
            made = entry.makes.get(method) if entry.makes else None
            if made is not None:  # a dict's iterator: a shared object of its own
                typeid, exposed = made
                spec = self.registry.get(typeid)
                if spec is not None and spec.exposed:
                    exposed = spec.exposed
                result = self._new_ref(typeid, spec, result, DATA, exposed, peer, lane)
            return [Send(peer, self._reply(rid, result))]
        return self._sync_call(peer, rid, entry, method, a, kw, tid)

    def _sync_call(self, peer: int, rid: int, entry: Entry, method: str, a: tuple[object, ...],
                   kw: dict[str, object], tid: int) -> list[Action]:
        """A call on a SYNC object, here: answered, or its caller parked."""
        if method in _FALLBACKS:
            return [Send(peer, self._fallback(rid, entry, method))]
        if self.lot.count(peer) >= MAX_PARKED_PER_PEER:
            return [Send(peer, self._failure(rid, TooMany(
                f"too many blocking calls waiting from one process (the limit is {MAX_PARKED_PER_PEER:,})")))]
        w = Waiter(peer, rid, tid)
        fx = Effects()
        try:
            result = entry.obj.call(method, w, a, kw, self.now, fx)  # type: ignore[attr-defined]
        except Exception as exc:
            return self._effects(fx) + [Send(peer, self._failure(rid, exc))]
        if result is PARKED:
            self.lot.park(w)
            self.timers += 1
            return self._effects(fx)
        answer = Send(peer, self._reply(rid, result))
        if not fx.wakes and not fx.jobs:
            return [answer]
        actions = self._effects(fx)
        actions.append(answer)
        return actions

    def _wrote(self, entry: Entry, method: str, a: tuple[object, ...]) -> None:
        """Bump the versions a write of ``method`` touched, before its reply goes out."""
        versions = self.versions
        if versions is None:
            return
        if entry.keyed and a and method in KEYED_WRITES:
            versions.wrote_key(entry.oid, a[0])
        else:
            versions.wrote(entry.oid)

    def _fallback(self, rid: int, entry: Entry, method: str) -> Reply | Failure:
        if method == "__repr__":
            return self._reply(rid, repr(entry.obj))
        if method == "__str__":
            return self._reply(rid, str(entry.obj))
        if entry.kind == SYNC:
            return self._failure(rid, TypeError(f"cannot copy a {entry.typeid} out of its manager"))
        return self._reply(rid, entry.obj)

    # -- off the loop -----------------------------------------------------------------------

    def _offload(self, job: Callable[[], object], done: Callable[[Any], list[Action]]) -> list[Action]:
        """``job()`` on a worker thread, then ``done(outcome)`` here, under the core lock."""
        def finish(outcome: object, now: float) -> list[Action]:
            self.now = now
            return done(outcome) + self._drain()
        return [Offload(job, finish)]

    def _foreign_call(self, peer: int, rid: int, oid: int, method: str, payload: bytes) -> list[Action]:
        """A call whose payload may hold user objects: it is unpickled on a worker thread."""
        entry = self.objects.get(oid)
        if entry is None:
            return [Send(peer, _gone(rid, oid))]
        if method not in entry.exposed and method not in _FALLBACKS:
            return [Send(peer, _not_exposed(rid, entry, method))]
        if entry.kind == CUSTOM:
            return self._offload_call(peer, rid, entry, method, payload=payload)
        lane: Any = entry.lane
        if lane.busy:
            lane.held.append((peer, rid, (oid, method), payload))
            return []
        if entry.kind == DATA:
            return self._offload_data(peer, rid, entry, method, None, payload)
        return self._offload_sync(peer, rid, entry, method, payload)

    def _free_lane(self, lane: Lane) -> list[Action]:
        """Run the calls that waited for ``lane``, in order, until one leaves the loop again."""
        lane.busy = False
        held = lane.held
        actions: list[Action] = []
        while held and not lane.busy:
            peer, rid, args, payload = held.popleft()
            try:
                if payload is None:
                    actions += self._call(peer, rid, args)
                else:
                    actions += self._foreign_call(peer, rid, args[0], args[1], payload)
            except Exception as exc:  # a malformed call: fail it, as ``on_op`` does
                actions.append(Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                                  f"bad 'call' op: {type(exc).__name__}: {exc}", b"")))
        return actions

    def _offload_data(self, peer: int, rid: int, entry: Entry, method: str,
                      call: tuple[tuple[object, ...], dict[str, object]] | None,
                      payload: bytes | None) -> list[Action]:
        """A call on a data object, on a worker thread: its payload (if foreign) is read,
        the method runs and its answer is pickled there. The object's lane stays busy until
        ``done`` has bumped its versions and queued the answer."""
        lane: Any = entry.lane
        lane.busy = True
        obj, oid = entry.obj, entry.oid
        writes = method not in entry.reads and method not in _FALLBACKS
        made = entry.makes.get(method) if entry.makes else None
        pending = None if payload is None else _Pending(self)

        def job() -> object:
            granted: list[tuple[ProxyRef, int]] = []
            token = grants.set(granted)
            a: tuple[object, ...] = ()
            plain = True
            result: object = None
            try:
                if pending is None:
                    a, kw = call  # type: ignore[misc]
                else:
                    _, _, a, kw, _ = _read_call(pending.read(payload), oid, method)  # type: ignore[arg-type]
                    plain = _plain((a, kw), ARGS_BUDGET)
                result = _invoke(obj, method, a, kw)
                answer = None if made is not None else self._reply(rid, result)
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the caller
                answer, result = self._failure(rid, exc), None
            finally:
                grants.reset(token)
            user = lane.user or (writes and not plain)
            if user and writes:
                user = _holds_user(obj)
            return answer, result, a, granted, user

        def done(outcome: Any) -> list[Action]:
            answer, result, a, granted, user = outcome
            if pending is not None:
                pending.adopt()
            self.grant(granted)
            lane.user = user
            if writes and entry.pure is not None:
                self._wrote(entry, method, a)
            if answer is None and made is not None and peer in self._alive:  # a dict's iterator
                typeid, exposed = made
                spec = self.registry.get(typeid)
                if spec is not None and spec.exposed:
                    exposed = spec.exposed
                answer = self._reply(rid, self._new_ref(typeid, spec, result, DATA, exposed, peer, lane))
            actions: list[Action] = [Send(peer, answer)] if answer is not None else []
            return actions + self._free_lane(lane)

        return self._offload(job, done)

    def _offload_sync(self, peer: int, rid: int, entry: Entry, method: str, payload: bytes) -> list[Action]:
        """A call on a SYNC object whose payload is foreign: read on a worker thread (a
        queue's item that is not plain pickled there too), then run here, in lane order."""
        lane: Any = entry.lane
        lane.busy = True
        oid = entry.oid
        pending = _Pending(self)
        puts = method in _QUEUE_PUTS and type(entry.obj) is Queue

        def job() -> object:
            try:
                _, _, a, kw, tid = _read_call(pending.read(payload), oid, method)
                if puts:
                    if a and not _plain(a[0], ARGS_BUDGET):
                        a = (Blob.of(self, a[0]), *a[1:])
                    elif "item" in kw and not _plain(kw["item"], ARGS_BUDGET):
                        kw = {**kw, "item": Blob.of(self, kw["item"])}
                # What the loop will read (a timeout, a count, a flag) must run no user
                # code there, not even a number type's own __float__ or __index__.
                for arg in (*a, *kw.values()):
                    if type(arg) is not Blob and not _plain(arg, ARGS_BUDGET):
                        raise TypeError(f"{method}() takes built-in values (numbers, strings, "
                                        f"None), not {type(arg).__name__}")
                return ("call", a, kw, tid)
            except BaseException as exc:  # noqa: BLE001
                return ("error", self._failure(rid, exc))

        def done(outcome: Any) -> list[Action]:
            pending.adopt()
            actions: list[Action]
            if outcome[0] == "error":
                actions = [Send(peer, outcome[1])]
            elif self.objects.get(oid) is not entry:
                actions = [Send(peer, _gone(rid, oid))]
            else:
                _, a, kw, tid = outcome
                try:
                    actions = self._sync_call(peer, rid, entry, method, a, kw, tid)
                except Exception as exc:
                    actions = [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                                  f"bad 'call' op: {type(exc).__name__}: {exc}", b""))]
            return actions + self._free_lane(lane)

        return self._offload(job, done)

    def _full(self, rid: int) -> list[Failure]:
        """The answer to a create when the table holds as many objects as it may."""
        if len(self.objects) < MAX_OBJECTS:
            return []
        return [self._failure(rid, TooMany(f"too many shared objects (the limit is {MAX_OBJECTS:,})"))]

    def _foreign_create(self, peer: int, rid: int, typeid: str, payload: bytes) -> list[Action]:
        """A create whose payload may hold user objects: read on a worker thread, where a
        data object is also made; a parking one is made here, once it is read."""
        full = self._full(rid)
        if full:
            return [Send(peer, full[0])]
        spec = self.registry.get(typeid)
        native = spec.native if spec is not None else (typeid if typeid in NATIVE else None)
        if native is None:
            if spec is None:
                return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                           f"no typeid {typeid!r} is registered with this manager", b""))]
            return self._create_custom(peer, rid, typeid, spec, (), {}, payload)
        data = NATIVE[native].kind == DATA
        # A Barrier's action runs on worker threads: it gets real proxies, as a registered
        # type's code does; anything else here keeps ``ProxyRef``s (a Condition's lock).
        pending = None if native == "Barrier" else _Pending(self)

        def job() -> object:
            try:
                _, a, kw = _read_create(_codec.loads(payload) if pending is None else pending.read(payload),
                                        typeid)
            except BaseException as exc:  # noqa: BLE001
                return ("error", self._failure(rid, exc) if isinstance(exc, SerializationError)
                        else _create_failed(rid, exc))
            if not data:
                return ("args", a, kw)
            try:
                obj = NATIVE[native].make(*a, **kw)
            except BaseException as exc:  # noqa: BLE001
                return ("error", _create_failed(rid, exc))
            return ("object", obj, not _plain((a, kw), ARGS_BUDGET) and _holds_user(obj))

        def done(outcome: Any) -> list[Action]:
            if pending is not None:
                pending.adopt()
            if outcome[0] == "error":
                return [Send(peer, outcome[1])]
            if peer not in self._alive:
                return []
            if outcome[0] == "object":
                return self._add_native(peer, rid, typeid, spec, native, outcome[1], outcome[2])
            try:
                obj = self._make_native(native, outcome[1], outcome[2])
            except Exception as exc:
                return [Send(peer, _create_failed(rid, exc))]
            return self._add_native(peer, rid, typeid, spec, native, obj, False)

        return self._offload(job, done)

    def _offload_call(self, peer: int, rid: int, entry: Entry, method: str,
                      a: tuple[object, ...] = (), kw: dict[str, object] | None = None,
                      payload: bytes | None = None) -> list[Action]:
        """A registered type's method, on a worker thread; a foreign ``payload`` is read
        there too, its proxies real ones of this process."""
        obj, oid = entry.obj, entry.oid
        if self.versions is not None:
            # Which of a user's methods only read is unknown, and its object may change
            # by itself: every call moves its version, so no process serves it a copy.
            self.versions.wrote(oid)
        spec = entry.spec
        target = spec.method_to_typeid.get(method) if spec and spec.method_to_typeid else None
        target_spec = self.registry.get(target) if target else None

        def job() -> object:
            try:
                if payload is None:
                    args, kwargs = a, kw or {}
                else:
                    _, _, args, kwargs, _ = _read_call(_codec.loads(payload), oid, method)
                result = _invoke(obj, method, args, kwargs)
                if target is not None:
                    if target_spec is not None and target_spec.callable is not None:
                        result = target_spec.callable(result)  # as the stdlib's create() does
                    return ("object", result, _exposed_of(target_spec, result))
                return ("value", _codec.dumps(result))
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the caller
                return ("error", self._failure(rid, exc, keep_traceback=True))

        def done(outcome: Any, fx: Effects) -> list[Action]:
            if outcome[0] == "error":
                return [Send(peer, outcome[1])]
            if outcome[0] == "value":
                return [Send(peer, Reply(rid, outcome[1]))]
            _, result, exposed = outcome
            if peer not in self._alive:
                return []
            ref = self._new_ref(str(target), target_spec, result, CUSTOM, exposed, peer)
            return [Send(peer, self._reply(rid, ref))]

        fx = Effects()
        fx.offload(job, done)
        return self._effects(fx)

    def _create(self, peer: int, rid: int, args: Any) -> list[Action]:
        typeid, a, kw = args
        full = self._full(rid)
        if full:
            return [Send(peer, full[0])]
        spec = self.registry.get(typeid)
        native = spec.native if spec is not None else (typeid if typeid in NATIVE else None)
        if native is not None:
            try:
                obj = self._make_native(native, a, kw)
            except Exception as exc:
                return [Send(peer, _create_failed(rid, exc))]
            return self._add_native(peer, rid, typeid, spec, native, obj, False)
        if spec is None:
            return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                       f"no typeid {typeid!r} is registered with this manager", b""))]
        return self._create_custom(peer, rid, typeid, spec, a, kw, None)

    def _add_native(self, peer: int, rid: int, typeid: str, spec: TypeSpec | None, native: str,
                    obj: object, user: bool) -> list[Action]:
        ntype = NATIVE[native]
        exposed = spec.exposed if spec is not None and spec.exposed else ntype.exposed
        entry = self._add(typeid, obj, ntype.kind, exposed, spec, peer, ntype.makes or None)
        entry.reads = READS.get(native, frozenset())
        if native == "Lock" and self.cells is not None:
            cell = self.cells.allocate(entry.oid)
            if cell >= 0:
                entry.obj = SharedLock(self.cells, cell, self._pid_of, self._on_retry)
        if user:
            entry.lane.user = True  # type: ignore[union-attr]
        if self.versions is not None:
            entry.pure = READS.get(native)
            entry.keyed = native in KEYED
        return [Send(peer, self._reply(rid, (entry.oid, tuple(exposed))))]

    def _create_custom(self, peer: int, rid: int, typeid: str, spec: TypeSpec, a: tuple[object, ...],
                       kw: dict[str, object], payload: bytes | None) -> list[Action]:
        """A registered type's object, made on a worker thread (a foreign ``payload`` is
        read there, with real proxies)."""
        if payload is None and spec.callable is None:
            if kw or len(a) != 1:
                return [Send(peer, _create_failed(rid, ValueError(
                    "Without callable, must have one non-keyword argument")))]
        factory = spec.callable

        def job() -> object:
            try:
                if payload is None:
                    args, kwargs = a, kw
                else:
                    try:
                        _, args, kwargs = _read_create(_codec.loads(payload), typeid)
                    except SerializationError as exc:
                        return ("error", Failure(rid, ErrorCode.SERIALIZATION, str(exc), b""))
                    if factory is None and (kwargs or len(args) != 1):
                        raise ValueError("Without callable, must have one non-keyword argument")
                obj = args[0] if factory is None else factory(*args, **kwargs)
                return ("object", obj, _exposed_of(spec, obj))
            except BaseException as exc:  # noqa: BLE001
                return ("error", _create_failed(rid, exc))

        def done(outcome: Any, fx: Effects) -> list[Action]:
            if outcome[0] == "error":
                return [Send(peer, outcome[1])]
            _, obj, exposed = outcome
            if peer not in self._alive:
                return []
            entry = self._add(typeid, obj, CUSTOM, exposed, spec, peer)
            return [Send(peer, self._reply(rid, (entry.oid, tuple(exposed))))]

        fx = Effects()
        fx.offload(job, done)
        return self._effects(fx)

    def _make_native(self, native: str, a: tuple[object, ...], kw: dict[str, object]) -> object:
        if native != "Condition":
            return NATIVE[native].make(*a, **kw)
        lock = a[0] if a else kw.pop("lock", None)
        if len(a) > 1 or kw:
            raise TypeError("Condition() takes at most one argument (lock)")
        if lock is None:
            return Condition()
        entry = self.objects.get(lock.token.id) if isinstance(lock, ProxyRef) and lock.counted else None
        if entry is None or not isinstance(entry.obj, Lock):
            raise TypeError("a Manager's Condition takes a Lock or RLock of the same manager")
        if isinstance(entry.obj, SharedLock):
            entry.obj.to_broker()
        return Condition(entry.obj, keep=lock)

    def _add(self, typeid: str, obj: object, kind: int, exposed: tuple[str, ...] | frozenset[str],
             spec: TypeSpec | None, peer: int,
             makes: dict[str, tuple[str, tuple[str, ...]]] | None = None,
             lane: Lane | None = None) -> Entry:
        oid = next(self._ids)
        entry = Entry(oid, typeid, obj, kind, frozenset(exposed), spec, 1, makes,
                      lane=lane if lane is not None or kind == CUSTOM else Lane())
        self.objects[oid] = entry
        if kind == SYNC:
            self._sync[oid] = entry
        refs = self.refs.get(peer)
        if refs is None:
            refs = self.refs[peer] = {}
        refs[oid] = refs.get(oid, 0) + 1
        return entry

    def _new_ref(self, typeid: str, spec: TypeSpec | None, obj: object, kind: int,
                 exposed: tuple[str, ...], peer: int, lane: Lane | None = None) -> NewRef:
        """Share ``obj``, made by a method ``peer`` called, as ``typeid``; the reference is
        ``peer``'s. Without a registered proxy type the receiver builds an AutoProxy.
        ``lane``: the lane of the object ``obj`` reads (a dict's, for its iterator)."""
        new = self._add(typeid, obj, kind, exposed, spec, peer, lane=lane)
        return NewRef(spec.proxytype if spec is not None else None, Token(typeid, self.address, new.oid),
                      tuple(exposed))

    def _incref(self, peer: int, rid: int, args: Any) -> list[Action]:
        oid, gid = args
        entry = self.objects.get(oid)
        if entry is None:
            if not rid:
                return []
            return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND, f"shared object {oid} does not exist (any more)", b""))]
        refs = self.refs.get(peer)
        if refs is None:
            refs = self.refs[peer] = {}
        refs[oid] = refs.get(oid, 0) + 1
        entry.total += 1
        if gid and gid in self.graces:
            self._take_grace(gid)
        return [Send(peer, Reply(rid, _NONE))] if rid else []

    def _decref(self, peer: int, rid: int, args: Any) -> list[Action]:
        refs = self.refs.get(peer, {})
        fx = Effects()
        for oid in args:
            count = refs.get(oid, 0)
            if count <= 0:
                continue
            if count == 1:
                del refs[oid]
            else:
                refs[oid] = count - 1
            self._release(oid, 1, fx)
        actions = self._effects(fx)
        if rid:
            actions.append(Send(peer, Reply(rid, _NONE)))
        return actions

    def _grace(self, peer: int, rid: int, args: Any) -> list[Action]:
        oid, gid = args
        entry = self.objects.get(oid)
        if entry is not None and gid not in self.graces:
            self.graces[gid] = oid
            entry.total += 1
            heapq.heappush(self._grace_heap, (self.now + GRACE_S, gid))
            self.timers += 1
        return [Send(peer, Reply(rid, _NONE))] if rid else []

    def _cancel(self, peer: int, rid: int, args: Any) -> list[Action]:
        w = self.lot.get(peer, args)
        if w is not None:
            fx = Effects()
            if w.owner is not None:
                w.owner.discard(w, fx)
            self.lot.unpark(w)
            return self._effects(fx)
        return []

    def _count(self, peer: int, rid: int, args: Any) -> list[Action]:
        return [Send(peer, self._reply(rid, len(self.objects)))]

    def _debug(self, peer: int, rid: int, args: Any) -> list[Action]:
        rows = [(oid, e.total, e.obj) for oid, e in sorted(self.objects.items())]

        def text() -> str:
            return "\n".join(f"  {oid}:       refcount={total}\n    {_shown(obj)[:75]}" for oid, total, obj in rows)

        if not any(e.kind == CUSTOM or e.lane.user for e in self.objects.values()):  # type: ignore[union-attr]
            return [Send(peer, self._reply(rid, text()))]
        return self._offload(lambda: self._reply(rid, text()), lambda answer: [Send(peer, answer)])

    # -- references ----------------------------------------------------------------------------

    def issue_grace(self, oid: int, gid: int = 0) -> int:
        """A grace for a proxy the broker pickles (called from ``ProxyRef.__reduce__``);
        ``gid``: one drawn before (``next_gid``)."""
        entry = self.objects.get(oid)
        if entry is None:
            return 0
        gid = gid or next(self._gids)
        self.graces[gid] = oid
        entry.total += 1
        heapq.heappush(self._grace_heap, (self.now + GRACE_S, gid))
        self.timers += 1
        return gid

    def next_gid(self) -> int:
        """A grace id for a proxy pickled on a worker thread (``next`` of a count: atomic)."""
        return next(self._gids)

    def grant(self, granted: list[tuple[ProxyRef, int]]) -> None:
        """Register the graces of proxies pickled on a worker thread (``_refs.grants``)."""
        for ref, gid in granted:
            if ref.counted:
                self.issue_grace(ref.token.id, gid)

    def _take_grace(self, gid: int) -> None:
        oid = self.graces.pop(gid)
        entry = self.objects.get(oid)
        if entry is not None:
            entry.total -= 1  # the caller just added the reference that replaces it

    def _release(self, oid: int, n: int, fx: Effects) -> None:
        entry = self.objects.get(oid)
        if entry is None:
            return
        entry.total -= n
        if entry.total <= 0:
            del self.objects[oid]
            if self._sync.pop(oid, None) is not None:
                entry.obj.close(fx)  # type: ignore[attr-defined]
            entry.obj = None  # ProxyRefs it held queue their oids on ``dead`` now

    def _drain(self) -> list[Action]:
        fx = Effects()
        while self.dead:
            self._release(self.dead.pop(), 1, fx)
        return self._effects(fx)


_NONE: Final = _codec.dumps(None)
_TRUE: Final = _codec.dumps(True)


def _create_failed(rid: int, exc: BaseException) -> Failure:
    """A failed create is a RemoteError carrying the traceback text, as in the stdlib."""
    _, text = _codec.pack_exception(exc)
    return Failure(rid, ErrorCode.REMOTE_TEXT, "\n" + "-" * 75 + "\n" + text + "-" * 75, b"")


def _exposed_of(spec: TypeSpec | None, obj: object) -> tuple[str, ...]:
    exposed = spec.exposed if spec is not None and spec.exposed else public_methods(obj)
    if spec is not None and spec.method_to_typeid:
        exposed = tuple(exposed) + tuple(m for m in spec.method_to_typeid if m not in exposed)
    return tuple(exposed)


def _gone(rid: int, oid: int) -> Failure:
    return Failure(rid, ErrorCode.NOT_FOUND, f"shared object {oid} does not exist (any more)", b"")


def _not_exposed(rid: int, entry: Entry, method: str) -> Failure:
    # A RemoteError (with this text) in the caller, as in the standard library.
    return Failure(rid, ErrorCode.REMOTE_TEXT,
                   f"AttributeError: method {method!r} of {type(entry.obj)!r} object "
                   f"is not in exposed={tuple(sorted(entry.exposed))!r}", b"")


def _shown(obj: object) -> str:
    try:
        return str(obj)
    except Exception as exc:
        return f"<str() failed: {type(exc).__name__}>"


# -- payloads that are not built-in values only ----------------------------------------------

def _peek(payload: bytes, *, call: bool) -> tuple[int | None, str] | None:
    """``(oid, method)`` of a pickled call, or ``(None, typeid)`` of a create, read off the
    first bytes of ``payload`` as pickle lays a tuple out (protocol 4 or 5: a frame, a mark
    for a call's five items, an int, a str), without unpickling it; None if laid out otherwise.
    Whatever it reads is checked against the whole payload once that is unpickled."""
    try:
        if payload[0] != 0x80 or payload[1] not in (4, 5):  # PROTO
            return None
        pos = 11 if payload[2] == 0x95 else 2  # FRAME and its 8-byte length
        oid = None
        if call:
            if payload[pos] != 0x28:  # MARK
                return None
            oid, pos = _peek_int(payload, pos + 1)
            if oid is None:
                return None
        name = _peek_str(payload, pos)
    except IndexError:
        return None
    return None if name is None else (oid, name)


def _peek_int(data: bytes, pos: int) -> tuple[int | None, int]:
    op = data[pos]
    if op == 0x4B:  # BININT1
        return data[pos + 1], pos + 2
    if op == 0x4D:  # BININT2
        return int.from_bytes(data[pos + 1:pos + 3], "little"), pos + 3
    if op == 0x4A:  # BININT
        return int.from_bytes(data[pos + 1:pos + 5], "little", signed=True), pos + 5
    if op == 0x8A:  # LONG1
        n = data[pos + 1]
        return int.from_bytes(data[pos + 2:pos + 2 + n], "little", signed=True), pos + 2 + n
    return None, pos


def _peek_str(data: bytes, pos: int) -> str | None:
    op = data[pos]
    if op == 0x8C:  # SHORT_BINUNICODE
        n, pos = data[pos + 1], pos + 2
    elif op == 0x58:  # BINUNICODE
        n, pos = int.from_bytes(data[pos + 1:pos + 5], "little"), pos + 5
    elif op == 0x8D:  # BINUNICODE8
        n, pos = int.from_bytes(data[pos + 1:pos + 9], "little"), pos + 9
    else:
        return None
    try:
        return bytes(data[pos:pos + n]).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def _read_call(call: object, oid: int, method: str) -> tuple[Any, ...]:
    """A call unpickled on a worker thread, if it is the one ``_peek`` read."""
    if (type(call) is not tuple or len(call) != 5 or type(call[0]) is not int or call[0] != oid
            or type(call[1]) is not str or call[1] != method):
        raise SerializationError("the call's payload is not the call its first bytes name")
    return call


def _read_create(create: object, typeid: str) -> tuple[Any, ...]:
    """A create unpickled on a worker thread, if it is the one ``_peek`` read."""
    if type(create) is not tuple or len(create) != 3 or type(create[0]) is not str or create[0] != typeid:
        raise SerializationError("the create's payload is not the create its first bytes name")
    return create


def _invoke(obj: object, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    """Call ``method`` of ``obj`` (or a fallback every object has: a copy, its repr or str)."""
    if method == "#GETVALUE":
        return obj
    if method == "__repr__":
        return repr(obj)
    if method == "__str__":
        return str(obj)
    return getattr(obj, method)(*args, **kwargs)


def _plain(value: object, budget: int) -> bool:
    """Whether ``value`` is built-in values and proxies all through, so that its hash,
    equality, repr and pickling run no user code (only ``budget`` values are looked at:
    past that, it counts as not plain)."""
    seen: set[int] = set()
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        for v in stack[-1]:
            budget -= 1
            if budget < 0:
                return False
            t = type(v)
            if t in _LEAVES:
                continue
            if t not in _NESTS:
                return False
            if id(v) in seen:  # shared, or a cycle
                continue
            seen.add(id(v))
            if t is dict:
                stack.append(itertools.chain.from_iterable(v.items()))
            elif t is slice:
                stack.append(iter((v.start, v.stop, v.step)))
            else:
                stack.append(iter(v))
            break
        else:
            stack.pop()
    return True


def _holds_user(obj: object) -> bool:
    """Whether a native data object may hold a value that is not plain."""
    t = type(obj)
    if t is array.array:
        return False
    if t is Namespace:
        return not _plain(vars(obj), HOLDS_BUDGET)
    if t is Value:
        return not _plain(obj.get(), HOLDS_BUDGET)  # type: ignore[attr-defined]
    return not _plain(obj, HOLDS_BUDGET)


class _Pending:
    """Reads a payload on a worker thread. Its proxies become ``ProxyRef``s owned by this
    reader until ``adopt`` (under the core lock) counts their references in the table:
    one dropped before that counts nothing."""

    __slots__ = ("table", "refs", "dead")

    def __init__(self, table: ObjectTable) -> None:
        self.table = table
        self.refs: list[tuple[ProxyRef, int]] = []
        self.dead: list[int] = []  # what a ProxyRef dropped before ``adopt`` reports to

    def read(self, payload: bytes) -> object:
        token = loading.set(self)
        try:
            return _codec.loads(payload)
        finally:
            loading.reset(token)

    def ref_from_pickle(self, factory: object, token: Token, exposed: tuple[str, ...] | None,
                        gid: int) -> ProxyRef:
        ref = ProxyRef(self, factory, token, exposed, same_address(token.address, self.table.address))
        self.refs.append((ref, gid))
        return ref

    def next_gid(self) -> int:
        return self.table.next_gid()

    def issue_grace(self, oid: int, gid: int = 0) -> int:
        return 0  # pickled outside ``grants`` before ``adopt``: no grace to give

    def adopt(self) -> None:
        """Count the references the proxies read hold, taking over their graces."""
        table = self.table
        for ref, gid in self.refs:
            ref.table = table
            if not ref.counted:
                continue
            entry = table.objects.get(ref.token.id)
            if entry is None:  # a dead object's proxy: kept as a plain token
                ref.counted = False
                continue
            entry.total += 1
            if gid in table.graces:
                table._take_grace(gid)
        self.refs.clear()


class Blob:
    """A queue's item that is not plain, pickled on the worker thread that read it: sent as
    these bytes, never pickled on the loop. Its proxies' graces are registered as it leaves
    (``reply``), however long it waited; ``keep`` holds their objects until then."""

    __slots__ = ("table", "data", "keep", "granted")

    def __init__(self, table: ObjectTable, data: bytes, keep: object,
                 granted: list[tuple[ProxyRef, int]]) -> None:
        self.table, self.data, self.keep, self.granted = table, data, keep, granted

    @classmethod
    def of(cls, table: ObjectTable, item: object) -> Blob:
        """``item`` pickled (on a worker thread); SerializationError if it cannot be."""
        granted: list[tuple[ProxyRef, int]] = []
        token = grants.set(granted)
        try:
            data = _codec.dumps(item)
        finally:
            grants.reset(token)
        return cls(table, data, item, granted)

    def reply(self, rid: int) -> Reply:
        granted, self.granted = self.granted, []
        self.table.grant(granted)
        return Reply(rid, self.data)
