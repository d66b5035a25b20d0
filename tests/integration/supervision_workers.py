"""Targets for ``test_supervision.py`` (importable, so every start method can run them).

Every ``task`` first checks in with the master (its ``checkin`` handler) and then does
what the master answers: the test decides, per arrival, whether this attempt returns,
hangs, spins, ignores SIGTERM... So a test can make the first attempt of a request hang
(and kill it) while its retry, on another member or on the replacement, succeeds.

Directives (the ``checkin`` handler's answer):

- ``("return", None)``: return ``{"tag", "name", "group", "pid"}``.
- ``("raise", "ValueError"|"KeyError")``: raise that exception type.
- ``("sleep", None)``: hang for good in ``time.sleep`` (until killed).
- ``("sleep", seconds)``: a handler busy in ``time.sleep`` for that long, then return.
- ``("spin", seconds)``: a CPU-bound Python loop for that long (never waits), then return.
- ``("gil", seconds)``: one C call that holds the GIL for about that long
  (``sum(range(n))``), then return.
- ``("exit", code)``: ``os._exit(code)``; ``("system-exit", code)``: raise SystemExit;
  ``("segfault", None)``: read address 0 through ctypes.
- ``("stubborn", None)``: ignore SIGTERM, check in again (tag ``"<tag>:ignoring-sigterm"``),
  then hang for good.
"""

from __future__ import annotations

import os
import signal
import time

import mpmesh

FOREVER_S = 3600.0


def _info(child: mpmesh.Child, tag: object) -> dict[str, object]:
    return {"tag": tag, "name": child.name, "group": child.group, "pid": os.getpid()}


def _spin(seconds: float) -> int:
    """Burn CPU in pure Python for ``seconds`` (the GIL switches, the loop never waits)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(10_000):
            n += 1
    return n


def _hold_the_gil(seconds: float) -> None:
    """Hold the GIL in a single C call for about ``seconds`` (no bytecode runs meanwhile)."""
    n = 2_000_000
    started = time.perf_counter()
    sum(range(n))
    per_item = (time.perf_counter() - started) / n
    sum(range(int(seconds / per_item)))
    # Calibration runs slow on a loaded machine; top up with further long C calls.
    while (left := seconds - (time.perf_counter() - started)) > 0:
        sum(range(max(n, int(left / per_item))))


def worker(child: mpmesh.Child) -> None:
    @child.handler("task")
    def task(tag: object) -> object:
        kind, arg = child.send_request("checkin", _info(child, tag))  # type: ignore[misc]
        if kind == "raise":
            raise {"ValueError": ValueError, "KeyError": KeyError}[arg](f"{tag} in {child.name}")
        if kind == "sleep":
            deadline = time.monotonic() + (FOREVER_S if arg is None else float(arg))
            while time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        elif kind == "spin":
            _spin(float(arg))
        elif kind == "gil":
            _hold_the_gil(float(arg))
        elif kind == "exit":
            os._exit(int(arg))
        elif kind == "system-exit":
            raise SystemExit(int(arg))
        elif kind == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif kind == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # main thread: a sequential child
            child.send_request("checkin", _info(child, f"{tag}:ignoring-sigterm"))
            while True:
                time.sleep(FOREVER_S)
        return _info(child, tag)

    @child.handler("record")
    def record(tag: object) -> object:
        """Tell the master's ``record`` handler that ``tag`` runs now (execution order)."""
        child.send_request("record", tag)
        return tag

    @child.handler("counted")
    def counted(tag: object) -> object:
        """Enter, wait at the master's gate, leave: the master counts who is inside."""
        child.send_request("enter", tag)
        try:
            child.send_request("hold", tag)
        finally:
            child.send_request("leave", tag)
        return tag

    @child.handler("whoami")
    def whoami(_: object) -> dict[str, object]:
        return _info(child, None)

    @child.handler("echo")
    def echo(x: object) -> object:
        return x

    child.run()
