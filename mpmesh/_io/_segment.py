"""The memory segment holding a broker's version table (``_broker/_versions``), its
write ring (``_broker/_ring``) and its Manager Locks' cells (``_broker/_lockcells``).

It is an anonymous memory file (``memfd``): it has no name anywhere, so nothing is left
behind however its processes end; it goes away with the last process that maps it. The
broker hands its descriptor to each local peer with the peer's ``Ready``, after the peer
has proven the authkey, as ancillary data on the Unix socket (``SCM_RIGHTS``). Where
there are no memory files (not Linux) or no Unix socket (TCP), there is no segment, and
every read is a round trip.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Callable
from typing import Final

from .._broker._lockcells import SEGMENT_BYTES, LockCells
from .._broker._ring import MUTEX_AT, RingReader, RingWriter
from .._broker._versions import MAGIC, TABLE_BYTES, VersionTable
from ._mutex import SharedMutex, available

__all__ = ["Segment", "create", "map_received", "received_fd", "send_with_fd", "writers"]

ANCILLARY_BYTES: Final = socket.CMSG_SPACE(array.array("i").itemsize)


class Segment:
    """The broker's segment: its descriptor (to hand out) and its table (to write)."""

    def __init__(self, fd: int, mm: mmap.mmap) -> None:
        self.fd = fd
        self.mm = mm
        self.table = VersionTable(memoryview(mm)[:TABLE_BYTES])
        # The write ring, where processes can share a mutex (else writes are all sent).
        self.ring: RingReader | None = None
        # Manager Locks' cells, likewise.
        self.cells: LockCells | None = None
        self._mutex: SharedMutex | None = None
        if available():
            try:
                self._mutex = SharedMutex.create(mm, MUTEX_AT)
            except OSError:
                pass
            else:
                self.ring = RingReader(memoryview(mm))
                self.ring.open()
                self.cells = LockCells(memoryview(mm), _mutex_maker(mm))

    def close(self) -> None:
        """Mark the table closed (readers stop trusting their copies) and let go of it;
        what still bumps versions (a late offloaded call) writes to private memory."""
        if self.fd < 0:
            return
        table = self.table
        table.close()
        if self.ring is not None:
            self.ring.close()
        if self._mutex is not None:
            self._mutex.close()
        if self.cells is not None:
            self.cells.close()
            self.cells = None
        shared, table.words = table.words, memoryview(bytearray(TABLE_BYTES)).cast("Q")
        shared.release()
        self.ring = None
        try:
            self.mm.close()
        except BufferError:  # a view of the ring is still held: the GC unmaps it
            pass
        os.close(self.fd)
        self.fd = -1


def create() -> Segment | None:
    """A new segment, or None where memory files are not available."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return None
    try:
        fd = memfd_create("mpmesh-versions", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.ftruncate(fd, SEGMENT_BYTES)
        mm = _map(fd)
    except OSError:
        os.close(fd)
        return None
    return Segment(fd, mm)


def _map(fd: int) -> mmap.mmap:
    """Map ``fd``; from Python 3.13 without the duplicate descriptor mmap keeps otherwise."""
    try:
        return mmap.mmap(fd, SEGMENT_BYTES, trackfd=False)  # type: ignore[call-arg]
    except TypeError:
        return mmap.mmap(fd, SEGMENT_BYTES)


def send_with_fd(sock: socket.socket, data: bytes, fd: int) -> int:
    """Send (some of) ``data`` with ``fd`` attached to its first byte; bytes sent."""
    return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def received_fd(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The descriptor that came with a ``recvmsg`` (-1 if none); any extra ones are closed."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else -1


def map_received(fd: int) -> mmap.mmap | None:
    """Map a segment a broker sent (and close the descriptor); None if it is not one."""
    try:
        if os.fstat(fd).st_size != SEGMENT_BYTES:
            return None
        mm = _map(fd)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if memoryview(mm).cast("Q")[0] != MAGIC:
        mm.close()
        return None
    return mm


def _mutex_maker(mm: mmap.mmap) -> Callable[[int, bool], SharedMutex]:
    def mutex_at(offset: int, new: bool) -> SharedMutex:
        return SharedMutex.create(mm, offset) if new else SharedMutex(mm, offset)
    return mutex_at


def writers(mm: mmap.mmap) -> tuple[RingWriter, LockCells] | None:
    """This process's way to a received segment's write ring and lock cells; None where
    the broker opened no ring or this process cannot share its mutexes."""
    if not available():
        return None
    try:
        writer = RingWriter(memoryview(mm), SharedMutex(mm, MUTEX_AT))
        if not writer.usable():
            return None
        return writer, LockCells(memoryview(mm), _mutex_maker(mm))
    except (OSError, ValueError, TypeError):
        return None
