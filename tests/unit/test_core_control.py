"""The core's control operations, what a Master asks of its children's records: read
them, configure a group, mark a child down, stop children, fail what is left."""

from __future__ import annotations

import pytest

from ._broker_harness import ORIGIN, Harness, failures_to, requests_to
from mpmesh._broker._jobs import WorkerState
from mpmesh._wire._messages import ErrorCode


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.client()
    return harness


def test_records_are_read_through_the_core(h: Harness) -> None:
    h.group("g", 2)
    assert set(h.core.children()) == {"g-0", "g-1"} and h.core.child("g-0") is h.worker("g-0")
    assert set(h.core.groups()) == {"g"} and h.core.group("nope") is None and h.core.child("nope") is None


def test_requests_counts_queued_and_in_flight(h: Harness) -> None:
    h.group("g", 1)  # one child, capacity 1
    h.request("g")
    h.request("g")
    h.request("g")
    assert h.core.requests() == (2, 1)


def test_configure_group_changes_it_and_starts_what_now_fits(h: Harness) -> None:
    [peer] = h.group("g", 1, capacity=4, max_concurrency=1)
    h.request("g")
    _, queued = h.request("g")
    assert requests_to(queued, peer) == []  # capped at one
    started = h.core.configure_group("g", h.now, strategy="least-busy", max_concurrency=2)
    assert len(requests_to(started, peer)) == 1 and h.group_of("g").strategy == "least-busy"
    with pytest.raises(KeyError):
        h.core.configure_group("nope", h.now)
    with pytest.raises(ValueError, match="unknown strategy"):
        h.core.configure_group("g", h.now, strategy="fastest")


def test_child_down_fails_its_request_and_once_down_can_be_left_alone(h: Harness) -> None:
    peer = 1
    h.child("c", peer)
    rid, _ = h.request("c")
    down = h.core.child_down("c", "died with SIGKILL", h.now)
    assert [f.code for f in failures_to(down, ORIGIN)] == [ErrorCode.WORKER_LOST]
    assert h.worker("c").state is WorkerState.DOWN
    assert h.core.child_down("c", "was shut down", h.now, unless_down=True) == []
    assert h.core.child_down("nope", "gone", h.now) == []


def test_stop_children_and_fail_all(h: Harness) -> None:
    h.group("g", 2)
    h.request("g")
    h.core.stop_children(["g-0", "g-1", "forgotten"], timeout=None)
    assert all(w.state is not WorkerState.READY for w in h.core.children().values())
    failed = h.core.fail_all(ErrorCode.CLOSED, "the mesh was shut down")
    assert [f.code for f in failures_to(failed, ORIGIN)] == [ErrorCode.CLOSED]
    h.core.forget_child("g-0")
    assert h.core.child("g-0") is None and [w.name for w in h.group_of("g").members] == ["g-1"]
