"""Task functions for the Pool tests, importable by every worker (spawn and forkserver too).

Coordination between a test and its workers goes through files in a directory the test
owns (``marker``/``wait_for_file``), never through sleeps standing in for a condition.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any

# -- plain tasks -----------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def add(a: int, b: int) -> int:
    return a + b


def power(base: int, exp: int = 2) -> int:
    return int(base**exp)


def getpid(_: object = None) -> int:
    return os.getpid()


def pid_and_value(x: int) -> tuple[int, int]:
    return os.getpid(), x


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"bad value {x}")
    return x


def raise_key_error(key: str) -> None:
    raise KeyError(key)


def burn(n: int) -> int:
    """CPU work: about n loop iterations."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- what cannot cross -------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable objects refuse to be pickled")


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.gen = (i for i in range(3))  # neither pickle nor dill takes a generator


def return_unpicklable(_: object = None) -> Unpicklable:
    return Unpicklable()


def raise_unpicklable(_: object = None) -> None:
    raise UnpicklableError("carries a generator")


# -- worker state ------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def init_state(value: Any) -> None:
    _STATE["value"] = value


def read_state(_: object = None) -> Any:
    return _STATE.get("value")


def init_fail(message: str) -> None:
    raise RuntimeError(message)


def init_exit(_: object = None) -> None:
    os._exit(3)


# -- crashes -------------------------------------------------------------------------------------


def die(how: str) -> None:
    """End this worker mid-task: ``sigkill``, ``exit`` (os._exit) or ``segfault``."""
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(7)
    elif how == "segfault":
        ctypes.string_at(0)
    time.sleep(60)  # unreachable for the cases above


def die_once(marker_dir: str, how: str = "sigkill") -> str:
    """Die the first time (leaving a marker file), succeed when run again."""
    marker = Path(marker_dir) / "died-once"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return "second attempt"
    os.close(fd)
    die(how)
    return "unreachable"


def die_if(x: int, bad: int = 3, how: str = "sigkill") -> int:
    if x == bad:
        die(how)
    return x


# -- coordination ------------------------------------------------------------------------------


def wait_for_file(path: str, timeout: float = 30.0) -> bool:
    """Block until ``path`` exists (a test releases the task by creating it)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def mark_and_block(marker: str, release: str) -> int:
    """Create ``marker`` (the test now knows the task runs), then wait for ``release``."""
    Path(marker).touch()
    wait_for_file(release)
    return os.getpid()


def hang(_: object = None) -> None:
    """A task that never ends by itself (task_timeout must end it)."""
    while True:
        time.sleep(1)


def block_sigterm_then_hang(_: object = None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hang()
