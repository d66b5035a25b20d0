"""Payloads and values that may hold user objects, and the loop that must not run user code.

The loop may read of them only what runs no user code: a pickled call's head (``peek``:
its oid and method, or a create's typeid, read off its first bytes), and whether a value
is built-in values and proxies all through (``plain``). What is not plain is read and
written on worker threads: ``Pending`` unpickles a payload there, its proxies counted by
the table once it adopts them; ``Blob`` is a queue's item pickled there.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterator
from typing import Any, Final, Protocol

from .._errors import SerializationError
from .._wire import _codec
from .._wire._messages import Reply
from ._entries import Entry
from ._natives import Namespace, Value
from ._refs import AttributeRef, ProxyRef, RefOwner, Token, grants, loading, same_address


__all__ = [
    "ARGS_BUDGET", "HOLDS_BUDGET", "Blob", "Pending", "holds_user", "peek", "plain", "read_call",
    "read_create",
]

# Values whose hash, equality, repr and pickling are the interpreter's or mpmesh's own.
_LEAVES: Final = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, range,
                            type(...), type(NotImplemented), ProxyRef, AttributeRef})
_NESTS: Final = frozenset({tuple, list, dict, set, frozenset, slice})
# How many values ``plain`` looks at: a call's arguments; what a written object holds.
ARGS_BUDGET: Final = 10_000
HOLDS_BUDGET: Final = 256


def peek(payload: bytes, *, call: bool) -> tuple[int | None, str] | None:
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


def read_call(call: object, oid: int, method: str) -> tuple[Any, ...]:
    """A call unpickled on a worker thread, if it is the one ``peek`` read."""
    if (type(call) is not tuple or len(call) != 5 or type(call[0]) is not int or call[0] != oid
            or type(call[1]) is not str or call[1] != method):
        raise SerializationError("the call's payload is not the call its first bytes name")
    return call


def read_create(create: object, typeid: str) -> tuple[Any, ...]:
    """A create unpickled on a worker thread, if it is the one ``peek`` read."""
    if type(create) is not tuple or len(create) != 3 or type(create[0]) is not str or create[0] != typeid:
        raise SerializationError("the create's payload is not the create its first bytes name")
    return create


def plain(value: object, budget: int) -> bool:
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


def holds_user(obj: object) -> bool:
    """Whether a native data object may hold a value that is not plain."""
    t = type(obj)
    if t is array.array:
        return False
    if t is Namespace:
        return not plain(vars(obj), HOLDS_BUDGET)
    if t is Value:
        return not plain(obj.get(), HOLDS_BUDGET)  # type: ignore[attr-defined]
    return not plain(obj, HOLDS_BUDGET)


class Grants(RefOwner, Protocol):
    """What reading and sending pickled values uses of the object table: its address (to
    know its own tokens), its objects, and the graces of proxies pickled off the loop."""

    address: object
    objects: dict[int, Entry]
    graces: dict[int, int]

    def grant(self, granted: list[tuple[ProxyRef, int]]) -> None: ...

    def take_grace(self, gid: int) -> None: ...


class Pending:
    """Reads a payload on a worker thread. Its proxies become ``ProxyRef``s owned by this
    reader until ``adopt`` (under the core lock) counts their references in the table:
    one dropped before that counts nothing."""

    __slots__ = ("table", "refs", "dead")

    def __init__(self, table: Grants) -> None:
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
                table.take_grace(gid)
        self.refs.clear()


class Blob:
    """A queue's item that is not plain, pickled on the worker thread that read it: sent as
    these bytes, never pickled on the loop. Its proxies' graces are registered as it leaves
    (``reply``), however long it waited; ``keep`` holds their objects until then."""

    __slots__ = ("table", "data", "keep", "granted")

    def __init__(self, table: Grants, data: bytes, keep: object,
                 granted: list[tuple[ProxyRef, int]]) -> None:
        self.table, self.data, self.keep, self.granted = table, data, keep, granted

    @classmethod
    def of(cls, table: Grants, item: object) -> Blob:
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
