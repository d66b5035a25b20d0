"""Hostile or broken peers on the broker's socket: connections that never authenticate
or never say Hello, a flood of half-open connections, accept() failing, and a process
that says Hello with a supervised child's name or with another process's pid.

Each test keeps a bystander working while it runs. Waits are on conditions (a socket's
EOF, a Challenge arriving, a counter reaching a value), each with a generous bound; the
autouse leak guard of ``tests/conftest.py`` fails a test that leaves a process, socket
or fd behind.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import mpmesh
from mpmesh._broker._jobs import WorkerState
from mpmesh._client._base import make_hello
from mpmesh._client._socket import SocketClient
from mpmesh._errors import BrokerUnavailable
from mpmesh._host import _inproc as _host
from mpmesh._io import _reactor
from mpmesh._mesh._lifecycle import Lifecycle
from mpmesh._wire._connection import Connection, Phase, Side
from mpmesh._wire._frames import HEADER, MAX_HANDSHAKE_FRAME_BYTES
from mpmesh._wire._messages import Hello, Role
from tests.conftest import wait_for
from tests.integration import workers

WAIT_S = 10.0   # generous bound for what normally takes milliseconds
SHORT_S = 0.5   # the handshake timeout these tests set


@pytest.fixture(scope="module", autouse=True)
def _stdlib_helpers() -> None:
    workers.start_stdlib_helpers()


def master(**kwargs: Any) -> mpmesh.Master:
    """A Master whose broker runs on its own thread (monkeypatched limits apply to it),
    answering ``echo`` itself, so a bystander needs no child."""
    kwargs.setdefault("timeout", WAIT_S)
    m = mpmesh.Master(broker="thread", **kwargs)
    m.register_handler("echo", lambda x: x)
    return m


def client(address: str, authkey: bytes, **kwargs: Any) -> SocketClient:
    return SocketClient(address, authkey, make_hello(Role.CLIENT), **kwargs)


def raw(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(address)
    return sock


def authenticate(sock: socket.socket, authkey: bytes) -> None:
    """The peer's side of the handshake, on a raw socket: Challenge in, Answer out, Welcome in."""
    wire = Connection(Side.PEER, authkey, os.urandom)
    while wire.phase is Phase.HANDSHAKE:
        data = sock.recv(4096)
        assert data, "the broker hung up during the handshake"
        out = wire.receive_data(data)
        if out:
            sock.sendall(out)


def hung_up(sock: socket.socket, timeout: float = WAIT_S) -> bool:
    """Read until the broker closes the connection (True) or ``timeout`` passes (False)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def has_data(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# -- connections that never authenticate, or never say Hello -----------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", ["silent", "half-answer", "no-hello"])
def test_a_peer_that_stalls_is_closed_after_the_timeout(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reactor, "HANDSHAKE_TIMEOUT_S", SHORT_S)
    with master() as m:
        bystander = client(m.address, m.authkey)
        try:
            with raw(m.address) as sock:
                if stage == "no-hello":
                    authenticate(sock, m.authkey)
                else:
                    challenge = sock.recv(4096)
                    assert challenge, "no Challenge"
                    if stage == "half-answer":
                        answer = Connection(Side.PEER, m.authkey, os.urandom).receive_data(challenge)
                        sock.sendall(answer[: len(answer) // 2])
                started = time.monotonic()
                assert bystander.call("echo", "", 1, timeout=5) == 1  # served meanwhile
                assert hung_up(sock), f"the broker kept a peer stalled at {stage!r}"
                assert time.monotonic() - started < WAIT_S
            assert bystander.call("echo", "", 2, timeout=5) == 2
            assert len(m._core.peers) == 2  # the master's own and the bystander's
        finally:
            bystander.close()


@pytest.mark.timeout(60)
def test_before_the_key_is_proven_reads_stay_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that has not proven the key gets no large buffer: the broker reads at most
    one handshake frame's worth at a time (and unpickles nothing: it is never READY)."""
    fed: list[int] = []
    receive = Connection.receive_data

    def recording(self: Connection, data: Any) -> bytes:
        if self.side is Side.BROKER and self.phase is Phase.HANDSHAKE:
            fed.append(len(data))
        return receive(self, data)

    monkeypatch.setattr(Connection, "receive_data", recording)
    with master() as m:
        with raw(m.address) as sock:
            assert sock.recv(4096)  # the Challenge
            # A frame of the largest size allowed before authentication, whose end never
            # comes, then a flood behind it.
            sock.sendall(HEADER.pack(MAX_HANDSHAKE_FRAME_BYTES, 2) + b"\0" * (MAX_HANDSHAKE_FRAME_BYTES - 1))
            assert wait_for(lambda: sum(fed) >= HEADER.size + MAX_HANDSHAKE_FRAME_BYTES - 1, WAIT_S)
            sock.setblocking(False)
            try:
                sock.send(b"\xff" * (200 * 1024))
            except OSError:
                pass  # full, or the broker hung up already
            assert hung_up(sock), "the broker kept a peer that sent garbage"
        assert fed and max(fed) <= HEADER.size + MAX_HANDSHAKE_FRAME_BYTES, max(fed)


@pytest.mark.timeout(60)
def test_at_most_max_handshaking_peers_are_held_the_rest_wait_in_the_backlog(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reactor, "HANDSHAKE_TIMEOUT_S", 120.0)  # idle peers keep their slots here
    cap = _reactor.MAX_HANDSHAKING
    with master() as m:
        bystander = client(m.address, m.authkey)
        idle = [raw(m.address) for _ in range(cap + 1)]
        late: list[SocketClient | BaseException] = []
        thread: threading.Thread | None = None
        try:
            for sock in idle[:cap]:
                assert sock.recv(4096), "an admitted peer gets its Challenge"
            # A round trip through the loop: had it accepted the last one, that one's
            # Challenge would be in its socket by the time the answer is back.
            assert bystander.call("echo", "", 1, timeout=5) == 1
            assert not has_data(idle[cap]), f"{cap + 1} peers mid-handshake at once"
            idle.pop(0).close()  # a slot frees: the one waiting is taken in
            assert idle[cap - 1].recv(4096), "the waiting peer never got its Challenge"

            # Full again: a real client waits in the backlog, then connects once slots free.
            def join() -> None:
                try:
                    late.append(client(m.address, m.authkey))
                except BaseException as exc:
                    late.append(exc)

            thread = threading.Thread(target=join)
            thread.start()
            assert bystander.call("echo", "", 2, timeout=5) == 2
            assert not late, "the client got in while every slot was taken"
            for sock in idle:
                sock.close()
            idle.clear()
            thread.join(WAIT_S)
            assert late and isinstance(late[0], SocketClient), late
            assert late[0].call("echo", "", 3, timeout=5) == 3
        finally:
            for sock in idle:
                sock.close()
            if thread is not None:
                thread.join(WAIT_S)
            for c in late:
                if isinstance(c, SocketClient):
                    c.close()
            bystander.close()


# -- accept() failing --------------------------------------------------------------------------

class FlakyListener:
    """A listening socket whose ``accept`` fails with ``error`` (once, if ``once``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.error: int | None = None
        self.once = False
        self.calls = 0
        self.first = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.calls == 1:
            self.first = time.monotonic()
        error = self.error
        if error is not None:
            if self.once:
                self.error = None
            raise OSError(error, os.strerror(error))
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def flaky() -> Iterator[tuple[_host.BrokerHost, FlakyListener]]:
    name = f"flaky-{os.getpid()}-{os.urandom(3).hex()}"
    address = _host._paths.socket_path(name)
    listener = FlakyListener(_host.listen(address))
    host = _host.BrokerHost(name, os.urandom(32), address=address, listener=listener)  # type: ignore[arg-type]
    host.start_thread()
    try:
        yield host, listener
    finally:
        host.close()


@pytest.mark.timeout(60)
def test_emfile_at_accept_backs_off_instead_of_spinning(
        flaky: tuple[_host.BrokerHost, FlakyListener], caplog: pytest.LogCaptureFixture) -> None:
    host, listener = flaky
    assert isinstance(host.address, str)
    caplog.set_level(logging.DEBUG, logger="mpmesh.broker")
    bystander = client(host.address, host.authkey)
    waiting: socket.socket | None = None
    try:
        listener.calls = 0
        listener.error = errno.EMFILE
        waiting = raw(host.address)  # the listener is readable from now on
        assert wait_for(lambda: listener.calls >= 4, WAIT_S), listener.calls
        # Backed off 0.1 s, 0.2 s, 0.4 s between the tries (a spinning loop tries at once).
        assert time.monotonic() - listener.first >= 0.5, f"{listener.calls} accept() calls in a burst"
        assert bystander.instance_id > 0 and host.loop._thread is not None and host.loop._thread.is_alive()
        complaints = [r for r in caplog.records if r.name == "mpmesh.broker" and r.levelno >= logging.WARNING]
        assert len(complaints) == 1, [r.getMessage() for r in complaints]
        listener.error = None  # the descriptors are back
        assert waiting.recv(4096), "the waiting connection was never taken in"
        late = client(host.address, host.authkey)
        assert late.instance_id > 0
        late.close()
    finally:
        if waiting is not None:
            waiting.close()
        bystander.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("error", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM])
def test_other_accept_errors_do_not_close_the_mesh(
        error: int, flaky: tuple[_host.BrokerHost, FlakyListener], caplog: pytest.LogCaptureFixture) -> None:
    host, listener = flaky
    assert isinstance(host.address, str)
    caplog.set_level(logging.DEBUG, logger="mpmesh.broker")
    bystander = client(host.address, host.authkey)
    try:
        listener.error, listener.once = error, True
        late = client(host.address, host.authkey)  # its first accept() fails; the next takes it
        assert late.instance_id > 0
        late.close()
        assert listener.error is None
        assert host.loop._thread is not None and host.loop._thread.is_alive()
        assert not [r for r in caplog.records if r.name == "mpmesh.broker" and r.levelno >= logging.ERROR]
        again = client(host.address, host.authkey)  # the bystander's mesh is still open
        assert again.instance_id > bystander.instance_id
        again.close()
    finally:
        bystander.close()


# -- Hello: who is speaking --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_hello_with_another_process_pid_is_refused() -> None:
    with master() as m:
        bystander = client(m.address, m.authkey)
        try:
            impostor = Hello(os.getppid(), int(Role.CLIENT), 0, "", "", socket.gethostname())
            with pytest.raises(BrokerUnavailable):
                SocketClient(m.address, m.authkey, impostor).close()
            honest = Hello(os.getpid(), int(Role.CLIENT), 0, "", "", socket.gethostname())
            ok = SocketClient(m.address, m.authkey, honest)
            assert ok.call("echo", "", 1, timeout=5) == 1
            ok.close()
            assert bystander.call("echo", "", 2, timeout=5) == 2
        finally:
            bystander.close()


@pytest.mark.timeout(90)
def test_a_hello_claiming_a_restarting_child_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a supervised child restarts, a process with the key says Hello with its name:
    refused (after the Hello deadline while the new pid is unknown, at once when it is
    reported), and the real child takes its place."""
    monkeypatch.setattr(_reactor, "HANDSHAKE_TIMEOUT_S", 1.0)
    gate = threading.Event()
    held = threading.Event()
    restart = Lifecycle._restart

    def restart_when_let(self: Lifecycle, *args: Any) -> None:
        held.set()
        gate.wait(WAIT_S)
        restart(self, *args)

    monkeypatch.setattr(Lifecycle, "_restart", restart_when_let)
    with master(start_method="fork") as m:
        m.spawn_child("victim", workers.basic)
        old_pid = m.send_request("whoami", "victim")["pid"]  # type: ignore[index]
        worker = m._core.router.workers["victim"]
        claim = make_hello(Role.CHILD, name="victim")
        outcome: list[object] = []
        thread: threading.Thread | None = None
        try:
            os.kill(old_pid, signal.SIGKILL)
            assert held.wait(WAIT_S) and worker.state is WorkerState.STARTING
            with pytest.raises(BrokerUnavailable):
                SocketClient(m.address, m.authkey, claim).close()
            assert worker.peer is None and worker.state is WorkerState.STARTING

            def claim_it() -> None:
                try:
                    outcome.append(SocketClient(m.address, m.authkey, claim))
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=claim_it)
            thread.start()
            assert wait_for(lambda: len(m._core.peers) == 2, WAIT_S)  # the claimant is in, waiting
            gate.set()  # the real child starts; its pid settles the claim
            thread.join(WAIT_S)
            assert outcome and isinstance(outcome[0], BrokerUnavailable), outcome
            assert wait_for(lambda: worker.state is WorkerState.READY, WAIT_S)
            who = m.send_request("whoami", "victim")
            assert who["pid"] == m.process_stats("victim").pid != old_pid  # type: ignore[index]
        finally:
            gate.set()
            if thread is not None:
                thread.join(WAIT_S)
            for c in outcome:
                if isinstance(c, SocketClient):
                    c.close()
