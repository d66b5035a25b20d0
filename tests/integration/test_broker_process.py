"""``mpmesh.Manager()``'s broker runs in a process of its own.

What the creator does (spin in Python, sit in a long C call that holds the GIL) must not
slow other processes' shared-state operations; the creator keeps no thread, so a later
``fork`` is safe; and the broker and its creator live and die together.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import mpmesh
from tests.compat.conftest import FORK_WARNING
from tests.conftest import wait_for
from tests.integration import broker_process_workers as workers

LONG = 30.0
ROUNDS = 40
# A round is a lock, a get, a set, an append and an index: a few milliseconds at most on
# an idle machine. With the broker on a thread of a spinning creator a round took ~0.4 s
# here (every operation waits for the creator to hand over the GIL), so this bound fails
# by orders of magnitude on that design while leaving room for a loaded CI machine.
WORST_ROUND_S = 0.25


def _busy_python(until: Any) -> None:
    x = 0
    while not until():
        for i in range(20_000):
            x += i * i


def _busy_in_c(until: Any) -> None:
    while not until():  # a backtracking match holds the GIL for the whole call (~0.3 s)
        re.match(r"(a+)+b", "a" * 23)


@pytest.mark.filterwarnings(FORK_WARNING)  # pytest's own threads; not what is tested here
@pytest.mark.parametrize("busy", [_busy_python, _busy_in_c], ids=["python", "c-call"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_busy_creator_does_not_slow_other_processes(busy: Any, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with mpmesh.Manager() as m:
        d, lst, lock, out = m.dict(), m.list(), m.Lock(), m.Queue()
        proc = ctx.Process(target=workers.timed_ops, args=(d, lst, lock, ROUNDS, out))
        proc.start()
        try:
            busy(lambda: not proc.is_alive())
            proc.join(LONG)
            assert proc.exitcode == 0
            worst = out.get(timeout=LONG)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert d["n"] == ROUNDS and len(lst) == ROUNDS
        assert worst < WORST_ROUND_S, f"a round took {worst * 1e3:.0f} ms while the creator was busy"


def _run(code: str, timeout: float = LONG) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_the_creator_keeps_no_thread_and_may_fork() -> None:
    """A fresh interpreter (single-threaded, so the fork warning would fire): after
    ``Manager()`` it runs one thread, and ``os.fork()`` and a fork ``Pool`` raise no
    DeprecationWarning (``-W error``)."""
    done = _run("""
        import multiprocessing, os, threading
        import mpmesh
        with mpmesh.Manager() as m:
            d = m.dict(a=1)
            assert threading.active_count() == 1, threading.enumerate()
            pid = os.fork()
            if pid == 0:
                os._exit(0 if d["a"] == 1 else 3)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            with multiprocessing.get_context("fork").Pool(2) as pool:
                assert pool.map(abs, [-1, -2]) == [1, 2]
            print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_killed_broker_is_a_clear_error_for_everyone() -> None:
    m = mpmesh.Manager()
    try:
        d, ev, ready = m.dict(), m.Event(), m.Queue()
        proc = multiprocessing.get_context("spawn").Process(target=workers.park_on, args=(ev, ready))
        proc.start()
        assert ready.get(timeout=LONG) == "parked"
        assert m._broker_proc is not None
        m._broker_proc.kill()
        # Once it is gone, every call fails (a write racing the kill may be taken).
        m._broker_proc.join(LONG)
        with pytest.raises(mpmesh.BrokerUnavailable):
            d["x"] = 1
        proc.join(LONG)  # its parked wait fails too, instead of hanging
        assert proc.exitcode not in (None, 0)
        proc.close()
    finally:
        m.shutdown()


def test_a_killed_creator_takes_its_broker() -> None:
    assert_sigkill_takes_broker("""
        m = mpmesh.Manager()
        m.dict(a=1)
        print(m._broker_proc.pid, flush=True)
    """)


def assert_sigkill_takes_broker(setup: str) -> None:
    """Run ``setup`` (it prints its broker's pid) in a fresh interpreter, SIGKILL that
    interpreter, and check its broker process is gone within 5 s."""
    creator = subprocess.Popen([sys.executable, "-c", "import sys, mpmesh\n" + textwrap.dedent(setup)
                                + "\nsys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert creator.stdout is not None
        broker = int(creator.stdout.readline())
        os.kill(creator.pid, signal.SIGKILL)
        creator.wait(LONG)
        assert wait_for(lambda: not _alive(broker), 5.0), "the broker outlived its creator"
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()
        assert creator.stdin is not None and creator.stdout is not None
        creator.stdin.close()
        creator.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_thread_broker_is_still_offered() -> None:
    with mpmesh.Manager(broker="thread") as m:
        assert m._broker_proc is None
        d = m.dict(a=1)
        assert d["a"] == 1
    with pytest.raises(ValueError, match="broker"):
        mpmesh.Manager(broker="elsewhere")


def test_shutdown_reaps_the_broker() -> None:
    m = mpmesh.Manager()
    proc = m._broker_proc
    assert proc is not None and _alive(proc.pid)
    started = time.monotonic()
    m.shutdown()
    assert not _alive(proc.pid)
    assert time.monotonic() - started < 5.0
