"""The object table's records: one ``Entry`` per shared object, and the ``Lane`` that
orders the calls on a native object while one of them runs off the loop."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ._refs import TypeSpec

__all__ = ["Entry", "Lane"]


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
