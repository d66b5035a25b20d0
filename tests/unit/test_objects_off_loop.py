"""The ``objects`` component keeps user code off the loop: a call whose payload is not
built-in values, or on an object that holds user values, is an ``Offload`` (run here by
hand, no threads); later calls on its object wait in its lane and run after it, in order;
versions are bumped, proxies counted and graces registered only when it is done."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from mpmesh._broker._actions import Offload, Send
from mpmesh._broker._objects import BROKER_GIDS
from mpmesh._broker._refs import ProxyRef, Token, TypeSpec
from mpmesh._broker._versions import TABLE_BYTES, VersionTable, whole_slot
from mpmesh._wire import _codec
from mpmesh._wire._messages import ErrorCode, Op
from tests.unit.test_objects import ADDRESS, NOTHING, Harness, _Pickled, _plain_rebuild, _Rebuilt, answer

__all__ = ["_plain_rebuild"]  # its autouse fixture: tokens rebuild as plain records here

RAN: list[str] = []  # the user code that ran, in order


class Loud:
    """A user value that notes its user code: unpickling, hash, equality, pickling again."""

    def __init__(self, n: int, armed: bool = False) -> None:
        self.n, self.armed = n, armed

    @staticmethod
    def _made(n: int) -> Loud:
        RAN.append("made")
        return Loud(n, armed=True)

    def __reduce__(self) -> tuple[Any, ...]:
        if self.armed:
            RAN.append("reduce")
        return (Loud._made, (self.n,))

    def __eq__(self, other: object) -> bool:
        RAN.append("eq")
        return isinstance(other, Loud) and other.n == self.n

    def __hash__(self) -> int:
        RAN.append("hash")
        return self.n


class BadState:
    def __reduce__(self) -> tuple[Any, ...]:
        return (BadState, (), {"x": 1})

    def __setstate__(self, state: object) -> None:
        raise ValueError("bad state")


@pytest.fixture
def h() -> Harness:
    RAN.clear()
    harness = Harness()
    harness.table.versions = VersionTable(bytearray(TABLE_BYTES))
    return harness


def offloads(actions: list[Any]) -> list[Offload]:
    return [a for a in actions if isinstance(a, Offload)]


def run(h: Harness, offload: Offload) -> list[Any]:
    """What a host does with an Offload: its job on a worker, then its done in the core."""
    return offload.done(offload.job(), h.now)


def version(h: Harness, oid: int) -> int:
    return h.table.versions.words[whole_slot(oid)]  # type: ignore[union-attr]


def test_a_foreign_write_runs_off_the_loop_and_later_calls_wait_for_it(h: Harness) -> None:
    d, other = h.create(1, "dict"), h.create(1, "dict")
    rid, actions = h.call(1, d, "__setitem__", "k", Loud(1))
    (offload,) = offloads(actions)
    assert RAN == []                                       # nothing of the user's ran here
    rid2, held = h.call(2, d, "__getitem__", "k")
    assert held == []                                      # waits in d's lane
    assert h.value(2, other, "__setitem__", "a", 1) is None  # other objects answer at once
    before = version(h, d)
    outcome = offload.job()
    assert RAN == ["made"] and version(h, d) == before     # applied, not yet announced
    actions = offload.done(outcome, h.now)
    assert version(h, d) > before                          # bumped as the reply is queued
    assert answer(actions, 1, rid) is None
    assert isinstance(actions[0], Send) and actions[0].msg.rid == rid  # the write's reply first
    (read,) = offloads(actions)                            # then the read: d holds a user value
    got = answer(run(h, read), 2, rid2)
    assert isinstance(got, Loud) and got.n == 1 and RAN == ["made", "reduce", "made"]  # the last: here


def test_calls_held_in_a_lane_run_in_order(h: Harness) -> None:
    lst = h.create(1, "list")
    rid, (offload,) = h.call(1, lst, "append", Loud(1))
    rids = [h.call(2, lst, "append", i)[0] for i in range(3)] + [h.call(3, lst, "__len__")[0]]
    actions = run(h, offload)
    # The list holds a user value now: the next held call runs off the loop too, and the
    # rest wait behind it.
    answered = []
    while True:
        answered += [a.msg.rid for a in actions if isinstance(a, Send)]
        pending = offloads(actions)
        if not pending:
            break
        (offload,) = pending
        actions = run(h, offload)
    assert answered == [rid, *rids]
    assert h.table.objects[lst].obj[1:] == [0, 1, 2]     # type: ignore[index]


def test_a_plain_object_stays_on_the_loop_and_an_emptied_one_comes_back(h: Harness) -> None:
    d = h.create(1, "dict", {"a": 1})
    assert h.value(1, d, "__getitem__", "a") == 1          # answered at once
    rid, (offload,) = h.call(1, d, "__setitem__", "u", Loud(2))
    run(h, offload)
    rid, actions = h.call(1, d, "keys")
    (offload,) = offloads(actions)                         # its keys pickle user values now
    assert answer(run(h, offload), 1, rid) == ["a", "u"]
    rid, (offload,) = h.call(1, d, "clear")
    run(h, offload)
    assert h.value(1, d, "__setitem__", "b", 2) is None    # plain again: on the loop
    assert h.value(1, d, "__repr__") == "{'b': 2}"


def test_proxies_read_off_the_loop_are_counted_when_done(h: Harness) -> None:
    outer, inner = h.create(1, "list"), h.create(1, "dict")
    h.op(1, "grace", (inner, 77), rid=0)                   # the sender's, for the token in transit
    ref_args = (None, Token("dict", ADDRESS, inner), None, 77, None)
    payload = _codec.dumps((outer, "append", (_Pickled(ref_args), Loud(0)), {}, 0))
    (offload,) = h.table.on_op(1, Op(9, -1.0, "objects", "call", payload), h.now)
    outcome = offload.job()
    assert 77 in h.table.graces                            # not taken on the worker
    done = offload.done(outcome, h.now)
    assert isinstance(answer(done, 1, 9), TypeError)       # append takes one argument
    payload = _codec.dumps((outer, "append", (_Pickled(ref_args),), {}, 0))
    (offload,) = h.table.on_op(1, Op(10, -1.0, "objects", "call", payload), h.now)
    run(h, offload)
    assert 77 not in h.table.graces
    h.op(1, "decref", [inner], rid=0)
    assert h.count() == 2                                  # the list keeps the dict
    got = h.value(2, outer, "__getitem__", 0)              # plain (a proxy): on the loop
    assert got.token.id == inner and got.gid in h.table.graces and got.gid >= BROKER_GIDS


def test_a_proxy_pickled_on_a_worker_gets_its_grace_when_done(h: Harness) -> None:
    outer, inner = h.create(1, "list"), h.create(1, "dict")
    ref = ProxyRef(h.table, None, Token("dict", ADDRESS, inner), None, True)
    h.table.objects[inner].total += 1
    h.table.objects[outer].obj.extend([ref, Loud(1)])    # type: ignore[union-attr]
    h.table.objects[outer].lane.user = True                # type: ignore[union-attr]
    rid, (offload,) = h.call(2, outer, "__getitem__", 0)
    graces = dict(h.table.graces)
    outcome = offload.job()
    assert h.table.graces == graces                        # drawn there, registered here
    got = answer(offload.done(outcome, h.now), 2, rid)
    assert isinstance(got, _Rebuilt) and h.table.graces[got.gid] == inner


def test_a_raising_setstate_fails_its_call_and_frees_the_lane(h: Harness) -> None:
    d = h.create(1, "dict")
    rid, (offload,) = h.call(1, d, "__setitem__", "k", BadState())
    rid2, held = h.call(2, d, "__setitem__", "k", 1)
    assert held == []
    actions = run(h, offload)
    assert actions[0].msg.code == ErrorCode.SERIALIZATION and "bad state" in actions[0].msg.message
    assert answer(actions, 2, rid2) is None                # the held call ran, on the loop
    assert h.value(1, d, "__getitem__", "k") == 1


def test_a_queue_item_is_pickled_off_the_loop(h: Harness) -> None:
    q = h.create(1, "Queue")
    rid, actions = h.call(2, q, "get")
    assert answer(actions, 2, rid) is NOTHING              # parked
    rid_put, (offload,) = h.call(1, q, "put", Loud(5))
    actions = run(h, offload)
    assert RAN == ["made", "reduce"]                       # read and pickled on the worker
    got = answer(actions, 2, rid)                          # handed to the parked getter
    assert isinstance(got, Loud) and got.n == 5 and answer(actions, 1, rid_put) is None
    RAN.clear()
    rid, (offload,) = h.call(1, q, "put", Loud(6))
    run(h, offload)
    got = h.value(2, q, "get")                             # sent as the bytes it was put as
    assert got.n == 6 and RAN == ["made", "reduce", "made"]  # the last: unpickled by this test


def test_a_create_with_user_values_is_made_off_the_loop(h: Harness) -> None:
    rid, actions = h.op(1, "create", ("dict", ({"a": Loud(1)},), {}))
    (offload,) = offloads(actions)
    assert RAN == []
    oid, _ = answer(run(h, offload), 1, rid)
    assert h.table.objects[oid].lane.user                  # type: ignore[union-attr]
    rid, (offload,) = h.call(1, oid, "__contains__", "a")
    assert answer(run(h, offload), 1, rid) is True


def test_a_registered_types_call_reads_its_payload_on_its_worker(h: Harness) -> None:
    h.table.registry["Box"] = TypeSpec("Box", lambda: {}, ("__setitem__", "get"), None, None)
    rid, (offload,) = h.op(1, "create", ("Box", (), {}))
    oid, _ = answer(run(h, offload), 1, rid)
    rid, actions = h.call(1, oid, "__setitem__", "k", Loud(3))
    (offload,) = offloads(actions)
    assert RAN == []
    assert answer(run(h, offload), 1, rid) is None and RAN == ["made"]


def test_payloads_that_cannot_be_read_safely_fail(h: Harness) -> None:
    d = h.create(1, "dict")
    actions = h.table.on_op(1, Op(5, -1.0, "objects", "call", b"garbage"), h.now)
    assert actions[0].msg.code == ErrorCode.SERIALIZATION
    payload = pickle.dumps((d, "__setitem__", ("k", Loud(1)), {}, 0), 2)  # not laid out as ours
    actions = h.table.on_op(1, Op(6, -1.0, "objects", "call", payload), h.now)
    assert actions[0].msg.code == ErrorCode.SERIALIZATION and RAN == []
    actions = h.table.on_op(1, Op(7, -1.0, "objects", "incref", _codec.dumps((Loud(1), 0))), h.now)
    assert actions[0].msg.code == ErrorCode.BAD_REQUEST
