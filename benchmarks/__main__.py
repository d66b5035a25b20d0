"""``python -m benchmarks SUITE... [options]``: run suites pinned and unpinned, print one table.

The command you type is the *conductor*: it starts one worker subprocess per mode
(``--worker pinned|unpinned``, an internal flag), each of which runs the suites and
writes its rows as JSON; the conductor merges them, prints the table with PASS/FAIL
against each scenario's bar, and with ``--write`` updates ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from . import SUITES
from ._harness import (
    LEGEND,
    MODES,
    Config,
    Profiler,
    Row,
    machine_info,
    machine_line,
    render_table,
    run_mode_subprocess,
    section_text,
    watchdog,
    write_results,
)

HERE = Path(__file__).resolve().parent
# Slack on top of the suites' own budgets for interpreter start-up and imports.
WORKER_SLACK_S = 20.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="+", choices=[*SUITES, "all"], metavar="SUITE",
                   help=f"one or more of {', '.join(SUITES)}, or all")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: fewer, smaller repetitions")
    p.add_argument("--repeat", type=int, metavar="N", help="repetitions per scenario (overrides the default)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--pin", dest="modes", action="store_const", const=("pinned",),
                       help="only pinned: every process on one CPU")
    modes.add_argument("--no-pin", dest="modes", action="store_const", const=("unpinned",),
                       help="only unpinned")
    modes.add_argument("--both", dest="modes", action="store_const", const=MODES,
                       help="pinned and unpinned, each in a fresh process (default)")
    p.set_defaults(modes=MODES)
    p.add_argument("--cpu", type=int, help="the CPU of pinned mode (default: the last usable one)")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md (clean runs only)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds one mode may take before it counts as hung (default: from the suites)")
    p.add_argument("--profile", action="store_true",
                   help="run in this process (one mode; unpinned unless --pin) with cProfile on the "
                        "master side, and print the top functions by tottime")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def selected_suites(names: list[str]) -> list[str]:
    wanted = list(SUITES) if "all" in names else list(dict.fromkeys(names))
    present = [s for s in wanted if (HERE / f"{s}.py").exists()]
    missing = [s for s in wanted if s not in present]
    if missing and "all" not in names:
        sys.exit(f"python -m benchmarks: suite(s) {', '.join(missing)} not written yet "
                 f"(expected benchmarks/<suite>.py)")
    if missing:
        print(f"skipping suites not written yet: {', '.join(missing)}", file=sys.stderr)
    return present


def load(suite: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.{suite}")


def config_for(args: argparse.Namespace, mode: str) -> Config:
    return Config(quick=args.quick, repeat=args.repeat, mode=mode, cpu=args.cpu)


def pin(cpu: int | None) -> int:
    """Pin this process (and so everything it starts later) to one CPU; return it."""
    usable = sorted(os.sched_getaffinity(0))
    chosen = usable[-1] if cpu is None else cpu
    if chosen not in usable:
        sys.exit(f"python -m benchmarks: CPU {chosen} is not usable here (usable: {usable})")
    os.sched_setaffinity(0, {chosen})
    return chosen


def run_suites(suites: list[str], cfg: Config) -> tuple[list[Row], list[str]]:
    """Run every suite in this process; a suite that raises becomes an error line."""
    rows: list[Row] = []
    errors: list[str] = []
    for suite in suites:
        module = load(suite)
        cfg.log(f"[{cfg.mode}] {suite}: starting")
        first_note = len(cfg.notes)
        try:
            with watchdog(module.budget(cfg)):
                got = module.run(cfg)
        except Exception:
            errors.append(f"{cfg.mode} {suite}: {traceback.format_exc()}")
            continue
        finally:
            cfg.notes[first_note:] = [f"{suite}: {n}" for n in cfg.notes[first_note:]]
            errors += [f"{cfg.mode} {suite}: {e}" for e in cfg.errors]
            cfg.errors.clear()
        for row in got:
            row.mode = cfg.mode
            row.scenario = f"{suite}:{row.scenario}"
        rows += got
    return rows, errors


def worker(args: argparse.Namespace, suites: list[str]) -> int:
    """Run in one mode, in this fresh process; rows go to ``--json-out`` as JSON."""
    cfg = config_for(args, args.worker)
    if args.worker == "pinned":
        cfg.cpu = pin(args.cpu)
    rows, errors = run_suites(suites, cfg)
    # What mpmesh keeps for this process's next mesh or manager goes now, not as a stray.
    from mpmesh._host._process import discard_launcher
    from mpmesh._io._spare import discard_spare

    discard_launcher()
    discard_spare()
    report: dict[str, Any] = {"mode": cfg.mode, "cpu": cfg.cpu, "rows": [r.to_json() for r in rows],
                              "errors": errors, "notes": cfg.notes}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f)
    else:
        json.dump(report, sys.stdout)
    return 1 if errors else 0


def profile(args: argparse.Namespace, suites: list[str]) -> int:
    mode = "pinned" if args.modes == ("pinned",) else "unpinned"
    cfg = config_for(args, mode)
    if mode == "pinned":
        cfg.cpu = pin(args.cpu)
    cfg.profile = True
    cfg.profiler = Profiler()
    rows, errors = run_suites(suites, cfg)
    for row in rows:
        row.scenario = row.scenario.split(":", 1)[1]
    print(render_table(rows))
    print("(profiled: the mpmesh figures above include cProfile's overhead)")
    print(cfg.profiler.report())
    for err in errors:
        print(err, file=sys.stderr)
    return 1 if errors else 0


def suite_of(row: Row) -> str:
    return row.scenario.split(":", 1)[0]


def conduct(args: argparse.Namespace, suites: list[str]) -> int:
    info = machine_info()
    worker_args: list[str] = []
    if args.quick:
        worker_args.append("--quick")
    if args.repeat:
        worker_args += ["--repeat", str(args.repeat)]
    if args.cpu is not None:
        worker_args += ["--cpu", str(args.cpu)]
    rows: list[Row] = []
    errors: list[str] = []
    notes: list[tuple[str, str]] = []
    for mode in args.modes:
        budget = args.timeout or WORKER_SLACK_S + sum(load(s).budget(config_for(args, mode)) for s in suites)
        print(f"== {mode}: running {', '.join(suites)} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        report = run_mode_subprocess(mode, suites, worker_args, budget)
        rows += [Row.from_json(r) for r in report.get("rows", [])]
        errors += report.get("errors", [])
        cpu = f" on CPU {report['cpu']}" if report.get("cpu") is not None else ""
        notes += [(mode, n) for n in report.get("notes", [])]
        print(f"== {mode}{cpu}: done in {report['elapsed']:.1f} s", file=sys.stderr, flush=True)
        if cpu:
            info[f"{mode}_cpu"] = str(report["cpu"])

    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"\n{machine_line(info)}")
    print(f"command: {command}" + ("   [--quick: smoke-run figures, not for the record]" if args.quick else ""))
    sections: dict[str, str] = {}
    for suite in suites:
        suite_rows = [r for r in rows if suite_of(r) == suite]
        for r in suite_rows:
            r.scenario = r.scenario.split(":", 1)[1]
        title = load(suite).TITLE
        print(f"\n### {suite}: {title}\n")
        print(render_table(suite_rows) if suite_rows else "(no rows)")
        suite_notes = [f"{mode}: {n.split(': ', 1)[1]}" for mode, n in notes if n.startswith(f"{suite}: ")]
        sections[suite] = section_text(suite, title, info, suite_rows, command, suite_notes)
    print(f"\n{LEGEND}")
    for mode, note in notes:
        print(f"note [{mode}] {note}")
    failed = [r for r in rows if r.passed is False]
    if failed:
        print("\nbars failed:")
        for r in failed:
            print(f"  {r.scenario} [{r.mode}] {r.impl}: {r.ratio:.2f}x, bar {r.bar}")
    for err in errors:
        print(f"\nERROR: {err}", file=sys.stderr)
    if args.write:
        if errors:
            print("\nnot writing benchmarks/RESULTS.md: the run had errors", file=sys.stderr)
        elif args.quick:
            print("\nnot writing benchmarks/RESULTS.md from a --quick run", file=sys.stderr)
        else:
            write_results(sections)
            print(f"\nwrote {', '.join(sections)} to benchmarks/RESULTS.md")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    suites = selected_suites(args.suites)
    if not suites:
        print("no suite to run", file=sys.stderr)
        return 1
    if args.worker:
        return worker(args, suites)
    if args.profile:
        return profile(args, suites)
    return conduct(args, suites)


if __name__ == "__main__":
    sys.exit(main())
