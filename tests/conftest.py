"""Test fixtures: an isolated runtime directory, and a guard that fails any test leaving
a process, a socket/key file or a file descriptor behind (loky/pyzmq style)."""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator

import pytest

# Before mpmesh is imported anywhere: every mesh of this test process lives in a private,
# short directory (Unix socket paths are limited to ~100 bytes). A process a test starts
# that imports this module (a spawned child unpickling a test's function) keeps the
# directory it inherited: it is the test process's to remove.
if "PYTEST_CURRENT_TEST" in os.environ and os.environ.get("MPMESH_RUNTIME_DIR"):
    _RUNTIME = os.environ["MPMESH_RUNTIME_DIR"]
else:
    _RUNTIME = tempfile.mkdtemp(prefix="mpm-")
    os.environ["MPMESH_RUNTIME_DIR"] = _RUNTIME

# The stdlib starts these long-lived helpers on first use of spawn / forkserver; start
# them up front so the leak guard does not count them against the first test using them.
multiprocessing.resource_tracker.ensure_running()
multiprocessing.forkserver.ensure_running()

SETTLE_S = 5.0  # how long a test's processes get to finish exiting before it counts as a leak


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_RUNTIME, ignore_errors=True)


def descendants(root: int | None = None) -> set[int]:
    """PIDs of every live process below ``root`` (this process by default), via /proc."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z":
            continue
        parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it holds; for conditions only the OS can tell us about."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    before_procs = descendants()
    before_fds = open_fds()
    yield
    # A zygote parked for the next mesh of this process, and the launcher of broker
    # processes, are kept on purpose; not leaks.
    from mpmesh._host._process import discard_launcher
    from mpmesh._io._spare import discard_spare

    discard_spare()
    discard_launcher()
    wait_for(lambda: not (descendants() - before_procs), SETTLE_S)
    leaked = descendants() - before_procs
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    files = sorted(os.listdir(_RUNTIME))
    for name in files:
        os.unlink(os.path.join(_RUNTIME, name))
    wait_for(lambda: open_fds() <= before_fds, 2.0)
    extra_fds = {fd: _describe_fd(fd) for fd in open_fds() - before_fds}
    assert not leaked, f"processes left behind: {sorted(leaked)}"
    assert not files, f"runtime files left behind: {files}"
    assert not extra_fds, f"file descriptors left open: {extra_fds}"


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)
