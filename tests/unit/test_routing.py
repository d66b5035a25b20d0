"""BrokerCore + Router, pure: delivery, sequential workers, priorities, strategies, caps.

Timeouts, lost peers and retries are in test_routing_failures.py.
"""

from __future__ import annotations

import random

import pytest

from ._broker_harness import (
    ORIGIN, Harness, closes, failures_to, replies_to, requests_to, where_sent,
)
from mpmesh._broker._core import LOCAL_PEER
from mpmesh._broker._jobs import J_DONE, Job, JobQueue
from mpmesh._wire._messages import ErrorCode, Failure, Hello, Reply, Request, Role


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.client()
    return harness


# -- targets ---------------------------------------------------------------------------------

def test_unknown_target_is_not_found(h: Harness) -> None:
    rid, actions = h.request("nobody")
    (failure,) = failures_to(actions)
    assert (failure.rid, failure.code) == (rid, ErrorCode.NOT_FOUND)
    assert "'nobody'" in failure.message
    h.settled()


def test_unknown_instance_id_is_not_found(h: Harness) -> None:
    rid, actions = h.request("", target_id=9999)
    (failure,) = failures_to(actions)
    assert (failure.rid, failure.code) == (rid, ErrorCode.NOT_FOUND)
    assert "9999" in failure.message


def test_empty_target_without_a_host_is_no_handler(h: Harness) -> None:
    rid, actions = h.request("")
    (failure,) = failures_to(actions)
    assert (failure.rid, failure.code) == (rid, ErrorCode.NO_HANDLER)
    assert "master" in failure.message
    h.settled()


def test_empty_target_is_delivered_to_the_local_host(h: Harness) -> None:
    h.core.add_local("master", 1, "host", h.now)
    rid, actions = h.request("", "whoami", payload=b"\x80\x05N.")
    (req,) = requests_to(actions, LOCAL_PEER)
    assert (req.action, req.payload, req.target_id) == ("whoami", b"\x80\x05N.", -1)
    assert replies_to(h.reply(LOCAL_PEER, req.rid, b"me")) == [Reply(rid, b"me")]
    h.settled()


def test_target_by_instance_id(h: Harness) -> None:
    h.child("w", 1)
    rid, actions = h.request("", target_id=h.instance[1])
    (req,) = requests_to(actions, 1)
    assert replies_to(h.reply(1, req.rid)) == [Reply(rid, b"result")]


def test_request_before_hello_closes_the_peer(h: Harness) -> None:
    h.core.on_connect(7, h.now)
    h.child("w", 1)
    actions = h.core.on_message(7, Request(1, 0, -1, 0, -1.0, 0.0, "job", "w", b""), h.now)
    assert [c.peer for c in closes(actions)] == [7]
    assert requests_to(actions, 1) == []
    h.settled()


def test_second_hello_and_duplicate_child_are_refused(h: Harness) -> None:
    h.child("w", 1)
    again = h.core.on_message(1, Hello(1001, int(Role.CHILD), 1, "w", "", "host"), h.now)
    assert [c.peer for c in closes(again)] == [1]
    h.core.on_connect(2, h.now)
    dup = h.core.on_message(2, Hello(55, int(Role.CHILD), 1, "w", "", "host"), h.now)
    assert [c.peer for c in closes(dup)] == [2]


def test_request_to_a_child_down_for_good_fails_fast(h: Harness) -> None:
    h.child("w", 1)
    h.lose(1)
    h.router.worker_down(h.worker("w"), "exited with code 1", h.now)
    rid, actions = h.request("w")
    (failure,) = failures_to(actions)
    assert (failure.rid, failure.code) == (rid, ErrorCode.UNAVAILABLE)
    h.settled()


# -- sequential workers and answers ----------------------------------------------------------------

def test_sequential_worker_gets_one_request_at_a_time(h: Harness) -> None:
    h.core.declare_child("w", None, 1)
    h.hello(1, "w", capacity=0)
    _, a1 = h.request("w", "first")
    _, a2 = h.request("w", "second")
    assert requests_to(a1 + a2, 1) == [], "Hello(capacity=0): nothing before Serve"
    (req1,) = requests_to(h.serve(1, 1), 1)
    assert req1.action == "first"
    _, a3 = h.request("w", "third")
    assert requests_to(a3, 1) == [], "still busy with the first"
    after = h.reply(1, req1.rid)
    assert [r.action for r in requests_to(after, 1)] == ["second"]
    assert len(replies_to(after)) == 1


def test_reply_reaches_the_origin_with_its_own_rid(h: Harness) -> None:
    h.child("w", 1)
    h.client(200)
    # Every client numbers its requests from 1: the same rid from two origins is fine.
    rid_a, a = h.request("w", "a", origin=ORIGIN, rid=1)
    rid_b, _ = h.request("w", "b", origin=200, rid=1)
    (req_a,) = requests_to(a, 1)
    replied = h.reply(1, req_a.rid, b"A")
    assert replies_to(replied, ORIGIN) == [Reply(rid_a, b"A")]
    (req_b,) = requests_to(replied, 1)
    assert replies_to(h.reply(1, req_b.rid, b"B"), 200) == [Reply(rid_b, b"B")]
    h.settled()


def test_failure_from_the_worker_is_forwarded(h: Harness) -> None:
    h.child("w", 1)
    rid, actions = h.request("w")
    (req,) = requests_to(actions, 1)
    out = h.fail(1, req.rid)
    assert failures_to(out) == [Failure(rid, ErrorCode.REMOTE, "remote says no", b"exc")]
    assert h.worker("w").errors == 1
    h.settled()


def test_unknown_or_foreign_reply_is_ignored(h: Harness) -> None:
    h.child("w", 1)
    h.child("v", 2)
    _, actions = h.request("w")
    (req,) = requests_to(actions, 1)
    assert h.reply(2, req.rid) == [], "only the worker holding a job may answer it"
    assert h.reply(1, 424242) == []
    assert len(replies_to(h.reply(1, req.rid))) == 1


# -- priorities ----------------------------------------------------------------------------------

ORDER = [("low", 0), ("high-1", 5), ("mid", 1), ("high-2", 5), ("neg", -3), ("high-3", 5)]
EXPECTED = ["high-1", "high-2", "high-3", "mid", "low", "neg"]


def test_priority_order_on_a_saturated_sequential_worker(h: Harness) -> None:
    h.child("w", 1)
    _, a = h.request("w", "busy")
    (busy,) = requests_to(a, 1)
    for action, priority in ORDER:
        _, out = h.request("w", action, priority=priority)
        assert requests_to(out, 1) == []
    started = []
    brid = busy.rid
    while True:
        out = h.reply(1, brid)
        reqs = requests_to(out, 1)
        if not reqs:
            break
        started.append(reqs[0].action)
        brid = reqs[0].rid
    assert started == EXPECTED
    h.settled()


def test_priority_order_on_a_saturated_group(h: Harness) -> None:
    peers = h.group("g", 2, capacity=1)
    sent = []
    for name in ("busy-0", "busy-1"):
        _, out = h.request("g", name)
        sent += requests_to(out, peers[0]) + requests_to(out, peers[1])
    assert len(sent) == 2
    for action, priority in ORDER:
        _, out = h.request("g", action, priority=priority)
        assert where_sent(out) == []
    started: list[str] = []
    # Free one worker at a time, always peers[0] first: the group queue decides the order.
    running = {peers[0]: sent[0].rid, peers[1]: sent[1].rid}
    while running:
        peer = min(running)
        out = h.reply(peer, running.pop(peer))
        for p in peers:
            for req in requests_to(out, p):
                started.append(req.action)
                running[p] = req.rid
    assert started == EXPECTED
    h.settled()


def _job(seq: int, priority: int = 0) -> Job:
    return Job(seq, ORIGIN, seq, f"job-{seq}", b"", priority, None, "g", float("inf"), seq=seq)


def test_job_queue_orders_by_priority_then_seq_and_skips_jobs_that_left() -> None:
    queue = JobQueue()
    jobs = {seq: _job(seq, priority) for seq, priority in [(1, 0), (2, 5), (3, 0), (4, 5), (6, -1)]}
    for job in jobs.values():
        queue.push(job)
    queue.push(retried := _job(0))  # a retried job keeps its seq: back to the front of its lane
    queue.push(late := _job(5))     # and one that stood between others goes between them
    jobs[3].state = J_DONE          # left by another way (timeout, cancel)
    queue.discard(jobs[3])
    assert len(queue) == 6
    order = [job.seq for job in queue.drain()]
    assert order == [2, 4, 0, 1, 5, 6]
    assert retried.seq == 0 and late.seq == 5 and len(queue) == 0 and queue.peek() is None


def test_job_queue_keeps_no_lane_for_priorities_it_no_longer_holds() -> None:
    queue = JobQueue()
    for seq in range(1000):
        queue.push(_job(seq, priority=seq))
        queue.pop()
    assert queue._lanes == {} and queue._order == []


# -- strategies ------------------------------------------------------------------------------------

def test_round_robin_alternates(h: Harness) -> None:
    peers = h.group("g", 3, capacity=10)
    order = [where_sent(h.request("g", f"r{i}")[1])[0][0] for i in range(7)]
    assert order == [peers[i % 3] for i in range(7)]


def test_round_robin_skips_a_busy_member(h: Harness) -> None:
    peers = h.group("g", 3, capacity=1)
    first = [where_sent(h.request("g", f"r{i}")[1])[0][0] for i in range(3)]
    assert first == peers
    # Free only the middle one: the next request must go there, whoever's turn it is.
    job = next(j for j in h.router.jobs.values() if j.worker is h.worker("g-1"))
    h.reply(peers[1], job.brid)
    assert where_sent(h.request("g", "next")[1]) == [(peers[1], "next")]


def test_least_busy_picks_the_least_loaded(h: Harness) -> None:
    peers = h.group("g", 3, strategy="least-busy", capacity=10)
    for _ in range(3):
        h.request("g-0")
    for _ in range(1):
        h.request("g-1")
    for _ in range(2):
        h.request("g-2")
    assert [h.worker(f"g-{i}").busy for i in range(3)] == [3, 1, 2]
    assert where_sent(h.request("g", "a")[1]) == [(peers[1], "a")]   # 3, 2, 2
    picks = {where_sent(h.request("g", f"b{i}")[1])[0][0] for i in range(2)}
    assert picks == {peers[1], peers[2]}                              # 3, 3, 3
    assert [h.worker(f"g-{i}").busy for i in range(3)] == [3, 3, 3]


def _random_picks(seed: int, n: int) -> list[int]:
    h = Harness(seed)
    h.client()
    h.group("g", 4, strategy="random", capacity=1000)
    return [where_sent(h.request("g", f"r{i}")[1])[0][0] for i in range(n)]


def test_random_uses_the_injected_rng() -> None:
    picks = _random_picks(1234, 40)
    assert picks == _random_picks(1234, 40), "same seed, same schedule"
    replay = random.Random(1234)
    assert picks == [replay.choice([1, 2, 3, 4]) for _ in range(40)]
    assert set(picks) == {1, 2, 3, 4}
    assert _random_picks(99, 40) != picks


def test_random_only_picks_free_members(h: Harness) -> None:
    peers = h.group("g", 3, strategy="random", capacity=1)
    got = [where_sent(h.request("g", f"r{i}")[1]) for i in range(4)]
    assert sorted(p for (p, _), in got[:3]) == peers
    assert got[3] == [], "all busy: the fourth waits in the group queue"


# -- concurrency caps ---------------------------------------------------------------------------

def test_group_max_concurrency_caps_in_flight(h: Harness) -> None:
    h.group("g", 2, capacity=5, max_concurrency=3)
    sent = []
    for i in range(6):
        sent += where_sent(h.request("g", f"r{i}")[1])
    assert len(sent) == 3
    assert h.group_of("g").busy == 3
    job = next(iter(h.router.jobs.values()))
    assert job.worker is not None
    out = h.reply(job.worker.peer, job.brid)  # type: ignore[arg-type]
    assert len(where_sent(out)) == 1, "one finished, one more may start"
    assert h.group_of("g").busy == 3
    assert sum(len(h.worker(f"g-{i}").running) for i in range(2)) == 3


def test_concurrent_worker_takes_up_to_its_capacity(h: Harness) -> None:
    h.child("w", 1, capacity=3)
    sent = [where_sent(h.request("w", f"r{i}")[1]) for i in range(5)]
    assert [len(s) for s in sent] == [1, 1, 1, 0, 0]
    assert h.worker("w").busy == 3


def test_serve_zero_stops_new_deliveries(h: Harness) -> None:
    h.child("w", 1, capacity=2)
    h.serve(1, 0)
    assert where_sent(h.request("w")[1]) == []
    assert len(where_sent(h.serve(1, 2))) == 1
