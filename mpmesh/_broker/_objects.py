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
(``_plain.peek``) without unpickling it. On the worker the payload is unpickled, the call runs
and its reply (or exception) is pickled; the lane's ``done`` then, under the core lock,
takes the proxies read (``Pending.adopt``) and the graces of those pickled (``grant``),
bumps the object's versions and queues the reply in one step. A write that stored a value
that is not plain (``_plain.plain``: built-in values and proxies all through) marks the object
``user``; a later write that leaves it plain again (emptied, say) clears it. A queue's
item that is not plain is pickled on the worker as it is put (a ``Blob``) and sent as
those bytes. A dict's iterator shares its dict's lane. User code of registered types
(factory, methods, a Barrier's action) runs on worker threads with real proxies: their
payloads are unpickled there.

This module is the table and the calls that run on the loop; what leaves it is
``_offload``'s (``OffLoop``), what the loop may read of a payload and the readers and
writers on worker threads are ``_plain``'s, and the answers are built by ``_answers``.

Posted ops (request id 0: ``incref``, ``decref``, ``grace``, ``cancel``) get no answer.
Nothing here does I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, Final

from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Op, Reply
from ._actions import WARNING, Action, Notify, Offload, Send
from ._answers import FALLBACKS, PICKLED_NONE, create_failed, gone, not_exposed, to_failure, to_reply
from ._entries import Entry, Lane
from ._limits import MAX_OBJECTS, MAX_PARKED_PER_PEER, TooMany
from ._lockcells import LockCells
from ._natives import CUSTOM, DATA, KEYED, KEYED_WRITES, NATIVE, READS, SYNC
from ._offload import OffLoop
from ._refs import NewRef, ProxyRef, Token, TypeSpec
from ._sync import Condition, Lock, SharedLock
from ._versions import VersionTable
from ._waiters import PARKED, Effects, ParkingLot, Waiter

__all__ = ["BROKER_GIDS", "COMPONENT", "GRACE_S", "Entry", "Lane", "ObjectTable"]

COMPONENT: Final = "objects"
# How long a pickled proxy that nobody has unpickled yet keeps its object alive. Long
# enough for a token to sit in a queue or a process's start-up; a token never unpickled
# costs its object this long, no more.
GRACE_S: Final = 60.0
# Grace ids the broker issues itself (for proxies it pickles) live above this; clients
# draw theirs at random below it.
BROKER_GIDS: Final = 1 << 62
_loads_builtin: Final = _codec.loads_builtin
# How soon a shared Lock whose cell was busy is looked at again (``_lockcells``).
RETRY_S: Final = 0.001


# -- the table ---------------------------------------------------------------------------

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
        self.alive: set[int] = set()  # peers still connected (a late off-loop answer to one gone is dropped)
        self.timers = 0   # deadlines set so far (``Component.timers``)
        self._ids = itertools.count(1)
        self._gids = itertools.count(BROKER_GIDS)
        self._ops: dict[str, Callable[[int, int, Any], list[Action]]] = {
            "call": self.call, "create": self._create, "incref": self._incref,
            "decref": self._decref, "grace": self._grace, "cancel": self._cancel,
            "count": self._count, "debug": self._debug, "drain": self._drained,
            "wake": self._wake,
        }
        self.off = OffLoop(self)  # the calls and creates that leave the loop

    # -- Component protocol -----------------------------------------------------------------

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        self.now = now
        if peer not in self.alive:
            self.alive.add(peer)
        handler = self._ops.get(msg.op)
        rid = msg.rid
        if handler is None:
            return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST, f"unknown objects op {msg.op!r}", b""))]
        try:
            args = _loads_builtin(msg.payload)
        except TypeError:  # not built-in values only: read off the loop, if at all
            try:
                actions = self.off.foreign(peer, msg)
            except Exception as exc:
                return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                           f"bad {msg.op!r} op: {type(exc).__name__}: {exc}", b""))] if rid else []
            return actions + self.drain() if self.dead else actions
        try:
            actions = handler(peer, rid, args)
        except Exception as exc:  # a malformed op from a peer: fail it, keep serving the rest
            return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                       f"bad {msg.op!r} op: {type(exc).__name__}: {exc}", b""))] if rid else []
        if self.dead:
            actions += self.drain()
        return actions

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        """Drop what ``peer`` held. Its locks and semaphore units are released only if it
        died abnormally (its connection closed without a Goodbye: killed, or ended by an
        error), with a warning; one that exited cleanly leaves them held, as the standard
        library does, for another process to release."""
        self.now = now
        self.alive.discard(peer)
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
        return self.effects(fx) + notes + self.drain()

    def on_idle(self, now: float) -> list[Action]:
        return self._retry_locks(now) if self._retry else []

    def _retry_locks(self, now: float) -> list[Action]:
        self.now = now
        fx = Effects()
        locks, self._retry = self._retry, set()
        for lock in locks:
            lock.grant_next(fx)
        return self.effects(fx)

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
        return self.effects(fx) + self.drain()

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

    def effects(self, fx: Effects) -> list[Action]:
        """The answers to the waiters ``fx`` woke, and the jobs it sent off the loop."""
        actions: list[Action] = []
        for w, value, exc in fx.wakes:
            self.lot.unpark(w)
            if w.rid:
                actions.append(Send(w.peer, to_reply(w.rid, value) if exc is None
                                    else to_failure(w.rid, exc)))
        for job, done in fx.jobs:
            actions.append(Offload(job, self._resume(done)))
        return actions

    def _resume(self, done: Callable[[object, Effects], object]) -> Callable[[object, float], list[Action]]:
        def finish(outcome: object, now: float) -> list[Action]:
            self.now = now
            fx = Effects()
            extra = done(outcome, fx)
            actions = self.effects(fx)
            if isinstance(extra, list):
                actions += extra
            return actions + self.drain()
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
        return self.effects(fx)

    def _drained(self, peer: int, rid: int, args: Any) -> list[Action]:
        """A writer's nudge: the ring filled up (the core emptied it before this op)."""
        return []

    def call(self, peer: int, rid: int, args: Any) -> list[Action]:
        """The ``call`` op: run here at once if it can be, else off the loop or parked."""
        oid, method, a, kw, tid = args
        entry = self.objects.get(oid)
        if entry is None:
            return [Send(peer, gone(rid, oid))]
        if method not in entry.exposed and method not in FALLBACKS:
            return [Send(peer, not_exposed(rid, entry, method))]
        kind = entry.kind
        if kind == CUSTOM:
            return self.off.custom_call(peer, rid, entry, method, a, kw)
        lane: Any = entry.lane
        if lane.busy:
            lane.held.append((peer, rid, args, None))
            return []
        if kind == DATA:
            if lane.user:
                return self.off.data_call(peer, rid, entry, method, (a, kw), None)
            if method in FALLBACKS:
                return [Send(peer, self._fallback(rid, entry, method))]
            pure = entry.pure
            try:
                result = getattr(entry.obj, method)(*a, **kw)
            except Exception as exc:
                if pure is not None and method not in pure:
                    self.wrote(entry, method, a)  # it may have changed some before it failed
                return [Send(peer, to_failure(rid, exc))]
            if pure is not None and method not in pure:
                self.wrote(entry, method, a)
            made = entry.makes.get(method) if entry.makes else None
            if made is not None:  # a dict's iterator: a shared object of its own
                typeid, exposed = made
                spec = self.registry.get(typeid)
                if spec is not None and spec.exposed:
                    exposed = spec.exposed
                result = self.new_ref(typeid, spec, result, DATA, exposed, peer, lane)
            return [Send(peer, to_reply(rid, result))]
        return self.sync_call(peer, rid, entry, method, a, kw, tid)

    def sync_call(self, peer: int, rid: int, entry: Entry, method: str, a: tuple[object, ...],
                  kw: dict[str, object], tid: int) -> list[Action]:
        """A call on a SYNC object, here: answered, or its caller parked."""
        if method in FALLBACKS:
            return [Send(peer, self._fallback(rid, entry, method))]
        if self.lot.count(peer) >= MAX_PARKED_PER_PEER:
            return [Send(peer, to_failure(rid, TooMany(
                f"too many blocking calls waiting from one process (the limit is {MAX_PARKED_PER_PEER:,})")))]
        w = Waiter(peer, rid, tid)
        fx = Effects()
        try:
            result = entry.obj.call(method, w, a, kw, self.now, fx)  # type: ignore[attr-defined]
        except Exception as exc:
            return self.effects(fx) + [Send(peer, to_failure(rid, exc))]
        if result is PARKED:
            self.lot.park(w)
            self.timers += 1
            return self.effects(fx)
        answer = Send(peer, to_reply(rid, result))
        if not fx.wakes and not fx.jobs:
            return [answer]
        actions = self.effects(fx)
        actions.append(answer)
        return actions

    def wrote(self, entry: Entry, method: str, a: tuple[object, ...]) -> None:
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
            return to_reply(rid, repr(entry.obj))
        if method == "__str__":
            return to_reply(rid, str(entry.obj))
        if entry.kind == SYNC:
            return to_failure(rid, TypeError(f"cannot copy a {entry.typeid} out of its manager"))
        return to_reply(rid, entry.obj)

    def full(self, rid: int) -> list[Failure]:
        """The answer to a create when the table holds as many objects as it may."""
        if len(self.objects) < MAX_OBJECTS:
            return []
        return [to_failure(rid, TooMany(f"too many shared objects (the limit is {MAX_OBJECTS:,})"))]

    def _create(self, peer: int, rid: int, args: Any) -> list[Action]:
        typeid, a, kw = args
        full = self.full(rid)
        if full:
            return [Send(peer, full[0])]
        spec = self.registry.get(typeid)
        native = spec.native if spec is not None else (typeid if typeid in NATIVE else None)
        if native is not None:
            try:
                obj = self.make_native(native, a, kw)
            except Exception as exc:
                return [Send(peer, create_failed(rid, exc))]
            return self.add_native(peer, rid, typeid, spec, native, obj, False)
        if spec is None:
            return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                       f"no typeid {typeid!r} is registered with this manager", b""))]
        return self.off.custom_create(peer, rid, typeid, spec, a, kw, None)

    def add_native(self, peer: int, rid: int, typeid: str, spec: TypeSpec | None, native: str,
                   obj: object, user: bool) -> list[Action]:
        """Share the native ``obj`` just made for ``peer`` (``user``: it may hold user values)."""
        ntype = NATIVE[native]
        exposed = spec.exposed if spec is not None and spec.exposed else ntype.exposed
        entry = self.add(typeid, obj, ntype.kind, exposed, spec, peer, ntype.makes or None)
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
        return [Send(peer, to_reply(rid, (entry.oid, tuple(exposed))))]

    def make_native(self, native: str, a: tuple[object, ...], kw: dict[str, object]) -> object:
        """A new native object (a Condition over a Lock of this table takes that lock)."""
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

    def add(self, typeid: str, obj: object, kind: int, exposed: tuple[str, ...] | frozenset[str],
            spec: TypeSpec | None, peer: int,
            makes: dict[str, tuple[str, tuple[str, ...]]] | None = None,
            lane: Lane | None = None) -> Entry:
        """Put ``obj`` in the table under a new oid, with one reference of ``peer``'s."""
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

    def new_ref(self, typeid: str, spec: TypeSpec | None, obj: object, kind: int,
                exposed: tuple[str, ...], peer: int, lane: Lane | None = None) -> NewRef:
        """Share ``obj``, made by a method ``peer`` called, as ``typeid``; the reference is
        ``peer``'s. Without a registered proxy type the receiver builds an AutoProxy.
        ``lane``: the lane of the object ``obj`` reads (a dict's, for its iterator)."""
        new = self.add(typeid, obj, kind, exposed, spec, peer, lane=lane)
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
            self.take_grace(gid)
        return [Send(peer, Reply(rid, PICKLED_NONE))] if rid else []

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
        actions = self.effects(fx)
        if rid:
            actions.append(Send(peer, Reply(rid, PICKLED_NONE)))
        return actions

    def _grace(self, peer: int, rid: int, args: Any) -> list[Action]:
        oid, gid = args
        entry = self.objects.get(oid)
        if entry is not None and gid not in self.graces:
            self.graces[gid] = oid
            entry.total += 1
            heapq.heappush(self._grace_heap, (self.now + GRACE_S, gid))
            self.timers += 1
        return [Send(peer, Reply(rid, PICKLED_NONE))] if rid else []

    def _cancel(self, peer: int, rid: int, args: Any) -> list[Action]:
        w = self.lot.get(peer, args)
        if w is not None:
            fx = Effects()
            if w.owner is not None:
                w.owner.discard(w, fx)
            self.lot.unpark(w)
            return self.effects(fx)
        return []

    def _count(self, peer: int, rid: int, args: Any) -> list[Action]:
        return [Send(peer, to_reply(rid, len(self.objects)))]

    def _debug(self, peer: int, rid: int, args: Any) -> list[Action]:
        rows = [(oid, e.total, e.obj) for oid, e in sorted(self.objects.items())]

        def text() -> str:
            return "\n".join(f"  {oid}:       refcount={total}\n    {_shown(obj)[:75]}" for oid, total, obj in rows)

        if not any(e.kind == CUSTOM or e.lane.user for e in self.objects.values()):  # type: ignore[union-attr]
            return [Send(peer, to_reply(rid, text()))]
        return self.off.offload(lambda: to_reply(rid, text()), lambda answer: [Send(peer, answer)])

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

    def take_grace(self, gid: int) -> None:
        """A reference just counted replaces grace ``gid``."""
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

    def drain(self) -> list[Action]:
        """Release the references of the ``ProxyRef``s that became garbage (``dead``)."""
        fx = Effects()
        while self.dead:
            self._release(self.dead.pop(), 1, fx)
        return self.effects(fx)


def _shown(obj: object) -> str:
    try:
        return str(obj)
    except Exception as exc:
        return f"<str() failed: {type(exc).__name__}>"
