"""Run CPython's own Manager and Pool tests against mpmesh and summarize the outcome.

Each selected class (``cpython_selection.py``) runs, once per start method, in a fresh
worker process (``cpython_worker.py``: the factories swapped, then CPython's test classes
built as ``test_multiprocessing_<method>`` builds them) in a session of its own. The
worker writes an event as each test starts and ends; one that writes none for
``--timeout`` seconds (a test, a class fixture or the interpreter's exit hangs) is made
to dump every thread's stack (SIGUSR1, faulthandler), then killed with its session; the
running test is reported as timed out and the class goes on from the next test in a new
worker. Whatever a worker leaves running after it ends is reported, then killed. ``--stdlib`` runs the
same tests with nothing swapped: the baseline.

    python conformance/run_cpython.py [--start-method fork|spawn|all] [--out DIR] [--stdlib]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpython_selection import EXCLUDED, HARNESS_SKIPS, SELECTED, START_METHOD_ENV, TARGET_ENV  # noqa: E402

WORKER = Path(__file__).resolve().parent / "cpython_worker.py"
START_METHODS = ("fork", "spawn")
OUTCOMES = ("passed", "failed", "error", "skipped", "not run")
# How often the driver looks at a worker's events.
POLL_S = 0.5
# Between the stack dump of a hung worker and its kill.
DUMP_S = 0.5
# How long a worker's children may outlive it before they are reported and killed.
LEFTOVER_GRACE_S = 5.0


@dataclass
class Outcome:
    """How one test (or a class fixture, or the worker's exit) ended."""

    id: str
    outcome: str  # one of OUTCOMES
    summary: str = ""  # the first line of the error, or the skip reason
    detail: str = ""  # the traceback


@dataclass
class SelectorRun:
    """Every worker run of one selector (a class, or one test) under one start method."""

    method: str
    selector: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    log: str = ""
    seconds: float = 0.0

    def counts(self) -> Counter[str]:
        return Counter(o.outcome for o in self.outcomes.values())

    def problems(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.outcome in ("failed", "error", "not run")]


@dataclass
class Attempt:
    """What one worker process reported."""

    plan: list[str] | None = None
    started: dict[str, float] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def _read_events(path: Path, limit: int | None = None) -> Attempt:
    """The events of one worker, those in the first ``limit`` bytes if given."""
    attempt = Attempt()
    if not path.exists():
        return attempt
    for line in path.read_bytes()[:limit].decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the watchdog
            continue
        kind = event.get("event")
        if kind == "plan" and attempt.plan is None:
            attempt.plan = list(event["ids"])
        elif kind == "start":
            attempt.started[event["id"]] = event["time"]
        elif kind == "result":
            attempt.results.append(event)
        elif kind == "finished":
            attempt.finished = True
    return attempt


def _session_leftovers(sid: int) -> list[str]:
    """``pid cmdline`` of every live process in session ``sid`` (Linux; else empty).
    Zombies are left out: nothing of ours is still running in them."""
    found: list[str] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid or fields[0] == "Z":  # fields: state ppid pgrp session ...
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        found.append(f"{entry.name} {cmdline.strip()[:160]}")
    return found


@dataclass(frozen=True)
class Settings:
    """What every worker of a run shares."""

    python: str  # the workers' interpreter
    target: str  # "mpmesh", or "stdlib" for the baseline (nothing swapped)
    timeout: float  # how long a worker may go without writing an event
    workdir: Path  # event files and worker logs

    def label(self, method: str) -> str:
        """``fork``, or ``stdlib-fork`` for the baseline: names files and summary lines."""
        return method if self.target == "mpmesh" else f"{self.target}-{method}"


@dataclass
class WorkerExit:
    """How a worker process ended."""

    returncode: int
    killed: bool  # by us, after it stopped reporting
    leftovers: list[str]  # processes of its session still running after it ended
    # Killed: how much of its events file counts (what it wrote before its stacks were
    # dumped; a test it finished between the dump and the kill runs again).
    events_limit: int | None = None


def _run_worker(settings: Settings, method: str, selector: str, exclude: set[str],
                events: Path, log: Path) -> WorkerExit:
    """Run one worker to its end (or kill it once it stops reporting); its session is
    emptied afterwards."""
    cmd = [settings.python, "-u", str(WORKER), "--start-method", method, "--events", str(events),
           selector]
    for test_id in sorted(exclude):
        cmd += ["--exclude", test_id]
    env = dict(os.environ, **{START_METHOD_ENV: method, TARGET_ENV: settings.target})
    killed, events_limit = False, None
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n===== {TARGET_ENV}={settings.target} {' '.join(cmd)}\n")
        out.flush()
        worker = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        last_size, last_progress = -1, time.monotonic()
        while True:
            try:
                worker.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            size = events.stat().st_size if events.exists() else 0
            if size != last_size:
                last_size, last_progress = size, time.monotonic()
            elif not killed and time.monotonic() - last_progress > settings.timeout:
                events_limit = size
                out.write(f"\n===== no event for {settings.timeout:.0f}s: every thread's stack, "
                          "then SIGKILL\n")
                out.flush()
                try:
                    os.kill(worker.pid, signal.SIGUSR1)  # faulthandler writes to the log
                    time.sleep(DUMP_S)
                    os.killpg(worker.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    pass
                killed = True
        # Its children get a moment to notice that it is gone, as they should.
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (leftovers := _session_leftovers(worker.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if leftovers:
            out.write(f"===== still running {LEFTOVER_GRACE_S:.0f}s after the worker exited "
                      "(killed now):\n  " + "\n  ".join(leftovers) + "\n")
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return WorkerExit(worker.returncode, killed, leftovers, events_limit)


def run_selector(settings: Settings, method: str, selector: str) -> SelectorRun:
    """Run ``selector`` until every test in it has an outcome, restarting the worker
    after a test that hung or crashed it."""
    result = SelectorRun(method, selector)
    stem = f"{settings.label(method)}-{selector.replace('.', '-')}"
    log = settings.workdir / f"{stem}.log"
    log.unlink(missing_ok=True)
    plan: list[str] | None = None
    t0 = time.monotonic()
    for attempt_no in range(1, 1000):
        events = settings.workdir / f"{stem}-{attempt_no}.jsonl"
        events.unlink(missing_ok=True)
        end = _run_worker(settings, method, selector, set(result.outcomes), events, log)
        if end.leftovers:
            result.notes.append(f"{len(end.leftovers)} process(es) still running {LEFTOVER_GRACE_S:.0f}s "
                                f"after worker {attempt_no} ended: {'; '.join(end.leftovers)}")
        attempt = _read_events(events, end.events_limit)
        plan = plan if plan is not None else attempt.plan
        for event in attempt.results:
            if event["id"] not in result.outcomes or event["outcome"] != "passed":
                result.outcomes[event["id"]] = Outcome(event["id"], event["outcome"],
                                                       event["summary"], event["detail"])
        reported = {e["id"] for e in attempt.results}
        pending = [t for t in attempt.started if t not in reported]
        if attempt.finished:
            if end.returncode != 0:
                what = "was killed" if end.killed else f"exited with code {end.returncode}"
                result.outcomes[f"{selector} [interpreter exit]"] = Outcome(
                    f"{selector} [interpreter exit]", "error",
                    f"the worker {what} after its tests finished (exit hang or crash; see the log)")
            break
        if pending:
            test_id = pending[-1]
            if end.killed:
                summary = f"TIMEOUT: no result within {settings.timeout:.0f}s (stacks dumped in the log)"
            else:
                summary = f"the worker died (exit code {end.returncode}) during this test"
            result.outcomes[test_id] = Outcome(test_id, "error", summary, f"see the log: {log}")
            continue  # a new worker runs the rest
        # The worker ended outside a test: a class fixture hung or the process crashed.
        result.notes.append(f"worker ended outside a test (exit code {end.returncode}"
                            f"{', killed' if end.killed else ''}); the tests it had not run are 'not run'")
        break
    # A class skipped as a whole (SkipTest in setUpClass) is reported as its tests' skips.
    class_skips = {o.id.rpartition("(")[2].rstrip(")"): result.outcomes.pop(o.id)
                   for o in list(result.outcomes.values()) if o.outcome == "skipped" and o.id.endswith(")")}
    for test_id in plan or []:
        if test_id not in result.outcomes:
            skip = class_skips.get(test_id.partition(".")[0])
            result.outcomes[test_id] = (Outcome(test_id, "skipped", skip.summary) if skip else
                                        Outcome(test_id, "not run", "the worker ended before this test"))
    result.seconds = time.monotonic() - t0
    result.log = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return result


def run_method(settings: Settings, method: str, selectors: list[str], jobs: int) -> list[SelectorRun]:
    """Every selector under one start method; progress lines go to stdout."""
    def one(selector: str) -> SelectorRun:
        run = run_selector(settings, method, selector)
        print(f"[{settings.label(method)}] {selector}: {_counts_text(run.counts())} "
              f"({run.seconds:.1f}s)", flush=True)
        return run

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, selectors))


def _counts_text(counts: Counter[str]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in OUTCOMES if counts[k] or k != "not run")


def format_summary(label: str, runs: list[SelectorRun], seconds: float) -> str:
    """The table per class, then every failing test with the first line of its error."""
    width = max(len(r.selector) for r in runs)
    lines = [f"start method {label}: {seconds:.0f}s",
             f"  {'class':<{width}}  passed failed errors skipped not-run    time"]
    total: Counter[str] = Counter()
    for run in runs:
        c = run.counts()
        total.update(c)
        lines.append(f"  {run.selector:<{width}}  {c['passed']:6} {c['failed']:6} {c['error']:6} "
                     f"{c['skipped']:7} {c['not run']:7} {run.seconds:6.1f}s")
    lines.append(f"  {'total':<{width}}  {total['passed']:6} {total['failed']:6} {total['error']:6} "
                 f"{total['skipped']:7} {total['not run']:7}")
    problems = [(run, o) for run in runs for o in run.problems()]
    if problems:
        lines.append(f"failing ({len(problems)}):")
        lines += [f"  [{label}] {o.id}: {o.outcome.upper()} {o.summary}" for _, o in problems]
    notes = [f"  [{label}] {run.selector}: {note}" for run in runs for note in run.notes]
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines)


def write_results(path: Path, label: str, runs: list[SelectorRun], summary: str) -> None:
    """The summary, every failure's traceback, the skip reasons and the worker logs."""
    parts = [summary, "", "=" * 100, "FAILURES AND ERRORS", "=" * 100]
    for run in runs:
        for o in run.problems():
            parts += [f"--- [{label}] {o.id}: {o.outcome.upper()} {o.summary}", o.detail.rstrip(), ""]
    parts += ["=" * 100, "SKIPPED", "=" * 100]
    for run in runs:
        parts += [f"  {o.id}: {o.summary}" for o in run.outcomes.values() if o.outcome == "skipped"]
    parts += ["", "=" * 100, "WORKER LOGS", "=" * 100]
    for run in runs:
        parts += [f"##### {run.selector}", run.log.rstrip(), ""]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    data = [{"selector": r.selector, "seconds": r.seconds, "notes": r.notes,
             "outcomes": [vars(o) for o in r.outcomes.values()]} for r in runs]
    path.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def describe_environment(python: str) -> str:
    """What was tested: the interpreter, and mpmesh's version, location and git state."""
    probe = ("import mpmesh, os, sys; print(sys.version.split()[0], mpmesh.__version__, "
             "os.path.dirname(os.path.dirname(mpmesh.__file__)))")
    try:
        version, mpmesh_version, root = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    except (subprocess.CalledProcessError, ValueError) as exc:
        return f"{python}: cannot import mpmesh ({exc})"
    git = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    return f"Python {version}, mpmesh {mpmesh_version} from {root}" + (f" (git {git})" if git else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", choices=(*START_METHODS, "all"), default="all",
                        help="all (the default): fork, then spawn")
    parser.add_argument("--out", type=Path, help="where results-<method>.txt go (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a worker may run without an event: a test, a class fixture, "
                        "its exit (default 120)")
    parser.add_argument("--jobs", type=int, default=1, help="classes run at once (default 1: "
                        "some tests measure time)")
    parser.add_argument("--only", action="append", metavar="SELECTOR",
                        help="run only this Class or Class.test_name (repeatable)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with mpmesh installed")
    parser.add_argument("--stdlib", action="store_true", help="swap nothing: run the same tests "
                        "against the standard library, the baseline (results-stdlib-<method>.txt)")
    args = parser.parse_args(argv)
    methods = START_METHODS if args.start_method == "all" else (args.start_method,)
    selectors = args.only or list(SELECTED)
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="mpmesh-conformance-"))
    settings = Settings(args.python, "stdlib" if args.stdlib else "mpmesh", args.timeout, out / "work")
    settings.workdir.mkdir(parents=True, exist_ok=True)
    environment = describe_environment(args.python)
    if args.stdlib:
        environment += "; BASELINE: nothing swapped, the standard library under test"
    print(f"{environment}\nresults: {out}\nnot run (see cpython_selection.EXCLUDED): "
          f"{'; '.join(EXCLUDED)}\nskipped by the harness: {'; '.join(HARNESS_SKIPS)}", flush=True)
    summaries: list[str] = []
    failing = 0
    for method in methods:
        t0 = time.monotonic()
        runs = run_method(settings, method, selectors, args.jobs)
        label = settings.label(method)
        summary = f"{environment}\n{format_summary(label, runs, time.monotonic() - t0)}"
        results = out / f"results-{label}.txt"
        write_results(results, label, runs, summary)
        summaries.append(f"{summary}\nfull results: {results}")
        failing += sum(len(r.problems()) for r in runs)
    print("\n" + "\n\n".join(summaries))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
