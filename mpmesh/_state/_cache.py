"""``Cache``: a picklable ``MutableMapping`` over a named cache held by the broker.

Every method is one round trip and atomic on the broker. Values are pickled here, at the
call site (``SerializationError`` is raised in the caller's frame, before anything is sent), and
come back as the very bytes that were stored; keys must be built-in values (str, int,
float, bytes, tuples of them...), because the broker reads them.

A proxy pickles as ``(mesh address, cache name, options)``; in another process it uses
that process's connection to the mesh (see ``_binding``). If the broker no longer knows
the cache (a restarted standalone broker), the proxy opens it again with its options
and retries once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, final

from .._broker._cache import ENTRY_OVERHEAD_BYTES
from .._broker._payload import MISSING, pack
from .._broker._ring import CACHE
from .._broker._versions import bulk_slot, cache_ident, key_slot, stable_hash, whole_slot
from .._client import _binding
from .._client._near import ETERNAL, NearCache
from .._errors import NotFound
from .._wire import _codec

if TYPE_CHECKING:
    from .._client._base import ClientBase
    from ._grant import LockGrant

__all__ = ["Cache", "CacheBase", "open_cache"]

_NOTHING: Any = object()
_TIMES: Any = (int, float)
_WHOLE: Any = ("#whole",)  # in the copy key of keys() and len(), which no cache key equals


def open_cache(client: ClientBase, address: str, name: str, maxsize: int | None,
               ttl: float | None, maxbytes: int | None, *, near: bool = True) -> Cache:
    """Create (or attach to) cache ``name`` on the broker; ValueError on clashing options.
    ``near``: the handle reads from this process's copies where it can."""
    call = client.op("cache", "open", payload=pack((name, maxsize, ttl, maxbytes)))
    options = client.wait(call, client.due())
    return Cache(address, name, {**options, "near": bool(near)}, client)  # type: ignore[dict-item]


class CacheBase(MutableMapping):  # type: ignore[type-arg]
    """What a cache is whatever holds it (this mesh's broker, or Redis across hosts): a
    mutable mapping whose ``update`` is one ``mset``, shown by name and options."""

    __slots__ = ()
    name: str
    options: dict[str, Any]

    def mset(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` at once (one round trip, atomic)."""
        raise NotImplementedError

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        items = dict(other)
        items.update(kwargs)
        if items:
            self.mset(items)

    def __repr__(self) -> str:
        return f"<mpmesh.Cache {self.name!r} {self.options}>"


@final
class Cache(CacheBase):
    """A named cache shared by every process of a mesh (``m.cache(name)``).

    ``cache[k]`` and ``del cache[k]`` raise ``KeyError`` when ``k`` is missing; ``get``
    and ``mget`` return ``None`` (or ``default``); ``set`` without ``ttl`` uses the
    cache's default TTL.
    """

    __slots__ = ("name", "options", "_address", "_client", "_pid", "_ident", "_whole", "_bulk")

    def __init__(self, address: str, name: str, options: dict[str, Any], client: ClientBase | None = None) -> None:
        self.name = name
        self.options = options
        self._address = address
        self._client = client
        self._pid = os.getpid() if client is not None else 0
        self._ident = ident = cache_ident(name)
        self._whole, self._bulk = whole_slot(ident), bulk_slot(ident)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._address, self.name, self.options))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cache) and (other._address, other.name) == (self._address, self.name)

    def __hash__(self) -> int:
        return hash((self._address, self.name))

    # -- transport ----------------------------------------------------------------------------

    def _bound(self) -> ClientBase:
        client = self._client
        if client is None or self._pid != os.getpid():
            client = self._client = _binding.client_for(self._address)
            self._pid = os.getpid()
        return client

    def _near(self) -> NearCache | None:
        """This process's copies for this handle, if it keeps any."""
        return self._bound().near if self.options.get("near", True) else None

    def _op(self, op: str, payload: bytes) -> Any:
        """One operation, answered at once: it waits for the connection's ``timeout``."""
        client = self._bound()
        try:
            call = client.op("cache", op, payload=payload)
            return client.wait(call, client.due())
        except NotFound:
            if client._closed is not None:
                raise
            o = self.options
            open_cache(client, self._address, self.name, o.get("maxsize"), o.get("ttl"), o.get("maxbytes"))
            call = client.op("cache", op, payload=payload)
            return client.wait(call, client.due())

    # -- reads served from this process's copy (``_near``) ----------------------------------
    # A copy of a key lapses with its entry's TTL, and a read from it counts as a use for
    # the cache's LRU eviction (the broker sees the time it was last read in the table).

    def _read(self, key: Any) -> Any:
        """``key``'s value, or MISSING: from this process's copy while it is current."""
        near = self._near()
        if near is None:
            return self._op("get", pack((self.name, key)))
        khash = stable_hash(key)
        s1 = self._whole if khash is None else key_slot(self._ident, khash)
        copy_key = (self.name, key)
        try:
            entry = near.lookup(copy_key, s1, self._bulk)
        except TypeError:  # an unhashable key: the broker says what is wrong with it
            return self._op("get", pack((self.name, key)))
        if entry is not None:
            return near.serve(entry)
        v1, v2 = near.version(s1), near.version(self._bulk)
        near.misses += 1
        blob, expires = self._op("nget", pack((self.name, key)))
        return self._keep(near, copy_key, v1, v2, blob, expires, khash is not None and s1)

    @staticmethod
    def _keep(near: NearCache, copy_key: Any, v1: int, v2: int, blob: bytes | None,
              expires: float, access_slot: int | bool) -> Any:
        if blob is None:
            near.keep(copy_key, v1, v2, ETERNAL, MISSING, None, shared=True)
            return MISSING
        value = _codec.loads(blob)
        near.keep(copy_key, v1, v2, ETERNAL if expires == math.inf else int(expires * 1e9),
                  value, blob, access_slot=int(access_slot))
        return value

    def _near_whole(self, what: str) -> Any:
        """``keys`` or ``len``, from this process's copy while the cache is unchanged
        (only for a cache none of whose entries can expire unseen)."""
        near = self._near()
        if near is None:
            return self._op(what, pack((self.name,)))
        copy_key = (self.name, _WHOLE, what)
        entry = near.lookup(copy_key, self._whole, self._whole)
        if entry is not None:
            return near.serve(entry)
        v = near.version(self._whole)
        near.misses += 1
        value, lasting = self._op("n" + what, pack((self.name,)))
        if lasting:
            near.keep(copy_key, v, v, ETERNAL, value, None if what == "len" else _codec.dumps(value))
        return value

    # -- single keys --------------------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is missing (or expired)."""
        value = self._read(key)
        return default if value is MISSING else value

    def __getitem__(self, key: Any) -> Any:
        value = self._read(key)
        if value is MISSING:
            raise KeyError(key)
        return value

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (None: the cache's TTL)."""
        blob = _codec.dumps(value)
        if not self._leave(key, value, blob, ttl):
            self._op("set", pack((self.name, key, ttl), blob))

    def _leave(self, key: Any, value: Any, blob: bytes, ttl: float | None) -> bool:
        """Leave a ``set`` that cannot fail in the broker's write ring (``_broker/_ring``),
        keeping what it wrote as this process's copy; False if it must be sent."""
        client = self._bound()
        if client.ring is None or not self.options.get("near", True):
            return False
        khash = stable_hash(key)
        if khash is None or (ttl is not None and (type(ttl) not in _TIMES or not 0 <= ttl < math.inf)):
            return False
        maxbytes = self.options.get("maxbytes")
        if maxbytes is not None and len(blob) + ENTRY_OVERHEAD_BYTES > maxbytes:
            return False  # too large for it: the broker says so
        s1 = key_slot(self._ident, khash)
        at = time.monotonic()
        left = client.leave(pack((self.name, key, ttl, at), blob), s1, self._whole, s1, self._bulk, CACHE)
        if left is None:
            return False
        near = client.near
        if near is not None:
            lasts = self.options.get("ttl") if ttl is None else ttl
            expires = ETERNAL if lasts is None else int((at + lasts) * 1e9)
            near.keep((self.name, key), *left, expires, value, blob, access_slot=s1)
        return True

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Any) -> None:
        if not self._op("delete", pack((self.name, key))):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if self._near() is not None:
            return self._read(key) is not MISSING
        return bool(self._op("contains", pack((self.name, key))))

    def pop(self, key: Any, default: Any = _NOTHING) -> Any:
        """Remove ``key`` and return its value (``default``, or KeyError, when missing)."""
        value = self._op("pop", pack((self.name, key)))
        if value is MISSING:
            if default is _NOTHING:
                raise KeyError(key)
            return default
        return value

    def setdefault(self, key: Any, default: Any = None, ttl: float | None = None) -> Any:
        """Atomically: store ``default`` unless ``key`` exists; return the value it now has."""
        return self._op("setdefault", pack((self.name, key, ttl), _codec.dumps(default)))

    def incr(self, key: Any, amount: int | float = 1) -> Any:
        """Add ``amount`` to the number under ``key`` (a missing key counts from 0); return it.

        The entry keeps its remaining TTL.
        """
        return self._op("incr", pack((self.name, key, amount)))

    def decr(self, key: Any, amount: int | float = 1) -> Any:
        """Subtract ``amount`` (see ``incr``)."""
        return self._op("incr", pack((self.name, key, -amount)))

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Atomically replace ``key``'s value by ``new`` if it equals ``expected``; whether it did.

        A missing key equals ``None``. Built-in values compare by value, others by their
        pickled form. The entry keeps its remaining TTL.
        """
        old, blob = _codec.dumps(expected), _codec.dumps(new)
        return bool(self._op("cas", pack((self.name, key, len(old)), old, blob)))

    # -- fenced writes ----------------------------------------------------------------------

    def fenced_set(self, grant: LockGrant, key: Any, value: Any, ttl: float | None = None) -> None:
        """``set``, only while ``grant`` is its lock's current grant.

        Raises:
            FencedError: the grant has expired or been superseded; nothing was written.
        """
        blob = _codec.dumps(value)
        self._op("fenced_set", pack((self.name, (grant.name, grant.token), key, ttl), blob))

    def fenced_delete(self, grant: LockGrant, key: Any) -> bool:
        """Delete ``key`` (whether it was there), only while ``grant`` is current (else FencedError)."""
        return bool(self._op("fenced_delete", pack((self.name, (grant.name, grant.token), key))))

    def fenced_cas(self, grant: LockGrant, key: Any, expected: Any, new: Any) -> bool:
        """``cas``, only while ``grant`` is current (else FencedError)."""
        old, blob = _codec.dumps(expected), _codec.dumps(new)
        return bool(self._op("fenced_cas", pack((self.name, (grant.name, grant.token), key, len(old)), old, blob)))

    # -- many keys --------------------------------------------------------------------------

    def mget(self, keys: Iterable[Any]) -> list[Any]:
        """The values of ``keys``, ``None`` for each one missing."""
        keys = list(keys)
        near = self._near()
        if near is None:
            loads = _codec.loads
            return [None if b is None else loads(b) for b in self._op("mget", pack((self.name, keys)))]
        found: list[Any] = [MISSING] * len(keys)
        wanted: list[tuple[int, Any, int, int, int]] = []  # index, copy key, slot, v1, v2
        version, bulk = near.version, self._bulk
        try:
            for i, key in enumerate(keys):
                khash = stable_hash(key)
                s1 = self._whole if khash is None else key_slot(self._ident, khash)
                entry = near.lookup((self.name, key), s1, bulk)
                if entry is not None:
                    found[i] = near.serve(entry)
                else:
                    wanted.append((i, (self.name, key), s1 if khash is not None else 0, version(s1), version(bulk)))
        except TypeError:  # an unhashable key: the broker says what is wrong with it
            self._op("mget", pack((self.name, keys)))
            raise
        if wanted:
            near.misses += len(wanted)
            answers = self._op("nmget", pack((self.name, [copy_key[1] for _, copy_key, _, _, _ in wanted])))
            for (i, copy_key, access, v1, v2), (blob, expires) in zip(wanted, answers):
                found[i] = self._keep(near, copy_key, v1, v2, blob, expires, access)
        return [None if v is MISSING else v for v in found]

    def mset(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` at once (one round trip, atomic)."""
        dumps = _codec.dumps
        blobs = [dumps(v) for v in mapping.values()]
        items = [(k, len(b)) for k, b in zip(mapping.keys(), blobs)]
        self._op("mset", pack((self.name, items, ttl), *blobs))

    def keys(self) -> list[Any]:  # type: ignore[override]
        """A snapshot of the keys (least recently used first, as the broker saw them used)."""
        return list(self._near_whole("keys"))

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        """A snapshot of the ``(key, value)`` pairs."""
        loads = _codec.loads
        return [(k, loads(b)) for k, b in self._op("items", pack((self.name,)))]

    def values(self) -> list[Any]:  # type: ignore[override]
        return [v for _, v in self.items()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return int(self._near_whole("len"))

    def clear(self) -> None:
        """Remove every entry (one round trip)."""
        self._op("clear", pack((self.name,)))


def _rebuild(address: str, name: str, options: dict[str, Any]) -> Cache:
    return Cache(address, name, options)
