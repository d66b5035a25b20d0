"""A Master's shared state is served by a broker process of its own.

A master computing in Python must not slow its children's cache, lock and pub/sub
operations; the state broker lives and dies with its Master.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import mpmesh
from tests.integration import broker_process_workers as workers
from tests.integration.test_broker_process import assert_sigkill_takes_broker

LONG = 30.0
ROUNDS = 40
# A round is a cache set, an incr, a lock and a publish: a few ms at most. With the
# broker on a thread of a master sitting in a long C call that holds the GIL (a
# backtracking regular expression, ~0.3 s a call), the slowest round took ~1.7 s here.
WORST_ROUND_S = 0.25


def _busy_in_c(fut: Any) -> None:
    while not fut.done():
        re.match(r"(a+)+b", "a" * 23)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_busy_master_does_not_slow_its_childrens_shared_state(method: str) -> None:
    with mpmesh.Master(start_method=method) as m:
        m.spawn_child("w", workers.shared_state_rounds)
        fut = m.request("rounds", "w", ROUNDS, timeout=LONG)
        _busy_in_c(fut)
        worst = fut.result(LONG)
        assert m.cache("busy")["count"] == ROUNDS
        assert worst < WORST_ROUND_S, f"a round took {worst * 1e3:.0f} ms while the master was busy"


def test_every_process_sees_one_state() -> None:
    with mpmesh.Master() as m:
        m.cache("one")["k"] = "from the master"
        with mpmesh.connect(m.name, authkey=m.authkey, autospawn=False) as other:
            assert other.cache("one")["k"] == "from the master"
            other.cache("one")["k2"] = 2
        assert m.cache("one")["k2"] == 2
        assert m._state_proc is not None


def test_a_killed_state_broker_is_a_clear_error() -> None:
    with mpmesh.Master() as m:
        cache = m.cache("c")
        cache["k"] = 1
        assert m._state_proc is not None
        m._state_proc.kill()
        m._state_proc.join(10)  # once it is gone, every call fails (a write racing the kill may be taken)
        with pytest.raises(mpmesh.BrokerUnavailable):
            cache["k"] = 2


def test_a_killed_master_takes_its_state_broker() -> None:
    assert_sigkill_takes_broker("""
        m = mpmesh.Master()
        m.cache("c")["k"] = 1
        print(m._state_proc.pid, flush=True)
    """)


def test_broker_thread_keeps_state_in_the_master() -> None:
    with mpmesh.Master(broker="thread") as m:
        assert m._state_proc is None
        m.cache("c")["k"] = 1
        assert m.cache("c")["k"] == 1
    with pytest.raises(ValueError, match="broker"):
        mpmesh.Master(broker="elsewhere")



def test_a_child_holding_the_gil_does_not_slow_the_others() -> None:
    """A guard: a child's GIL is its own, wherever the broker runs."""
    with mpmesh.Master() as m:
        m.spawn_child("hog", workers.gil_hog)
        m.spawn_child("w", workers.shared_state_rounds)
        hogging = m.request("hog", "hog", 3.0, timeout=LONG)
        worst = m.send_request("rounds", "w", ROUNDS, timeout=LONG)
        assert not hogging.done(), "the hog finished before the rounds: nothing was measured"
        assert worst < WORST_ROUND_S, f"a round took {worst * 1e3:.0f} ms while a child held its GIL"
        hogging.result(LONG)


def _threads(pid: int) -> int:
    import os
    return len(os.listdir(f"/proc/{pid}/task"))


def test_the_state_broker_does_its_start_up_work_only_when_first_used() -> None:
    from tests.conftest import wait_for
    from tests.integration import workers as plain

    with mpmesh.Master() as m:
        m.spawn_child("w", plain.basic)
        assert m.send_request("square", "w", 7, timeout=LONG) == 49  # no shared state used
        proc = m._state_proc
        assert proc is not None and _threads(proc.pid) == 1  # forked, waiting: no broker built
        m.cache("c")["k"] = 1                                  # the first use builds it
        assert wait_for(lambda: _threads(proc.pid) > 1, LONG)
        assert m.cache("c")["k"] == 1
