"""Chaos soak: mixed traffic on one Master while processes are SIGKILLed at random.

Run: ``python -m tests.soak.soak --minutes 2 --seed 1`` (exit status 1 on any violation).

One ``mpmesh.Master`` runs a group of concurrent children (auto-restart on) and a thread
of mixed traffic; client processes (``multiprocessing`` spawn, joined with
``mpmesh.connect``) run the same mix: mesh cache ``incr``/``set``/``get``, a TTL'd
``lock``, a Manager dict (``m.dict()``), a counter in that dict bumped under a Manager
``Lock`` (``m.Lock()``: a lost increment means two processes held it at once) and
requests to the group. A chaos thread
SIGKILLs a random child or client every ~100 ms and restarts killed clients.

Every process appends a line to its own log *before* each call (``S``) and another when
it returns (``E``), so a process killed mid-call still leaves its record. The report
checks that:

- no acknowledged write is lost: for each counter, acknowledged <= final <= attempted;
- no call hangs: none runs longer than its bound + slack (watched live, not only at the end);
- the state broker's RSS and fds stay flat after warm-up, and its lock table and the
  router's jobs drain once traffic stops;
- nothing leaks in this driver: fds, threads, processes, runtime files.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import mpmesh

GROUP = "soak"
CACHE = "soak"
CLIENT_COUNTER = "client-incr"   # incremented by clients and the driver thread directly
GROUP_COUNTER = "group-bumps"    # incremented by the group's handler, once per request that ran
LOCKED_COUNTER = "locked-bumps"  # a key of the Manager dict, incremented under the Manager Lock
LOCK = "soak-lock"
HOLDER = "lock-holder"

REQ_TIMEOUT = 2.0
LOCK_WAIT = 1.0
LOCK_TTL = 2.0
OP_BOUND = 2.0            # a cache or dict call takes no timeout: the bound we hold each to
MESH_GUARD_SLACK = 2.0    # mpmesh's own client-side guard over a lock wait
# The longest each kind of call may take before it counts as hung (plus --slack).
BOUNDS: dict[str, float] = {
    "connect": 10.0, "open": OP_BOUND, "incr": OP_BOUND, "cache": 2 * OP_BOUND, "dict": 2 * OP_BOUND,
    "lock": LOCK_WAIT + MESH_GUARD_SLACK + 3 * OP_BOUND, "req": REQ_TIMEOUT,
    "mlock": 4 * OP_BOUND,
}
MIX: dict[str, int] = {"incr": 25, "cache": 20, "dict": 20, "lock": 15, "req": 15, "mlock": 10}
# Failures that chaos may legitimately cause, per kind of call.
ALLOWED: dict[str, tuple[str, ...]] = {
    "lock": ("LockTimeout",),
    "req": ("RequestTimeout", "WorkerLost"),
}


# -- the traffic (runs in clients and in the driver) ----------------------------------------

class OpLog:
    """Append-only record of one process's calls: ``S`` before, ``E`` after, ``V`` for a
    violation seen in the process. One ``os.write`` per line survives a SIGKILL."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _line(self, text: str) -> None:
        os.write(self.fd, (text.replace("\n", " ") + "\n").encode())

    def start(self, kind: str, bound: float) -> None:
        self._line(f"S {kind} {time.monotonic():.6f} {bound}")

    def end(self, kind: str, elapsed: float, outcome: str) -> None:
        self._line(f"E {kind} {elapsed:.6f} {outcome}")

    def violation(self, text: str) -> None:
        self._line(f"V {text[:300]}")

    def close(self) -> None:
        os.close(self.fd)


def logged_call(log: OpLog, tag: str, kind: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` between its two log lines; a lost broker ends the process."""
    log.start(kind, BOUNDS[kind])
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:
        outcome = type(exc).__name__
        log.end(kind, time.monotonic() - t0, outcome)
        if outcome not in ALLOWED.get(kind, ()):
            log.violation(f"{tag} {kind}: unexpected {exc!r}")
            if isinstance(exc, (mpmesh.BrokerUnavailable, mpmesh.MeshClosed)):
                raise
        return
    log.end(kind, time.monotonic() - t0, "ok")


class Mesh(Protocol):
    """What the traffic needs: a Master or a ``connect()`` handle."""

    def cache(self, name: str) -> Any: ...
    def lock(self, name: str, ttl: float | None = None, wait: float | None = None) -> Any: ...
    def send_request(self, action: str, target: str | int, data: object = None, *,
                     timeout: float | None = None) -> object: ...


class Traffic:
    """The mixed workload of one process; each call is logged around itself."""

    def __init__(self, mesh: Mesh, shared: Any, log: OpLog, tag: str, rng: random.Random) -> None:
        self.mesh, self.shared, self.log, self.tag, self.rng = mesh, shared, log, tag, rng
        self.key = f"own-{tag}"  # written by this process only: read-your-writes is checkable
        self.seq = 0
        self.kinds, self.weights = list(MIX), list(MIX.values())
        self.cache: Any = None
        self.mlock: Any = None
        self.call("open", self._open)

    def step(self) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        self.call(kind, getattr(self, "_" + kind))

    def call(self, kind: str, fn: Callable[[], object]) -> None:
        logged_call(self.log, self.tag, kind, fn)

    def _open(self) -> None:
        self.cache = self.mesh.cache(CACHE)

    def _incr(self) -> None:
        self.cache.incr(CLIENT_COUNTER)

    def _cache(self) -> None:
        self.seq += 1
        self.cache.set(self.key, self.seq)
        got = self.cache.get(self.key)
        if got != self.seq:
            self.log.violation(f"{self.tag} cache: read {got!r} after writing {self.seq}")

    def _dict(self) -> None:
        self.seq += 1
        self.shared[self.key] = self.seq
        got = self.shared.get(self.key)
        if got != self.seq:
            self.log.violation(f"{self.tag} dict: read {got!r} after writing {self.seq}")

    def _mlock(self) -> None:
        if self.mlock is None:
            self.mlock = self.shared["mlock"]
        with self.mlock:
            self.shared[LOCKED_COUNTER] = self.shared.get(LOCKED_COUNTER, 0) + 1

    def _lock(self) -> None:
        grant = self.mesh.lock(LOCK, ttl=LOCK_TTL, wait=LOCK_WAIT)
        granted = time.monotonic()
        try:
            mark = (self.tag, grant.token)
            try:
                self.cache.fenced_set(grant, HOLDER, mark)
            except mpmesh.FencedError:
                if time.monotonic() - granted < LOCK_TTL:
                    self.log.violation(f"{self.tag} lock: fenced out while its grant {grant.token} was live")
                return
            got = self.cache.get(HOLDER)
            if got != mark and time.monotonic() - granted < LOCK_TTL:
                self.log.violation(f"{self.tag} lock: holder is {got!r} while {mark!r} holds the lock")
        finally:
            grant.release()

    def _req(self) -> None:
        self.mesh.send_request("bump", GROUP, None, timeout=REQ_TIMEOUT)


def soak_worker(child: mpmesh.Child) -> None:
    """A group member: ``bump`` increments the group counter once and returns its value."""
    cache = child.cache(CACHE)

    @child.handler("bump")
    def bump(_: object) -> int:
        return int(cache.incr(GROUP_COUNTER))

    child.run()


def client_main(slot: int, gen: int, mesh_name: str, authkey: bytes, shared: Any, log_path: str,
                stop_path: str, seed: int) -> None:
    """A client process: join the mesh, run the mix until told to stop (or orphaned)."""
    log = OpLog(log_path)
    parent = os.getppid()
    rng = random.Random(f"{seed}-{slot}-{gen}")
    handles: list[Any] = []

    def join() -> None:
        handles.append(mpmesh.connect(mesh_name, authkey=authkey, autospawn=False, timeout=REQ_TIMEOUT))

    logged_call(log, f"c{slot}", "connect", join)
    if not handles:
        sys.exit(3)
    try:
        traffic = Traffic(handles[0], shared, log, f"c{slot}", rng)
        while not os.path.exists(stop_path) and os.getppid() == parent:
            traffic.step()
    finally:
        handles[0].close()
        log.close()


# -- reading the logs -------------------------------------------------------------------------

class LogReader:
    """Incremental parser of one ``OpLog`` file: counts, the open call, violations."""

    def __init__(self, path: str, who: str) -> None:
        self.path, self.who = path, who
        self.offset = 0
        self.rest = b""
        self.started: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.slowest: dict[str, float] = collections.defaultdict(float)
        self.open: tuple[str, float, float] | None = None  # kind, start, bound
        self.hang_reported: float | None = None
        self.violations: list[str] = []

    def update(self, slack: float) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for raw in lines:
            tag, _, rest = raw.decode().partition(" ")
            if tag == "S":
                kind, start, bound = rest.split()
                self.started[kind] += 1
                self.open = (kind, float(start), float(bound))
            elif tag == "E":
                kind, elapsed, outcome = rest.split(" ", 2)
                self.outcomes[kind, outcome] += 1
                self.slowest[kind] = max(self.slowest[kind], float(elapsed))
                if self.open is not None and float(elapsed) > self.open[2] + slack:
                    self.violations.append(f"{self.who}: {kind} took {float(elapsed):.1f} s "
                                           f"(bound {self.open[2]:g} s + {slack:g} s slack)")
                self.open = None
            elif tag == "V":
                self.violations.append(f"{self.who}: {rest}")

    def check_hang(self, now: float, slack: float) -> None:
        """Flag the open call if it has run past its bound + slack (once per call)."""
        if self.open is None:
            return
        kind, start, bound = self.open
        if now - start > bound + slack and self.hang_reported != start:
            self.hang_reported = start
            self.violations.append(f"{self.who}: {kind} hung: open for {now - start:.1f} s "
                                   f"(bound {bound:g} s + {slack:g} s slack)")


def counter_violations(name: str, final: int, acked: int, attempted: int) -> list[str]:
    """A counter must hold every acknowledged increment and no more than were attempted."""
    found = []
    if final < acked:
        found.append(f"counter {name}: {final} < {acked} acknowledged increments (writes lost)")
    if final > attempted:
        found.append(f"counter {name}: {final} > {attempted} attempted increments (one applied twice)")
    return found


# -- the driver ---------------------------------------------------------------------------------

@dataclass
class Slot:
    """One client position: the process now filling it and its log."""

    index: int
    gen: int = 0
    proc: BaseProcess | None = None
    reader: LogReader | None = None
    killed: bool = False


@dataclass
class Report:
    seconds: float = 0.0
    seed: int = 0
    children: int = 0
    clients: int = 0
    start_method: str = ""
    kill_interval: float = 0.0
    ops: dict[str, collections.Counter[str]] = field(default_factory=dict)
    slowest: dict[str, float] = field(default_factory=dict)
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    child_restarts: int = 0
    counters: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # final, acked, attempted
    # Samples: seconds since start, state broker RSS and fds, this driver's RSS (it hosts
    # the mesh's own broker, on a thread).
    rss: list[tuple[float, int, int, int]] = field(default_factory=list)
    warmup: float = 0.0
    shutdown_s: float = 0.0
    violations: list[str] = field(default_factory=list)

    def render(self, rss_growth: float) -> str:
        mib = 1 << 20
        lines = [f"mpmesh soak: {self.seconds:.1f} s, seed {self.seed}, {self.children} children "
                 f"({self.start_method}), {self.clients} client processes, a SIGKILL every ~{self.kill_interval:g} s",
                 "",
                 "| figure | value |", "|---|---|"]
        total = sum(sum(c.values()) for c in self.ops.values())
        for kind in ("connect", "open", *MIX):
            outcomes = self.ops.get(kind, collections.Counter())
            others = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()) if o != "ok")
            lines.append(f"| calls: {kind} | {sum(outcomes.values())} ({outcomes['ok']} ok"
                         f"{'; ' + others if others else ''}; slowest {self.slowest.get(kind, 0):.2f} s) |")
        lines.append(f"| calls: total | {total} ({total / max(self.seconds, 1e-9):.0f}/s) |")
        lines.append(f"| SIGKILLs | {sum(self.kills.values())} ({self.kills['child']} children, "
                     f"{self.kills['client']} clients) |")
        lines.append(f"| child restarts (auto) | {self.child_restarts} |")
        for name, (final, acked, attempted) in self.counters.items():
            lines.append(f"| counter {name}: acked <= final <= attempted | {acked} <= {final} <= {attempted} |")
        after = [s for s in self.rss if s[0] >= self.warmup] or self.rss
        if after:
            first, last = after[0], after[-1]
            growth = (last[1] - first[1]) / first[1] * 100
            lines.append(f"| state broker RSS after {self.warmup:.0f} s warm-up: first / last / max | "
                         f"{first[1] / mib:.1f} / {last[1] / mib:.1f} / {max(s[1] for s in after) / mib:.1f} MiB "
                         f"({growth:+.1f} %, limit +{rss_growth:.0f} %) |")
            lines.append(f"| state broker fds: first / last / max | {first[2]} / {last[2]} / "
                         f"{max(s[2] for s in after)} |")
            lines.append(f"| driver RSS (hosts the mesh broker): first / last / max | {first[3] / mib:.1f} / "
                         f"{last[3] / mib:.1f} / {max(s[3] for s in after) / mib:.1f} MiB "
                         f"({(last[3] - first[3]) / first[3] * 100:+.1f} %) |")
        lines.append(f"| m.shutdown() | {self.shutdown_s:.2f} s |")
        lines.append(f"| violations | {len(self.violations)} |")
        lines.append("")
        if self.violations:
            lines.append("VIOLATIONS:")
            lines += [f"  - {v}" for v in self.violations[:40]]
            if len(self.violations) > 40:
                lines.append(f"  ... and {len(self.violations) - 40} more")
        else:
            lines.append("OK: no violation")
        return "\n".join(lines)


def rss_and_fds(pid: int) -> tuple[int, int]:
    """Resident set size (bytes) and open fds of ``pid``, from /proc; (0, 0) if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith(b"VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return 0, 0


def process_table() -> dict[int, int]:
    """pid -> ppid of every live (non-zombie) process."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != b"Z":
                table[int(entry)] = int(fields[1])
    return table


def my_descendants() -> set[int]:
    table = process_table()
    found: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def is_my_descendant(pid: int) -> bool:
    """Whether ``pid`` is below this process (checked before each kill: never a stranger)."""
    for _ in range(6):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == os.getpid():
            return True
    return False


def snapshot() -> tuple[set[int], set[str], int, set[int]]:
    """This process's fds, Python thread names, OS thread count and descendants."""
    return ({int(fd) for fd in os.listdir("/proc/self/fd")},
            {t.name for t in threading.enumerate()},
            len(os.listdir("/proc/self/task")), my_descendants())


class Soak:
    """Runs one soak and builds its report."""

    def __init__(self, args: argparse.Namespace, duration: float, runtime: str, workdir: str) -> None:
        self.args = args
        self.duration = duration
        self.runtime = runtime
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.started: collections.Counter[str] = collections.Counter()
        self.report = Report(seed=args.seed, children=args.children, clients=args.clients,
                             kill_interval=args.kill_interval)
        self.report.warmup = max(5.0, duration * 0.2)
        self.stop_path = os.path.join(workdir, "stop")
        self.ctx = multiprocessing.get_context("spawn")

    # -- clients

    def _start_client(self, slot: Slot) -> None:
        from tests.soak import soak as this  # by its importable name, not __main__

        slot.gen += 1
        path = os.path.join(self.workdir, f"client-{slot.index}-{slot.gen}.log")
        slot.reader = LogReader(path, f"client {slot.index} gen {slot.gen}")
        slot.killed = False
        slot.proc = self.ctx.Process(
            target=this.client_main, name=f"soak-client-{slot.index}", daemon=True,
            args=(slot.index, slot.gen, self.m.name, self.m.authkey, self.shared, path, self.stop_path,
                  self.args.seed))
        slot.proc.start()

    def _reap(self, slot: Slot, timeout: float) -> int | None:
        proc = slot.proc
        assert proc is not None
        proc.join(timeout)
        code = proc.exitcode
        if code is not None:
            proc.close()
            slot.proc = None
            if slot.reader is not None:
                self._retire(slot.reader)
                slot.reader = None
        return code

    def _retire(self, reader: LogReader) -> None:
        """Fold the log of a process that ended into the report, and delete it (the driver
        keeps no per-process record: its own memory must stay flat too)."""
        reader.update(self.args.slack)
        report = self.report
        report.violations += reader.violations
        self.started += reader.started
        for (kind, outcome), n in reader.outcomes.items():
            report.ops.setdefault(kind, collections.Counter())[outcome] += n
        for kind, s in reader.slowest.items():
            report.slowest[kind] = max(report.slowest.get(kind, 0.0), s)
        try:
            os.unlink(reader.path)
        except FileNotFoundError:
            pass

    def _kill_client(self, slot: Slot) -> None:
        assert slot.proc is not None and slot.reader is not None
        slot.reader.update(self.args.slack)
        slot.reader.check_hang(time.monotonic(), self.args.slack)
        pid = slot.proc.pid
        if pid is not None and is_my_descendant(pid):
            slot.killed = True
            os.kill(pid, signal.SIGKILL)
            self.report.kills["client"] += 1
        if self._reap(slot, 10.0) is None:
            self.report.violations.append(f"client {slot.index} survived SIGKILL for 10 s")

    # -- threads

    def _chaos(self) -> None:
        interval = self.args.kill_interval
        while not self.stop.wait(self.rng.uniform(0.5, 1.5) * interval):
            with self.lock:
                targets: list[tuple[str, Any]] = [("child", n) for n in self.children]
                targets += [("client", s) for s in self.slots if s.proc is not None]
                kind, which = self.rng.choice(targets)
                if kind == "child":
                    stats = self.m.process_stats(which)
                    if stats.alive and stats.pid and is_my_descendant(stats.pid):
                        try:
                            os.kill(stats.pid, signal.SIGKILL)
                            self.report.kills["child"] += 1
                        except ProcessLookupError:
                            pass
                else:
                    self._kill_client(which)
                    self._start_client(which)

    def _guarded(self, target: Callable[[], None]) -> None:
        """Run a soak thread; its failure is a violation (and ends the soak early)."""
        try:
            target()
        except BaseException as exc:
            self.report.violations.append(f"soak thread {target.__name__[1:]} failed: {exc!r}")
            self.stop.set()

    def _driver_traffic(self) -> None:
        log = OpLog(os.path.join(self.workdir, "driver.log"))
        try:
            traffic = Traffic(self.m, self.shared, log, "driver", random.Random(self.args.seed))
            while not self.stop.is_set():
                traffic.step()
        finally:
            log.close()

    def _monitor(self) -> None:
        last_sample = 0.0
        while not self.stop.wait(0.25):
            now = time.monotonic()
            with self.lock:
                for reader in [self.driver_reader] + [s.reader for s in self.slots if s.reader]:
                    reader.update(self.args.slack)
                    reader.check_hang(now, self.args.slack)
                for slot in self.slots:  # a client that ended without being killed
                    if slot.proc is not None and not slot.killed and slot.proc.exitcode is not None:
                        code = self._reap(slot, 0)
                        self.report.violations.append(f"client {slot.index} gen {slot.gen} exited on its own "
                                                      f"(exit code {code})")
                        self._start_client(slot)
            if now - last_sample >= 1.0:
                last_sample = now
                rss, fds = rss_and_fds(self.broker_pid)
                self.report.rss.append((now - self.t0, rss, fds, rss_and_fds(os.getpid())[0]))

    # -- the run

    def run(self) -> Report:
        args, report = self.args, self.report
        # The stdlib's helpers for spawn and forkserver live as long as this process, by design.
        multiprocessing.resource_tracker.ensure_running()
        multiprocessing.forkserver.ensure_running()
        fds0, threads0, tasks0, procs0 = snapshot()
        self.t0 = time.monotonic()
        self.m = m = mpmesh.Master(timeout=REQ_TIMEOUT, start_method=args.start_method, restart_limit=10**6,
                                   restart_backoff=0.005, restart_backoff_max=0.05)
        report.start_method = m.start_method
        threads: list[threading.Thread] = []
        try:
            from tests.soak import soak as this

            self.children = m.spawn_group(GROUP, this.soak_worker, size=args.children, mode="concurrent")
            self.shared = m.dict()
            self.shared["mlock"] = m.Lock()
            m.cache(CACHE)
            self.broker_pid = int(m.stats()["broker_pid"])
            self.driver_reader = LogReader(os.path.join(self.workdir, "driver.log"), "driver")
            self.slots = [Slot(i) for i in range(args.clients)]
            for slot in self.slots:
                self._start_client(slot)
            for target in (self._driver_traffic, self._chaos, self._monitor):
                threads.append(threading.Thread(target=self._guarded, args=(target,),
                                                name=f"soak-{target.__name__[1:]}"))
                threads[-1].start()
            try:
                self.stop.wait(self.duration)  # the soak's pacing, not a condition
            finally:
                self.stop.set()
                for t in threads:
                    t.join(BOUNDS["lock"] + args.slack + 10)
                    if t.is_alive():
                        report.violations.append(f"thread {t.name} did not stop")
            report.seconds = time.monotonic() - self.t0
            self._stop_clients()
            self._drain_and_count()
        finally:
            started = time.monotonic()
            m.shutdown()
            report.shutdown_s = time.monotonic() - started
            if report.shutdown_s > 10.0 + args.slack:
                report.violations.append(f"m.shutdown() took {report.shutdown_s:.1f} s")
        self._retire(self.driver_reader)
        self._check_counters()
        self._check_rss()
        self._check_leaks(fds0, threads0, tasks0, procs0)
        return report

    def _stop_clients(self) -> None:
        with open(self.stop_path, "w"):
            pass
        for slot in self.slots:
            if slot.proc is None:
                continue
            code = self._reap(slot, BOUNDS["lock"] + self.args.slack + 10)
            if code is None:
                self.report.violations.append(f"client {slot.index} did not stop when asked; killed")
                self._kill_client(slot)
            elif code != 0:
                self.report.violations.append(f"client {slot.index} gen {slot.gen} stopped with exit code {code}")

    def _drain_and_count(self) -> None:
        """Once traffic stopped: the router's jobs and the lock table empty, then the counters."""
        m, report = self.m, self.report
        deadline = time.monotonic() + REQ_TIMEOUT + LOCK_TTL + self.args.slack
        stats = m.stats()
        while time.monotonic() < deadline and (stats["requests_in_flight"] or stats["requests_queued"]
                                               or stats["locks_held"] or stats["lock_waiters"]):
            time.sleep(0.05)  # polling the broker's own counters
            stats = m.stats()
        for key in ("requests_in_flight", "requests_queued", "locks_held", "lock_waiters"):
            if stats[key]:
                report.violations.append(f"{key} = {stats[key]} after traffic stopped (should drain to 0)")
        report.child_restarts = m.group_stats(GROUP).restarts
        cache = m.cache(CACHE)
        report.counters[CLIENT_COUNTER] = (int(cache.get(CLIENT_COUNTER) or 0), 0, 0)
        report.counters[GROUP_COUNTER] = (int(cache.get(GROUP_COUNTER) or 0), 0, 0)
        report.counters[LOCKED_COUNTER] = (int(self.shared.get(LOCKED_COUNTER, 0)), 0, 0)

    def _check_counters(self) -> None:
        report = self.report
        for name, kind in ((CLIENT_COUNTER, "incr"), (GROUP_COUNTER, "req"), (LOCKED_COUNTER, "mlock")):
            acked = report.ops.get(kind, collections.Counter())["ok"]
            attempted = self.started[kind]
            final = report.counters[name][0]
            report.counters[name] = (final, acked, attempted)
            report.violations += counter_violations(name, final, acked, attempted)

    def _check_rss(self) -> None:
        report = self.report
        after = [s for s in report.rss if s[0] >= report.warmup]
        if len(after) < 2:
            return
        first, last = after[0], after[-1]
        if first[1] and (last[1] - first[1]) / first[1] * 100 > self.args.rss_growth:
            report.violations.append(f"state broker RSS grew {first[1] >> 10} -> {last[1] >> 10} KiB "
                                     f"after warm-up (> {self.args.rss_growth:g} %)")
        if last[2] > first[2] + self.args.clients + self.args.children:
            report.violations.append(f"state broker fds grew {first[2]} -> {last[2]} after warm-up")

    def _check_leaks(self, fds0: set[int], threads0: set[str], tasks0: int, procs0: set[int]) -> None:
        from mpmesh._host._process import discard_launcher
        from mpmesh._io._spare import discard_spare

        # A zygote parked for the next mesh and the broker launcher are kept on purpose.
        discard_spare()
        discard_launcher()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            fds, threads, tasks, procs = snapshot()
            if fds <= fds0 and threads <= threads0 and tasks <= tasks0 and procs <= procs0:
                break
            time.sleep(0.05)  # processes and threads take a moment to finish exiting
        leaks = [f"fds {sorted(fds - fds0)}" if fds - fds0 else "",
                 f"threads {sorted(threads - threads0)}" if threads - threads0 else "",
                 f"OS threads {tasks0} -> {tasks}" if tasks > tasks0 else "",
                 f"processes {sorted(procs - procs0)}" if procs - procs0 else ""]
        for leak in filter(None, leaks):
            self.report.violations.append(f"leaked by the driver: {leak}")
        for pid in procs - procs0:
            if is_my_descendant(pid):
                os.kill(pid, signal.SIGKILL)
        left = sorted(os.listdir(self.runtime))
        if left:
            self.report.violations.append(f"runtime files left behind: {left}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"],
                        help="of the Master's children (default: mpmesh's)")
    parser.add_argument("--kill-interval", type=float, default=0.1, help="mean seconds between SIGKILLs")
    parser.add_argument("--slack", type=float, default=3.0, help="seconds past a call's bound before it hangs")
    parser.add_argument("--rss-growth", type=float, default=30.0, help="percent allowed after warm-up")
    args = parser.parse_args(argv)
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    # A private runtime directory: its sockets and key files are checked, then removed.
    runtime = tempfile.mkdtemp(prefix="mpsoak-")
    os.environ["MPMESH_RUNTIME_DIR"] = runtime
    workdir = tempfile.mkdtemp(prefix="mpsoak-logs-")
    try:
        report = Soak(args, duration, runtime, workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    print(report.render(args.rss_growth), flush=True)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
