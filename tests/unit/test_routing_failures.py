"""BrokerCore + Router, pure: timeouts, lost workers and origins, retries, deadlines, no leaks."""

from __future__ import annotations

import random

import pytest

from ._broker_harness import (
    ORIGIN, Harness, cancels_to, failures_to, notes, replies_to, requests_to, where_sent,
)
from mpmesh._broker._actions import Inspect, Send
from mpmesh._broker._routing import LOST_GRACE_S
from mpmesh._wire._messages import Cancel, ErrorCode, Reply


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.client()
    return harness


def no_send_to_nobody(actions: list[object]) -> None:
    assert all(a.peer is not None for a in actions if isinstance(a, Send)), actions


# -- timeouts ------------------------------------------------------------------------------------

def test_timeout_while_queued_never_runs(h: Harness) -> None:
    h.child("w", 1)
    _, a = h.request("w", "busy")
    (busy,) = requests_to(a, 1)
    rid, queued = h.request("w", "late", timeout=1.0)
    assert requests_to(queued, 1) == []
    assert h.core.next_deadline() == 1.0
    assert h.tick(0.999) == []
    out = h.tick(1.0)
    (failure,) = failures_to(out)
    assert (failure.rid, failure.code) == (rid, ErrorCode.TIMEOUT)
    assert "queued" in failure.message and "'late'" in failure.message
    assert cancels_to(out, 1) == [], "the worker never saw it"
    after = h.reply(1, busy.rid)
    assert requests_to(after, 1) == [], "a request that timed out while queued is never run"
    h.settled()


def test_timeout_while_running_cancels_and_drops_the_late_reply(h: Harness) -> None:
    h.child("w", 1)
    rid, a = h.request("w", "slow", timeout=2.0)
    (req,) = requests_to(a, 1)
    assert req.timeout == 2.0, "the worker learns the remaining time"
    rid2, b = h.request("w", "next")
    assert requests_to(b, 1) == []
    out = h.tick(2.0)
    (failure,) = failures_to(out)
    assert (failure.rid, failure.code) == (rid, ErrorCode.TIMEOUT)
    assert "'w'" in failure.message
    assert cancels_to(out, 1) == [Cancel(req.rid)]
    assert requests_to(out, 1) == [], "an abandoned job still holds its worker"
    late = h.reply(1, req.rid, b"too late")
    assert replies_to(late) == [], "the late answer is dropped"
    (nxt,) = requests_to(late, 1)
    assert nxt.action == "next", "the late answer frees the capacity"
    assert replies_to(h.reply(1, nxt.rid)) == [Reply(rid2, b"result")]
    h.settled()


def test_timeout_cancelled_before_start_also_frees_the_capacity(h: Harness) -> None:
    h.child("w", 1)
    _, a = h.request("w", "slow", timeout=1.0)
    (req,) = requests_to(a, 1)
    h.request("w", "next")
    h.tick(1.0)
    freed = h.fail(1, req.rid, ErrorCode.CANCELLED)
    assert failures_to(freed) == []
    assert [r.action for r in requests_to(freed, 1)] == ["next"]


def test_remaining_time_is_sent_to_the_worker(h: Harness) -> None:
    h.child("w", 1)
    _, a = h.request("w", "busy")
    (busy,) = requests_to(a, 1)
    h.request("w", "waits", timeout=5.0)
    h.now = 3.0
    (req,) = requests_to(h.reply(1, busy.rid), 1)
    assert req.timeout == pytest.approx(2.0)


def test_timeout_is_retried_when_retries_are_left(h: Harness) -> None:
    """``retries`` re-sends after RequestTimeout too; ``timeout`` is per attempt."""
    peers = h.group("g", 2, capacity=1)
    rid, a = h.request("g", "job", timeout=1.0, retries=1)
    ((first_peer, _),) = where_sent(a)
    out = h.tick(1.0)
    assert failures_to(out) == []
    assert len(notes(out, "request-retry")) == 1
    assert len(cancels_to(out, first_peer)) == 1
    ((second_peer, _),) = where_sent(out)
    assert second_peer != first_peer and second_peer in peers
    (req,) = requests_to(out, second_peer)
    assert replies_to(h.reply(second_peer, req.rid)) == [Reply(rid, b"result")]


def test_next_deadline_is_the_earliest_timer(h: Harness) -> None:
    h.child("w", 1, capacity=10)
    assert h.core.next_deadline() is None
    for timeout in (5.0, 3.0, 4.0):
        h.request("w", f"t{timeout}", timeout=timeout)
    h.request("w", "forever")
    assert h.core.next_deadline() == 3.0
    assert [f.code for f in failures_to(h.tick(3.0))] == [ErrorCode.TIMEOUT]
    assert h.core.next_deadline() == 4.0
    # Answering the 4 s request removes its timer from consideration.
    job = next(j for j in h.router.jobs.values() if j.action == "t4.0")
    h.reply(1, job.brid)
    assert h.core.next_deadline() == 5.0


# -- a worker goes away -------------------------------------------------------------------------

def test_worker_lost_fails_its_running_request_naming_worker_pid_and_action(h: Harness) -> None:
    h.group("g", 2, capacity=1)
    rid, a = h.request("g", "square")
    ((peer, _),) = where_sent(a)
    assert h.lose(peer) == [], "connection gone: wait to learn how the process ended"
    name = next(w for w in h.router.workers.values() if w.pid == 1000 + peer).name
    out = h.router.worker_down(h.worker(name), "died with SIGKILL", h.now)
    (failure,) = failures_to(out)
    assert (failure.rid, failure.code) == (rid, ErrorCode.WORKER_LOST)
    for part in (f"'{name}'", f"pid {1000 + peer}", "'square'", "SIGKILL"):
        assert part in failure.message
    h.settled()


def test_worker_lost_retries_on_another_member(h: Harness) -> None:
    h.group("g", 2, capacity=1)
    rid, a = h.request("g", "square", retries=1)
    ((peer, _),) = where_sent(a)
    other = 2 if peer == 1 else 1
    h.lose(peer)
    out = h.router.worker_down(h.worker(f"g-{peer - 1}"), "died with SIGKILL", h.now)
    assert failures_to(out) == []
    (note,) = notes(out, "request-retry")
    assert note.info["action"] == "square" and note.info["attempt"] == 2
    (req,) = requests_to(out, other)
    assert req.action == "square"
    assert replies_to(h.reply(other, req.rid, b"49")) == [Reply(rid, b"49")]
    h.settled()


def test_retry_waits_out_retry_delay(h: Harness) -> None:
    h.group("g", 2, capacity=1)
    _, a = h.request("g", "job", retries=1, retry_delay=0.5)
    ((peer, _),) = where_sent(a)
    h.lose(peer)
    out = h.router.worker_down(h.worker(f"g-{peer - 1}"), "died with SIGKILL", h.now)
    assert len(notes(out, "request-retry")) == 1
    assert where_sent(out) == [], "not before retry_delay"
    assert h.core.next_deadline() == pytest.approx(0.5)
    assert len(where_sent(h.tick(0.5))) == 1


def test_lost_connection_fails_after_the_grace_period(h: Harness) -> None:
    h.child("w", 1)
    rid, _ = h.request("w", "job")
    h.now = 10.0
    h.lose(1)
    assert h.core.next_deadline() == pytest.approx(10.0 + LOST_GRACE_S)
    assert h.tick(10.0 + LOST_GRACE_S / 2) == []
    (failure,) = failures_to(h.tick(10.0 + LOST_GRACE_S))
    assert (failure.rid, failure.code) == (rid, ErrorCode.WORKER_LOST)
    assert "closed its connection" in failure.message


def test_timeout_during_the_lost_grace_period(h: Harness) -> None:
    """The deadline passes after the connection dropped but before the process is reaped."""
    h.child("w", 1)
    rid, _ = h.request("w", "job", timeout=1.0)
    h.now = 0.8
    h.lose(1)
    out = h.tick(1.0)
    no_send_to_nobody(out)
    (failure,) = failures_to(out)
    assert (failure.rid, failure.code) == (rid, ErrorCode.TIMEOUT)
    later = h.router.worker_down(h.worker("w"), "died with SIGKILL", 1.1)
    assert failures_to(later) == [], "one answer per request"
    h.settled()


def test_timeout_retry_during_the_lost_grace_period_runs_once(h: Harness) -> None:
    h.group("g", 2, capacity=1)
    rid, a = h.request("g", "job", timeout=1.0, retries=1)
    ((peer, _),) = where_sent(a)
    other = 2 if peer == 1 else 1
    h.now = 0.8
    h.lose(peer)
    out = h.tick(1.0)
    no_send_to_nobody(out)
    (req,) = requests_to(out, other)
    later = h.router.worker_down(h.worker(f"g-{peer - 1}"), "died with SIGKILL", 1.1)
    later += h.tick(1.1 + LOST_GRACE_S)
    assert failures_to(later) == [], "the timed-out attempt is over"
    assert notes(later, "request-retry") == [], "the timed-out attempt was already retried"
    final = h.reply(other, req.rid)
    assert replies_to(final) == [Reply(rid, b"result")]
    assert where_sent(final) == [], "no second copy of the request runs"
    h.settled()


def test_delayed_retry_to_a_child_that_went_down_for_good(h: Harness) -> None:
    """A retry waiting out its delay must not be parked on a dead child forever."""
    h.child("w", 1)
    rid, _ = h.request("w", "job", retries=1, retry_delay=0.5)
    h.lose(1)
    restarting = h.router.worker_down(h.worker("w"), "died with SIGKILL", 0.0, restarting=True)
    assert len(notes(restarting, "request-retry")) == 1
    gone = h.router.worker_down(h.worker("w"), "could not be restarted", 0.1)
    gone += h.tick(0.6)
    (failure,) = failures_to(gone)
    assert failure.rid == rid and failure.code in (ErrorCode.UNAVAILABLE, ErrorCode.WORKER_LOST)
    h.settled()


def test_queued_requests_of_a_child_down_for_good_fail_fast(h: Harness) -> None:
    h.child("w", 1)
    h.request("w", "running")
    rid, _ = h.request("w", "queued")
    h.lose(1)
    out = h.router.worker_down(h.worker("w"), "exited with code 3", h.now)
    codes = {f.rid: f.code for f in failures_to(out)}
    assert codes[rid] == ErrorCode.UNAVAILABLE and len(codes) == 2
    h.settled()


# -- the origin goes away ------------------------------------------------------------------------

def test_origin_lost_drops_queued_and_cancels_running(h: Harness) -> None:
    h.child("w", 1)
    h.client(200)
    _, a = h.request("w", "running")
    (running,) = requests_to(a, 1)
    h.request("w", "queued-1")
    h.request("w", "queued-2", timeout=5.0)
    rid_other, _ = h.request("w", "other", origin=200)
    out = h.lose(ORIGIN)
    assert cancels_to(out, 1) == [Cancel(running.rid)]
    assert failures_to(out, ORIGIN) == [] and replies_to(out, ORIGIN) == []
    after = h.fail(1, running.rid, ErrorCode.CANCELLED)
    (nxt,) = requests_to(after, 1)
    assert nxt.action == "other", "the lost origin's queued jobs vanished"
    assert replies_to(h.reply(1, nxt.rid), 200) == [Reply(rid_other, b"result")]
    h.settled()


def test_origin_cancel_message(h: Harness) -> None:
    h.child("w", 1)
    rid_run, a = h.request("w", "running")
    (running,) = requests_to(a, 1)
    rid_q, _ = h.request("w", "queued")
    assert h.core.on_message(ORIGIN, Cancel(rid_q), h.now) == []
    out = h.core.on_message(ORIGIN, Cancel(rid_run), h.now)
    assert out == [Send(1, Cancel(running.rid))]
    assert where_sent(h.fail(1, running.rid, ErrorCode.CANCELLED)) == []
    h.settled()


def test_cancel_only_touches_the_senders_own_request(h: Harness) -> None:
    h.child("w", 1)
    h.client(200)
    _, a = h.request("w", "mine", origin=ORIGIN, rid=1)
    (running,) = requests_to(a, 1)
    assert h.core.on_message(200, Cancel(1), h.now) == [], "peer 200 has no request 1"
    assert replies_to(h.reply(1, running.rid)) == [Reply(1, b"result")]
    h.settled()


# -- nothing grows --------------------------------------------------------------------------

def test_nothing_is_left_after_a_busy_schedule() -> None:
    h = Harness(seed=7)
    h.client()
    h.client(200)
    h.group("g", 3, strategy="least-busy", capacity=2, max_concurrency=5)
    h.child("solo", 10, capacity=1)
    rng = random.Random(7)
    running: dict[int, list[int]] = {1: [], 2: [], 3: [], 10: []}
    answered: set[tuple[int, int]] = set()

    def absorb(actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Send):
                if a.peer in running and hasattr(a.msg, "action"):
                    running[a.peer].append(a.msg.rid)  # type: ignore[attr-defined]
                elif a.peer in (ORIGIN, 200) and not isinstance(a.msg, Cancel):
                    key = (a.peer, a.msg.rid)  # type: ignore[attr-defined]
                    assert key not in answered, f"two answers for {key}"
                    answered.add(key)

    submitted = 0
    for step in range(400):
        h.now = step * 0.1
        absorb(h.tick(h.now))
        if rng.random() < 0.6:
            timeout = rng.choice([None, 0.3, 1.0, 5.0])
            _, out = h.request(rng.choice(["g", "solo"]), priority=rng.randint(0, 3),
                               timeout=timeout, origin=rng.choice([ORIGIN, 200]))
            submitted += 1
            absorb(out)
        peer = rng.choice(list(running))
        if running[peer] and rng.random() < 0.7:
            absorb(h.reply(peer, running[peer].pop(rng.randrange(len(running[peer])))))
    while any(running.values()) or h.router.jobs:
        h.now += 0.1
        absorb(h.tick(h.now))
        for peer, brids in running.items():
            while brids:
                absorb(h.reply(peer, brids.pop()))
    assert len(answered) == submitted, "every request got exactly one answer"
    h.settled()


# -- heartbeats ------------------------------------------------------------------------------------

def test_a_silent_worker_whose_process_runs_is_busy_not_unhealthy() -> None:
    # A handler inside one long C call that holds the GIL starves the thread that beats;
    # its process is still running, and the router asks (``Inspect``) before it calls
    # the worker unhealthy (never marking it, not even for a moment).
    h = Harness()
    h.client()
    h.core.enable_heartbeats(1.0, 3, 0.0, inspect=True)
    busy, stuck = h.child("busy", 1), h.child("stuck", 2)
    out = h.tick(4.0)  # silent for 4 s: past three missed beats
    [ask] = [a for a in out if isinstance(a, Inspect)]
    assert sorted(ask.pids) == sorted([busy.pid, stuck.pid])
    assert not notes(out, "heartbeat-missed") and busy.healthy and stuck.healthy  # not yet: asked
    out = h.core.on_running({busy.pid}, 4.0)
    assert [n.info["name"] for n in notes(out, "heartbeat-missed")] == ["stuck"]
    assert busy.healthy and not stuck.healthy
    out = h.tick(7.5)  # the busy one stays silent, and now it is not running
    [ask] = [a for a in out if isinstance(a, Inspect)]
    assert ask.pids == (busy.pid,)
    out = h.core.on_running(set(), 7.5)
    assert [n.info["name"] for n in notes(out, "heartbeat-missed")] == ["busy"]
    assert not busy.healthy
    assert h.core.on_running({busy.pid}, 8.0) == []  # an answer nobody asked for changes nothing


def test_without_inspecting_a_silent_worker_is_unhealthy_at_once() -> None:
    h = Harness()
    h.client()
    h.core.enable_heartbeats(1.0, 3, 0.0)
    worker = h.child("w", 1)
    out = h.tick(4.0)
    assert [n.info["name"] for n in notes(out, "heartbeat-missed")] == ["w"]
    assert not [a for a in out if isinstance(a, Inspect)] and not worker.healthy
