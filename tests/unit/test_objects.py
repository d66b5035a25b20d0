"""The ``objects`` component, driven with Op messages and a fake clock: calls, errors,
references per peer, graces, parking and expiry, a lost holder (crashed or gone cleanly),
offloaded user code, proxies user code gets, a dict's iterator."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest

from mpmesh._broker._actions import WARNING, Notify, Offload, Send
from mpmesh._broker._objects import GRACE_S, ObjectTable
from mpmesh._broker._refs import AttributeRef, ProxyRef, Token, TypeSpec, WorkerSide, rebuild_ref
from mpmesh._broker._sync import BrokenBarrier
from mpmesh._client._futures import error_for
from mpmesh._wire import _codec
from mpmesh._wire._messages import ErrorCode, Failure, Op, Reply

ADDRESS = "/tmp/test.sock"
NOTHING = object()


CLEAN = 9  # the peer that says Goodbye in these tests


class Harness:
    def __init__(self) -> None:
        self.table = ObjectTable(left_cleanly=lambda peer: peer == CLEAN,
                                 describe=lambda peer: f"process {peer}")
        self.table.address = ADDRESS
        self.rids = iter(range(1, 10**6))
        self.now = 100.0

    def op(self, peer: int, name: str, args: Any, rid: int | None = None) -> tuple[int, list[Any]]:
        rid = next(self.rids) if rid is None else rid
        actions = self.table.on_op(peer, Op(rid, -1.0, "objects", name, _codec.dumps(args)), self.now)
        return rid, actions

    def create(self, peer: int, typeid: str, *args: Any, **kwargs: Any) -> int:
        rid, actions = self.op(peer, "create", (typeid, args, kwargs))
        oid, _ = answer(actions, peer, rid)
        return oid  # type: ignore[no-any-return]

    def call(self, peer: int, oid: int, method: str, *args: Any, tid: int = 0, **kwargs: Any) -> tuple[int, list[Any]]:
        return self.op(peer, "call", (oid, method, args, kwargs, tid))

    def value(self, peer: int, oid: int, method: str, *args: Any, **kwargs: Any) -> Any:
        rid, actions = self.call(peer, oid, method, *args, **kwargs)
        return answer(actions, peer, rid)

    def tick(self, now: float) -> list[Any]:
        self.now = now
        return self.table.on_tick(now)

    def count(self) -> int:
        return len(self.table.objects)


def answer(actions: list[Any], peer: int, rid: int) -> Any:
    """The value (or raised exception) sent to (peer, rid); NOTHING if none was sent."""
    for action in actions:
        if isinstance(action, Send) and action.peer == peer and action.msg.rid == rid:
            msg = action.msg
            if isinstance(msg, Reply):
                return _codec.loads(msg.payload)
            assert isinstance(msg, Failure)
            return error_for(msg)
    return NOTHING


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_dict_calls_and_errors(h: Harness) -> None:
    d = h.create(1, "dict", {"a": 1})
    assert h.value(1, d, "__setitem__", "b", 2) is None
    assert h.value(1, d, "keys") == ["a", "b"]          # views travel as lists
    assert isinstance(h.value(1, d, "__getitem__", "zz"), KeyError)
    rid, actions = h.call(1, d, "fromkeys", [1])         # not exposed
    assert actions[0].msg.code == ErrorCode.REMOTE_TEXT
    assert h.value(1, d, "__repr__") == "{'a': 1, 'b': 2}"
    assert h.value(1, d, "#GETVALUE") == {"a": 1, "b": 2}
    rid, actions = h.call(1, 999, "keys")
    assert actions[0].msg.code == ErrorCode.NOT_FOUND


def test_unknown_typeid_and_bad_op(h: Harness) -> None:
    rid, actions = h.op(1, "create", ("nope", (), {}))
    assert actions[0].msg.code == ErrorCode.NOT_FOUND
    rid, actions = h.op(1, "frobnicate", None)
    assert actions[0].msg.code == ErrorCode.BAD_REQUEST
    rid, actions = h.op(1, "call", (1, 2))                # malformed
    assert actions[0].msg.code == ErrorCode.BAD_REQUEST


def test_references_per_peer(h: Harness) -> None:
    d = h.create(1, "dict")
    h.op(2, "incref", (d, 0), rid=0)
    h.op(1, "decref", [d], rid=0)
    assert h.count() == 1                                  # peer 2 still holds it
    h.op(1, "decref", [d], rid=0)                          # not peer 1's any more: ignored
    assert h.count() == 1
    assert h.table.on_peer_lost(2, h.now) == []
    assert h.count() == 0


def test_a_grace_covers_a_token_in_transit(h: Harness) -> None:
    d = h.create(1, "dict")
    h.op(1, "grace", (d, 77), rid=0)
    h.op(1, "decref", [d], rid=0)
    assert h.count() == 1 and h.table.next_deadline() == h.now + GRACE_S
    h.op(2, "incref", (d, 77), rid=0)                      # the receiver takes it over
    assert h.table.graces == {} and h.count() == 1
    h.table.on_peer_lost(2, h.now)
    assert h.count() == 0


def test_an_unclaimed_grace_expires(h: Harness) -> None:
    d = h.create(1, "dict")
    h.op(1, "grace", (d, 5), rid=0)
    h.table.on_peer_lost(1, h.now)
    assert h.count() == 1
    h.tick(h.now + GRACE_S)
    assert h.count() == 0 and h.table.next_deadline() is None


def test_nested_proxies_hold_internal_references(h: Harness) -> None:
    outer, inner = h.create(1, "list"), h.create(1, "dict")
    # What a pickled proxy looks like to the broker: a call to rebuild_ref.
    ref_args = (None, Token("dict", ADDRESS, inner), None, 0, None)
    payload = _codec.dumps((outer, "append", (_Pickled(ref_args),), {}, 0))
    (offload,) = h.table.on_op(1, Op(9, -1.0, "objects", "call", payload), h.now)
    offload.done(offload.job(), h.now)                     # not built-in values: read off the loop
    del offload                                            # as a host drops it: it holds the list
    h.op(1, "decref", [inner], rid=0)
    assert h.count() == 2                                  # the list keeps the dict
    got = h.value(2, outer, "__getitem__", 0)              # the dict comes back as a proxy
    assert got.token.id == inner and got.gid >= 1 << 62
    h.op(1, "decref", [outer], rid=0)
    assert h.count() == 1                                  # the reply's grace still covers it
    h.tick(h.now + GRACE_S)
    assert h.count() == 0


class _Pickled:
    """Pickles as a proxy token would."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild_ref, self.args)


class _Rebuilt:
    def __init__(self, factory: Any, token: Token, exposed: Any, gid: int, authkey: Any) -> None:
        self.token, self.gid, self.exposed = token, gid, exposed


@pytest.fixture(autouse=True)
def _plain_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the broker a token rebuilds as a plain record (no proxies, no clients)."""
    from mpmesh._broker import _refs
    monkeypatch.setattr(_refs, "_proxy_builder", _Rebuilt)


def test_lock_parks_and_a_lost_holder_releases_it(h: Harness) -> None:
    lock = h.create(1, "Lock")
    h.op(2, "incref", (lock, 0), rid=0)
    assert h.value(1, lock, "acquire") is True
    rid, actions = h.call(2, lock, "acquire")
    assert answer(actions, 2, rid) is NOTHING and len(h.table.lot) == 1
    actions = h.table.on_peer_lost(1, h.now)               # the holder dies
    assert answer(actions, 2, rid) is True and len(h.table.lot) == 0
    assert h.value(2, lock, "acquire", False) is False


def test_acquire_times_out_at_its_deadline(h: Harness) -> None:
    lock = h.create(1, "Lock")
    h.value(1, lock, "acquire")
    rid, actions = h.call(2, lock, "acquire", True, 2.0)
    assert answer(actions, 2, rid) is NOTHING
    assert h.table.next_deadline() == h.now + 2.0
    assert h.tick(h.now + 1.0) == []
    assert answer(h.tick(h.now + 1.0), 2, rid) is False


def test_rlock_owner_is_peer_and_thread(h: Harness) -> None:
    rlock = h.create(1, "RLock")
    assert h.value(1, rlock, "acquire", tid=7) is True
    assert h.value(1, rlock, "acquire", tid=7) is True
    rid, actions = h.call(1, rlock, "release", tid=8)
    assert isinstance(answer(actions, 1, rid), RuntimeError)


def test_condition_wait_notify_reacquires(h: Harness) -> None:
    cond = h.create(1, "Condition")
    h.value(1, cond, "acquire")
    rid_wait, actions = h.call(1, cond, "wait", 10.0)
    assert answer(actions, 1, rid_wait) is NOTHING        # parked; the lock is free again
    assert h.value(2, cond, "acquire") is True
    rid, actions = h.call(2, cond, "notify")
    assert answer(actions, 1, rid_wait) is NOTHING         # notified, but peer 2 holds the lock
    actions = h.call(2, cond, "release")[1]
    assert answer(actions, 1, rid_wait) is True
    h.value(1, cond, "release")
    h.value(1, cond, "acquire")
    rid_wait, _ = h.call(1, cond, "wait", 1.0)
    assert answer(h.tick(h.now + 1.0), 1, rid_wait) is False  # timed out, lock re-acquired


def test_queue_hands_items_to_parked_getters(h: Harness) -> None:
    q = h.create(1, "Queue", 1)
    rid_get, actions = h.call(2, q, "get", True, 5.0)
    assert answer(actions, 2, rid_get) is NOTHING
    rid, actions = h.call(1, q, "put", "x")
    assert answer(actions, 2, rid_get) == "x"
    rid_get, _ = h.call(2, q, "get", True, 5.0)
    assert isinstance(answer(h.tick(h.now + 5.0), 2, rid_get), queue.Empty)
    h.value(1, q, "put", "a")
    rid_put, actions = h.call(1, q, "put", "b", True, None)
    assert answer(actions, 1, rid_put) is NOTHING          # full: parked
    actions = h.call(2, q, "get")[1]
    assert answer(actions, 1, rid_put) is None
    assert h.value(2, q, "get") == "b"


def test_barrier_breaks_at_a_deadline(h: Harness) -> None:
    barrier = h.create(1, "Barrier", 3)
    rid, _ = h.call(1, barrier, "wait", 1.0)
    assert h.value(1, barrier, "__getattribute__", "n_waiting") == 1
    assert isinstance(answer(h.tick(h.now + 1.0), 1, rid), BrokenBarrier)
    assert h.value(1, barrier, "__getattribute__", "broken") is True


def test_cancel_withdraws_a_parked_call(h: Harness) -> None:
    ev = h.create(1, "Event")
    rid, _ = h.call(2, ev, "wait")
    h.op(2, "cancel", rid, rid=0)
    assert len(h.table.lot) == 0
    assert answer(h.call(1, ev, "set")[1], 2, rid) is NOTHING


def test_user_types_run_off_the_loop(h: Harness) -> None:
    h.table.registry["Box"] = TypeSpec("Box", lambda v: {"v": v}, ("get",), None, None)
    rid, actions = h.op(1, "create", ("Box", (3,), {}))
    (offload,) = actions
    assert isinstance(offload, Offload)
    seen: list[Any] = []
    t = threading.Thread(target=lambda: seen.append(offload.job()))
    t.start()
    t.join()
    oid, exposed = answer(offload.done(seen[0], h.now), 1, rid)
    assert exposed == ("get",)
    rid, (offload,) = h.call(1, oid, "get", "v")
    assert answer(offload.done(offload.job(), h.now), 1, rid) == 3
    rid, (offload,) = h.call(1, oid, "get")              # raises in user code
    assert isinstance(answer(offload.done(offload.job(), h.now), 1, rid), TypeError)


def test_count_and_debug(h: Harness) -> None:
    h.create(1, "list", [1])
    rid, actions = h.op(1, "count", None)
    assert answer(actions, 1, rid) == 1
    rid, actions = h.op(1, "debug", None)
    assert "refcount=1" in answer(actions, 1, rid)


def warnings_in(actions: list[Any]) -> list[str]:
    return [str(a.info["message"]) for a in actions if isinstance(a, Notify) and a.event == WARNING]


def test_a_clean_exit_leaves_its_lock_held_for_a_hand_off(h: Harness) -> None:
    lock = h.create(1, "Lock")
    h.op(CLEAN, "incref", (lock, 0), rid=0)
    assert h.value(CLEAN, lock, "acquire") is True
    assert warnings_in(h.table.on_peer_lost(CLEAN, h.now)) == []
    assert h.value(1, lock, "acquire", False) is False    # still held, as in the stdlib
    assert h.value(1, lock, "release") is None            # anyone may release a Lock
    assert h.value(1, lock, "acquire", False) is True


def test_a_crashed_holder_is_named_in_a_warning(h: Harness) -> None:
    lock, rlock, sem = h.create(1, "Lock"), h.create(1, "RLock"), h.create(1, "Semaphore")
    for oid in (lock, rlock, sem):
        h.op(2, "incref", (oid, 0), rid=0)
        assert h.value(2, oid, "acquire") is True
    (text,) = warnings_in(h.table.on_peer_lost(2, h.now))
    assert text.startswith("process 2 ended abnormally")
    assert f"Lock {lock}" in text and f"RLock {rlock}" in text and f"Semaphore {sem}" in text
    for oid in (lock, rlock, sem):
        assert h.value(1, oid, "acquire", False) is True
    assert warnings_in(h.table.on_peer_lost(3, h.now)) == []  # held nothing: no warning


def test_a_dead_peers_semaphore_units_come_back(h: Harness) -> None:
    sem = h.create(1, "BoundedSemaphore", 2)
    for peer in (2, 3, 4):
        h.op(peer, "incref", (sem, 0), rid=0)
    assert h.value(2, sem, "acquire") is True and h.value(3, sem, "acquire") is True
    rid, actions = h.call(4, sem, "acquire")
    assert answer(actions, 4, rid) is NOTHING             # parked
    assert answer(h.table.on_peer_lost(2, h.now), 4, rid) is True  # 2's unit goes to 4
    assert h.value(1, sem, "release") is None              # a hand-off: counted against 3's
    h.table.on_peer_lost(3, h.now)                         # so 3's death returns nothing more
    assert h.value(1, sem, "acquire", False) is True
    assert h.value(1, sem, "acquire", False) is False      # 4 holds the other one
    h.table.on_peer_lost(4, h.now)
    assert h.value(1, sem, "acquire", False) is True
    assert isinstance(h.value(1, sem, "release", 3), ValueError)  # never past its bound


def test_a_dicts_iterator_lives_in_the_broker(h: Harness) -> None:
    d = h.create(1, "dict", {"a": 1, "b": 2})
    it = h.value(1, d, "__iter__")
    assert isinstance(it, _Rebuilt) and it.token.typeid == "Iterator" and it.gid == -1
    assert it.exposed == ("__next__", "send", "throw", "close")
    assert h.value(1, it.token.id, "__next__") == "a"
    h.value(1, d, "clear")
    assert isinstance(h.value(1, it.token.id, "__next__"), RuntimeError)
    it = h.value(1, d, "__iter__")
    assert isinstance(h.value(1, it.token.id, "__next__"), StopIteration)
    assert h.count() == 3
    h.op(1, "decref", [it.token.id], rid=0)
    assert h.count() == 2


def test_a_bound_method_of_a_proxy_stays_a_reference(h: Harness) -> None:
    outer, inner = h.create(1, "list"), h.create(1, "list")
    ref_args = (None, Token("list", ADDRESS, inner), None, 0, None)
    method = _Method(_Pickled(ref_args), "append")           # pickles as lst.append does
    payload = _codec.dumps((outer, "append", (method,), {}, 0))
    (offload,) = h.table.on_op(1, Op(9, -1.0, "objects", "call", payload), h.now)
    offload.done(offload.job(), h.now)
    stored = h.table.objects[outer].obj[0]  # type: ignore[index]
    assert isinstance(stored, AttributeRef) and stored.name == "append"
    assert isinstance(stored.ref, ProxyRef) and stored.ref.token.id == inner
    with pytest.raises(AttributeError):
        stored.ref._private  # noqa: B018 - only public names are references


def test_user_code_gets_a_value_rebuilt_on_its_worker(h: Harness) -> None:
    inner = h.create(1, "dict")
    h.table._with_refs = True
    ref = ProxyRef(h.table, None, Token("dict", ADDRESS, inner), None, True)
    h.table.objects[inner].total += 1                      # what ref_from_pickle counts
    side = WorkerSide([ref])
    assert inner in h.table.graces.values()                # pickled here: a grace
    rebuilt = side.get()
    assert isinstance(rebuilt[0], _Rebuilt) and rebuilt[0].gid in h.table.graces
    assert side.get() is rebuilt                           # rebuilt once


class _Method:
    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (self.obj, self.name))
