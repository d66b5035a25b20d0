"""The parking lot: deadlines in order, lazy deletion, rescheduling; no clock, no I/O."""

from __future__ import annotations

from mpmesh._broker._limits import FOREVER
from mpmesh._broker._waiters import Effects, ParkingLot, Waiter, deadline_for


def test_deadline_for() -> None:
    assert deadline_for(10.0, None) == FOREVER
    assert deadline_for(10.0, 2.5) == 12.5
    assert deadline_for(10.0, -1) == 10.0


def test_expired_in_deadline_order() -> None:
    lot = ParkingLot()
    late, early, never = Waiter(1, 1, 0, 5.0), Waiter(1, 2, 0, 2.0), Waiter(2, 3, 0)
    for w in (late, early, never):
        lot.park(w)
    assert len(lot) == 3 and lot.next_deadline() == 2.0
    assert lot.expired(1.0) == []
    assert lot.expired(5.0) == [early, late]
    assert lot.next_deadline() is None  # the one left has no deadline
    assert lot.get(2, 3) is never and lot.of_peer(2) == [never]


def test_unpark_and_reschedule_drop_stale_entries() -> None:
    lot = ParkingLot()
    a, b = Waiter(1, 1, 0, 1.0), Waiter(1, 2, 0, 3.0)
    lot.park(a)
    lot.park(b)
    lot.unpark(a)
    assert a.done and lot.get(1, 1) is None and len(lot) == 1
    assert lot.next_deadline() == 3.0
    lot.reschedule(b, FOREVER)  # e.g. a notified Condition waiter, now queued on the lock
    assert lot.next_deadline() is None and lot.expired(10.0) == []
    lot.reschedule(b, 7.0)
    assert lot.expired(10.0) == [b]


def test_effects_collect_answers_and_jobs() -> None:
    fx = Effects()
    w = Waiter(1, 1, 0)
    fx.wake(w, 42)
    fx.fail(w, ValueError("x"))
    fx.offload(lambda: 1, lambda outcome, fx: None)
    assert fx.wakes[0] == (w, 42, None) and isinstance(fx.wakes[1][2], ValueError)
    assert len(fx.jobs) == 1
