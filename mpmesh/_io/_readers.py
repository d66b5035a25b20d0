"""Descriptors that other parts of a process watch through one of its selector loops.

A supervisor hears its zygote's reports, and a ``multiprocessing`` child's sentinel,
through whichever loop hosts it: a broker's (``_loop.py``) or a standalone pool's
(``_pool/_io.py``). Both loops keep this small registry; changes may come from any
thread and are applied on the loop's own thread, which alone touches its selector.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable

__all__ = ["Reader", "Readers", "drain_pipe"]


def drain_pipe(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:  # BlockingIOError: empty
        pass


class Reader:
    """The selector data of a watched descriptor: call ``callback()`` when it is readable."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback


class Readers:
    """Pending and current watches of one loop (a mixin: the loop supplies the rest)."""

    _sel: selectors.BaseSelector
    _thread: threading.Thread | None

    def _wake(self) -> None: ...

    def _init_readers(self) -> None:
        self._readers_lock = threading.Lock()
        self._reader_changes: list[tuple[int, Callable[[], None] | None]] = []
        self._watched_fds: set[int] = set()

    def add_reader(self, fd: int, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` on the loop's thread whenever ``fd`` is readable (None
        removes); from any thread."""
        with self._readers_lock:
            self._reader_changes.append((fd, callback))
        if threading.current_thread() is self._thread:
            self._apply_reader_changes()
        else:
            self._wake()

    def _apply_reader_changes(self) -> None:
        """On the loop's thread."""
        with self._readers_lock:
            changes, self._reader_changes = self._reader_changes, []
        for fd, callback in changes:
            if fd in self._watched_fds:
                self._watched_fds.discard(fd)
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError):
                    pass
            if callback is not None:
                self._sel.register(fd, selectors.EVENT_READ, Reader(callback))
                self._watched_fds.add(fd)

    def _forget_readers(self) -> None:
        """The loop is closing: unregister what is still watched."""
        for fd in self._watched_fds:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._watched_fds.clear()
