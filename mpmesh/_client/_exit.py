"""How a process ends, as its broker connections tell it.

The broker cannot see a process's exit status (it goes to the process's parent); it only
sees the connection close. So a process tells it: a connection that closes after a
Goodbye was a clean exit, one that closes without is a crash, and the Manager locks and
semaphore units a crashed process held are released (``_broker/_objects``), where a
clean exit leaves them held, as the standard library does. A process ends cleanly when
its ``multiprocessing`` ``run()`` returns or raises SystemExit(0 or None), when a script
ends without an uncaught exception, or when it closes its connection itself. Killed by a
signal, os._exit(), any other exception or exit status out of ``run()``: no Goodbye.
The Goodbye goes from ``multiprocessing.util``'s exit handler (``_exit_function``), which
a ``multiprocessing`` child runs after ``run()`` with its exception still in
``sys.exc_info()`` (atexit handlers do not run in a forked child), and which runs from
``atexit`` elsewhere; a Master's child says it from ``run_target``, which knows its exit
code (``process_ends``). Every connection of the process says it, whichever broker it
goes to. Not seen: a script's sys.exit(n) (atexit cannot tell), a kill after the Goodbye.
"""


from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import sys
import threading
import types
import weakref
from typing import Protocol


__all__ = ["ends_uncleanly", "exit_is_clean", "process_ends", "watch_exit"]


class Farewell(Protocol):
    """A connection that can say Goodbye (``SocketClient``)."""

    _pid: int

    def say_goodbye(self) -> None: ...


_open_clients: weakref.WeakSet[Farewell] = weakref.WeakSet()
_verdict: tuple[int, bool] | None = None  # (pid, clean) once this process's end is judged
_watching_pid = 0


def watch_exit(client: Farewell) -> None:
    """Say Goodbye on ``client`` when this process ends cleanly."""
    global _watching_pid
    _open_clients.add(client)
    if _watching_pid != client._pid:
        _watching_pid = client._pid
        multiprocessing.util.Finalize(None, _at_exit, exitpriority=-100)
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(_at_thread_shutdown)
            except RuntimeError:  # the process is already shutting down
                pass


def exit_is_clean() -> bool:
    """Called as this process ends: whether it ends cleanly (judged once per process)."""
    pid = os.getpid()
    if _verdict is not None and _verdict[0] == pid:
        return _verdict[1]
    exc = sys.exc_info()[1]
    if exc is None and multiprocessing.parent_process() is None:
        # A script that an uncaught exception ended (a child may have inherited these).
        exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0))


def ends_uncleanly() -> bool:
    """Whether this process was judged to be ending abnormally (then nothing says Goodbye)."""
    return _verdict is not None and _verdict[0] == os.getpid() and not _verdict[1]


def process_ends(clean: bool) -> None:
    """This process is about to end: if ``clean``, each of its connections says Goodbye
    now; if not, none will (not even as it closes)."""
    global _verdict
    pid = os.getpid()
    _verdict = (pid, clean)
    if clean:
        for client in list(_open_clients):
            if client._pid == pid:
                client.say_goodbye()


def _at_exit() -> None:
    process_ends(exit_is_clean())


def _at_thread_shutdown() -> None:
    """Judge a ``multiprocessing`` child's end by its exit code. From Python 3.13 its
    ``_bootstrap`` runs the exit handlers only after it returned (with the exception
    already handled); the code is still a local of ``_bootstrap`` while that shuts the
    threading module down, which is when this runs."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_bootstrap" and "exitcode" in frame.f_locals:
            if _verdict is None or _verdict[0] != os.getpid():
                process_ends(frame.f_locals["exitcode"] == 0)
            return
        frame = frame.f_back
