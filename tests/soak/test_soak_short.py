"""The chaos soak, short enough for CI (~25 s), plus the checks it relies on.

The soak runs in a subprocess, as ``python -m tests.soak.soak`` would: it forks a
Master, spawns clients and SIGKILLs them; this process only reads its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.soak.soak import BOUNDS, LogReader, OpLog, counter_violations

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = 25


def test_short_soak_finds_no_violation() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.soak.soak", "--seconds", str(SOAK_SECONDS), "--seed", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "OK: no violation" in out.stdout, report
    assert "| SIGKILLs | 0 " not in out.stdout, "the chaos thread killed nothing"


# -- the checker itself: a soak that cannot see a violation proves nothing ---------------------

def test_log_reader_counts_calls_and_sees_a_call_cut_short(tmp_path: Path) -> None:
    path = str(tmp_path / "c.log")
    log = OpLog(path)
    log.start("incr", BOUNDS["incr"])
    log.end("incr", 0.001, "ok")
    log.start("req", BOUNDS["req"])
    log.end("req", 0.5, "WorkerLost")
    log.start("incr", BOUNDS["incr"])  # killed here: attempted, never acknowledged
    log.close()
    reader = LogReader(path, "c")
    reader.update(slack=3.0)
    assert reader.started == {"incr": 2, "req": 1}
    assert reader.outcomes == {("incr", "ok"): 1, ("req", "WorkerLost"): 1}
    assert reader.open is not None and reader.open[0] == "incr"
    assert reader.violations == []


def test_log_reader_flags_a_hung_and_a_slow_call(tmp_path: Path) -> None:
    path = str(tmp_path / "c.log")
    log = OpLog(path)
    log.start("lock", 1.0)
    log.end("lock", 9.0, "ok")  # returned, but far past its bound
    log.start("req", 1.0)
    log.violation("c1 cache: read 3 after writing 4")
    reader = LogReader(path, "c1")
    reader.update(slack=3.0)
    start = reader.open[1] if reader.open else 0.0
    reader.check_hang(start + 2.0, slack=3.0)  # within bound + slack: still fine
    assert len(reader.violations) == 2
    reader.check_hang(start + 5.0, slack=3.0)
    reader.check_hang(start + 6.0, slack=3.0)  # the same call is reported once
    log.close()
    assert [v.split(":", 1)[1].split()[:2] for v in reader.violations] == [
        ["lock", "took"], ["c1", "cache:"], ["req", "hung:"]]


def test_log_reader_keeps_a_partial_line_for_later(tmp_path: Path) -> None:
    path = str(tmp_path / "c.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"S incr {time.monotonic():.6f} 5.0\nE incr 0.0".encode())
        reader = LogReader(path, "c")
        reader.update(slack=3.0)
        assert reader.started["incr"] == 1 and not reader.outcomes
        os.write(fd, b"01 ok\n")
        reader.update(slack=3.0)
        assert reader.outcomes == {("incr", "ok"): 1} and reader.open is None
    finally:
        os.close(fd)


def test_counter_checks() -> None:
    assert counter_violations("n", 10, 10, 12) == []
    assert counter_violations("n", 12, 10, 12) == []
    assert "lost" in counter_violations("n", 9, 10, 12)[0]
    assert "twice" in counter_violations("n", 13, 10, 12)[0]
