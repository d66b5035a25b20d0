"""Master and Child over real processes and sockets: requests, errors and the semantics behind their names.

Every test builds its own mesh in a ``with`` block; the autouse leak guard in
``tests/conftest.py`` then fails the test if a process, socket or fd outlives it.
Tests coordinate through master-side handlers (``Gate``, ``threading.Barrier``), never
through sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from tests.conftest import wait_for
from tests.integration import workers
from tests.integration.workers import CustomError

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "scripts" / "script_worker.py")
MODULE = "tests.integration.script_module"
WAIT_S = 10.0  # generous bound for things that normally take milliseconds


class Gate:
    """Master-side handler ``hold``: records that a child is inside, waits to be opened."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.arrived: list[object] = []
        self.opened = threading.Event()

    def hold(self, tag: object) -> object:
        with self.cond:
            self.arrived.append(tag)
            self.cond.notify_all()
        if not self.opened.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        return tag

    def wait_arrivals(self, n: int) -> list[object]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.arrived) >= n, WAIT_S), self.arrived
            return list(self.arrived)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture(scope="module", autouse=True)
def _stdlib_helpers() -> None:
    workers.start_stdlib_helpers()


def mesh(**kwargs: Any) -> mpmesh.Master:
    kwargs.setdefault("timeout", WAIT_S)
    return mpmesh.Master(**kwargs)


def ready(m: mpmesh.Master, group: str) -> None:
    """Wait until every member of ``group`` serves (a broadcast reaches each by name)."""
    results = m.broadcast("whoami", group)
    assert all(isinstance(r, dict) for r in results.values()), results


# -- requests: blocking, Future, asyncio ---------------------------------------------------

def test_send_request_to_child_and_group() -> None:
    with mesh() as m:
        m.spawn_child("solo", workers.basic)
        names = m.spawn_group("g", workers.basic, size=2)
        assert m.send_request("square", "solo", 7) == 49
        assert m.send_request("echo", "solo", {"k": [1, 2]}) == {"k": [1, 2]}
        assert m.send_request("square", "g", 8) == 64
        who = m.send_request("whoami", "g")
        assert who["name"] in names and who["group"] == "g"  # type: ignore[index]
        assert m.send_request("whoami", "solo")["group"] is None  # type: ignore[index]


def test_request_returns_a_future() -> None:
    with mesh() as m:
        m.spawn_group("g", workers.basic, size=2)
        futures = [m.request("square", "g", i) for i in range(20)]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        _, not_done = concurrent.futures.wait(futures, timeout=WAIT_S)
        assert not not_done
        assert [f.result() for f in futures] == [i * i for i in range(20)]
        failing = m.request("raise", "g", "via future")
        exc = failing.exception(timeout=WAIT_S)
        assert isinstance(exc, CustomError) and exc.code == 42


def test_arequest_under_asyncio_run() -> None:
    with mesh() as m:
        m.spawn_group("g", workers.basic, size=2)
        m.spawn_child("solo", workers.basic)

        async def main() -> tuple[list[object], BaseException | None]:
            results = await asyncio.gather(*(m.arequest("square", "g", i) for i in range(10)),
                                           m.arequest("async-square", "solo", 12))
            try:
                await m.arequest("raise", "solo", "async caller")
            except CustomError as exc:
                return list(results), exc
            return list(results), None

        results, exc = asyncio.run(main())
        assert results == [i * i for i in range(10)] + [144]
        assert isinstance(exc, CustomError) and "async caller" in str(exc)


def test_spawn_group_names_members_from_zero() -> None:
    with mesh() as m:
        names = m.spawn_group("g", workers.basic, size=3, mode="sequential")
        assert names == ["g-0", "g-1", "g-2"]
        assert m.children() == names
        who = m.broadcast("whoami", "g")
        assert {n: (w["name"], w["group"]) for n, w in who.items()} == {  # type: ignore[index]
            n: (n, "g") for n in names}
        assert len({w["pid"] for w in who.values()}) == 3  # type: ignore[index]
        assert all(m.process_stats(n).group == "g" for n in names)


def test_each_start_method_round_trips(start_method: str) -> None:
    with mesh(start_method=start_method) as m:
        m.register_handler("master-echo", lambda data: ("master", os.getpid(), data))
        m.spawn_child("c", workers.basic)
        assert m.send_request("square", "c", 9) == 81
        who = m.send_request("whoami", "c")
        assert who["pid"] != os.getpid()  # type: ignore[index]
        assert who["pid"] == m.process_stats("c").pid  # type: ignore[index]
        assert m.send_request("ask-master", "c", "up") == ("master", os.getpid(), "up")


# -- script and module targets ------------------------------------------------------------

def test_script_target() -> None:
    with mesh() as m:
        m.register_handler("master-echo", lambda data: ["echoed", data])
        m.spawn_child("script", SCRIPT, env={"MPMESH_TEST_TAG": "from-env"})
        info = m.send_request("info", "script")
        assert info == {"name": "script", "group": None, "pid": m.process_stats("script").pid,
                        "main": "__main__", "tag": "from-env", "script": SCRIPT}
        assert m.send_request("square", "script", 11) == 121
        assert m.send_request("ask-master", "script", 5) == ["echoed", 5]
        names = m.spawn_group("sg", SCRIPT, size=2)
        assert sorted(m.broadcast("info", "sg")) == names


def test_module_name_target_sees_the_repo_on_sys_path() -> None:
    assert os.path.isfile(os.path.join(os.getcwd(), "tests", "integration", "script_module.py")), \
        "run the suite from the repository root"
    with mesh() as m:
        m.spawn_child("mod", MODULE)
        info = m.send_request("info", "mod")
        assert info["name"] == "mod" and info["main"] == "__main__"  # type: ignore[index]
        assert info["module"] == MODULE and info["cwd_on_path"] is True  # type: ignore[index]
        assert info["mode"] == "concurrent"  # type: ignore[index]
        assert m.send_request("square", "mod", 6) == 36
        with pytest.raises(CustomError) as caught:
            m.send_request("raise", "mod", "from a module")
        assert caught.value.code == 3


# -- sequential and concurrent children ---------------------------------------------------

def test_concurrent_child_runs_requests_at_the_same_time() -> None:
    barrier = threading.Barrier(4, timeout=WAIT_S)
    with mesh() as m:
        m.register_handler("arrive", lambda tag: (tag, barrier.wait()))
        m.spawn_child("c", workers.basic, mode="concurrent", max_concurrency=4)
        futures = [m.request("call-master", "c", ("arrive", i)) for i in range(4)]
        results = [f.result(WAIT_S) for f in futures]
        # All four were inside their handler at once, or the barrier would have broken.
        assert [tag for tag, _ in results] == [0, 1, 2, 3]
        assert sorted(index for _, index in results) == [0, 1, 2, 3]


def test_sequential_child_runs_one_request_at_a_time_in_order() -> None:
    gate = Gate()
    with mesh() as m:
        m.register_handler("hold", gate.hold)
        m.spawn_child("s", workers.basic, mode="sequential")
        first = m.request("call-master", "s", ("hold", 1))
        assert gate.wait_arrivals(1) == [1]
        rest = [m.request("call-master", "s", ("hold", i)) for i in (2, 3, 4)]
        stats = m.process_stats("s")
        assert stats.requests_active == 1, "a sequential child got a second request while busy"
        assert gate.arrived == [1]
        gate.open()
        assert [f.result(WAIT_S) for f in [first, *rest]] == [1, 2, 3, 4]
        assert gate.arrived == [1, 2, 3, 4]


def test_concurrent_child_respects_max_concurrency() -> None:
    gate = Gate()
    with mesh() as m:
        m.register_handler("hold", gate.hold)
        m.spawn_child("c", workers.basic, mode="concurrent", max_concurrency=2)
        futures = [m.request("call-master", "c", ("hold", i)) for i in range(3)]
        assert sorted(gate.wait_arrivals(2)) == [0, 1]
        assert m.process_stats("c").requests_active == 2
        assert len(gate.arrived) == 2
        gate.open()
        assert [f.result(WAIT_S) for f in futures] == [0, 1, 2]


# -- groups: strategies, configuration, broadcast -----------------------------------------

def test_round_robin_cycles_through_members() -> None:
    with mesh() as m:
        names = m.spawn_group("rr", workers.basic, size=3, strategy="round-robin")
        ready(m, "rr")
        picked = [m.send_request("whoami", "rr")["name"] for _ in range(6)]  # type: ignore[index]
        assert picked == names + names


def test_random_strategy_reaches_every_member() -> None:
    with mesh() as m:
        names = m.spawn_group("rnd", workers.basic, size=3, strategy="random")
        ready(m, "rnd")
        picked = [m.send_request("whoami", "rnd")["name"] for _ in range(60)]  # type: ignore[index]
        counts = collections.Counter(picked)
        assert set(counts) == set(names), counts  # P(a member is never picked) ~ 3 * (2/3)**60
        assert picked != (names * 20), "random behaved exactly like round-robin"


def test_least_busy_avoids_the_busy_member_and_configure_group_switches_strategy() -> None:
    gate = Gate()
    with mesh() as m:
        m.register_handler("hold", gate.hold)
        m.spawn_group("lb", workers.basic, size=2, mode="concurrent", strategy="least-busy")
        ready(m, "lb")
        held = m.request("call-master", "lb-0", ("hold", "busy"))  # by member name
        gate.wait_arrivals(1)
        picked = [m.send_request("whoami", "lb")["name"] for _ in range(4)]  # type: ignore[index]
        assert picked == ["lb-1"] * 4
        m.configure_group("lb", strategy="round-robin")
        picked = {m.send_request("whoami", "lb")["name"] for _ in range(2)}  # type: ignore[index]
        assert picked == {"lb-0", "lb-1"}
        assert m.group_stats("lb").strategy == "round-robin"
        gate.open()
        assert held.result(WAIT_S) == "busy"


def test_configure_group_rejects_unknown_strategy_and_group() -> None:
    with mesh() as m:
        m.spawn_group("g", workers.basic, size=1)
        with pytest.raises(ValueError, match="strategy"):
            m.configure_group("g", strategy="fastest")
        with pytest.raises(mpmesh.NotFound):
            m.configure_group("nope", strategy="random")
        with pytest.raises(LookupError):
            m.configure_group("nope")
        with pytest.raises(ValueError, match="strategy"):
            m.spawn_group("h", workers.basic, size=1, strategy="fastest")
        assert m.group_stats("g").strategy == "round-robin"
        assert m.send_request("square", "g", 3) == 9


def test_broadcast_maps_every_member_to_its_result_or_exception() -> None:
    with mesh() as m:
        names = m.spawn_group("g", workers.basic, size=3)
        results = m.broadcast("square", "g", 5)
        assert results == {n: 25 for n in names}
        results = m.broadcast("raise-if-name", "g", "g-1")
        assert set(results) == set(names)
        assert results["g-0"] == "g-0" and results["g-2"] == "g-2"
        err = results["g-1"]
        assert isinstance(err, CustomError) and err.code == 7 and "g-1 refuses" in str(err)
        with pytest.raises(mpmesh.NotFound):
            m.broadcast("square", "no-such-group", 1)


# -- child -> master, nested, async -------------------------------------------------------

def test_child_to_master_request() -> None:
    with mesh() as m:
        seen: list[object] = []
        m.register_handler("master-echo", lambda data: seen.append(data) or {"got": data})
        m.spawn_child("c", workers.basic)
        assert m.send_request("ask-master", "c", [1, 2, 3]) == {"got": [1, 2, 3]}
        assert seen == [[1, 2, 3]]
        with pytest.raises(mpmesh.NoHandler):  # the master has no such handler
            m.send_request("call-master", "c", ("no-such-master-action", None))


def test_nested_master_child_master_child_round_trip() -> None:
    with mesh() as m:
        @m.handler("master-echo")
        def echo(data: object) -> object:
            return ("master-echo", data)

        @m.handler("to-b")
        def to_b(data: object) -> object:
            # master handler -> child B, whose handler calls the master again
            return ("to-b", m.send_request("ask-master", "b", data))

        m.spawn_child("a", workers.basic, mode="sequential")
        m.spawn_child("b", workers.basic, mode="sequential")
        # master -> A("call-master") -> master("to-b") -> B("ask-master") -> master("master-echo")
        result = m.send_request("call-master", "a", ("to-b", 17))
        assert result == ("to-b", ("master-echo", 17))
        # many at once through the same chain: still no deadlock
        futures = [m.request("call-master", "a", ("to-b", i)) for i in range(8)]
        assert [f.result(WAIT_S) for f in futures] == [("to-b", ("master-echo", i)) for i in range(8)]


# -- a blocked caller reads its child's reply itself (BrokerLoop.submit_lent / read_for) ------

def test_forked_children_get_their_connection_from_the_zygote() -> None:
    # The zygote makes a socketpair per forked child and hands the broker its end: the
    # child never dials the mesh's socket (no connect, no handshake). With the socket
    # file gone nobody can dial it, yet children forked now (and a restart) still join.
    with mesh(start_method="fork") as m:
        os.unlink(m.address)
        m.spawn_group("g", workers.basic, 2)
        assert [m.send_request("square", "g", i) for i in range(4)] == [0, 1, 4, 9]
        pid = m.send_request("whoami", "g-0")["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: m.process_stats("g-0").pid not in (pid, None), WAIT_S)
        assert m.send_request("square", "g-0", 5) == 25


def test_an_idle_childs_reply_is_read_by_the_blocked_caller() -> None:
    with mesh() as m:
        m.spawn_child("c", workers.basic)
        m.send_request("echo", "c", 0)
        readers: list[str] = []
        take_in = m._loop._take_in

        def recording(conn: Any, view: memoryview) -> None:
            readers.append(threading.current_thread().name)
            take_in(conn, view)

        m._loop._take_in = recording  # type: ignore[method-assign]
        assert [m.send_request("square", "c", i) for i in range(20)] == [i * i for i in range(20)]
        assert readers.count(threading.current_thread().name) >= 20, readers


def test_blocking_calls_from_many_threads_to_one_child_and_a_group() -> None:
    with mesh() as m:
        m.spawn_child("c", workers.basic, mode="sequential")
        m.spawn_group("g", workers.basic, size=2, mode="concurrent")
        errors: list[BaseException] = []

        def caller(k: int) -> None:
            try:
                for i in range(150):
                    target = "c" if (i + k) % 2 else "g"
                    assert m.send_request("square", target, k * 1000 + i) == (k * 1000 + i) ** 2
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 3)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        assert m._core.router.jobs == {}


def test_a_blocked_caller_hears_its_child_die_its_timeout_and_shutdown() -> None:
    inside = threading.Event()
    with mesh(timeout=30) as m:
        m.register_handler("entered", lambda info: inside.set())
        m.spawn_child("victim", workers.basic, auto_restart=False)
        m.spawn_child("slow", workers.basic)
        m.spawn_child("busy", workers.basic)
        outcome: dict[str, BaseException] = {}

        def call(key: str, *args: Any, **kwargs: Any) -> None:
            try:
                m.send_request(*args, **kwargs)
            except BaseException as exc:
                outcome[key] = exc

        # The child dies: its socket hangs up under the caller reading it.
        t = threading.Thread(target=call, args=("killed", "enter-then-sleep", "victim", 60))
        t.start()
        assert inside.wait(WAIT_S)
        started = time.monotonic()
        os.kill(m.process_stats("victim").pid, signal.SIGKILL)
        t.join(WAIT_S)
        assert isinstance(outcome["killed"], mpmesh.WorkerLost), outcome
        assert time.monotonic() - started < 2.0
        # The broker's timer fails the call: the caller is woken off the socket.
        started = time.monotonic()
        with pytest.raises(mpmesh.RequestTimeout):
            m.send_request("sleep", "slow", 30, timeout=0.3)
        assert time.monotonic() - started < 2.0
        # Shutdown fails what is still in flight.
        t = threading.Thread(target=call, args=("shutdown", "sleep", "busy", 30))
        t.start()
        assert wait_for(lambda: m.process_stats("busy").requests_active == 1, WAIT_S)
        m.shutdown(timeout=0.5)
        t.join(WAIT_S)
        assert not t.is_alive()
        assert isinstance(outcome["shutdown"], mpmesh.MeshError), outcome


def test_a_reply_sent_just_before_exiting_reaches_a_blocked_caller() -> None:
    # The caller reads the child's socket; the loop, told of the exit, takes it back
    # and reads what is left before it fails anything.
    names = [f"last-{i}" for i in range(12)]
    results: dict[str, object] = {}
    with mesh() as m:
        for name in names:
            m.spawn_child(name, workers.last_words, auto_restart=False)

        def call(i: int, name: str) -> None:
            try:
                results[name] = m.send_request("last-words", name, i)
            except BaseException as exc:
                results[name] = exc

        threads = [threading.Thread(target=call, args=(i, n)) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert results == {name: i for i, name in enumerate(names)}


def test_async_master_handlers_plain_and_concurrent() -> None:
    with mesh() as m:
        @m.handler("aecho")
        async def aecho(data: object) -> object:
            await asyncio.sleep(0)
            return ("async", data)

        arrived = {"n": 0}
        everyone: list[asyncio.Event] = []

        @m.handler("async-arrive")
        async def async_arrive(tag: int) -> int:
            if not everyone:
                everyone.append(asyncio.Event())
            arrived["n"] += 1
            if arrived["n"] == 4:
                everyone[0].set()
            await asyncio.wait_for(everyone[0].wait(), WAIT_S)  # all 4 wait here together
            return tag

        m.spawn_child("s", workers.basic, mode="sequential")
        m.spawn_child("c", workers.basic, mode="concurrent", max_concurrency=4)
        assert m.send_request("call-master", "s", ("aecho", 5)) == ("async", 5)
        futures = [m.request("call-master", "c", ("async-arrive", i)) for i in range(4)]
        assert [f.result(WAIT_S) for f in futures] == [0, 1, 2, 3]


def test_async_child_handlers_sequential_and_concurrent() -> None:
    barrier = threading.Barrier(4, timeout=WAIT_S)
    with mesh() as m:
        m.register_handler("arrive", lambda tag: (tag, barrier.wait()))
        m.spawn_child("s", workers.basic, mode="sequential")
        m.spawn_child("c", workers.basic, mode="concurrent", max_concurrency=4)
        assert [m.send_request("async-square", "s", i) for i in range(3)] == [0, 1, 4]
        assert m.send_request("async-square", "c", 7) == 49
        # four async handlers await the master at the same time, or the barrier breaks
        futures = [m.request("async-call-master", "c", ("arrive", i)) for i in range(4)]
        assert [f.result(WAIT_S)[0] for f in futures] == [0, 1, 2, 3]  # type: ignore[index]


def test_async_handler_in_sequential_child_can_call_the_master() -> None:
    with mesh() as m:
        m.register_handler("master-echo", lambda data: ("echo", data))
        m.spawn_child("s", workers.basic, mode="sequential")
        try:
            assert m.send_request("async-call-master", "s", ("master-echo", 1), timeout=3) == ("echo", 1)
        finally:
            m.shutdown(timeout=0.2)  # if the handler is stuck, do not wait the default 10 s


# -- introspection -------------------------------------------------------------------------

def test_children_is_alive_and_process_stats() -> None:
    with mesh() as m:
        m.spawn_child("a", workers.basic)
        m.spawn_child("b", workers.basic, mode="concurrent")
        assert m.children() == ["a", "b"]
        assert m.is_alive("a") and m.is_alive("b")
        with pytest.raises(mpmesh.NotFound):
            m.is_alive("nobody")
        with pytest.raises(mpmesh.NotFound):
            m.process_stats("nobody")
        fresh = m.process_stats("a")
        assert (fresh.requests_handled, fresh.requests_active, fresh.errors, fresh.restarts) == (0, 0, 0, 0)
        for i in range(3):
            m.send_request("square", "a", i)
        with pytest.raises(CustomError):
            m.send_request("raise", "a", "counted")
        stats = m.process_stats("a")
        assert stats.requests_handled == 4 and stats.errors == 1
        assert stats.requests_active == 0 and stats.restarts == 0
        assert stats.average_response_time > 0
        assert stats.pid == m.send_request("whoami", "a")["pid"]  # type: ignore[index]
        assert m.process_stats("b").requests_handled == 0
        m.shutdown_child("b")
        assert m.children() == ["a"]
        assert not m.is_alive("b")
        assert m.is_alive("a")


def test_process_stats_counts_active_requests() -> None:
    gate = Gate()
    with mesh() as m:
        m.register_handler("hold", gate.hold)
        m.spawn_child("c", workers.basic, mode="concurrent")
        futures = [m.request("call-master", "c", ("hold", i)) for i in range(3)]
        gate.wait_arrivals(3)
        assert m.process_stats("c").requests_active == 3
        gate.open()
        assert sorted(f.result(WAIT_S) for f in futures) == [0, 1, 2]
        stats = m.process_stats("c")
        assert stats.requests_active == 0 and stats.requests_handled == 3


# -- argument checks and lifecycle ----------------------------------------------------------

def test_duplicate_child_name_is_rejected() -> None:
    with mesh() as m:
        m.spawn_child("a", workers.basic)
        m.spawn_group("g", workers.basic, size=1)
        with pytest.raises(ValueError):
            m.spawn_child("a", workers.basic)
        with pytest.raises(ValueError):
            m.spawn_child("g-0", workers.basic)
        with pytest.raises(ValueError):
            m.spawn_group("g", workers.basic, size=1)
        assert m.children() == ["a", "g-0"]
        assert m.send_request("square", "a", 2) == 4


def test_negative_timeout_is_rejected() -> None:
    with pytest.raises(ValueError):
        mpmesh.Master(timeout=-1)
    with mesh() as m:
        m.spawn_child("a", workers.basic)
        m.spawn_group("g", workers.basic, size=1)
        with pytest.raises(ValueError):
            m.send_request("square", "a", 2, timeout=-0.5)
        with pytest.raises(ValueError):
            m.request("square", "a", 2, timeout=-1)
        with pytest.raises(ValueError):
            asyncio.run(m.arequest("square", "a", 2, timeout=-1))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            m.broadcast("square", "g", 2, timeout=-1)
        with pytest.raises(ValueError):
            m.shutdown_child("a", timeout=-1)
        with pytest.raises(ValueError):
            m.shutdown(timeout=-1)
        assert m.send_request("square", "a", 2, timeout=WAIT_S) == 4


def test_use_after_shutdown_raises_mesh_closed_and_second_shutdown_is_a_no_op() -> None:
    with mesh() as m:
        m.spawn_child("a", workers.basic)
        pid = m.process_stats("a").pid
        m.shutdown()
        assert not m.is_alive("a")
        for call in (lambda: m.send_request("square", "a", 2),
                     lambda: m.request("square", "a", 2),
                     lambda: asyncio.run(m.arequest("square", "a", 2)),  # type: ignore[arg-type]
                     lambda: m.broadcast("square", "a"),
                     lambda: m.spawn_child("b", workers.basic),
                     lambda: m.spawn_group("g", workers.basic, size=1),
                     lambda: m.configure_group("g", strategy="random"),
                     lambda: m.shutdown_child("a")):
            with pytest.raises(mpmesh.MeshClosed):
                call()
        started = time.monotonic()
        assert m.shutdown() is None
        assert time.monotonic() - started < 0.5
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not just a zombie


def test_with_block_left_by_an_exception_still_shuts_down() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), mesh() as m:
        m.spawn_group("g", workers.basic, size=2)
        pids = [m.process_stats(n).pid for n in m.children()]
        assert m.send_request("square", "g", 3) == 9
        raise Boom
    assert not any(m.is_alive(n) for n in ("g-0", "g-1"))
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(mpmesh.MeshClosed):
        m.send_request("square", "g", 3)
    assert not os.path.exists(m.address)


def test_child_started_and_child_exit_events() -> None:
    started: list[dict[str, Any]] = []
    exited: list[dict[str, Any]] = []
    got_start, got_exit = threading.Event(), threading.Event()
    with mesh() as m:
        m.on("child-started", lambda info: (started.append(info), got_start.set()))
        m.on("child-exit", lambda info: (exited.append(info), got_exit.set()))
        with pytest.raises(ValueError):
            m.on("no-such-event", lambda info: None)
        m.spawn_child("a", workers.basic, auto_restart=False)
        assert got_start.wait(WAIT_S)
        pid = m.process_stats("a").pid
        assert [(e["name"], e["pid"]) for e in started] == [("a", pid)]
        assert not exited
        m.shutdown_child("a")
        assert got_exit.wait(WAIT_S)
        assert [(e["name"], e["pid"], e["exitcode"]) for e in exited] == [("a", pid, 0)]


def test_shutting_down_a_child_that_just_started_is_graceful_and_prompt() -> None:
    exits: list[dict[str, Any]] = []
    exited = threading.Event()
    with mesh() as m:
        m.on("child-exit", lambda info: (exits.append(info), exited.set()))
        m.spawn_child("a", workers.basic)  # no request: it may not even have connected yet
        started = time.monotonic()
        m.shutdown_child("a")
        elapsed = time.monotonic() - started
        assert exited.wait(WAIT_S)
        assert exits[0]["exitcode"] == 0, f"not a graceful exit: {exits[0]}"
        assert elapsed < 2.0, f"shutdown_child took {elapsed:.1f} s for an idle child"
        assert not m.is_alive("a")


CALLBACK_THEN_MASTER = """
import threading, mpmesh
from tests.integration import workers

with mpmesh.Master(start_method="fork") as m:
    m.spawn_child("w", workers.basic)
    ran = threading.Event()
    fut = m.request("echo", "w", 1)
    fut.add_done_callback(lambda f: ran.set())
    assert ran.wait(10)
assert any(t.name == "mpmesh-callbacks" for t in threading.enumerate())
with mpmesh.Master(start_method="fork") as m2:
    print("forked" if m2._supervisor._zygote_pid else "exec'd")
"""


def test_idle_callback_thread_does_not_cost_the_next_master_its_forked_zygote() -> None:
    # In a fresh interpreter: the fast path needs a single-threaded process.
    done = subprocess.run([sys.executable, "-c", CALLBACK_THEN_MASTER], cwd=HERE.parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "forked"


def test_a_threaded_process_reuses_its_execd_zygote_for_the_next_mesh(tmp_path: Path) -> None:
    # A thread of ours makes forking unsafe, so the first mesh execs its zygote; the
    # second adopts it (same process) instead of booting another interpreter, briefed
    # with its own working directory, and still cleans up after itself.
    from mpmesh._io._spare import discard_spare

    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    try:
        with mpmesh.Master(start_method="fork") as m:
            m.spawn_child("w", workers.basic)
            assert m.send_request("echo", "w", 1) == 1
            first = m._supervisor._zygote_popen
            assert first is not None  # exec'd, not forked
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with mpmesh.Master(start_method="fork") as m2:
                assert m2._supervisor._zygote_popen is first
                m2.spawn_child("w", workers.basic)
                assert m2.send_request("square", "w", 7) == 49
                assert os.path.samefile(str(m2.send_request("cwd", "w")), tmp_path)
        finally:
            os.chdir(cwd)
        assert first.poll() is None  # parked again, alive
    finally:
        stop.set()
        helper.join()
        discard_spare()
    assert first.poll() is not None


FORK_BYSTANDER = """
import os, signal, sys, time, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # it forks a threaded process on purpose
import mpmesh
from tests.integration import workers

if sys.argv[1] == "pool":
    mesh = mpmesh.Pool(2)
    assert mesh.map(abs, [-1, -2]) == [1, 2]
    stop = lambda: (mesh.close(), mesh.join())
else:
    mesh = mpmesh.Master(start_method="fork")
    mesh.spawn_child("w", workers.basic)
    stop = mesh.shutdown
release_r, release_w = os.pipe()
bystander = os.fork()  # a fork of the user's own (multiprocessing's, a ProcessPoolExecutor's)
if bystander == 0:
    signal.alarm(8)  # never outlive a hung test
    os.close(release_w)
    os.read(release_r, 1)
    os._exit(0)
os.close(release_r)
start = time.monotonic()
stop()
print(f"{time.monotonic() - start:.2f}")
os.close(release_w)
os.waitpid(bystander, 0)
"""


@pytest.mark.parametrize("kind", ["master", "pool"])
def test_shutdown_does_not_wait_for_a_process_the_user_forked(kind: str) -> None:
    # A process forked from the user's (after the mesh exists) must not hold the ends of
    # the zygote's pipes: the zygote would never see EOF, and shutdown would wait for it.
    done = subprocess.run([sys.executable, "-c", FORK_BYSTANDER, kind], cwd=HERE.parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 3.0, f"{kind} shutdown waited for the bystander: {done.stdout}"


FORKED_COPY = """
import os, signal, sys, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # it forks a threaded process on purpose
import mpmesh
from tests.integration import workers

if sys.argv[1] == "pool":
    mesh = mpmesh.Pool(2)
    look = lambda: sorted(set(mesh.map(lambda _: os.getpid(), range(40), chunksize=1)))
else:
    mesh = mpmesh.Master(start_method="fork")
    mesh.spawn_child("w", workers.basic)
    look = lambda: (mesh.send_request("whoami", "w")["pid"], os.path.exists(mesh.address))
with mesh:
    before = look()
    copy = os.fork()
    if copy == 0:
        signal.alarm(20)  # never outlive a hung test
        sys.exit(0)  # leaves the with block (and runs the exit handlers) in the copy
    os.waitpid(copy, 0)
    print("same" if look() == before else f"changed: {before} -> {look()}")
"""


@pytest.mark.parametrize("kind", ["master", "pool"])
def test_a_forked_copy_leaving_the_with_block_does_not_stop_the_mesh(kind: str) -> None:
    # As with the standard Manager and Pool: shutdown, terminate and the exit handlers do
    # nothing to the mesh in a forked copy of the process that made it.
    done = subprocess.run([sys.executable, "-c", FORKED_COPY, kind], cwd=HERE.parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "same", done.stdout


@pytest.mark.timeout(60)
def test_shutdown_waits_for_a_busy_concurrent_child_no_longer_than_its_handler() -> None:
    m = mpmesh.Master()
    try:
        m.spawn_child("c", workers.basic, mode="concurrent")
        assert m.send_request("square", "c", 3, timeout=30) == 9
        fut = m.request("sleep", "c", 0.5)
        start = time.monotonic()
    finally:
        m.shutdown()
    # The child answers, then exits at once: before, it sat out the whole 10 s grace
    # (nothing woke its main thread when its last handler finished) and was terminated.
    assert time.monotonic() - start < 5.0
    assert fut.result(1) == 0.5
