"""Near copies: a process keeps what it read from shared state and serves it again, with
no system call, while the broker's version table says it is unchanged.

Each ``SocketClient`` whose broker sent a version table (``_io/_segment``) has one
``NearCache``. A read names the one or two table slots that cover what it reads (see
``_broker/_versions``) and a key for its copy. The reader notes the slots' versions
*before* it asks the broker, and keeps the answer with them: a write that lands after
that moment bumps a slot, so the copy is refreshed on its next use rather than served
stale. A read that finds its slots as it noted them returns its copy, as a fresh object
(values that cannot change, such as numbers, strings and tuples of them, are shared).

The broker renews a lease in the table while it runs; a copy is served only inside the
lease and while the table is not marked closed, so a broker that is gone (killed and
restarted, say) cannot leave a process serving what it read before. Copies are bounded
in number and bytes; a mesh cache entry's copy lapses with the entry's TTL.
"""

from __future__ import annotations

import mmap
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Final

from .._broker import _ring
from .._broker._versions import ACCESS, CLOSED, LEASE, TABLE_BYTES, VERSIONS, WRITERS
from .._wire import _codec

__all__ = [
    "ETERNAL", "MAX_COPIES", "MAX_COPY_BYTES", "MAX_TOTAL_BYTES", "NearCache", "counters", "immutable",
    "set_budget",
]

# A connection keeps at most this many copies, of at most this many bytes each; a process
# keeps at most ``budget()`` bytes of copies in all (``set_budget``). Beyond them the
# oldest copies go first.
MAX_COPIES: Final = 8192
MAX_COPY_BYTES: Final = 1 << 20
MAX_TOTAL_BYTES: Final = 64 << 20
ETERNAL: Final = 1 << 63  # the expiry of a copy without a TTL (ns)
# Marks a pickle that carries a proxy: such an answer is never kept (each unpickling of
# it would take a reference of its own).
_PROXY_MARK: Final = b"rebuild_ref"
_ATOMIC: Final = frozenset({int, float, complex, str, bytes, bool, type(None)})

_now_ns = time.monotonic_ns
_loads = _codec.loads
_budget = [MAX_TOTAL_BYTES]  # this process's, in bytes (``set_budget``)
_kept = [0]                  # bytes of copies this process keeps, every connection's
_caches: weakref.WeakSet[NearCache] = weakref.WeakSet()


def set_budget(nbytes: int) -> None:
    """How many bytes of copies this process may keep in all (0: keep none)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"near_cache_bytes must be an int >= 0, not {nbytes!r}")
    _budget[0] = nbytes


def counters() -> dict[str, int]:
    """This process's reads served from copies, reads that went to a broker, bytes kept,
    and writes it left in a broker's write ring (``_broker/_ring``)."""
    caches = list(_caches)
    return {"near_hits": sum(c.hits for c in caches), "near_misses": sum(c.misses for c in caches),
            "near_bytes": _kept[0], "near_writes": _ring.appended[0]}


def immutable(value: object, depth: int = 0) -> bool:
    """Whether ``value`` cannot change, so one object may be handed to every reader."""
    t = type(value)
    if t in _ATOMIC:
        return True
    if (t is tuple or t is frozenset) and depth < 4 and len(value) <= 64:  # type: ignore[arg-type]
        return all(immutable(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    return False


class NearCache:
    """This process's copies of what it read through one connection.

    An entry is ``[v1, v2, expires_ns, value, blob, raises, access]``: the versions of its
    two slots when the read began; when it lapses; the value itself (shared) or ``blob``,
    its pickle (unpickled for each reader); whether ``blob`` is an exception to raise;
    the table index where a hit notes the time (mesh caches' LRU), or 0.
    """

    __slots__ = ("_mm", "words", "entries", "_bytes", "hits", "misses", "__weakref__")

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        self.words = memoryview(mm)[:TABLE_BYTES].cast("Q")
        self.entries: dict[Hashable, list[Any]] = {}
        self._bytes = 0
        self.hits = self.misses = 0
        _caches.add(self)

    def trusted(self) -> bool:
        """Whether the table may be relied on now (the broker is there and vouches)."""
        words = self.words
        return not words[CLOSED] and words[LEASE] > _now_ns()

    def version(self, slot: int) -> int:
        """The slot's version: the broker's bumps plus the writing processes' (``_ring``)."""
        words = self.words
        return int(words[slot] + words[slot + WRITERS])

    def lookup(self, key: Hashable, s1: int, s2: int) -> list[Any] | None:
        """The entry of ``key`` if it may be served now, else None. No system call."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        words = self.words
        try:
            if (words[s1] + words[s1 + WRITERS] != entry[0]
                    or words[s2] + words[s2 + WRITERS] != entry[1]):
                return None
            now = _now_ns()
            if now >= entry[2] or now >= words[LEASE] or words[CLOSED]:
                return None
            if entry[6]:
                words[entry[6]] = now
        except ValueError:  # closed meanwhile (``close``)
            return None
        self.hits += 1
        return entry

    @staticmethod
    def serve(entry: list[Any]) -> Any:
        """What a hit returns: the shared value, or a fresh copy (or raises the copy's error)."""
        blob = entry[4]
        if blob is None:
            return entry[3]
        if entry[5]:
            error = _loads(blob)
            assert isinstance(error, BaseException)
            raise error
        return _loads(blob)

    def read(self, key: Hashable, s1: int, s2: int,
             fetch: Callable[[], tuple[Any, bytes | None]], access: bool = False) -> Any:
        """Serve ``key``'s copy, or ``fetch()`` (the value and its pickle) and keep it.

        A lookup error or AttributeError the broker answered is kept as well, and raised
        again for each reader.
        """
        entry = self.lookup(key, s1, s2)
        if entry is not None:
            return self.serve(entry)
        return self.fill(key, s1, s2, fetch, access)

    def fill(self, key: Hashable, s1: int, s2: int,
             fetch: Callable[[], tuple[Any, bytes | None]], access: bool = False) -> Any:
        """``fetch()`` and keep what it read (see ``read``)."""
        try:
            v1, v2 = self.version(s1), self.version(s2)
        except ValueError:  # closed meanwhile (``close``): nothing to keep
            return fetch()[0]
        self.misses += 1
        try:
            value, blob = fetch()
        except (LookupError, AttributeError) as exc:
            try:
                self.keep(key, v1, v2, ETERNAL, None, _codec.dumps(exc), True, s1 if access else 0)
            except Exception:  # noqa: BLE001 - an error we cannot keep is only not kept
                pass
            raise
        self.keep(key, v1, v2, ETERNAL, value, blob, False, s1 if access else 0)
        return value

    def keep(self, key: Hashable, v1: int, v2: int, expires_ns: int, value: Any,
             blob: bytes | None, raises: bool = False, access_slot: int = 0,
             shared: bool = False) -> None:
        """Keep a copy read after the table showed ``v1``/``v2`` at its slots. A value that
        cannot change (or is ``shared``: a sentinel) is kept as it is; any other needs
        ``blob`` (else it is not kept)."""
        if shared:
            blob = None
        elif blob is not None and not raises:
            if immutable(value):
                blob = None
            elif len(blob) > MAX_COPY_BYTES or _PROXY_MARK in blob:
                return
        elif blob is None and not immutable(value):
            return
        entries = self.entries
        self.forget(key)
        size = 0 if blob is None else len(blob)
        budget = _budget[0]
        if size > budget:
            return
        while entries and (len(entries) >= MAX_COPIES or _kept[0] + size > budget):
            self.forget(next(iter(entries)))
        access = ACCESS - VERSIONS + access_slot if access_slot else 0
        entries[key] = [v1, v2, expires_ns, value, blob, raises, access]
        self._bytes += size
        _kept[0] += size

    def __del__(self) -> None:
        _kept[0] -= self._bytes

    def close(self) -> None:
        """Let go of the table (its mapping and the descriptor that keeps it): the
        connection it came with is closed. A read racing this finds no copy."""
        self.entries = {}
        _kept[0] -= self._bytes
        self._bytes = 0
        try:
            self.words.release()
            self._mm.close()
        except (BufferError, ValueError):  # a reader still holds a view: the GC frees it
            pass

    def forget(self, key: Hashable) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None and entry[4] is not None:
            self._bytes -= len(entry[4])
            _kept[0] -= len(entry[4])
