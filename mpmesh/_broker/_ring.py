"""The write ring: plain writes to Manager objects that other processes leave in shared
memory instead of sending, and the broker applies in order before anything reads them.

A write such as ``d["k"] = 1`` cannot fail once its key and value are plain built-in
values, and returns nothing, so its caller needs no answer: it appends the call to this
ring, bumps the version words of what it wrote (the *writers' region* of the table, see
``_versions``), and returns. Appending is serialised by a process-shared mutex that
lives in the segment too (``_io/_mutex``: no system call when uncontended; a holder that
dies releases it). The ring's order is the writes' order.

The broker takes the ring's entries and applies them before it handles any operation on
Manager objects, so:

- a read that goes to the broker sees every write appended before the read was sent;
- a read served from a process's copy checks the slot's version, which the writer bumped
  after appending and before returning: a write that completed before a read began has
  either changed the version that read checks or is applied before its answer.

An entry is appended whole before the tail moves past it (one aligned 8-byte store), so a
writer killed mid-append leaves nothing half-written in the ring. Nothing here does I/O;
``buffer`` is the segment's mapping (the version table first, then this region).

Layout, after the version table (``TABLE_BYTES``)::

    +0      the mutex (``MUTEX_BYTES``)
    +64     head (bytes taken by the broker, ever), tail (bytes appended, ever), open flag
    +128    entries: u32 length, u32 kind (``OBJECTS``: a Manager object's call;
            ``CACHE``: a mesh cache's ``set``), the op's payload, padded to 8 bytes; a
            length of ``_SKIP`` says the next entry starts at the beginning again
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

from ._versions import TABLE_BYTES, WRITERS

__all__ = [
    "CACHE", "CAPACITY", "KINDS", "OBJECTS", "appended", "MAX_ENTRY", "MUTEX_AT", "MUTEX_BYTES", "POKE_AT", "RingReader", "RingWriter",
    "RING_END",
]

MUTEX_AT: Final = TABLE_BYTES
MUTEX_BYTES: Final = 64
_CTL_AT: Final = MUTEX_AT + MUTEX_BYTES
DATA_AT: Final = _CTL_AT + 64
CAPACITY: Final = 1 << 19
RING_END: Final = DATA_AT + CAPACITY
# Larger calls are sent as usual: an entry this size still leaves room for many more.
MAX_ENTRY: Final = 16 << 10
# A writer that leaves the ring at least this full asks the broker to empty it.
POKE_AT: Final = CAPACITY // 4

# Writes this process left in a ring, any broker's (``stats()``'s ``near_writes``).
appended = [0]

# What an entry is: the component and op its payload is for.
OBJECTS: Final = 0
CACHE: Final = 1
KINDS: Final = {OBJECTS: ("objects", "call"), CACHE: ("cache", "rset")}

_NOT_DONE: Final = (-1, 0, 0)
_HEAD: Final = 0
_TAIL: Final = 1
_OPEN: Final = 2
_SKIP: Final = 0xFFFFFFFF
_LEN: Final = struct.Struct("<I")
_HEADER: Final = struct.Struct("<II")  # length, kind


class Mutex(Protocol):
    def acquire(self) -> object: ...  # None: not had
    def release(self, held: object) -> None: ...
    def close(self) -> None: ...


class _Closed:
    """The mutex of a closed writer: never had."""

    def acquire(self) -> object:
        return None

    def release(self, held: object) -> None:  # pragma: no cover - never had
        pass

    def close(self) -> None:
        pass


_CLOSED: Final = _Closed()


class RingReader:
    """The broker's side: open the ring to writers, take what they appended."""

    __slots__ = ("_ctl", "_data", "_closed")

    def __init__(self, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        self._ctl = view[_CTL_AT:DATA_AT].cast("Q")
        self._data = view[DATA_AT:RING_END]
        self._closed = False

    def open(self) -> None:
        """Let writers use the ring (once its mutex is set up)."""
        self._ctl[_OPEN] = 1

    def close(self) -> None:
        """No more appends, and let go of the memory: the broker is going (what is
        left in the ring is never applied; its writers' peers are being dropped too)."""
        if not self._closed:
            self._closed = True
            self._ctl[_OPEN] = 0
            self._ctl.release()
            self._data.release()

    def pending(self) -> bool:
        ctl = self._ctl
        return not self._closed and ctl[_TAIL] != ctl[_HEAD]

    def take(self) -> list[tuple[int, bytes]]:
        """The entries appended since the last take, oldest first, as (kind, payload);
        their room is free again. An entry that cannot be one (a peer that wrote garbage)
        ends the take and drops the rest."""
        if self._closed:
            return []
        ctl, data = self._ctl, self._data
        head, tail = ctl[_HEAD], ctl[_TAIL]
        out: list[tuple[int, bytes]] = []
        while head < tail:
            pos = head % CAPACITY
            (n,) = _LEN.unpack_from(data, pos)
            if n == _SKIP:
                head += CAPACITY - pos
                continue
            if n > MAX_ENTRY or pos + 8 + n > CAPACITY:
                head = tail
                break
            out.append((_LEN.unpack_from(data, pos + 4)[0], bytes(data[pos + 8:pos + 8 + n])))
            head += (n + 15) & ~7
        ctl[_HEAD] = head
        return out


class RingWriter:
    """A writing process's side: append a call and bump its versions, or say it cannot."""

    __slots__ = ("_words", "_ctl", "_data", "_mutex")

    def __init__(self, buffer: memoryview, mutex: Mutex) -> None:
        view = memoryview(buffer).cast("B")
        self._words = view[:TABLE_BYTES].cast("Q")
        self._ctl = view[_CTL_AT:DATA_AT].cast("Q")
        self._data = view[DATA_AT:RING_END]
        self._mutex = mutex

    def usable(self) -> bool:
        return bool(self._ctl[_OPEN])

    def close(self) -> None:
        """Let go of the memory (the connection it came with is closed); appends made
        after this say -1. Views a racing append still holds are freed with it."""
        mutex, self._mutex = self._mutex, _CLOSED
        mutex.close()
        for view in (self._words, self._ctl, self._data):
            try:
                view.release()
            except BufferError:  # a racing append has a slice of it: the GC frees it
                pass

    def append(self, payload: bytes, s1: int, s2: int, n1: int, n2: int,
               kind: int = OBJECTS) -> tuple[int, int, int]:
        """Append ``payload`` (an entry of ``kind``) and bump slots ``s1`` and ``s2``.

        Returns ``(status, v1, v2)``. ``status``: 0 if done; 1 if done and the ring just
        became ``POKE_AT`` full (ask the broker to empty it); -1 if it was not appended
        (too large, the ring full or closed, or the mutex not had in time): then the call
        must be sent instead. ``v1``/``v2``: the versions slots ``n1`` and ``n2`` show
        right after it if nothing else changed them meanwhile: a copy of what this write
        wrote, kept with them, is current exactly while they still show those. They are
        read before the entry becomes visible: a write the broker applies after this
        one, whatever slots it bumps afterwards, then changes one of them; one it applied
        before only costs the copy a needless refresh."""
        n = len(payload)
        need = (n + 15) & ~7
        if need > MAX_ENTRY:
            return _NOT_DONE
        mutex = self._mutex
        held = mutex.acquire()
        if held is None:
            return _NOT_DONE
        try:
            ctl = self._ctl
            if not ctl[_OPEN]:
                return _NOT_DONE
            tail = ctl[_TAIL]
            pos = tail % CAPACITY
            pad = CAPACITY - pos if pos + need > CAPACITY else 0
            used = tail + pad + need - ctl[_HEAD]
            if used > CAPACITY:
                return _NOT_DONE
            data = self._data
            if pad:
                _LEN.pack_into(data, pos, _SKIP)
                pos = 0
            _HEADER.pack_into(data, pos, n, kind)
            data[pos + 8:pos + 8 + n] = payload
            words = self._words
            v1 = words[n1] + words[n1 + WRITERS] + (n1 == s1) + (n1 == s2 != s1)
            v2 = words[n2] + words[n2 + WRITERS] + (n2 == s1) + (n2 == s2 != s1)
            ctl[_TAIL] = tail + pad + need  # the commit: the entry is whole before this
            words[s1 + WRITERS] += 1
            if s2 != s1:
                words[s2 + WRITERS] += 1
            appended[0] += 1
            return (1 if used >= POKE_AT > used - pad - need else 0), v1, v2
        except ValueError:  # closed meanwhile (``close``)
            return _NOT_DONE
        finally:
            mutex.release(held)
