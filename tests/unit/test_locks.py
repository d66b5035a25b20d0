"""The lock table, pure: FIFO waiters, TTLs, fencing tokens, release on peer loss."""

from __future__ import annotations

import pytest

from .shared_fakes import Driver, answers
from mpmesh._broker._locks import LockTable
from mpmesh._broker._payload import pack
from mpmesh._errors import LockTimeout

A, B, C = 1, 2, 3


@pytest.fixture
def d() -> Driver:
    return Driver(LockTable(), "locks")


def acquire(d: Driver, peer: int, name: str = "L", ttl: float | None = None,
            wait: float | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    rid, actions = d.send(peer, "acquire", pack((name, ttl, wait)))
    return rid, answers(actions)


def test_grant_then_fifo_waiters(d: Driver) -> None:
    rid_a, got = acquire(d, A)
    token_a = got[(A, rid_a)][0]
    rid_b, got = acquire(d, B)
    assert got == {}  # parked
    rid_c, got = acquire(d, C)
    assert got == {}
    rid, actions = d.send(A, "release", pack(("L", token_a)))
    out = answers(actions)
    assert out[(A, rid)] is True
    token_b = out[(B, rid_b)][0]
    assert token_b > token_a
    assert (C, rid_c) not in out
    assert d.op(B, "release", ("L", token_b)) is True
    assert d.component.stats(0.0)["locks_held"] == 1  # C holds it now


def test_try_lock_answers_none_when_held(d: Driver) -> None:
    acquire(d, A)
    assert d.op(B, "acquire", ("L", None, 0)) is None
    assert d.op(B, "acquire", ("other", None, 0)) is not None


def test_wait_runs_out_with_lock_timeout(d: Driver) -> None:
    acquire(d, A)
    rid, got = acquire(d, B, wait=2.0)
    assert got == {} and d.component.next_deadline() == 2.0
    out = answers(d.tick(2.0))
    assert isinstance(out[(B, rid)], LockTimeout)
    assert d.component.stats(2.0)["lock_waiters"] == 0


def test_ttl_expiry_grants_next_waiter_and_stale_release_is_false(d: Driver) -> None:
    rid, got = acquire(d, A, ttl=1.0)
    token = got[(A, rid)][0]
    rid_b, _ = acquire(d, B)
    out = answers(d.tick(1.0))
    assert (B, rid_b) in out
    assert not d.component.valid("L", token, 1.0)
    assert d.component.valid("L", out[(B, rid_b)][0], 1.0)
    assert d.op(A, "release", ("L", token)) is False


def test_expired_grant_is_noticed_before_the_tick(d: Driver) -> None:
    acquire(d, A, ttl=1.0)
    d.now = 1.5
    rid, got = acquire(d, B, wait=0)
    assert got[(B, rid)] is not None


def test_peer_lost_releases_its_locks_and_drops_its_waiters(d: Driver) -> None:
    acquire(d, A, "x")
    acquire(d, A, "y")
    rid_b, _ = acquire(d, B, "x")
    acquire(d, A, "z")
    rid_c, _ = acquire(d, C, "z")  # waits behind A
    acquire(d, A, "x")              # A also waits on x (behind B)
    out = answers(d.component.on_peer_lost(A, 0.0))
    assert set(out) == {(B, rid_b), (C, rid_c)}
    stats = d.component.stats(0.0)
    assert (stats["locks_held"], stats["lock_waiters"]) == (2, 0)
    assert A not in d.component._by_peer


def test_withdraw_drops_a_waiter_or_releases_a_grant(d: Driver) -> None:
    rid_a, _ = acquire(d, A)
    rid_b, _ = acquire(d, B)
    d.send(B, "withdraw", pack(("L", rid_b)), rid=0)
    _, out = d.send(A, "withdraw", pack(("L", rid_a)), rid=0)
    assert out == []  # nobody left to grant it to
    assert "L" not in d.component.locks


def test_extend(d: Driver) -> None:
    rid, got = acquire(d, A, ttl=1.0)
    token = got[(A, rid)][0]
    d.now = 0.5
    assert d.op(A, "extend", ("L", token, 2.0)) is True
    assert d.tick(1.0) == []
    assert d.component.valid("L", token, 2.4)
    assert d.tick(2.5) == [] and not d.component.valid("L", token, 2.5)
    assert d.op(A, "extend", ("L", token, 2.0)) is False


def test_tokens_increase_across_locks(d: Driver) -> None:
    tokens = [d.op(A, "acquire", (name, None, None))[0] for name in "abcde"]
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


def test_timer_heap_stays_bounded_under_churn(d: Driver) -> None:
    for _ in range(10_000):
        token = d.op(A, "acquire", ("L", 30.0, None))[0]
        d.op(A, "release", ("L", token))
    assert len(d.component._timers) < 200


@pytest.mark.parametrize("head", [("", None, None), ("L", -1, None), ("L", None, -5), (1, None, None)])
def test_bad_arguments(d: Driver, head: tuple[object, ...]) -> None:
    with pytest.raises((ValueError, TypeError)):
        d.op(A, "acquire", head)
