"""The version table: how a process knows, without asking the broker, that what it read
from shared state is still current.

The table is an array of 64-bit words the broker shares with every local process (a
memory segment; see ``_io/_segment``). The broker bumps a word in the same step that
applies a write, before it replies; a reader that kept a copy together with the words it
saw before it asked serves the copy again while those words are unchanged (``_near``).

Layout, in words::

    0           magic (a segment of this layout)
    1           lease: the broker's clock (ns) until which it vouches for the table
    2           closed: non-zero once the broker is gone (set by it, or by a peer that saw it go)
    8 .. 8+N    versions the broker bumps, indexed by slot
    8+N .. 8+2N last local read of each slot (ns), for LRU eviction that counts local hits
    8+2N .. 8+3N versions that writing processes bump (``_ring``): a slot's version is
                 the sum of its two words, each written by one party only, so neither
                 can lose the other's bump

Slots: every shared object (a Manager object by its oid, a mesh cache by its name) has a
*whole* slot, bumped by every write, and a *bulk* slot, bumped by writes that touch many
keys at once (``clear``, ``update``); a key of a dict, a cache or a Namespace hashes into
a *key* slot, bumped by writes of that key. Two things sharing a slot only cost a copy a
needless refresh, never a stale read. Key hashes are stable across processes (CRC-32 of
str and bytes; Python's own, unsalted, hash of numbers); a key without one is covered by
its object's whole slot. Nothing here does I/O; the buffer can be any writable one.
"""

from __future__ import annotations

import zlib
from typing import Final

__all__ = [
    "ACCESS", "CLOSED", "LEASE", "MAGIC", "SLOTS", "TABLE_BYTES", "VERSIONS", "VersionTable", "WRITERS",
    "bulk_slot", "cache_ident", "key_slot", "stable_hash", "whole_slot",
]

SLOTS: Final = 1 << 16
MAGIC: Final = 0x6D706D6573680002
LEASE: Final = 1
CLOSED: Final = 2
VERSIONS: Final = 8
ACCESS: Final = VERSIONS + SLOTS
# A slot's word in the writers' region is this many words after its broker word.
WRITERS: Final = 2 * SLOTS
TABLE_BYTES: Final = (ACCESS + 2 * SLOTS) * 8

_MASK: Final = SLOTS - 1
_U64: Final = (1 << 64) - 1
_CACHE_TAG: Final = 1 << 40  # mesh caches' idents live above Manager oids
_K1: Final = 0x9E3779B1
_K2: Final = 0x85EBCA77


def _mix(ident: int, salt: int) -> int:
    # Multiplying by odd constants permutes the low bits, and CRC-32 spreads keys: enough
    # for a table where a collision costs a refresh, and cheap enough to run per write.
    return VERSIONS + (((ident * _K1) ^ (salt * _K2)) & _MASK)


def whole_slot(ident: int) -> int:
    return _mix(ident, 1)


def bulk_slot(ident: int) -> int:
    return _mix(ident, 2)


def key_slot(ident: int, khash: int) -> int:
    return _mix(ident, (khash & _U64) + 3)


def stable_hash(key: object) -> int | None:
    """A hash of ``key`` every process computes alike, equal for equal keys; None if
    there is none (then the key is covered by its object's whole slot)."""
    t = type(key)
    if t is str:
        return zlib.crc32(key.encode("utf-8", "surrogatepass"))  # type: ignore[attr-defined]
    if t is int or t is float or t is bool:
        return hash(key)  # not salted: 1, 1.0 and True hash (and compare) alike
    if t is bytes:
        return zlib.crc32(key) ^ 0x5BD1E995  # type: ignore[arg-type]
    if t is tuple:
        h = 0x345678
        for item in key:  # type: ignore[attr-defined]
            ih = stable_hash(item)
            if ih is None:
                return None
            h = ((h ^ ih) * 1000003) & _U64
        return h
    return None


def cache_ident(name: str) -> int:
    """The ident of mesh cache ``name`` in the table."""
    return _CACHE_TAG | zlib.crc32(name.encode("utf-8", "surrogatepass"))


class VersionTable:
    """The broker's side: bump versions as writes are applied; keep the lease."""

    __slots__ = ("words",)

    def __init__(self, buffer: memoryview | bytearray) -> None:
        self.words = memoryview(buffer).cast("B").cast("Q")
        self.words[0] = MAGIC

    def wrote(self, ident: int) -> None:
        """A write that may have touched anything of ``ident``."""
        words, base = self.words, ident * _K1
        words[VERSIONS + ((base ^ _K2) & _MASK)] += 1
        words[VERSIONS + ((base ^ (2 * _K2)) & _MASK)] += 1

    def wrote_key(self, ident: int, key: object) -> None:
        """A write of one key of ``ident`` (a key without a stable hash counts as bulk)."""
        words, base = self.words, ident * _K1
        words[VERSIONS + ((base ^ _K2) & _MASK)] += 1
        khash = stable_hash(key)
        salt = 2 if khash is None else (khash & _U64) + 3
        words[VERSIONS + ((base ^ (salt * _K2)) & _MASK)] += 1

    def read_at(self, ident: int, key: object) -> int:
        """When a process last served ``key`` of ``ident`` from its copy (ns; 0: never seen)."""
        khash = stable_hash(key)
        return 0 if khash is None else self.words[ACCESS - VERSIONS + key_slot(ident, khash)]

    def renew(self, until_ns: int) -> None:
        self.words[LEASE] = until_ns

    def close(self) -> None:
        self.words[CLOSED] = 1
        self.words[LEASE] = 0
