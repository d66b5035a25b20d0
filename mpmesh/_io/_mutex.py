"""A mutex shared by processes, inside a shared mapping: the write ring's (``_broker/_ring``).

It is the C library's own (``pthread_mutex_t``, called through ``ctypes``), set up
*process-shared* and *robust*: taking or leaving it free is an atomic instruction, with
no system call unless another holds it, and a holder that dies, even by SIGKILL, leaves
it to the next taker (the kernel marks it; ``EOWNERDEAD``), so a killed process never
leaves the others waiting. A taker waits at most ``WAIT_S`` (a holder stopped by a
signal, say); a caller that gives up takes the slow path instead, and for ``STUCK_S``
after that this process only tries the mutex, without waiting, so a stopped holder
costs it one wait, not one per call.

Only where the writes of one process reach the others in the order it made them without
barriers of ours (x86-64), and where the C library has robust mutexes (glibc); elsewhere
``available()`` says no and every write is sent as usual.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import platform
import time
from typing import Any, Final

__all__ = ["SharedMutex", "available"]

WAIT_S: Final = 0.05
STUCK_S: Final = 1.0
_BYTES: Final = 64  # room reserved per mutex (glibc's is 40 on x86-64)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load() -> Any:
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("pthread_mutex_trylock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
            fn = getattr(libc, name)
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_int
        libc.pthread_mutex_timedlock.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
        libc.pthread_mutex_timedlock.restype = ctypes.c_int
        for name in ("pthread_mutexattr_setpshared", "pthread_mutexattr_setrobust"):
            fn = getattr(libc, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
            fn.restype = ctypes.c_int
        libc.pthread_mutexattr_init.argtypes = [ctypes.c_void_p]
        libc.pthread_mutex_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load()


def available() -> bool:
    return _libc is not None


class SharedMutex:
    """The mutex at ``offset`` of ``mm``. It keeps the mapping exported while it lives, so
    the mapping cannot be closed under a thread that is taking it."""

    __slots__ = ("_cell", "_trylock", "_unlock", "_stuck_until")

    def __init__(self, mm: mmap.mmap, offset: int) -> None:
        if _libc is None:
            raise OSError("no process-shared robust mutexes here")
        self._cell: Any = (ctypes.c_char * _BYTES).from_buffer(mm, offset)
        self._trylock = _libc.pthread_mutex_trylock
        self._unlock = _libc.pthread_mutex_unlock
        self._stuck_until = 0.0  # after a wait that failed: only try, until then

    @classmethod
    def create(cls, mm: mmap.mmap, offset: int) -> SharedMutex:
        """Set up a new mutex at ``offset`` (the segment's creator, once)."""
        mutex = cls(mm, offset)
        attr = ctypes.create_string_buffer(64)
        rc = (_libc.pthread_mutexattr_init(attr)
              or _libc.pthread_mutexattr_setpshared(attr, 1)
              or _libc.pthread_mutexattr_setrobust(attr, 1)
              or _libc.pthread_mutex_init(ctypes.byref(mutex._cell), attr))
        if rc:
            raise OSError(rc, f"cannot set up a shared mutex: {errno.errorcode.get(rc, rc)}")
        return mutex

    def acquire(self, wait: float = WAIT_S) -> Any:
        """Take it, waiting at most ``wait`` seconds (0: only if free now): what to hand
        to ``release``, or None if it was not had in time (or is closed)."""
        cell = self._cell
        if cell is None:
            return None
        rc = self._trylock(ctypes.byref(cell))
        if rc == errno.EBUSY and wait > 0 and time.monotonic() >= self._stuck_until:
            deadline = time.time() + wait
            sec = int(deadline)
            rc = _libc.pthread_mutex_timedlock(ctypes.byref(cell), ctypes.byref(
                _Timespec(sec, int((deadline - sec) * 1e9))))
            if rc == errno.ETIMEDOUT:
                self._stuck_until = time.monotonic() + STUCK_S
        if rc == 0:
            return cell
        if rc == errno.EOWNERDEAD:  # its holder died: what it guarded is whole (see _ring)
            _libc.pthread_mutex_consistent(ctypes.byref(cell))
            return cell
        return None

    def release(self, held: Any) -> None:
        """Leave it free (``held``: what ``acquire`` returned, which keeps the mapping)."""
        self._unlock(ctypes.byref(held))

    def close(self) -> None:
        """Let go of the mapping (no thread may be using the mutex)."""
        self._cell = None
