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

User code (a registered type's factory and methods, a Barrier's action) runs on a worker
thread. What it is handed is read here, where proxies are ``ProxyRef``s; if the payload
carried any, it gets a ``WorkerSide`` copy instead, rebuilt there with real proxies.

Posted ops (request id 0: ``incref``, ``decref``, ``grace``, ``cancel``) get no answer.
Nothing here does I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Op, Reply
from ._actions import WARNING, Action, Notify, Offload, Send
from ._natives import DATA, KEYED, KEYED_WRITES, NATIVE, READS, SYNC
from ._versions import VersionTable
from ._refs import NewRef, ProxyRef, Token, TypeSpec, WorkerSide, loading, public_methods, same_address
from ._sync import Barrier, Condition, Lock
from ._waiters import PARKED, Effects, ParkingLot, Waiter

__all__ = ["COMPONENT", "CUSTOM", "GRACE_S", "ObjectTable"]

T = TypeVar("T")

COMPONENT: Final = "objects"
CUSTOM: Final = 3
# How long a pickled proxy that nobody has unpickled yet keeps its object alive. Long
# enough for a token to sit in a queue or a process's start-up; a token never unpickled
# costs its object this long, no more.
GRACE_S: Final = 60.0
# Grace ids the broker issues itself (for proxies it pickles) live above this; clients
# draw theirs at random below it.
BROKER_GIDS: Final = 1 << 62
_MARK: Final = b"rebuild_ref"  # in a payload only if it carries a pickled proxy
_VIEWS: Final[tuple[type, ...]] = (type({}.keys()), type({}.values()), type({}.items()))
_FALLBACKS: Final = frozenset({"#GETVALUE", "__repr__", "__str__"})


# -- the table ---------------------------------------------------------------------------

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


class ObjectTable:
    """The ``objects`` component (``Component`` protocol of ``_core``).

    ``left_cleanly(peer)``: whether a lost peer said Goodbye first (the core's record of
    it; without one, every loss counts as a crash); ``describe(peer)`` names it in the
    warning about what a crashed peer held.
    """

    def __init__(self, *, left_cleanly: Callable[[int], bool] | None = None,
                 describe: Callable[[int], str] | None = None,
                 versions: VersionTable | None = None) -> None:
        self._left_cleanly = left_cleanly
        self.versions = versions
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
        self._with_refs = False   # the payload being handled carries pickled proxies
        self.timers = 0   # deadlines set so far (``Component.timers``)
        self._ids = itertools.count(1)
        self._gids = itertools.count(BROKER_GIDS)
        self._ops: dict[str, Callable[[int, int, Any], list[Action]]] = {
            "call": self._call, "create": self._create, "incref": self._incref,
            "decref": self._decref, "grace": self._grace, "cancel": self._cancel,
            "count": self._count, "debug": self._debug,
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
            args = self._load(msg.payload)
        except SerializationError as exc:
            return [Send(peer, Failure(rid, ErrorCode.SERIALIZATION, str(exc), b""))] if rid else []
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

    def on_tick(self, now: float) -> list[Action]:
        self.now = now
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
        heap = self._grace_heap
        while heap and heap[0][1] not in self.graces:
            heapq.heappop(heap)
        parked = self.lot.next_deadline()
        if not heap:
            return parked
        return heap[0][0] if parked is None else min(parked, heap[0][0])

    # -- reading payloads ---------------------------------------------------------------------

    def _load(self, payload: bytes) -> Any:
        self._with_refs = _MARK in payload
        if not self._with_refs:
            return _codec.loads(payload)
        token = loading.set(self)
        try:
            return _codec.loads(payload)
        finally:
            loading.reset(token)

    def ref_from_pickle(self, factory: object, token: Token, exposed: tuple[str, ...] | None,
                        gid: int) -> ProxyRef:
        entry = self.objects.get(token.id) if same_address(token.address, self.address) else None
        if entry is None:  # another manager's proxy (or a dead one): kept as a plain token
            return ProxyRef(self, factory, token, exposed, False)
        entry.total += 1
        if gid in self.graces:
            self._take_grace(gid)
        return ProxyRef(self, factory, token, exposed, True)

    # -- answers ------------------------------------------------------------------------------

    @staticmethod
    def _reply(rid: int, value: object) -> Reply | Failure:
        if value is None:  # what every write returns
            return Reply(rid, _NONE)
        if value is True:  # what an acquire returns
            return Reply(rid, _TRUE)
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

    def _call(self, peer: int, rid: int, args: Any) -> list[Action]:
        oid, method, a, kw, tid = args
        entry = self.objects.get(oid)
        if entry is None:
            return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                       f"shared object {oid} does not exist (any more)", b""))]
        if method not in entry.exposed and method not in _FALLBACKS:
            # A RemoteError (with this text) in the caller, as in the standard library.
            return [Send(peer, Failure(rid, ErrorCode.REMOTE_TEXT,
                                       f"AttributeError: method {method!r} of {type(entry.obj)!r} object "
                                       f"is not in exposed={tuple(sorted(entry.exposed))!r}", b""))]
        kind = entry.kind
        if kind == CUSTOM:
            return self._offload_call(peer, rid, entry, method, a, kw)
        if method in _FALLBACKS:
            return [Send(peer, self._fallback(rid, entry, method))]
        if kind == DATA:
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
                result = self._new_ref(typeid, spec, result, DATA, exposed, peer)
            return [Send(peer, self._reply(rid, result))]
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

    def _offload_call(self, peer: int, rid: int, entry: Entry, method: str,
                      a: tuple[object, ...], kw: dict[str, object]) -> list[Action]:
        obj = entry.obj
        spec = entry.spec
        target = spec.method_to_typeid.get(method) if spec and spec.method_to_typeid else None
        target_spec = self.registry.get(target) if target else None
        call = self._for_worker((a, kw))

        def job() -> object:
            try:
                args, kwargs = call()
                if method == "#GETVALUE":
                    result = obj
                elif method == "__repr__":
                    result = repr(obj)
                elif method == "__str__":
                    result = str(obj)
                else:
                    result = getattr(obj, method)(*args, **kwargs)
                if target is not None:
                    if target_spec is not None and target_spec.callable is not None:
                        result = target_spec.callable(result)  # as the stdlib's create() does
                    return ("object", result, _exposed_of(target_spec, result))
                return ("value", _codec.dumps(result))
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the caller
                return ("error", exc)

        def done(outcome: Any, fx: Effects) -> list[Action]:
            if outcome[0] == "error":
                return [Send(peer, self._failure(rid, outcome[1], keep_traceback=True))]
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
        spec = self.registry.get(typeid)
        native = spec.native if spec is not None else (typeid if typeid in NATIVE else None)
        if native is not None:
            ntype = NATIVE[native]
            try:
                obj = self._make_native(native, a, kw)
            except Exception as exc:
                return [Send(peer, _create_failed(rid, exc))]
            exposed = spec.exposed if spec is not None and spec.exposed else ntype.exposed
            entry = self._add(typeid, obj, ntype.kind, exposed, spec, peer, ntype.makes or None)
            if self.versions is not None:
                entry.pure = READS.get(native)
                entry.keyed = native in KEYED
            return [Send(peer, self._reply(rid, (entry.oid, tuple(exposed))))]
        if spec is None:
            return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                       f"no typeid {typeid!r} is registered with this manager", b""))]
        if spec.callable is None:
            if kw or len(a) != 1:
                return [Send(peer, _create_failed(rid, ValueError(
                    "Without callable, must have one non-keyword argument")))]
        call = self._for_worker((a, kw))
        factory = spec.callable

        def job() -> object:
            try:
                args, kwargs = call()
                obj = args[0] if factory is None else factory(*args, **kwargs)
                return ("object", obj, _exposed_of(spec, obj))
            except BaseException as exc:  # noqa: BLE001
                return ("error", exc)

        def done(outcome: Any, fx: Effects) -> list[Action]:
            if outcome[0] == "error":
                return [Send(peer, _create_failed(rid, outcome[1]))]
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
            obj = NATIVE[native].make(*a, **kw)
            if isinstance(obj, Barrier) and obj.action is not None and self._with_refs:
                obj.action = WorkerSide(obj.action)  # user code: real proxies on its worker thread
            return obj
        lock = a[0] if a else kw.pop("lock", None)
        if len(a) > 1 or kw:
            raise TypeError("Condition() takes at most one argument (lock)")
        if lock is None:
            return Condition()
        entry = self.objects.get(lock.token.id) if isinstance(lock, ProxyRef) and lock.counted else None
        if entry is None or not isinstance(entry.obj, Lock):
            raise TypeError("a Manager's Condition takes a Lock or RLock of the same manager")
        return Condition(entry.obj, keep=lock)

    def _add(self, typeid: str, obj: object, kind: int, exposed: tuple[str, ...] | frozenset[str],
             spec: TypeSpec | None, peer: int,
             makes: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> Entry:
        oid = next(self._ids)
        entry = Entry(oid, typeid, obj, kind, frozenset(exposed), spec, 1, makes)
        self.objects[oid] = entry
        if kind == SYNC:
            self._sync[oid] = entry
        refs = self.refs.get(peer)
        if refs is None:
            refs = self.refs[peer] = {}
        refs[oid] = refs.get(oid, 0) + 1
        return entry

    def _new_ref(self, typeid: str, spec: TypeSpec | None, obj: object, kind: int,
                 exposed: tuple[str, ...], peer: int) -> NewRef:
        """Share ``obj``, made by a method ``peer`` called, as ``typeid``; the reference is
        ``peer``'s. Without a registered proxy type the receiver builds an AutoProxy."""
        new = self._add(typeid, obj, kind, exposed, spec, peer)
        return NewRef(spec.proxytype if spec is not None else None, Token(typeid, self.address, new.oid),
                      tuple(exposed))

    def _for_worker(self, value: T) -> Callable[[], T]:
        """How user code on a worker thread gets ``value``, read from the payload being
        handled: as it is, or rebuilt there if the payload carried proxies."""
        return WorkerSide(value).get if self._with_refs else (lambda: value)

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
        lines = [f"  {oid}:       refcount={e.total}\n    {str(e.obj)[:75]}"
                 for oid, e in sorted(self.objects.items())]
        return [Send(peer, self._reply(rid, "\n".join(lines)))]

    # -- references ----------------------------------------------------------------------------

    def issue_grace(self, oid: int) -> int:
        """A grace for a proxy the broker pickles (called from ``ProxyRef.__reduce__``)."""
        entry = self.objects.get(oid)
        if entry is None:
            return 0
        gid = next(self._gids)
        self.graces[gid] = oid
        entry.total += 1
        heapq.heappush(self._grace_heap, (self.now + GRACE_S, gid))
        self.timers += 1
        return gid

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
