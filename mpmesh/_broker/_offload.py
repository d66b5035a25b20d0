"""The object table's calls that leave the loop: user code, and payloads that may hold it.

The loop never runs user code (see ``_objects``): a call on an object that may hold user
values, a payload that is not built-in values only, and everything of a registered type
(its factory, its methods) run on a worker thread (``Offload``). While one does, its
object's lane is busy: later calls on that object wait in the lane, then run in order
(``_free_lane``), so each object's calls stay atomic and in arrival order. Each job's
``done`` runs back under the core lock and changes the table there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Op, Reply
from ._actions import Action, Offload, Send
from ._answers import FALLBACKS, create_failed, exposed_of, gone, not_exposed, to_failure, to_reply
from ._entries import Entry, Lane
from ._natives import CUSTOM, DATA, NATIVE
from ._plain import ARGS_BUDGET, Blob, Grants, Pending, holds_user, peek, plain, read_call, read_create
from ._queues import Queue
from ._refs import NewRef, ProxyRef, TypeSpec, grants
from ._versions import VersionTable
from ._waiters import Effects

__all__ = ["OffLoop"]

_QUEUE_PUTS: Final = frozenset({"put", "put_nowait"})


class Table(Grants, Protocol):
    """What the off-loop half uses of the object table (``_objects.ObjectTable``)."""

    now: float
    registry: dict[str, TypeSpec]
    versions: VersionTable | None
    alive: set[int]

    def call(self, peer: int, rid: int, args: Any) -> list[Action]: ...

    def sync_call(self, peer: int, rid: int, entry: Entry, method: str, a: tuple[object, ...],
                  kw: dict[str, object], tid: int) -> list[Action]: ...

    def wrote(self, entry: Entry, method: str, a: tuple[object, ...]) -> None: ...

    def full(self, rid: int) -> list[Failure]: ...

    def make_native(self, native: str, a: tuple[object, ...], kw: dict[str, object]) -> object: ...

    def add_native(self, peer: int, rid: int, typeid: str, spec: TypeSpec | None, native: str,
                   obj: object, user: bool) -> list[Action]: ...

    def add(self, typeid: str, obj: object, kind: int, exposed: tuple[str, ...] | frozenset[str],
            spec: TypeSpec | None, peer: int,
            makes: dict[str, tuple[str, tuple[str, ...]]] | None = None,
            lane: Lane | None = None) -> Entry: ...

    def new_ref(self, typeid: str, spec: TypeSpec | None, obj: object, kind: int,
                exposed: tuple[str, ...], peer: int, lane: Lane | None = None) -> NewRef: ...

    def effects(self, fx: Effects) -> list[Action]: ...

    def drain(self) -> list[Action]: ...


class OffLoop:
    """Runs the table's calls and creates that may run user code on worker threads, and
    the calls that waited for them; every method returns the actions to perform."""

    __slots__ = ("table",)

    def __init__(self, table: Table) -> None:
        self.table = table

    def foreign(self, peer: int, msg: Op) -> list[Action]:
        """An op whose payload is not built-in values only: a call or a create, routed by
        what ``peek`` reads off it, then unpickled on a worker thread; any other op fails."""
        rid, payload = msg.rid, msg.payload
        if msg.op == "call":
            head = peek(payload, call=True)
            if head is not None:
                return self._foreign_call(peer, rid, head[0], head[1], payload)  # type: ignore[arg-type]
        elif msg.op == "create":
            head = peek(payload, call=False)
            if head is not None:
                return self._foreign_create(peer, rid, head[1], payload)
        elif not rid:
            return []
        else:
            return [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                       f"the payload of the {msg.op!r} op must be built-in values", b""))]
        return [Send(peer, Failure(rid, ErrorCode.SERIALIZATION,
                                   f"cannot read this {msg.op!r} payload ({len(payload)} bytes)", b""))]

    def offload(self, job: Callable[[], object], done: Callable[[Any], list[Action]]) -> list[Action]:
        """``job()`` on a worker thread, then ``done(outcome)`` here, under the core lock."""
        table = self.table

        def finish(outcome: object, now: float) -> list[Action]:
            table.now = now
            return done(outcome) + table.drain()
        return [Offload(job, finish)]

    def _foreign_call(self, peer: int, rid: int, oid: int, method: str, payload: bytes) -> list[Action]:
        """A call whose payload may hold user objects: it is unpickled on a worker thread."""
        table = self.table
        entry = table.objects.get(oid)
        if entry is None:
            return [Send(peer, gone(rid, oid))]
        if method not in entry.exposed and method not in FALLBACKS:
            return [Send(peer, not_exposed(rid, entry, method))]
        if entry.kind == CUSTOM:
            return self.custom_call(peer, rid, entry, method, payload=payload)
        lane: Any = entry.lane
        if lane.busy:
            lane.held.append((peer, rid, (oid, method), payload))
            return []
        if entry.kind == DATA:
            return self.data_call(peer, rid, entry, method, None, payload)
        return self._sync_payload(peer, rid, entry, method, payload)

    def _free_lane(self, lane: Lane) -> list[Action]:
        """Run the calls that waited for ``lane``, in order, until one leaves the loop again."""
        table = self.table
        lane.busy = False
        held = lane.held
        actions: list[Action] = []
        while held and not lane.busy:
            peer, rid, args, payload = held.popleft()
            try:
                if payload is None:
                    actions += table.call(peer, rid, args)
                else:
                    actions += self._foreign_call(peer, rid, args[0], args[1], payload)
            except Exception as exc:  # a malformed call: fail it, as ``on_op`` does
                actions.append(Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                                  f"bad 'call' op: {type(exc).__name__}: {exc}", b"")))
        return actions

    def data_call(self, peer: int, rid: int, entry: Entry, method: str,
                  call: tuple[tuple[object, ...], dict[str, object]] | None,
                  payload: bytes | None) -> list[Action]:
        """A call on a data object, on a worker thread: its payload (if foreign) is read,
        the method runs and its answer is pickled there. The object's lane stays busy until
        ``done`` has bumped its versions and queued the answer."""
        table = self.table
        lane: Any = entry.lane
        lane.busy = True
        obj, oid = entry.obj, entry.oid
        writes = method not in entry.reads and method not in FALLBACKS
        made = entry.makes.get(method) if entry.makes else None
        pending = None if payload is None else Pending(table)

        def job() -> object:
            granted: list[tuple[ProxyRef, int]] = []
            token = grants.set(granted)
            a: tuple[object, ...] = ()
            is_plain = True
            result: object = None
            try:
                if pending is None:
                    a, kw = call  # type: ignore[misc]
                else:
                    _, _, a, kw, _ = read_call(pending.read(payload), oid, method)  # type: ignore[arg-type]
                    is_plain = plain((a, kw), ARGS_BUDGET)
                result = invoke(obj, method, a, kw)
                answer = None if made is not None else to_reply(rid, result)
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the caller
                answer, result = to_failure(rid, exc), None
            finally:
                grants.reset(token)
            user = lane.user or (writes and not is_plain)
            if user and writes:
                user = holds_user(obj)
            return answer, result, a, granted, user

        def done(outcome: Any) -> list[Action]:
            answer, result, a, granted, user = outcome
            if pending is not None:
                pending.adopt()
            table.grant(granted)
            lane.user = user
            if writes and entry.pure is not None:
                table.wrote(entry, method, a)
            if answer is None and made is not None and peer in table.alive:  # a dict's iterator
                typeid, exposed = made
                spec = table.registry.get(typeid)
                if spec is not None and spec.exposed:
                    exposed = spec.exposed
                answer = to_reply(rid, table.new_ref(typeid, spec, result, DATA, exposed, peer, lane))
            actions: list[Action] = [Send(peer, answer)] if answer is not None else []
            return actions + self._free_lane(lane)

        return self.offload(job, done)

    def _sync_payload(self, peer: int, rid: int, entry: Entry, method: str, payload: bytes) -> list[Action]:
        """A call on a SYNC object whose payload is foreign: read on a worker thread (a
        queue's item that is not plain pickled there too), then run here, in lane order."""
        table = self.table
        lane: Any = entry.lane
        lane.busy = True
        oid = entry.oid
        pending = Pending(table)
        puts = method in _QUEUE_PUTS and type(entry.obj) is Queue

        def job() -> object:
            try:
                _, _, a, kw, tid = read_call(pending.read(payload), oid, method)
                if puts:
                    if a and not plain(a[0], ARGS_BUDGET):
                        a = (Blob.of(table, a[0]), *a[1:])
                    elif "item" in kw and not plain(kw["item"], ARGS_BUDGET):
                        kw = {**kw, "item": Blob.of(table, kw["item"])}
                # What the loop will read (a timeout, a count, a flag) must run no user
                # code there, not even a number type's own __float__ or __index__.
                for arg in (*a, *kw.values()):
                    if type(arg) is not Blob and not plain(arg, ARGS_BUDGET):
                        raise TypeError(f"{method}() takes built-in values (numbers, strings, "
                                        f"None), not {type(arg).__name__}")
                return ("call", a, kw, tid)
            except BaseException as exc:  # noqa: BLE001
                return ("error", to_failure(rid, exc))

        def done(outcome: Any) -> list[Action]:
            pending.adopt()
            actions: list[Action]
            if outcome[0] == "error":
                actions = [Send(peer, outcome[1])]
            elif table.objects.get(oid) is not entry:
                actions = [Send(peer, gone(rid, oid))]
            else:
                _, a, kw, tid = outcome
                try:
                    actions = table.sync_call(peer, rid, entry, method, a, kw, tid)
                except Exception as exc:
                    actions = [Send(peer, Failure(rid, ErrorCode.BAD_REQUEST,
                                                  f"bad 'call' op: {type(exc).__name__}: {exc}", b""))]
            return actions + self._free_lane(lane)

        return self.offload(job, done)

    def _foreign_create(self, peer: int, rid: int, typeid: str, payload: bytes) -> list[Action]:
        """A create whose payload may hold user objects: read on a worker thread, where a
        data object is also made; a parking one is made here, once it is read."""
        table = self.table
        full = table.full(rid)
        if full:
            return [Send(peer, full[0])]
        spec = table.registry.get(typeid)
        native = spec.native if spec is not None else (typeid if typeid in NATIVE else None)
        if native is None:
            if spec is None:
                return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                           f"no typeid {typeid!r} is registered with this manager", b""))]
            return self.custom_create(peer, rid, typeid, spec, (), {}, payload)
        data = NATIVE[native].kind == DATA
        # A Barrier's action runs on worker threads: it gets real proxies, as a registered
        # type's code does; anything else here keeps ``ProxyRef``s (a Condition's lock).
        pending = None if native == "Barrier" else Pending(table)

        def job() -> object:
            try:
                _, a, kw = read_create(_codec.loads(payload) if pending is None else pending.read(payload),
                                        typeid)
            except BaseException as exc:  # noqa: BLE001
                return ("error", to_failure(rid, exc) if isinstance(exc, SerializationError)
                        else create_failed(rid, exc))
            if not data:
                return ("args", a, kw)
            try:
                obj = NATIVE[native].make(*a, **kw)
            except BaseException as exc:  # noqa: BLE001
                return ("error", create_failed(rid, exc))
            return ("object", obj, not plain((a, kw), ARGS_BUDGET) and holds_user(obj))

        def done(outcome: Any) -> list[Action]:
            if pending is not None:
                pending.adopt()
            if outcome[0] == "error":
                return [Send(peer, outcome[1])]
            if peer not in table.alive:
                return []
            if outcome[0] == "object":
                return table.add_native(peer, rid, typeid, spec, native, outcome[1], outcome[2])
            try:
                obj = table.make_native(native, outcome[1], outcome[2])
            except Exception as exc:
                return [Send(peer, create_failed(rid, exc))]
            return table.add_native(peer, rid, typeid, spec, native, obj, False)

        return self.offload(job, done)

    def custom_call(self, peer: int, rid: int, entry: Entry, method: str,
                    a: tuple[object, ...] = (), kw: dict[str, object] | None = None,
                    payload: bytes | None = None) -> list[Action]:
        """A registered type's method, on a worker thread; a foreign ``payload`` is read
        there too, its proxies real ones of this process."""
        table = self.table
        obj, oid = entry.obj, entry.oid
        if table.versions is not None:
            # Which of a user's methods only read is unknown, and its object may change
            # by itself: every call moves its version, so no process serves it a copy.
            table.versions.wrote(oid)
        spec = entry.spec
        target = spec.method_to_typeid.get(method) if spec and spec.method_to_typeid else None
        target_spec = table.registry.get(target) if target else None

        def job() -> object:
            try:
                if payload is None:
                    args, kwargs = a, kw or {}
                else:
                    _, _, args, kwargs, _ = read_call(_codec.loads(payload), oid, method)
                result = invoke(obj, method, args, kwargs)
                if target is not None:
                    if target_spec is not None and target_spec.callable is not None:
                        result = target_spec.callable(result)  # as the stdlib's create() does
                    return ("object", result, exposed_of(target_spec, result))
                return ("value", _codec.dumps(result))
            except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the caller
                return ("error", to_failure(rid, exc, keep_traceback=True))

        def done(outcome: Any, fx: Effects) -> list[Action]:
            if outcome[0] == "error":
                return [Send(peer, outcome[1])]
            if outcome[0] == "value":
                return [Send(peer, Reply(rid, outcome[1]))]
            _, result, exposed = outcome
            if peer not in table.alive:
                return []
            ref = table.new_ref(str(target), target_spec, result, CUSTOM, exposed, peer)
            return [Send(peer, to_reply(rid, ref))]

        fx = Effects()
        fx.offload(job, done)
        return table.effects(fx)

    def custom_create(self, peer: int, rid: int, typeid: str, spec: TypeSpec, a: tuple[object, ...],
                      kw: dict[str, object], payload: bytes | None) -> list[Action]:
        """A registered type's object, made on a worker thread (a foreign ``payload`` is
        read there, with real proxies)."""
        table = self.table
        if payload is None and spec.callable is None:
            if kw or len(a) != 1:
                return [Send(peer, create_failed(rid, ValueError(
                    "Without callable, must have one non-keyword argument")))]
        factory = spec.callable

        def job() -> object:
            try:
                if payload is None:
                    args, kwargs = a, kw
                else:
                    try:
                        _, args, kwargs = read_create(_codec.loads(payload), typeid)
                    except SerializationError as exc:
                        return ("error", Failure(rid, ErrorCode.SERIALIZATION, str(exc), b""))
                    if factory is None and (kwargs or len(args) != 1):
                        raise ValueError("Without callable, must have one non-keyword argument")
                obj = args[0] if factory is None else factory(*args, **kwargs)
                return ("object", obj, exposed_of(spec, obj))
            except BaseException as exc:  # noqa: BLE001
                return ("error", create_failed(rid, exc))

        def done(outcome: Any, fx: Effects) -> list[Action]:
            if outcome[0] == "error":
                return [Send(peer, outcome[1])]
            _, obj, exposed = outcome
            if peer not in table.alive:
                return []
            entry = table.add(typeid, obj, CUSTOM, exposed, spec, peer)
            return [Send(peer, to_reply(rid, (entry.oid, tuple(exposed))))]

        fx = Effects()
        fx.offload(job, done)
        return table.effects(fx)


def invoke(obj: object, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    """Call ``method`` of ``obj`` (or a fallback every object has: a copy, its repr or str)."""
    if method == "#GETVALUE":
        return obj
    if method == "__repr__":
        return repr(obj)
    if method == "__str__":
        return str(obj)
    return getattr(obj, method)(*args, **kwargs)
