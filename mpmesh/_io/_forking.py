"""When this process may fork, and ending and reaping what it forked with a deadline.

Forking a process that runs threads can deadlock the child (Python 3.12+ warns), so
mpmesh forks only while the process is single-threaded, and execs a fresh interpreter
otherwise.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Final

__all__ = [
    "KILL_WAIT_S", "TERM_GRACE_S", "close_quietly", "exited", "fork_is_safe", "on_cpu", "reap", "stop_in_turn",
    "threads_in_process",
]

# After SIGTERM, how long processes get to exit before SIGKILL (they clean up in time).
TERM_GRACE_S: Final = 1.0
# After SIGKILL, how long to wait for the kernel to end them before giving up on it.
KILL_WAIT_S: Final = 10.0


def stop_in_turn(send: Callable[[int], None], gone: Callable[[float], bool],
                 grace: float = TERM_GRACE_S, kill_wait: float = KILL_WAIT_S) -> bool:
    """End processes politely, then not: ``send(SIGTERM)``, wait ``gone(grace)``; if they
    live on, ``send(SIGKILL)`` and wait ``gone(kill_wait)``. Whether they ended.

    ``send(sig)`` signals every process still to end; ``gone(timeout)`` waits up to
    ``timeout`` for all of them and says whether they are gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        send(sig)
        if gone(wait):
            return True
    return False


def close_quietly(fd: int) -> None:
    """Close ``fd``, already closed or not (a forked copy dropping what it inherited)."""
    try:
        os.close(fd)
    except OSError:
        pass


def on_cpu(pid: int) -> bool:
    """Whether ``pid`` is running or runnable right now (Linux; False where unknown).

    A child whose heartbeat thread is starved by one long C call holding the GIL is on
    the CPU; a frozen (SIGSTOP) or wedged one is not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"R"
    except (OSError, IndexError):
        return False


def threads_in_process() -> int:
    """OS threads in this process (what Python 3.12+ counts before warning on fork)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[17])
    except (OSError, ValueError, IndexError):
        return threading.active_count()


def fork_is_safe() -> bool:
    """Whether ``os.fork()`` is safe now: this process runs one thread (callers retire
    their own idle threads first)."""
    if threading.active_count() != 1 or not hasattr(os, "fork"):
        return False
    # A thread that was just joined can linger in the kernel's count for a moment,
    # and os.fork() (Python 3.12+) counts kernel threads: wait a little for it.
    deadline = time.monotonic() + 0.05
    while threads_in_process() != 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def reap(pid: int, timeout: float) -> int:
    """Wait for process ``pid`` (our child, or one our launcher forked) to exit; SIGKILL it
    if it has not within ``timeout``. Its exit code, as ``Process.exitcode`` gives it; for
    a process that is not our child (its parent reaps it), 0 if it exited by itself."""
    killed = False
    try:
        if not exited(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            killed = True
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except (ChildProcessError, ProcessLookupError):
        return -signal.SIGKILL if killed else 0


def exited(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited (it may not be reaped yet), waiting up to ``timeout``."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)  # readable once it has exited
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout  # pragma: no cover - macOS
    while time.monotonic() < deadline:  # pragma: no cover
        try:
            if os.waitpid(pid, os.WNOHANG)[0] != 0:
                return True
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.005)
    return False  # pragma: no cover
