"""What every benchmark suite shares: configuration, timing, rows, tables, processes.

Method (the same for every suite):

- **Side by side.** Each scenario sets up mpmesh and its standard-library peer in the same
  process, then runs one timed *batch* of each per repetition, alternating the order every
  repetition (ABC, CBA, ABC, ...) so that slow drift (CPU frequency, other load on the
  machine) hits both sides alike. The figure reported is the median over repetitions.
- **Two modes, two fresh processes.** ``pinned``: the whole benchmark, and every process
  it starts, runs on one CPU (``os.sched_setaffinity`` before anything is spawned; children
  inherit it): stable, and it shows the cost of the code path. ``unpinned``: what users see,
  cross-CPU wake-ups included. Each mode runs in its own ``python -m benchmarks`` worker
  subprocess, which hands its rows back as JSON.
- **Nothing hangs.** A worker arms an alarm (``faulthandler`` dumps every thread's stack
  and the process ends when a suite overruns), the parent kills a worker that exceeds its budget, and
  any process the worker left behind is found by session id and killed by PID.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import datetime
import faulthandler
import gc
import io
import json
import os
import platform
import pstats
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from mpmesh._io._forking import threads_in_process

__all__ = [
    "MODES", "Config", "Row", "Timed", "alternate", "bar_check", "machine_info", "render_table",
    "guarded", "run_mode_subprocess", "threads_in_process", "wait_single_threaded", "watchdog",
    "write_results",
]

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = Path(__file__).resolve().parent / "RESULTS.md"
MODES: Final = ("pinned", "unpinned")
# Seconds a stray process of a finished worker gets after SIGTERM before SIGKILL.
STRAY_GRACE_S: Final = 2.0


# -- configuration and rows --------------------------------------------------------------

@dataclass
class Config:
    """What a suite's ``run`` is told: how long to run, in which mode."""

    quick: bool = False
    repeat: int | None = None          # overrides every scenario's repetition count
    mode: str = "unpinned"             # "pinned" or "unpinned"
    cpu: int | None = None             # the CPU of pinned mode
    profile: bool = False              # cProfile the master side (see ``Profiler``)
    profiler: Profiler | None = None
    notes: list[str] = field(default_factory=list)  # observations worth printing under the table
    errors: list[str] = field(default_factory=list)  # scenarios that failed while the suite went on
    log: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr, flush=True))

    def reps(self, full: int, quick: int) -> int:
        return self.repeat if self.repeat else (quick if self.quick else full)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Row:
    """One implementation in one scenario, in one mode.

    ``per_op`` is the median over repetitions of the seconds one operation took;
    ``ratio`` compares it with the scenario's reference row (``ratio_kind`` "time": this
    row's time per op / the reference's; "rate": this row's ops/s / the reference's).
    ``floor_ratio`` is time per op / the scenario's floor row's, where there is one.
    """

    scenario: str
    impl: str
    samples: list[float]               # seconds per op, one per repetition
    ops: int                           # operations per repetition
    mode: str = ""
    ref: str | None = None             # impl label of the reference row (None: this is one)
    ratio: float | None = None
    ratio_kind: str = "time"
    floor_ratio: float | None = None
    bar: str = ""                      # e.g. "time <= 0.80x"
    passed: bool | None = None
    show_rate: bool = True             # False for one-shot rows (startup, teardown)
    note: str = ""

    @property
    def per_op(self) -> float:
        return statistics.median(self.samples)

    @property
    def rate(self) -> float:
        return 1.0 / self.per_op if self.per_op > 0 else float("inf")

    @property
    def spread(self) -> float:
        """Half the range of the samples, relative to the median (a noise indicator)."""
        if len(self.samples) < 2 or self.per_op <= 0:
            return 0.0
        return (max(self.samples) - min(self.samples)) / 2 / self.per_op

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def relate(rows: Sequence[Row], ref: str, *, kind: str = "time", floor: str | None = None) -> None:
    """Fill ``ratio`` of every row against ``ref`` (and ``floor_ratio`` against ``floor``)."""
    by_impl = {r.impl: r for r in rows}
    base = by_impl[ref]
    floor_row = by_impl.get(floor) if floor else None
    for row in rows:
        if row is not base:
            row.ref = ref
            row.ratio = (row.per_op / base.per_op) if kind == "time" else (row.rate / base.rate)
            row.ratio_kind = kind
        if floor_row is not None and row is not floor_row:
            row.floor_ratio = row.per_op / floor_row.per_op


def bar_check(row: Row, op: str, limit: float) -> None:
    """Mark ``row`` PASS/FAIL on its ratio: ``op`` is "<=" (time) or ">=" (rate)."""
    assert row.ratio is not None, "call relate() first"
    row.bar = f"{row.ratio_kind} {op} {limit:.2f}x"
    row.passed = row.ratio <= limit if op == "<=" else row.ratio >= limit


# -- timing -------------------------------------------------------------------------------

Timed = Callable[[], "float | dict[str, float]"]


def alternate(batches: Sequence[tuple[str, Timed]], reps: int, *, log: Callable[[str], None] | None = None,
              label: str = "") -> dict[str, list[float]]:
    """Run each batch once per repetition, reversing the order every other repetition.

    A batch times itself (so its set-up stays outside the timed region) and returns the
    seconds per operation, or a dict of such figures keyed by row label (one batch may
    feed several rows, e.g. start-up and teardown). ``gc.collect()`` runs before each
    batch so that no batch pays for another's garbage.
    """
    samples: dict[str, list[float]] = {}
    for rep in range(reps):
        order = batches if rep % 2 == 0 else list(reversed(batches))
        for name, batch in order:
            gc.collect()
            result = batch()
            for key, value in (result.items() if isinstance(result, dict) else [(name, result)]):
                samples.setdefault(key, []).append(value)
        if log is not None:
            log(f"  {label} repetition {rep + 1}/{reps} done")
    return samples


def guarded(cfg: Config, scenarios: Sequence[Callable[[Config], list[Row]]]) -> list[Row]:
    """Run each scenario; one that raises is recorded in ``cfg.errors`` and the rest go on."""
    import traceback

    rows: list[Row] = []
    for scenario in scenarios:
        try:
            rows += scenario(cfg)
        except Exception:
            cfg.errors.append(f"{scenario.__name__}: {traceback.format_exc()}")
    return rows


def loop_time(n: int, fn: Callable[[], object]) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls."""
    perf = time.perf_counter
    start = perf()
    for _ in range(n):
        fn()
    return (perf() - start) / n


def wait_single_threaded(timeout: float = 3.0) -> bool:
    """Wait for helper threads of earlier scenarios to finish; whether they did."""
    deadline = time.monotonic() + timeout
    while threads_in_process() > 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Dump every thread's stack and end the process if the block runs past ``seconds``.

    ``faulthandler.dump_traceback_later`` would start a thread, and a Master forks its
    zygote only from a single-threaded process; so the alarm is ``SIGALRM``, whose
    faulthandler handler dumps the stacks from signal context (even when the main thread
    is stuck in C), then re-raises it with the default action: the process ends.
    """
    faulthandler.register(signal.SIGALRM, all_threads=True, chain=True)
    signal.alarm(max(1, int(seconds + 0.999)))
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.unregister(signal.SIGALRM)


class Profiler:
    """cProfile for chosen stretches of the calling thread, and for whole helper threads.

    Python 3.11 has no ``threading.setprofile_all_threads``: ``hook_new_threads()``
    installs a profile hook that threads started afterwards call first; it swaps itself
    for a ``cProfile.Profile`` of that thread (the broker's loop thread, for a Master).
    Profiles are kept per ``section`` (one per scenario), so scenarios do not blur.
    """

    def __init__(self) -> None:
        self.section = ""
        self.profiles: dict[str, cProfile.Profile] = {}

    @contextlib.contextmanager
    def on_main(self) -> Iterator[None]:
        key = f"{self.section}: main thread (timed mpmesh batches only)"
        prof = self.profiles.setdefault(key, cProfile.Profile())
        prof.enable()
        try:
            yield
        finally:
            prof.disable()

    def hook_new_threads(self) -> None:
        section = self.section

        def hook(*_: object) -> None:
            prof = cProfile.Profile()
            self.profiles[f"{section}: thread {threading.current_thread().name} (its whole life)"] = prof
            prof.enable()

        threading.setprofile(hook)

    def unhook(self) -> None:
        threading.setprofile(None)

    def report(self, top: int = 25) -> str:
        out = io.StringIO()
        for title, prof in self.profiles.items():
            try:
                stats = pstats.Stats(prof, stream=out)
            except TypeError:  # a thread that never made a call
                continue
            out.write(f"\n==== {title}: top {top} by tottime ====\n")
            stats.sort_stats("tottime").print_stats(top)
        return out.getvalue()


# -- the machine ------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mpmesh"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"


def machine_info() -> dict[str, str]:
    """The header every table carries: when, on what, with what."""
    try:
        import mpmesh
        version = mpmesh.__version__
    except Exception:  # pragma: no cover - a broken checkout still gets its header
        version = "not importable"
    import multiprocessing

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "nproc": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"
                 if hasattr(os, "sched_getaffinity") else str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "start_method": multiprocessing.get_context().get_start_method(),
        "mpmesh": f"{version} @ {_git_revision()}",
        "loadavg": load,
    }


def machine_line(info: dict[str, str]) -> str:
    return (f"{info['date']} · {info['platform']} · {info['cpu']} · nproc {info['nproc']} · "
            f"{info['python']} ({info['start_method']}) · mpmesh {info['mpmesh']} · "
            f"load avg at start {info['loadavg']}")


# -- tables -------------------------------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


HEADERS: Final = ("scenario", "mode", "implementation", "per op (median)", "ops/s", "ratio",
                  "vs floor", "bar", "result")
RIGHT: Final = frozenset({3, 4, 5, 6})  # right-aligned (numeric) columns


def table_cells(rows: Sequence[Row]) -> list[list[str]]:
    """One line per row, grouped by scenario, then mode, in the order the suite gave."""
    scenarios: list[str] = []
    for row in rows:
        if row.scenario not in scenarios:
            scenarios.append(row.scenario)
    cells: list[list[str]] = []
    for scenario in scenarios:
        first = True
        for mode in MODES:
            for row in (r for r in rows if r.scenario == scenario and r.mode == mode):
                spread = f" ±{row.spread * 100:.0f}%" if len(row.samples) > 1 else ""
                ratio = "ref" if row.ref is None else f"{row.ratio:.2f}x"
                result = "" if row.passed is None else ("PASS" if row.passed else "FAIL")
                cells.append([
                    scenario if first else "", mode, row.impl + (f" ({row.note})" if row.note else ""),
                    fmt_time(row.per_op) + spread, fmt_rate(row.rate) if row.show_rate else "",
                    ratio, "" if row.floor_ratio is None else f"{row.floor_ratio:.2f}x",
                    row.bar, result,
                ])
                first = False
    return cells


def render_table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    cells = table_cells(rows)
    if markdown:
        align = ["--:" if i in RIGHT else "---" for i in range(len(HEADERS))]
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(align) + "|"]
        for line in cells:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
        return "\n".join(lines)
    widths = [max(len(h), *(len(line[i]) for line in cells)) if cells else len(h) for i, h in enumerate(HEADERS)]
    def fmt(line: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        return "  ".join(padded).rstrip()

    out = [fmt(HEADERS), fmt(["-" * w for w in widths])]
    for line in cells:
        if line[0] and len(out) > 2:
            out.append("")
        out.append(fmt(line))
    return "\n".join(out)


LEGEND: Final = (
    "per op: median over repetitions (± half the range, relative); ratio: against the "
    "scenario's reference row (time bars: time per op ÷ reference's, lower is better; "
    "rate bars: ops/s ÷ reference's, higher is better); vs floor: time per op ÷ the "
    "scenario's floor row in the same run (bare Python: a multiprocessing.Pipe ping-pong, "
    "or a socket echo server with no protocol); pinned = every process on one CPU."
)


# -- worker subprocesses ------------------------------------------------------------------------

def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid`` (the worker's own pid)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return found


def end_strays(sid: int) -> tuple[list[int], list[int]]:
    """Kill, PID by PID, whatever the worker of session ``sid`` left running.

    Returns the PIDs found and those still alive after SIGTERM, then SIGKILL.
    """
    found = strays = _session_members(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STRAY_GRACE_S
        while strays and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = set(_session_members(sid))
            strays = [p for p in strays if p in alive]
        if not strays:
            break
    return found, strays


def run_mode_subprocess(mode: str, suites: Sequence[str], worker_args: Sequence[str],
                        timeout: float) -> dict[str, Any]:
    """Run ``python -m benchmarks`` in ``mode`` as a fresh process; return its JSON report.

    The worker's own output goes to our stderr (progress, tracebacks); its rows come back
    through a temporary file, so nothing a child prints can corrupt them.
    """
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"mpmesh-bench-{mode}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "benchmarks", *suites, "--worker", mode, "--json-out", path, *worker_args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sys.stderr,
                            stderr=sys.stderr, start_new_session=True)
    error = ""
    try:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            error = f"{mode} worker (pid {proc.pid}) ran past its {timeout:.0f} s budget; killed"
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        strays, leftover = end_strays(proc.pid)
        if not error and proc.returncode != 0:
            error = f"{mode} worker exited with status {proc.returncode}"
        try:
            with open(path) as f:
                report: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            report = {"mode": mode, "rows": [], "errors": []}
        if error:
            report.setdefault("errors", []).append(error)
        if strays or leftover:
            report.setdefault("errors", []).append(
                f"{mode} worker left processes behind: {sorted(strays)} (killed); "
                f"still alive: {sorted(leftover) or 'none'}")
        report["elapsed"] = time.monotonic() - started
        return report
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- RESULTS.md ------------------------------------------------------------------------------------

RESULTS_HEADER: Final = """# mpmesh benchmark results

Written by `python -m benchmarks SUITE --write` (see `benchmarks/__init__.py`). Each
suite's section is replaced only when that suite runs; the others are kept as they are.
Every figure is a median over repetitions, with mpmesh and its standard-library peer run
side by side in the same process, pinned to one CPU and unpinned.
"""


def section_text(suite: str, title: str, info: dict[str, str], rows: Sequence[Row], command: str,
                 notes: Sequence[str]) -> str:
    lines = [f"<!-- suite:{suite} -->", f"## {suite}: {title}", "",
             f"- Date: {info['date']}",
             f"- Machine: {info['platform']}; {info['cpu']}; nproc {info['nproc']}; "
             f"load average at start {info['loadavg']}",
             f"- Python: {info['python']}; start method {info['start_method']}; mpmesh {info['mpmesh']}",
             f"- Command: `{command}`", "",
             render_table(rows, markdown=True), "", LEGEND]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines.append(f"<!-- /suite:{suite} -->")
    return "\n".join(lines)


def write_results(sections: dict[str, str], path: Path = RESULTS) -> None:
    """Replace (or append) each suite's marked section of ``path``, keeping the rest."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    for suite, body in sections.items():
        pattern = re.compile(rf"<!-- suite:{re.escape(suite)} -->.*?<!-- /suite:{re.escape(suite)} -->", re.S)
        match = pattern.search(text)
        if match:
            text = text[:match.start()] + body + text[match.end():]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
