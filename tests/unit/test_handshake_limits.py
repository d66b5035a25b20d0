"""The broker core's rules for a Hello: a deadline to say it, the pid the OS saw, and
supervised children's names reserved for the process their supervisor started.

Driven with a fake clock and plain peer ids, as the I/O loop drives the core; the
``peer_pid`` tests use real sockets of this process.
"""

from __future__ import annotations

import os
import socket

import pytest

from mpmesh._broker._actions import WARNING, Action, Send
from mpmesh._broker._core import BrokerCore
from mpmesh._io._reactor import peer_pid
from mpmesh._wire._messages import Hello, Ready, Role
from tests.unit._broker_harness import closes, notes


def hello(pid: int, name: str = "", role: Role = Role.CHILD) -> Hello:
    return Hello(pid, int(role), 1, name, "", "host")


def ready(actions: list[Action], peer: int) -> bool:
    return any(isinstance(a, Send) and a.peer == peer and isinstance(a.msg, Ready) for a in actions)


def refused(actions: list[Action], peer: int) -> bool:
    """Closed, and the owner warned."""
    return [c.peer for c in closes(actions)] == [peer] and len(notes(actions, WARNING)) == 1


@pytest.fixture
def core() -> BrokerCore:
    core = BrokerCore()
    core.declare_child("w", None, 1)
    return core


@pytest.mark.timeout(10)
def test_a_peer_that_says_no_hello_is_closed_at_its_deadline(core: BrokerCore) -> None:
    core.on_connect(7, 0.0, hello_by=5.0)
    core.on_connect(8, 0.0, hello_by=5.0)
    assert ready(core.on_message(8, hello(800, role=Role.CLIENT), 1.0), 8)
    assert core.next_deadline() == 5.0
    assert closes(core.on_tick(4.9)) == []
    assert [c.peer for c in closes(core.on_tick(5.0))] == [7]  # not 8: it said Hello
    core.on_peer_lost(7, 5.0)
    assert core.next_deadline() is None


@pytest.mark.timeout(10)
def test_a_connection_of_our_own_zygote_has_no_hello_deadline(core: BrokerCore) -> None:
    core.on_connect(7, 0.0)
    assert core.next_deadline() is None
    assert closes(core.on_tick(1e6)) == []


@pytest.mark.timeout(10)
def test_a_hello_must_name_the_pid_the_os_saw(core: BrokerCore) -> None:
    core.on_connect(7, 0.0, pid=4242, hello_by=5.0)
    assert refused(core.on_message(7, hello(4243, role=Role.CLIENT), 0.0), 7)
    core.on_peer_lost(7, 0.0)
    core.on_connect(8, 0.0, pid=4242, hello_by=5.0)
    assert ready(core.on_message(8, hello(4242, role=Role.CLIENT), 0.0), 8)


@pytest.mark.parametrize("known", [True, False], ids=["pid-from-the-os", "pid-unknown"])
@pytest.mark.timeout(10)
def test_a_supervised_name_takes_only_the_pid_its_supervisor_started(core: BrokerCore, known: bool) -> None:
    assert core.child_started("w", 500, 0.0) == []
    core.on_connect(7, 0.0, pid=501 if known else None, hello_by=5.0)
    assert refused(core.on_message(7, hello(501, "w"), 0.0), 7)
    core.on_peer_lost(7, 0.0)
    core.on_connect(8, 0.0, pid=500 if known else None, hello_by=5.0)
    assert ready(core.on_message(8, hello(500, "w"), 0.0), 8)
    worker = core.router.workers["w"]
    assert (worker.peer, worker.pid) == (8, 500)


@pytest.mark.timeout(10)
def test_a_hello_before_the_pid_is_reported_waits_for_it(core: BrokerCore) -> None:
    core.on_connect(7, 0.0, pid=600, hello_by=5.0)
    core.on_connect(8, 0.0, pid=601, hello_by=5.0)
    assert core.on_message(7, hello(600, "w"), 0.0) == []
    assert core.on_message(8, hello(601, "w"), 0.0) == []
    assert core.router.workers["w"].peer is None
    assert [c.peer for c in closes(core.on_message(7, hello(600, "w"), 0.0))] == [7], "Hello twice"
    core.on_peer_lost(7, 0.0)
    actions = core.child_started("w", 601, 1.0)
    assert ready(actions, 8) and core.router.workers["w"].peer == 8


@pytest.mark.timeout(10)
def test_a_held_hello_settled_by_another_pid_is_refused(core: BrokerCore) -> None:
    core.on_connect(7, 0.0, pid=600, hello_by=5.0)
    assert core.on_message(7, hello(600, "w"), 0.0) == []
    assert refused(core.child_started("w", 700, 1.0), 7)
    assert core.router.workers["w"].peer is None


@pytest.mark.timeout(10)
def test_a_held_hello_is_refused_at_the_deadline(core: BrokerCore) -> None:
    core.on_connect(7, 0.0, pid=600, hello_by=5.0)
    assert core.on_message(7, hello(600, "w"), 0.0) == []
    assert core.next_deadline() == 5.0
    assert refused(core.on_tick(5.0), 7)
    core.on_peer_lost(7, 5.0)
    assert core.child_started("w", 600, 6.0) == []  # nothing held any more


@pytest.mark.timeout(10)
def test_a_restart_forgets_the_old_pid(core: BrokerCore) -> None:
    core.child_started("w", 500, 0.0)
    core.on_connect(7, 0.0, pid=500, hello_by=5.0)
    assert ready(core.on_message(7, hello(500, "w"), 0.0), 7)
    core.on_peer_lost(7, 1.0)
    worker = core.router.workers["w"]
    core.router.worker_down(worker, "died with SIGKILL", 1.0, restarting=True)
    assert worker.started_pid == 0
    # A process that (by pid reuse, say) has the old pid is not the new start.
    core.on_connect(8, 1.0, pid=500, hello_by=6.0)
    assert core.on_message(8, hello(500, "w"), 1.0) == []
    assert refused(core.child_started("w", 501, 2.0), 8)


@pytest.mark.timeout(10)
def test_peer_pid_is_the_connecting_process_over_unix_and_unknown_over_tcp() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_pid(a) == os.getpid()
    tcp = socket.create_server(("127.0.0.1", 0))
    with tcp, socket.create_connection(tcp.getsockname()) as out:
        accepted, _ = tcp.accept()
        with accepted:
            assert peer_pid(accepted) is None
            assert out.fileno() >= 0
