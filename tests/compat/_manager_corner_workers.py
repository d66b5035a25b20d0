"""Targets and picklable helpers of ``test_manager_corners`` (importable under spawn, and by
the standard library's manager server)."""

from __future__ import annotations

import sys
from typing import Any

REFUSAL = "this object refuses to be pickled"


class Unpicklable:
    """Pickling it raises RuntimeError (not a TypeError or PicklingError)."""

    def __reduce__(self) -> Any:
        raise RuntimeError(REFUSAL)


def identity(x: Any) -> Any:
    return x


def first(a: Any, b: Any) -> Any:
    return a


def square(x: int) -> int:
    return x * x


class AppendTrue:
    """A Barrier action holding a list proxy."""

    def __init__(self, lst: Any) -> None:
        self.lst = lst

    def __call__(self) -> None:
        self.lst.append(True)


def acquire_and_end(lock: Any, q: Any, how: str) -> None:
    """Acquire ``lock``, say so, then end: ``"return"``, ``"exit3"`` or ``"raise"``."""
    lock.acquire()
    q.put("held")
    if how == "exit3":
        sys.exit(3)
    if how == "raise":
        raise ValueError("the worker failed while holding the lock (expected by the test)")


def acquire_and_wait(lock: Any, q: Any, never: Any) -> None:
    """Acquire ``lock``, say so, and wait for an event nobody sets (to be killed)."""
    lock.acquire()
    q.put("held")
    never.wait(60)


def child_acquire_and_end(child: Any, lock: Any, q: Any, how: str) -> None:
    """A Master's child: acquire ``lock``, report our pid, end as ``acquire_and_end``."""
    import os

    lock.acquire()
    q.put(os.getpid())
    if how == "exit3":
        sys.exit(3)
