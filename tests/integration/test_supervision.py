"""Supervision over real processes: heartbeats, auto-restart, retries, queues, caps, shutdown.

Workers are in ``supervision_workers.py``: each ``task`` checks in with the master
(``Checkin`` below), which tells it what to do, so a test decides per attempt whether
the handler returns, hangs, spins or ignores SIGTERM, and knows the pid that is inside
before killing it.

Coordination is through master handlers, Events and Conditions; ``wait_for`` (a poll) is
used only for facts only the OS or the broker's tables can tell (a pid is gone, N
requests are queued). The few fixed waits are observation windows for "this does *not*
happen" (no second heartbeat-missed event), each a handful of heartbeat intervals.
The autouse leak guard of ``tests/conftest.py`` fails any test that leaves a process,
socket or fd behind.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from tests.conftest import wait_for
from tests.integration import supervision_workers, workers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CTRL_C_SCRIPT = HERE / "scripts" / "ctrl_c_master.py"
WAIT_S = 10.0          # generous bound for things that normally take milliseconds
HB_S = 0.1             # heartbeat interval of the heartbeat tests
HB_MISSES = 3          # ... and how many missed beats make a child unhealthy
FAST_FAIL_S = 1.0      # "fails fast": well under any request timeout these tests use
EVENTS = ("child-started", "child-exit", "heartbeat-missed", "auto-restart", "request-retry",
          "heartbeat-resumed")

Directive = tuple[str, Any]
Plan = Callable[[int, dict[str, Any]], Directive]
RETURN: Directive = ("return", None)
HANG: Directive = ("sleep", None)


# -- helpers -----------------------------------------------------------------------------------

def mesh(**kwargs: Any) -> mpmesh.Master:
    kwargs.setdefault("timeout", WAIT_S)
    return mpmesh.Master(**kwargs)


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


class Checkin:
    """The master's ``checkin`` handler: records each arrival, answers with the plan's directive.

    ``plan(i, info)`` gets the 0-based arrival index and ``{"tag", "name", "group", "pid"}``;
    it may block (on ``gate``) to keep that handler stuck until the test opens the gate.
    """

    def __init__(self, plan: Plan | None = None) -> None:
        self.cond = threading.Condition()
        self.arrivals: list[dict[str, Any]] = []
        self.plan: Plan = plan or (lambda i, info: RETURN)
        self.gate = threading.Event()

    def __call__(self, info: dict[str, Any]) -> Directive:
        with self.cond:
            i = len(self.arrivals)
            self.arrivals.append(dict(info, at=time.monotonic()))
            self.cond.notify_all()
        return self.plan(i, info)

    def wait(self, n: int) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.arrivals) >= n, WAIT_S), self.arrivals
            return list(self.arrivals)

    def held(self, directive: Directive = RETURN) -> Directive:
        """Block this arrival until ``gate`` opens, then answer ``directive``."""
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        return directive


class Events:
    """Every supervision event of a Master, in arrival order, with waits."""

    def __init__(self, m: mpmesh.Master) -> None:
        self.cond = threading.Condition()
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.timed: list[tuple[str, dict[str, Any], float]] = []  # with time.monotonic() on arrival
        for event in EVENTS:
            m.on(event, lambda info, event=event: self._add(event, info))

    def _add(self, event: str, info: dict[str, Any]) -> None:
        with self.cond:
            self.log.append((event, dict(info)))
            self.timed.append((event, dict(info), time.monotonic()))
            self.cond.notify_all()

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self.cond:
            return [info for e, info in self.log
                    if e == event and all(info.get(k) == v for k, v in match.items())]

    def wait(self, event: str, n: int = 1, *, within: float = WAIT_S, **match: Any) -> list[dict[str, Any]]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.of(event, **match)) >= n, within)
        assert ok, f"no {n} {event!r} event(s) matching {match}; got {self.log}"
        return self.of(event, **match)

    def index(self, event: str, **match: Any) -> int:
        with self.cond:
            for i, (e, info) in enumerate(self.log):
                if e == event and all(info.get(k) == v for k, v in match.items()):
                    return i
        raise AssertionError(f"no {event!r} event matching {match}; got {self.log}")


def start(m: mpmesh.Master, checkin: Checkin) -> Events:
    m.register_handler("checkin", checkin)
    return Events(m)


def serving(m: mpmesh.Master, group: str) -> None:
    """Wait until every member of ``group`` serves (a broadcast reaches each by name)."""
    results = m.broadcast("whoami", group)
    assert all(isinstance(r, dict) for r in results.values()), results


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def connected(m: mpmesh.Master, events: Events, name: str) -> int:
    """Wait until child ``name`` has connected (``child-started``); return its pid.

    ``spawn_child`` returns once the process exists; a child killed or frozen before it
    connects never "started" and has no heartbeats to miss.
    """
    pid = m.process_stats(name).pid
    events.wait("child-started", name=name, pid=pid)
    assert pid is not None
    return pid


def wait_replaced(events: Events, name: str, old_pid: int) -> int:
    """Wait for ``name``'s restart after ``old_pid`` died; return the new pid.

    Only events logged after that death count (earlier restarts have their own).
    """
    events.wait("child-exit", name=name, pid=old_pid)
    died = events.index("child-exit", name=name, pid=old_pid)

    def after(event: str, **match: Any) -> list[dict[str, Any]]:
        return [info for e, info in events.log[died + 1:]
                if e == event and info.get("name") == name and all(info.get(k) == v for k, v in match.items())]

    with events.cond:
        ok = events.cond.wait_for(lambda: bool(after("auto-restart", given_up=False))
                                  and bool(after("child-started")), WAIT_S)
        assert ok, f"{name!r} was not restarted after pid {old_pid} died: {events.log}"
        restart, started = after("auto-restart", given_up=False)[0], after("child-started")[0]
    assert restart["pid"] == started["pid"] != old_pid
    return int(started["pid"])


def assert_worker_lost(exc: BaseException | None, name: str, pid: int, action: str, attempt: str,
                       how: str = "SIGKILL") -> None:
    assert isinstance(exc, mpmesh.WorkerLost), repr(exc)
    text = str(exc)
    for part in (repr(name), f"pid {pid}", how, repr(action), f"attempt {attempt}"):
        assert part in text, f"{part!r} missing from {text!r}"


# -- SIGKILL mid-request, auto-restart --------------------------------------------------------

def test_sigkill_mid_request_without_retries_fails_with_worker_lost_and_restarts_the_child() -> None:
    checkin = Checkin(lambda i, info: HANG if i == 0 else RETURN)
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=1, mode="sequential")
        first = m.process_stats("g-0").pid
        fut = m.request("task", "g-0", "doomed", retries=0)
        pid = checkin.wait(1)[0]["pid"]
        assert pid == first
        kill(pid)
        assert_worker_lost(fut.exception(WAIT_S), "g-0", pid, "task", "1 of 1")

        new_pid = wait_replaced(events, "g-0", pid)
        exit_info = events.of("child-exit", name="g-0", pid=pid)[0]
        assert exit_info["signal"] == signal.SIGKILL and exit_info["exitcode"] == -signal.SIGKILL
        assert exit_info["group"] == "g"
        restart = events.of("auto-restart", name="g-0")[0]
        assert restart["restarts"] == 1 and restart["pid"] == new_pid and "SIGKILL" in restart["reason"]
        assert events.index("child-exit", name="g-0", pid=pid) < events.index("child-started", pid=new_pid)
        assert events.of("child-started", pid=new_pid)[0]["group"] == "g"
        assert new_pid != pid
        assert wait_for(lambda: gone(pid))

        stats = m.process_stats("g-0")
        assert (stats.name, stats.group, stats.pid, stats.restarts) == ("g-0", "g", new_pid, 1)
        assert stats.alive and stats.healthy
        assert m.group_stats("g").restarts == 1
        assert m.children() == ["g-0"]
        assert m.send_request("whoami", "g-0") == {"tag": None, "name": "g-0", "group": "g", "pid": new_pid}
        assert m.send_request("task", "g", "again")["pid"] == new_pid  # type: ignore[index]
        assert not events.of("request-retry")


@pytest.mark.parametrize("where", ["another member", "the replacement"])
def test_sigkill_mid_request_with_retries_succeeds(where: str) -> None:
    checkin = Checkin(lambda i, info: HANG if i == 0 else RETURN)
    size = 2 if where == "another member" else 1
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=size, mode="sequential")
        serving(m, "g")  # so the retry finds the other member free
        fut = m.request("task", "g", "survivor", retries=1)
        victim = checkin.wait(1)[0]
        kill(victim["pid"])
        result = fut.result(WAIT_S)
        assert result["tag"] == "survivor" and result["pid"] != victim["pid"]
        second = checkin.wait(2)[1]
        assert second["pid"] == result["pid"]
        if where == "another member":
            assert result["name"] != victim["name"]
        else:
            assert result["name"] == victim["name"] == "g-0"
            assert result["pid"] == wait_replaced(events, "g-0", victim["pid"])
            assert m.process_stats("g-0").restarts == 1
        retry = events.wait("request-retry")[0]
        assert (retry["action"], retry["target"], retry["attempt"], retry["attempts"]) == ("task", "g", 2, 2)
        assert "SIGKILL" in retry["reason"] and repr(victim["name"]) in retry["reason"]
        assert len(checkin.arrivals) == 2


@pytest.mark.parametrize("configured", ["per request", "Master default"])
def test_retry_waits_retry_delay_before_resending(configured: str) -> None:
    delay = 0.5
    checkin = Checkin(lambda i, info: HANG if i == 0 else RETURN)
    options: dict[str, Any] = {"retries": 1, "retry_delay": delay}
    with mesh(**(options if configured == "Master default" else {})) as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        fut = m.request("task", "g", "later", **(options if configured == "per request" else {}))
        victim = checkin.wait(1)[0]
        killed_at = time.monotonic()
        kill(victim["pid"])
        result = fut.result(WAIT_S)
        resent_at = checkin.wait(2)[1]["at"]
        assert result["pid"] != victim["pid"]
        assert resent_at - killed_at >= delay
        assert events.of("request-retry")[0]["attempt"] == 2


def test_retry_on_resends_only_for_the_listed_exceptions() -> None:
    checkin = Checkin()
    with mesh() as m:
        start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")

        # A listed exception is re-sent (blocking and Future flavours)...
        checkin.plan = lambda i, info: ("raise", "ValueError") if i == 0 else RETURN
        assert m.send_request("task", "g", "a", retries=2, retry_on=(ValueError,))["tag"] == "a"  # type: ignore[index]
        assert len(checkin.arrivals) == 2
        checkin.plan = lambda i, info: ("raise", "ValueError") if i < 4 else RETURN
        assert m.request("task", "g", "b", retries=2, retry_on=(ValueError,)).result(WAIT_S)["tag"] == "b"
        assert len(checkin.arrivals) == 5

        # ...while attempts remain: then the handler's own exception comes back.
        checkin.plan = lambda i, info: ("raise", "ValueError")
        with pytest.raises(ValueError, match="c in g-"):
            m.send_request("task", "g", "c", retries=2, retry_on=(ValueError,))
        assert len(checkin.arrivals) == 8

        # An exception that is not listed is not re-sent.
        checkin.plan = lambda i, info: ("raise", "KeyError")
        with pytest.raises(KeyError):
            m.send_request("task", "g", "d", retries=3, retry_on=(ValueError,))
        assert len(checkin.arrivals) == 9

        # Without retry_on, retries never re-send a handler's exception.
        checkin.plan = lambda i, info: ("raise", "ValueError")
        with pytest.raises(ValueError):
            m.send_request("task", "g", "e", retries=3)
        assert m.request("task", "g", "f", retries=3).exception(WAIT_S).__class__ is ValueError
        assert len(checkin.arrivals) == 11


def test_retry_on_and_lost_workers_share_one_retry_budget() -> None:
    """``retries=1`` means two attempts in all, whatever ended the first one."""
    plan = {0: ("raise", "ValueError"), 1: HANG}
    checkin = Checkin(lambda i, info: plan.get(i, RETURN))
    with mesh() as m:
        start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        serving(m, "g")
        fut = m.request("task", "g", "budget", retries=1, retry_on=(ValueError,))
        second = checkin.wait(2)[1]  # the re-send after ValueError...
        kill(second["pid"])          # ...dies: that was the last attempt
        exc = fut.exception(WAIT_S)
        attempts = len(checkin.arrivals)
        assert attempts == 2, f"retries=1 made {attempts} attempts, the last: {exc or fut.result()!r}"
        assert isinstance(exc, mpmesh.WorkerLost), repr(exc)
        for part in (repr(second["name"]), f"pid {second['pid']}", "SIGKILL", "'task'"):
            assert part in str(exc), f"{part!r} missing from {str(exc)!r}"


def test_a_retry_on_re_send_emits_request_retry() -> None:
    checkin = Checkin(lambda i, info: ("raise", "ValueError") if i == 0 else RETURN)
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        assert m.send_request("task", "g", "evented", retries=1, retry_on=(ValueError,))["tag"] == "evented"  # type: ignore[index]
        retry = events.wait("request-retry", within=2.0)[0]  # the retry has happened already
        assert (retry["action"], retry["target"], retry["attempt"], retry["attempts"]) == ("task", "g", 2, 2)
        assert "ValueError" in retry["reason"]


# -- the restart-storm guard --------------------------------------------------------------------

def test_restart_storm_guard_leaves_the_child_down_and_requests_fail_fast(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mpmesh")
    limit = 2
    with mesh(restart_limit=limit, restart_window=60.0, restart_backoff=0.0) as m:
        events = Events(m)
        m.spawn_group("g", supervision_workers.worker, size=1, mode="sequential")
        pid = connected(m, events, "g-0")
        for restart in range(1, limit + 1):
            kill(pid)
            pid = wait_replaced(events, "g-0", pid)
            assert m.process_stats("g-0").restarts == restart
            assert m.send_request("echo", "g-0", restart) == restart
        kill(pid)
        given_up = events.wait("auto-restart", given_up=True)
        assert len(given_up) == 1 and given_up[0]["name"] == "g-0"
        assert f"{limit} times" in given_up[0]["reason"] and "SIGKILL" in given_up[0]["reason"]
        assert events.of("child-exit", pid=pid)[0]["signal"] == signal.SIGKILL

        assert wait_for(lambda: gone(pid))
        assert not m.is_alive("g-0")
        assert m.children() == []
        stats = m.process_stats("g-0")
        assert stats.restarts == limit and not stats.alive
        assert m.group_stats("g").restarts == limit
        for target in ("g-0", "g"):
            started = time.monotonic()
            with pytest.raises(mpmesh.MeshError) as caught:
                m.send_request("echo", target, 1, timeout=30.0)
            assert time.monotonic() - started < FAST_FAIL_S, f"{target}: waited, did not fail fast"
            assert repr(target) in str(caught.value), str(caught.value)
        assert len(events.of("child-started", name="g-0")) == 1 + limit
        assert any(r.levelno >= logging.ERROR and "giving up" in r.getMessage() for r in caplog.records)


CRASHES = [  # directive of the handler, what the caller's WorkerLost says, the exit code
    (("sleep", None), "SIGKILL", -signal.SIGKILL),          # killed from outside
    (("exit", 3), "exited with code 3", 3),                  # os._exit in the handler
    (("system-exit", 4), "exited with code 4", 4),           # SystemExit escapes the handler
    (("segfault", None), "SIGSEGV", -signal.SIGSEGV),        # a real segfault
]


@pytest.mark.parametrize(("directive", "how", "exitcode"), CRASHES, ids=[c[0][0] for c in CRASHES])
def test_a_child_that_dies_mid_request_is_named_in_worker_lost_and_restarted(
        directive: Directive, how: str, exitcode: int) -> None:
    checkin = Checkin(lambda i, info: directive if i == 0 else RETURN)
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_child("w", supervision_workers.worker)
        fut = m.request("task", "w", "crash")
        pid = checkin.wait(1)[0]["pid"]
        if directive == HANG:
            kill(pid)
        assert_worker_lost(fut.exception(WAIT_S), "w", pid, "task", "1 of 1", how=how)
        new_pid = wait_replaced(events, "w", pid)
        info = events.of("child-exit", pid=pid)[0]
        assert info["exitcode"] == exitcode
        assert info["signal"] == (-exitcode if exitcode < 0 else None)
        assert m.process_stats("w").restarts == 1
        assert m.send_request("task", "w", "after")["pid"] == new_pid  # type: ignore[index]


def test_restarts_back_off_exponentially() -> None:
    backoff, backoff_max = 0.2, 0.3
    with mesh(restart_backoff=backoff, restart_backoff_max=backoff_max) as m:
        events = Events(m)
        m.spawn_child("w", supervision_workers.worker)
        pid = connected(m, events, "w")
        expected = [0.0, backoff, backoff_max]  # then 0.4 capped to the maximum
        for delay in expected:
            killed_at = time.monotonic()
            kill(pid)
            old, pid = pid, wait_replaced(events, "w", pid)
            started_at = next(at for e, info, at in events.timed if e == "child-started" and info["pid"] == pid)
            assert started_at - killed_at >= delay
            assert events.of("auto-restart", pid=pid)[0]["delay"] == pytest.approx(delay)
            assert old != pid
            assert m.send_request("whoami", "w")["pid"] == pid  # type: ignore[index]
        assert m.process_stats("w").restarts == len(expected)


def test_configure_group_auto_restart_false_leaves_a_dead_member_down() -> None:
    with mesh() as m:
        events = Events(m)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        m.configure_group("g", auto_restart=False)
        pid = connected(m, events, "g-0")
        connected(m, events, "g-1")
        kill(pid)
        events.wait("child-exit", name="g-0")
        assert wait_for(lambda: m.children() == ["g-1"], WAIT_S), m.children()
        assert not m.is_alive("g-0") and not events.of("auto-restart")
        assert {m.send_request("whoami", "g")["name"] for _ in range(4)} == {"g-1"}  # type: ignore[index]
        started = time.monotonic()
        with pytest.raises(mpmesh.MeshError, match="g-0"):
            m.send_request("whoami", "g-0", timeout=30.0)
        assert time.monotonic() - started < FAST_FAIL_S
        assert m.process_stats("g-0").restarts == 0


# -- heartbeats: busy vs frozen -------------------------------------------------------------------

@pytest.mark.parametrize("busy", ["sleep", "spin", "gil"])
def test_child_busy_inside_a_handler_keeps_heartbeating(busy: str) -> None:
    """``gil``: a long C call that never releases the GIL (a big ``sum``, sort, regex...).

    It is as CPU-bound as a handler gets; the issue says such a child is still alive.
    """
    busy_for = 4 * HB_S * HB_MISSES  # four times the silence that makes a child unhealthy
    checkin = Checkin(lambda i, info: (busy, busy_for))
    with mesh(heartbeat_interval=HB_S, heartbeat_miss_threshold=HB_MISSES) as m:
        events = start(m, checkin)
        m.spawn_child("busy", supervision_workers.worker)
        pid = m.process_stats("busy").pid
        fut = m.request("task", "busy", busy)
        checkin.wait(1)
        seen_unhealthy: list[object] = []
        while not fut.done():  # sample health for the whole time the handler is busy
            if m.unhealthy() or not m.process_stats("busy").healthy:
                seen_unhealthy.append((m.unhealthy(), m.process_stats("busy")))
            time.sleep(HB_S / 4)
        assert fut.result(0)["pid"] == pid
        assert not seen_unhealthy
        assert not events.of("heartbeat-missed") and not events.of("child-exit")
        stats = m.process_stats("busy")
        assert stats.pid == pid and stats.restarts == 0 and stats.healthy
        assert stats.requests_handled == 1 and stats.average_response_time >= busy_for


def test_frozen_child_misses_heartbeats_is_killed_and_replaced() -> None:
    checkin = Checkin(lambda i, info: HANG if i == 0 else RETURN)
    with mesh(heartbeat_interval=HB_S, heartbeat_miss_threshold=HB_MISSES) as m:
        events = start(m, checkin)
        m.spawn_child("frozen", supervision_workers.worker)
        fut = m.request("task", "frozen", "held", retries=1)
        pid = checkin.wait(1)[0]["pid"]
        frozen_at = time.monotonic()
        kill(pid, signal.SIGSTOP)
        try:
            missed = events.wait("heartbeat-missed", name="frozen")
            assert missed[0]["pid"] == pid
            assert missed[0]["silent_for"] >= HB_S * HB_MISSES
            # Its last beat may have come up to one interval before the freeze.
            assert time.monotonic() - frozen_at >= HB_S * (HB_MISSES - 1)
            new_pid = wait_replaced(events, "frozen", pid)
        finally:
            if not gone(pid):
                kill(pid, signal.SIGCONT)
        assert events.of("child-exit", pid=pid)[0]["signal"] == signal.SIGKILL
        # The request it held is retried on the replacement.
        assert fut.result(WAIT_S)["pid"] == new_pid
        assert "SIGKILL" in events.wait("request-retry")[0]["reason"]
        assert len(events.of("heartbeat-missed")) == 1
        stats = m.process_stats("frozen")
        assert stats.pid == new_pid and stats.restarts == 1 and stats.healthy
        assert m.unhealthy() == []
        assert m.send_request("echo", "frozen", "thawed") == "thawed"


def test_frozen_child_without_auto_restart_is_only_listed_unhealthy_until_it_resumes() -> None:
    with mesh(heartbeat_interval=HB_S, heartbeat_miss_threshold=HB_MISSES) as m:
        events = Events(m)
        m.spawn_child("frozen", supervision_workers.worker, auto_restart=False)
        m.spawn_child("fine", supervision_workers.worker)
        pid = connected(m, events, "frozen")
        kill(pid, signal.SIGSTOP)
        try:
            events.wait("heartbeat-missed", name="frozen")
            assert m.unhealthy() == ["frozen"]
            assert not m.process_stats("frozen").healthy
            assert m.process_stats("fine").healthy
            time.sleep(5 * HB_S)  # window: the episode must not be reported twice, nor killed
            assert len(events.of("heartbeat-missed")) == 1
            assert m.is_alive("frozen") and not gone(pid)
            assert m.unhealthy() == ["frozen"]
        finally:
            kill(pid, signal.SIGCONT)
        assert wait_for(lambda: m.unhealthy() == [], WAIT_S)
        stats = m.process_stats("frozen")
        assert stats.healthy and stats.pid == pid and stats.restarts == 0
        assert m.send_request("echo", "frozen", "thawed") == "thawed"
        assert not events.of("child-exit") and not events.of("auto-restart")
        # A new episode is reported again.
        kill(pid, signal.SIGSTOP)
        try:
            events.wait("heartbeat-missed", n=2, name="frozen")
        finally:
            kill(pid, signal.SIGCONT)
        assert wait_for(lambda: m.unhealthy() == [], WAIT_S)


def test_heartbeat_resumed_event_fires_when_a_frozen_child_resumes() -> None:
    with mesh(heartbeat_interval=HB_S, heartbeat_miss_threshold=HB_MISSES) as m:
        events = Events(m)
        m.spawn_child("frozen", supervision_workers.worker, auto_restart=False)
        pid = connected(m, events, "frozen")
        kill(pid, signal.SIGSTOP)
        try:
            events.wait("heartbeat-missed", name="frozen")
        finally:
            kill(pid, signal.SIGCONT)
        assert wait_for(lambda: m.unhealthy() == [], WAIT_S)
        resumed = events.wait("heartbeat-resumed", name="frozen", within=2.0)  # it is already healthy
        assert resumed[0]["pid"] == pid


# -- priority queues and caps -------------------------------------------------------------------

SETUPS = ["sequential child", "group of 1 sequential", "group of 2 capped at 1"]


def _saturate(m: mpmesh.Master, setup: str) -> str:
    """Build the target of ``setup``; return its name."""
    if setup == "sequential child":
        m.spawn_child("s", supervision_workers.worker, mode="sequential")
        return "s"
    if setup == "group of 1 sequential":
        m.spawn_group("g", supervision_workers.worker, size=1, mode="sequential")
        return "g"
    m.spawn_group("g", supervision_workers.worker, size=2, mode="concurrent")
    m.configure_group("g", max_concurrency=1)
    assert m.group_stats("g").max_concurrency == 1
    return "g"


@pytest.mark.parametrize("setup", SETUPS)
def test_priority_order_under_a_saturated_target(setup: str) -> None:
    checkin = Checkin()
    checkin.plan = lambda i, info: checkin.held()
    ran: list[str] = []
    with mesh() as m:
        start(m, checkin)
        m.register_handler("record", ran.append)
        target = _saturate(m, setup)
        blocker = m.request("task", target, "blocker")
        checkin.wait(1)
        queued = [(0, "a0"), (5, "b5"), (0, "c0"), (10, "d10"), (5, "e5"), (-1, "f-1"), (10, "g10"), (0, "h0")]
        futures = [m.request("record", target, tag, priority=p) for p, tag in queued]
        assert wait_for(lambda: m.stats()["requests_queued"] == len(queued), WAIT_S), m.stats()
        if target == "g":
            assert m.group_stats("g").queue_length == len(queued)
        checkin.gate.set()
        assert blocker.result(WAIT_S)["tag"] == "blocker"
        assert [f.result(WAIT_S) for f in futures] == [tag for _, tag in queued]
        assert ran == ["d10", "g10", "b5", "e5", "a0", "c0", "h0", "f-1"]


@pytest.mark.parametrize("cap", [1, 2, None])
def test_group_max_concurrency_is_never_exceeded(cap: int | None) -> None:
    members, per_child, total = 3, 4, 16
    expected = cap if cap is not None else members * per_child
    lock = threading.Condition()
    inside = {"now": 0, "max": 0, "held": 0}
    release = threading.Event()

    def enter(_: object) -> None:
        with lock:
            inside["now"] += 1
            inside["max"] = max(inside["max"], inside["now"])

    def hold(_: object) -> None:
        with lock:
            inside["held"] += 1
            lock.notify_all()
        if not release.wait(WAIT_S):
            raise TimeoutError("never released")

    def leave(_: object) -> None:
        with lock:
            inside["now"] -= 1

    with mesh() as m:
        for name, fn in (("enter", enter), ("hold", hold), ("leave", leave)):
            m.register_handler(name, fn)
        m.spawn_group("g", supervision_workers.worker, size=members, mode="concurrent",
                      max_concurrency=per_child, strategy="least-busy")
        if cap is not None:
            m.configure_group("g", max_concurrency=cap)
        futures = [m.request("counted", "g", i) for i in range(total)]
        with lock:
            assert lock.wait_for(lambda: inside["held"] >= expected, WAIT_S), inside
        # Saturated: the cap's worth of requests inside the workers, the rest queued.
        assert wait_for(lambda: m.group_stats("g").queue_length == total - expected, WAIT_S), m.group_stats("g")
        g = m.group_stats("g")
        assert (g.requests_active, g.queue_length, g.max_concurrency) == (expected, total - expected, cap)
        assert sum(m.process_stats(n).requests_active for n in g.members) == expected
        with lock:
            assert inside["now"] == inside["max"] == expected
        release.set()
        assert [f.result(WAIT_S) for f in futures] == list(range(total))
        assert inside["max"] == expected and inside["now"] == 0
        g = m.group_stats("g")
        assert (g.requests_handled, g.requests_active, g.queue_length) == (total, 0, 0)


# -- timeouts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("setup", ["sequential child", "group of 2 capped at 1"])
def test_timeout_while_queued_raises_request_timeout_and_never_runs(setup: str) -> None:
    checkin = Checkin()
    checkin.plan = lambda i, info: checkin.held()
    ran: list[str] = []
    with mesh() as m:
        start(m, checkin)
        m.register_handler("record", ran.append)
        target = _saturate(m, setup)
        blocker = m.request("task", target, "blocker")
        checkin.wait(1)
        started = time.monotonic()
        late = m.request("record", target, "late", timeout=0.3, priority=100)
        exc = late.exception(WAIT_S)
        assert isinstance(exc, mpmesh.RequestTimeout) and isinstance(exc, TimeoutError), repr(exc)
        assert "while queued" in str(exc) and "'record'" in str(exc)
        assert 0.3 <= time.monotonic() - started < 0.3 + FAST_FAIL_S
        checkin.gate.set()
        blocker.result(WAIT_S)
        # FIFO after the blocker: had "late" been left in the queue, it would run first.
        assert m.send_request("record", target, "after") == "after"
        assert ran == ["after"]


def test_timeout_in_a_stuck_worker_is_retried_on_another_member() -> None:
    checkin = Checkin()
    checkin.plan = lambda i, info: checkin.held() if i == 0 else RETURN
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        serving(m, "g")
        fut = m.request("task", "g", "stuck-then-ok", timeout=0.5, retries=1)
        stuck = checkin.wait(1)[0]
        result = fut.result(WAIT_S)
        assert result["name"] != stuck["name"] and result["pid"] != stuck["pid"]
        reason = events.wait("request-retry")[0]["reason"]
        assert "timed out" in reason and repr(stuck["name"]) in reason and "attempt 1 of 2" in reason

        # Without retries the caller gets RequestTimeout naming the worker, pid, action, attempt.
        other = result["name"]
        checkin.plan = lambda i, info: checkin.held()
        with pytest.raises(mpmesh.RequestTimeout) as caught:
            m.send_request("task", other, "stuck", timeout=0.3)
        text = str(caught.value)
        for part in (repr(other), f"pid {result['pid']}", "'task'", "attempt 1 of 1"):
            assert part in text, f"{part!r} missing from {text!r}"
        checkin.gate.set()  # the stuck handlers finish; their late answers are dropped
        assert m.send_request("echo", "g", "still serving") == "still serving"
        assert [m.process_stats(n).restarts for n in ("g-0", "g-1")] == [0, 0]


# -- shutdown -------------------------------------------------------------------------------------

def test_graceful_shutdown_child_lets_the_in_flight_request_finish() -> None:
    checkin = Checkin()
    checkin.plan = lambda i, info: checkin.held()
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_child("w", supervision_workers.worker)
        pid = m.process_stats("w").pid
        in_flight = m.request("task", "w", "in flight")
        checkin.wait(1)
        queued = m.request("echo", "w", "queued")
        stopper = threading.Thread(target=m.shutdown_child, args=("w", 5.0))
        started = time.monotonic()
        stopper.start()
        # Stopping takes nothing new: what was queued behind the in-flight request fails.
        assert isinstance(queued.exception(WAIT_S), mpmesh.MeshError)
        assert not in_flight.done()
        checkin.gate.set()
        assert in_flight.result(WAIT_S)["tag"] == "in flight"
        stopper.join(WAIT_S)
        assert not stopper.is_alive()
        assert time.monotonic() - started < 5.0
        assert events.wait("child-exit", name="w")[0]["exitcode"] == 0
        assert not m.is_alive("w") and m.children() == [] and gone(pid)  # type: ignore[arg-type]
        assert not events.of("auto-restart")
        t0 = time.monotonic()
        with pytest.raises(mpmesh.MeshError):
            m.send_request("echo", "w", 1, timeout=30.0)
        assert time.monotonic() - t0 < FAST_FAIL_S


def test_shutdown_child_right_after_spawn_is_graceful() -> None:
    """The child may still be connecting: Shutdown then reaches it with (or before) Ready."""
    timeout = 2.0
    with mesh() as m:
        events = Events(m)
        for name in ("early-0", "early-1", "early-2"):
            m.spawn_child(name, supervision_workers.worker)
            started = time.monotonic()
            m.shutdown_child(name, timeout=timeout)
            elapsed = time.monotonic() - started
            info = events.wait("child-exit", name=name)[0]
            assert (info["exitcode"], info["signal"]) == (0, None), (name, info, f"{elapsed:.2f} s")
            assert elapsed < timeout, (name, elapsed)


def test_forced_shutdown_child_kills_a_child_that_ignores_sigterm() -> None:
    timeout = 0.5
    checkin = Checkin(lambda i, info: ("stubborn", None) if i == 0 else RETURN)
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_child("stubborn", supervision_workers.worker)
        fut = m.request("task", "stubborn", "never finishes")
        pid = checkin.wait(2)[1]["pid"]  # the second check-in: SIGTERM is ignored now
        started = time.monotonic()
        m.shutdown_child("stubborn", timeout=timeout)
        elapsed = time.monotonic() - started
        assert timeout <= elapsed < timeout + 1.0 + 3.0  # + TERMINATE_GRACE_S + slack
        assert_worker_lost(fut.exception(WAIT_S), "stubborn", pid, "task", "1 of 1")
        assert events.wait("child-exit", name="stubborn")[0]["signal"] == signal.SIGKILL
        assert not m.is_alive("stubborn") and gone(pid)
        assert not events.of("auto-restart")


def test_a_reply_sent_just_before_exiting_is_delivered() -> None:
    # The reply and the zygote's news of the exit arrive on two descriptors at about the
    # same time; whichever the broker sees first, the caller gets the reply.
    names = [f"last-{i}" for i in range(12)]
    with mesh() as m:
        for name in names:
            m.spawn_child(name, workers.last_words, auto_restart=False)
        futures = [m.request("last-words", name, i) for i, name in enumerate(names)]
        assert [f.result(WAIT_S) for f in futures] == list(range(len(names)))
        assert wait_for(lambda: not any(m.is_alive(n) for n in names), WAIT_S)


def test_master_shutdown_with_requests_in_progress() -> None:
    timeout = 1.0
    checkin = Checkin()
    checkin.plan = lambda i, info: ("stubborn", None) if info["name"] == "stubborn" else checkin.held()
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        m.spawn_child("stubborn", supervision_workers.worker)
        pids = {n: m.process_stats(n).pid for n in m.children()}
        in_flight = [m.request("task", "g", i) for i in range(2)]
        queued = [m.request("task", "g", i) for i in range(2, 4)]
        forced = m.request("task", "stubborn", "forced")
        checkin.wait(4)  # g-0, g-1 held; stubborn checked in twice
        stopper = threading.Thread(target=m.shutdown, args=(timeout,))
        started = time.monotonic()
        stopper.start()

        def closed() -> bool:
            try:
                m.request("echo", "g", 1).cancel()
            except mpmesh.MeshClosed:
                return True
            return False

        assert wait_for(closed, WAIT_S)
        checkin.gate.set()
        assert sorted(f.result(WAIT_S)["tag"] for f in in_flight) == [0, 1]
        stopper.join(WAIT_S)
        assert not stopper.is_alive()
        assert time.monotonic() - started < timeout + 1.0 + 3.0
        for fut in queued:  # accepted before the workers stopped taking work: either is fine
            exc = fut.exception(WAIT_S)
            assert exc is None or isinstance(exc, mpmesh.MeshError), repr(exc)
        assert_worker_lost(forced.exception(WAIT_S), "stubborn", pids["stubborn"], "task", "1 of 1")
        exits = {e["name"]: e for e in events.wait("child-exit", n=3)}
        assert {n: e["exitcode"] for n, e in exits.items()} == {"g-0": 0, "g-1": 0, "stubborn": -signal.SIGKILL}
        assert not events.of("auto-restart")
        assert all(gone(pid) for pid in pids.values())  # type: ignore[arg-type]
        m.shutdown()  # a second shutdown does nothing


def _readline(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return str(stream.readline())


@pytest.mark.parametrize(("to", "how"), [("the master", "idle"), ("its process group", "idle"),
                                         ("its process group", "busy")])
def test_ctrl_c_in_the_master_shuts_the_mesh_down_cleanly(to: str, how: str) -> None:
    proc = subprocess.Popen([sys.executable, str(CTRL_C_SCRIPT), how], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready = json.loads(_readline(proc.stdout, 30.0))
        children: dict[str, int] = ready["children"]
        assert sorted(children) == ["g-0", "g-1", "solo"]
        sent = time.monotonic()
        if to == "the master":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, err = proc.communicate(timeout=15.0)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, out, err)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True
    assert elapsed < 5.0
    # Each child was stopped by the master (clean exit), not by the SIGINT.
    assert {e["name"]: (e["pid"], e["exitcode"]) for e in report["exits"]} == {
        n: (pid, 0) for n, pid in children.items()}
    # Busy: the job in progress when Ctrl-C came was let finish (graceful, not mid-write).
    assert report["handled"] == {"g-0": 1, "g-1": 1, "solo": 2 if how == "busy" else 1}
    assert wait_for(lambda: all(gone(pid) for pid in children.values()), 5.0)
    assert "Traceback" not in err.replace("KeyboardInterrupt", ""), err


# -- logging and stdout -----------------------------------------------------------------------------

def test_exits_restarts_and_retries_are_logged_under_the_mpmesh_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mpmesh")
    checkin = Checkin(lambda i, info: HANG if i == 0 else RETURN)
    with mesh() as m:
        events = start(m, checkin)
        m.spawn_child("w", supervision_workers.worker)
        fut = m.request("task", "w", "logged", retries=1)
        pid = checkin.wait(1)[0]["pid"]
        kill(pid)
        new_pid = fut.result(WAIT_S)["pid"]
        wait_replaced(events, "w", pid)
    records = [r for r in caplog.records if r.name == "mpmesh" or r.name.startswith("mpmesh.")]
    messages = [(r.levelno, r.getMessage()) for r in records]

    def logged(level: int, *parts: str) -> bool:
        return any(lv >= level and all(p in msg for p in parts) for lv, msg in messages)

    assert logged(logging.WARNING, "'w'", str(pid), "SIGKILL"), messages
    assert logged(logging.WARNING, "restarted", "'w'", str(new_pid)), messages
    assert logged(logging.INFO, "retrying", "'task'"), messages
    assert logged(logging.DEBUG, "child-started", str(new_pid)), messages
    assert logged(logging.INFO, "'w'", str(new_pid), "exited with code 0"), messages


def test_the_library_prints_nothing_to_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    checkin = Checkin(lambda i, info: HANG if i == 0 else RETURN)
    with mesh(heartbeat_interval=HB_S, heartbeat_miss_threshold=HB_MISSES) as m:
        events = start(m, checkin)
        m.spawn_group("g", supervision_workers.worker, size=2, mode="sequential")
        fut = m.request("task", "g", "x", retries=1)
        pid = checkin.wait(1)[0]["pid"]
        kill(pid)
        fut.result(WAIT_S)
        wait_replaced(events, checkin.arrivals[0]["name"], pid)
        frozen = connected(m, events, "g-1")
        kill(frozen, signal.SIGSTOP)
        try:
            wait_replaced(events, "g-1", frozen)
        finally:
            if not gone(frozen):
                kill(frozen, signal.SIGCONT)
        serving(m, "g")
        m.shutdown_child("g-0")
    out, _ = capfd.readouterr()
    assert out == ""
