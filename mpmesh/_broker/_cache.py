"""Named caches held by the broker: per-item TTL, LRU eviction, counters, compare-and-swap.

Values stay the pickled bytes their writer sent: ``get`` answers with those bytes as they
are, so the broker never unpickles what it only stores. It does read keys, TTLs and
the operands of ``incr``/``cas``, through ``_payload.safe_loads`` (built-in types only).

Each cache is a ``cachetools.TLRUCache`` whose clock is the broker's ``now`` (handed to
every call), whose per-item expiry is the entry's own, and whose eviction is
least-recently-used (reads count as uses). It is bounded by entries (``maxsize``) and
optionally by the total bytes of its values (``maxbytes``). ``incr``, ``decr`` and
``cas`` keep an entry's expiry: a counter with a TTL keeps counting down.

Fenced writes (``fenced_set``, ``fenced_delete``, ``fenced_cas``) carry a lock grant
``(lock name, token)``; they go through only while that grant is the lock's current one
(see ``_locks``), else fail with ``FencedError``.

Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import cachetools

from .._errors import FencedError
from .._wire import _codec
from .._wire._messages import ErrorCode, Failure, Op
from ._actions import Action, Send
from ._limits import MAX_CACHES, check
from ._payload import fail, reply, safe_loads, split, value_reply
from ._versions import VersionTable, cache_ident

__all__ = ["CacheStore", "Entry", "SWEEP_INTERVAL_S"]

# Expired entries are also removed lazily on access; this sweep bounds how long an
# expired entry nobody touches keeps its memory. Shorter: more wake-ups of an idle broker.
SWEEP_INTERVAL_S: Final = 1.0
# Bytes an entry costs besides its value, for ``maxbytes`` accounting (key, bookkeeping).
ENTRY_OVERHEAD_BYTES: Final = 64
NUMBERS: Final = (int, float)
NONE_BYTES: Final = _codec.dumps(None)

Fence = Callable[[str, int, float], bool]


@dataclass(slots=True)
class Entry:
    data: bytes
    expires: float
    used: float = 0.0  # when the broker last read it (for LRU that counts local hits)


def _ttu(_key: object, entry: Entry, _now: float) -> float:
    return entry.expires


def _sizeof(entry: Entry) -> int:
    return len(entry.data) + ENTRY_OVERHEAD_BYTES


class _Store(cachetools.TLRUCache):  # type: ignore[type-arg]
    """A TLRUCache that counts evictions, tells of each, and also caps its number of entries."""

    def __init__(self, clock: Callable[[], float], maxsize: float, maxbytes: float,
                 on_evict: Callable[[object], None]) -> None:
        super().__init__(maxbytes, _ttu, timer=clock, getsizeof=_sizeof)
        self.max_entries = maxsize
        self.evictions = 0
        self._on_evict = on_evict

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self.evictions += 1
        self._on_evict(item[0])
        return item


class _Cache:
    """One named cache. Every change of a key bumps its versions (``_versions``), in the
    same step, for the processes that keep copies."""

    __slots__ = ("name", "maxsize", "maxbytes", "ttl", "store", "hits", "misses", "timed",
                 "clock", "ident", "versions")

    def __init__(self, name: str, clock: Callable[[], float], maxsize: int | None,
                 maxbytes: int | None, ttl: float | None, versions: VersionTable | None = None) -> None:
        self.name = name
        self.maxsize, self.maxbytes, self.ttl = maxsize, maxbytes, ttl
        self.clock = clock
        self.ident = cache_ident(name)
        self.versions = versions
        self.store = _Store(clock, math.inf if maxsize is None else maxsize,
                            math.inf if maxbytes is None else maxbytes, self.wrote)
        self.hits = self.misses = 0
        self.timed = ttl is not None

    def wrote(self, key: object) -> None:
        if self.versions is not None:
            self.versions.wrote_key(self.ident, key)

    def get(self, key: object) -> Entry | None:
        try:
            entry: Entry = self.store[key]
        except KeyError:
            self.misses += 1
            return None
        self.hits += 1
        entry.used = self.clock()
        return entry

    def put(self, key: object, entry: Entry, at: float | None = None) -> None:
        """Store ``entry``, written at ``at`` (None: now)."""
        store = self.store
        new = key not in store
        entry.used = self.clock() if at is None else at
        store[key] = entry
        self.wrote(key)
        if entry.expires != math.inf:
            self.timed = True
        if new and len(store) > store.max_entries:
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used entries down to ``maxsize``. An entry some process
        read from its own copy since the broker last saw it used is kept, as just used."""
        store = self.store
        versions = self.versions
        for _ in range(len(store) + 1):
            if len(store) <= store.max_entries:
                return
            key, entry = store.popitem()
            if versions is not None:
                seen = versions.read_at(self.ident, key) / 1e9
                if seen > entry.used:
                    store.evictions -= 1
                    entry.used = seen
                    store[key] = entry
        while len(store) > store.max_entries:
            store.popitem()

    def delete(self, key: object) -> bool:
        store = self.store
        if key not in store:
            return False
        del store[key]
        self.wrote(key)
        return True

    def clear(self) -> None:
        self.store.clear()
        if self.versions is not None:
            self.versions.wrote(self.ident)

    def expires(self, ttl: float | None, now: float) -> float:
        """The expiry of an entry written now with ``ttl`` (None: the cache's default)."""
        if ttl is None:
            ttl = self.ttl
        return math.inf if ttl is None else now + ttl

    def options(self) -> dict[str, Any]:
        return {"maxsize": self.maxsize, "maxbytes": self.maxbytes, "ttl": self.ttl}


def _check_ttl(ttl: object) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, NUMBERS) or not ttl >= 0:
        raise ValueError(f"ttl must be a non-negative number of seconds or None, not {ttl!r}")
    return float(ttl)


def _check_size(what: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int or None, not {value!r}")
    return value


class CacheStore:
    """Every named cache of one broker: the ``cache`` component."""

    def __init__(self, fence: Fence | None = None, versions: VersionTable | None = None) -> None:
        self.caches: dict[str, _Cache] = {}
        self.versions = versions
        self._fence = fence or (lambda _name, _token, _now: False)
        self._now = 0.0
        self._next_sweep: float | None = None
        self.ops = 0
        self._ops: dict[str, Callable[[_Cache, int, object, bytes, float], Action]] = {
            "get": self._get, "set": self._set, "rset": self._rset, "delete": self._delete,
            "contains": self._contains,
            "mget": self._mget, "mset": self._mset, "incr": self._incr, "cas": self._cas,
            "keys": self._keys, "items": self._items, "len": self._len, "clear": self._clear,
            "pop": self._pop, "setdefault": self._setdefault,
            "fenced_set": self._fenced_set, "fenced_delete": self._fenced_delete,
            "fenced_cas": self._fenced_cas,
            "nget": self._nget, "nmget": self._nmget, "nkeys": self._nkeys, "nlen": self._nlen,
        }

    def _clock(self) -> float:
        return self._now

    # -- Component protocol --------------------------------------------------------------

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        self._now = now
        self.ops += 1
        rid = msg.rid
        try:
            head, tail = split(msg.payload)
            if not isinstance(head, tuple) or not head or not isinstance(head[0], str):
                raise TypeError("malformed cache operation")
            if msg.op == "open":
                return [Send(peer, self._open(rid, head, now))]
            handler = self._ops.get(msg.op)
            if handler is None:
                raise ValueError(f"unknown cache operation {msg.op!r}")
            cache = self.caches.get(head[0])
            if cache is None:
                return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND, f"no cache named {head[0]!r}", b""))]
            action = handler(cache, rid, head, tail, now)
        except Exception as exc:  # a bad argument: the caller's error, not the broker's
            return [Send(peer, fail(rid, exc))]
        if cache.timed and self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL_S
        return [Send(peer, action)]  # type: ignore[arg-type]

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        return []

    def on_tick(self, now: float) -> list[Action]:
        if self._next_sweep is None or now < self._next_sweep:
            return []
        self._now = now
        timed = False
        for cache in self.caches.values():
            if cache.timed:
                cache.store.expire(now)
                timed = True
        self._next_sweep = now + SWEEP_INTERVAL_S if timed else None
        return []

    def next_deadline(self) -> float | None:
        return self._next_sweep

    # -- operations: each returns the one message answering it ----------------------------

    def _open(self, rid: int, head: tuple[Any, ...], now: float) -> Any:
        _, maxsize, ttl, maxbytes = head
        maxsize = _check_size("maxsize", maxsize)
        maxbytes = _check_size("maxbytes", maxbytes)
        ttl = _check_ttl(ttl)
        name = head[0]
        if not name:
            raise ValueError("a cache needs a non-empty name")
        cache = self.caches.get(name)
        if cache is None:
            check(len(self.caches), MAX_CACHES, "caches")
            self.caches[name] = _Cache(name, self._clock, maxsize, maxbytes, ttl, self.versions)
        else:
            asked = {"maxsize": maxsize, "maxbytes": maxbytes, "ttl": ttl}
            clash = {k: v for k, v in asked.items() if v is not None and v != cache.options()[k]}
            if clash:
                raise ValueError(f"cache {name!r} already exists with {cache.options()}; "
                                 f"cannot reopen it with {clash}")
        return reply(rid, self.caches[name].options())

    def _get(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        entry = cache.get(head[1])
        return value_reply(rid, None if entry is None else entry.data)  # type: ignore[return-value]

    def _contains(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        return reply(rid, head[1] in cache.store)  # type: ignore[return-value]

    def _set(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, key, ttl = head
        cache.put(key, Entry(tail, cache.expires(_check_ttl(ttl), now)))
        return reply(rid, None)  # type: ignore[return-value]

    def _rset(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        """A ``set`` a process left in the write ring (``_ring``) at ``at`` (its monotonic
        clock, which is this one): its TTL runs from then, not from when it is applied."""
        _, key, ttl, at = head
        if isinstance(at, bool) or not isinstance(at, NUMBERS) or not math.isfinite(at):
            raise ValueError(f"a write's time must be a finite number, not {at!r}")
        at = min(float(at), now)
        cache.put(key, Entry(tail, cache.expires(_check_ttl(ttl), at)), at)
        return reply(rid, None)  # type: ignore[return-value]

    def _delete(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        return reply(rid, cache.delete(head[1]))  # type: ignore[return-value]

    def _pop(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        entry = cache.get(head[1])
        if entry is not None:
            cache.delete(head[1])
        return value_reply(rid, None if entry is None else entry.data)  # type: ignore[return-value]

    def _setdefault(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, key, ttl = head
        entry = cache.get(key)
        if entry is None:
            cache.put(key, Entry(tail, cache.expires(_check_ttl(ttl), now)))
            return value_reply(rid, tail)  # type: ignore[return-value]
        return value_reply(rid, entry.data)  # type: ignore[return-value]

    def _mget(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        get = cache.get
        found = [None if (e := get(k)) is None else e.data for k in head[1]]
        return reply(rid, found)  # type: ignore[return-value]

    def _mset(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, items, ttl = head
        expires = cache.expires(_check_ttl(ttl), now)
        pos = 0
        for key, size in items:
            cache.put(key, Entry(tail[pos:pos + size], expires))
            pos += size
        return reply(rid, None)  # type: ignore[return-value]

    def _incr(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, key, amount = head
        if isinstance(amount, bool) or not isinstance(amount, NUMBERS):
            raise TypeError(f"incr/decr need a number, not {type(amount).__name__}")
        entry = cache.get(key)
        if entry is None:
            value: Any = 0
            expires = cache.expires(None, now)
        else:
            value = safe_loads(entry.data)
            if isinstance(value, bool) or not isinstance(value, NUMBERS):
                raise TypeError(f"cannot incr/decr {key!r}: it holds a {type(value).__name__}, not a number")
            expires = entry.expires
        value += amount
        cache.put(key, Entry(_codec.dumps(value), expires))
        return reply(rid, value)  # type: ignore[return-value]

    def _cas(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, key, n_expected = head
        return reply(rid, self._swap(cache, key, tail[:n_expected], tail[n_expected:], now))  # type: ignore[return-value]

    def _swap(self, cache: _Cache, key: object, expected: bytes, new: bytes, now: float) -> bool:
        """Replace ``key``'s value with ``new`` if it equals ``expected`` (missing == None)."""
        entry = cache.get(key)
        if entry is None:
            if expected != NONE_BYTES and not _same(NONE_BYTES, expected):
                return False
        elif not _same(entry.data, expected):
            return False
        cache.put(key, Entry(new, cache.expires(None, now) if entry is None else entry.expires))
        return True

    def _keys(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        cache.store.expire(now)
        return reply(rid, list(cache.store.keys()))  # type: ignore[return-value]

    def _items(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        store = cache.store
        store.expire(now)
        return reply(rid, [(k, store[k].data) for k in list(store.keys())])  # type: ignore[return-value]

    def _len(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        cache.store.expire(now)
        return reply(rid, len(cache.store))  # type: ignore[return-value]

    def _clear(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        cache.clear()
        return reply(rid, None)  # type: ignore[return-value]

    # -- reads for processes that keep copies (``_near``): each answer says how long ------
    # -- its copy may be served: until its entry expires, or (keys, len) not at all ------
    # -- once entries of the cache can expire unseen ------------------------------------

    def _nget(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        entry = cache.get(head[1])
        return reply(rid, (None, math.inf) if entry is None else (entry.data, entry.expires))  # type: ignore[return-value]

    def _nmget(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        get = cache.get
        return reply(rid, [(None, math.inf) if (e := get(k)) is None else (e.data, e.expires)  # type: ignore[return-value]
                           for k in head[1]])

    def _nkeys(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        cache.store.expire(now)
        return reply(rid, (list(cache.store.keys()), not cache.timed))  # type: ignore[return-value]

    def _nlen(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        cache.store.expire(now)
        return reply(rid, (len(cache.store), not cache.timed))  # type: ignore[return-value]

    # -- fenced writes ------------------------------------------------------------------

    def _check_fence(self, grant: object, now: float) -> None:
        if (not isinstance(grant, tuple) or len(grant) != 2 or not isinstance(grant[0], str)
                or not isinstance(grant[1], int)):
            raise TypeError("a fenced write needs a LockGrant")
        if not self._fence(grant[0], grant[1], now):
            raise FencedError(f"lock {grant[0]!r} grant {grant[1]} has expired or been superseded; "
                              "the write was refused")

    def _fenced_set(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, grant, key, ttl = head
        self._check_fence(grant, now)
        cache.put(key, Entry(tail, cache.expires(_check_ttl(ttl), now)))
        return reply(rid, None)  # type: ignore[return-value]

    def _fenced_delete(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, grant, key = head
        self._check_fence(grant, now)
        return reply(rid, cache.delete(key))  # type: ignore[return-value]

    def _fenced_cas(self, cache: _Cache, rid: int, head: Any, tail: bytes, now: float) -> Action:
        _, grant, key, n_expected = head
        self._check_fence(grant, now)
        return reply(rid, self._swap(cache, key, tail[:n_expected], tail[n_expected:], now))  # type: ignore[return-value]

    # -- observability ----------------------------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        self._now = now
        caches = {}
        for name, cache in self.caches.items():
            store = cache.store
            store.expire(now)
            caches[name] = {"size": len(store), "bytes": store.currsize - ENTRY_OVERHEAD_BYTES * len(store),
                            "hits": cache.hits, "misses": cache.misses, "evictions": store.evictions,
                            **cache.options()}
        return {"cache_ops": self.ops, "caches": caches,
                "cache_entries": sum(c["size"] for c in caches.values())}


def _same(current: bytes, expected: bytes) -> bool:
    """Whether two pickled values are equal: by value for built-in types, else by bytes."""
    if current == expected:
        return True
    try:
        a, b = safe_loads(current), safe_loads(expected)
    except TypeError:
        return False
    try:
        return bool(a == b)
    except Exception:  # e.g. RecursionError on a deeply nested value
        return False
