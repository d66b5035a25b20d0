"""The crash matrix (loky ``crash_cases`` style): what breaks, where, what the caller sees,
and that the mesh keeps serving everyone else afterwards.

Every mesh lives in a ``with`` block and the autouse leak guard (``tests/conftest.py``)
fails a test that leaves a process, socket or fd behind. Sleeps appear only *inside*
handlers, as the fault being injected; tests wait on events, futures and the OS.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.managers
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import mpmesh
from mpmesh._client._base import make_hello
from mpmesh._client._socket import SocketClient
from mpmesh._errors import RemoteTraceback
from mpmesh._wire._connection import Connection, Side
from mpmesh._wire._messages import Challenge, Hello, Request, encode
from tests.conftest import descendants, wait_for
from tests.integration import workers
from tests.integration.workers import CustomError

ROOT = Path(__file__).resolve().parents[2]
VICTIM = str(Path(__file__).resolve().parent / "scripts" / "master_victim.py")
WAIT_S = 10.0  # generous bound for what normally takes milliseconds
PROMPT_S = 1.5  # "fails at once": well under any request timeout used here
HEADER = struct.Struct("!IB")  # frame header: body length, kind byte


@pytest.fixture(scope="module", autouse=True)
def _stdlib_helpers() -> None:
    workers.start_stdlib_helpers()


@pytest.fixture(autouse=True)
def broker_never_crashes(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A fault in one peer must never take the broker loop down (it would stop everyone),
    nor trip a core bug that the loop can only survive by logging it at ERROR."""
    caplog.set_level(logging.ERROR, logger="mpmesh.broker")
    yield
    crashes = [r.getMessage() for r in caplog.records
               if r.name == "mpmesh.broker" and r.levelno >= logging.ERROR]
    assert not crashes, f"the broker loop logged: {crashes}"


def mesh(**kwargs: Any) -> mpmesh.Master:
    kwargs.setdefault("timeout", WAIT_S)
    return mpmesh.Master(**kwargs)


def still_serving(m: mpmesh.Master, target: str = "witness") -> None:
    """The mesh keeps answering, and the broker holds no leftover job."""
    assert m.send_request("square", target, 12, timeout=2) == 144
    assert m._core.router.jobs == {}


def jobs_from_master(m: mpmesh.Master) -> list[Any]:
    """The broker's in-flight entries for requests the master sent (peer 0)."""
    return [job for job in m._core.router.jobs.values() if job.origin == 0]


# -- the crash table ------------------------------------------------------------------------

@dataclass(frozen=True)
class Crash:
    """A request that goes wrong in the handler's process, and what the caller must see."""

    action: str
    data: object
    raises: tuple[type[BaseException], ...]   # the caller's exception is all of these
    says: tuple[str, ...] = ()                 # ... and str(exception) contains these
    child_survives: bool = True
    target: str = "victim"
    check: Callable[[BaseException], None] = field(default=lambda exc: None)


def _remote_traceback_names_the_frame(exc: BaseException) -> None:
    assert exc.args == ("bad input", 42) and exc.code == 42  # type: ignore[attr-defined]
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), repr(cause)
    assert "in raise_" in str(cause) and "workers.py" in str(cause)
    assert "CustomError: ('bad input', 42)" in str(cause)


CRASHES = {
    "handler-raises": Crash("raise", "bad input", (CustomError,), ("bad input",),
                            check=_remote_traceback_names_the_frame),
    "unpicklable-exception": Crash("raise-unpicklable", None,
                                   (mpmesh.RemoteError, multiprocessing.managers.RemoteError),
                                   ("Unpicklable", "boom", "raise_unpicklable")),
    "unpicklable-result": Crash("unpicklable-result", None, (mpmesh.SerializationError, TypeError),
                                ("generator", "unpicklable-result")),
    "unknown-target": Crash("square", 3, (mpmesh.NotFound, LookupError), ("nobody",), target="nobody"),
    "unknown-action": Crash("no-such-action", 3, (mpmesh.NoHandler,), ("no-such-action",)),
    "sigkill-in-handler": Crash("kill-self", int(signal.SIGKILL), (mpmesh.WorkerLost,),
                                ("'victim'", "SIGKILL", "'kill-self'"), child_survives=False),
    "os-exit-in-handler": Crash("exit", 3, (mpmesh.WorkerLost,),
                                ("'victim'", "code 3", "'exit'"), child_survives=False),
    "sigsegv-in-handler": Crash("kill-self", int(signal.SIGSEGV), (mpmesh.WorkerLost,),
                                ("'victim'", "SIGSEGV", "'kill-self'"), child_survives=False),
}


@pytest.mark.parametrize("case", list(CRASHES.values()), ids=list(CRASHES))
def test_crash_table(case: Crash) -> None:
    with mesh() as m:
        m.spawn_child("victim", workers.basic, auto_restart=False)
        m.spawn_child("witness", workers.basic)
        assert m.send_request("square", "victim", 2) == 4
        started = time.monotonic()
        with pytest.raises(case.raises) as caught:
            m.send_request(case.action, case.target, case.data)
        elapsed = time.monotonic() - started
        exc = caught.value
        assert all(isinstance(exc, cls) for cls in case.raises), type(exc).__mro__
        for text in case.says:
            assert text in str(exc), f"{text!r} not in {str(exc)!r}"
        case.check(exc)
        assert elapsed < PROMPT_S, f"the caller waited {elapsed:.2f} s (timeout is {WAIT_S} s)"
        assert m.is_alive("victim") is case.child_survives
        if case.child_survives:
            still_serving(m, "victim")
        still_serving(m)


# -- serialization in the caller ------------------------------------------------------------

def test_unpicklable_argument_fails_in_the_caller_before_anything_is_sent() -> None:
    with mesh() as m:
        m.spawn_child("witness", workers.basic)
        m.spawn_group("g", workers.basic, size=2)
        assert m.send_request("square", "witness", 1) == 1
        unpicklable = (x for x in range(3))
        for send in (lambda: m.send_request("echo", "witness", unpicklable),
                     lambda: m.request("echo", "witness", unpicklable),  # raises, not a failed future
                     lambda: m.send_request("echo", "g", unpicklable)):
            with pytest.raises(mpmesh.SerializationError, match="generator"):
                send()
        with pytest.raises(TypeError):  # SerializationError is a TypeError, raised before routing
            m.send_request("echo", "nobody-at-all", unpicklable)
        with pytest.raises(mpmesh.SerializationError):  # the caller's mistake: raised, not mapped
            m.broadcast("echo", "g", unpicklable)
        stats = [m.process_stats(n) for n in ("witness", "g-0", "g-1")]
        assert [(s.requests_handled, s.errors) for s in stats] == [(1, 0), (0, 0), (0, 0)]
        assert m._core.router.jobs == {}  # nothing half-sent
        still_serving(m)
        assert m.broadcast("square", "g", 3) == {"g-0": 9, "g-1": 9}


# -- timeouts ---------------------------------------------------------------------------------

def test_handler_that_never_returns_times_out_and_the_mesh_keeps_working() -> None:
    with mesh() as m:
        m.spawn_child("stuck", workers.basic, mode="concurrent")
        m.spawn_child("witness", workers.basic)
        started = time.monotonic()
        with pytest.raises(mpmesh.RequestTimeout) as caught:
            m.send_request("sleep", "stuck", 30, timeout=0.5)
        elapsed = time.monotonic() - started
        assert isinstance(caught.value, multiprocessing.TimeoutError)
        assert isinstance(caught.value, TimeoutError)
        assert "'sleep'" in str(caught.value) and "0.5" in str(caught.value)
        assert 0.45 <= elapsed < 1.0, elapsed
        assert m._core.router.jobs == {}  # the broker forgot the request...
        # ...the same (concurrent) child still answers while that handler sleeps on
        assert m.send_request("square", "stuck", 5) == 25
        still_serving(m)
        m.shutdown(timeout=0.2)  # the sleeping handler would hold a graceful shutdown for 10 s


def test_late_answer_after_a_timeout_is_dropped_and_nothing_leaks() -> None:
    inside, release = threading.Event(), threading.Event()

    def hold(_: object) -> bool:
        inside.set()
        return release.wait(WAIT_S)

    with mesh() as m:
        m.register_handler("hold", hold)
        m.spawn_child("seq", workers.basic, mode="sequential")
        with pytest.raises(mpmesh.RequestTimeout):
            m.send_request("call-master", "seq", ("hold", None), timeout=0.3)
        # the broker forgot the timed-out request (the child's own call to "hold" still runs)
        assert jobs_from_master(m) == []
        assert [job.action for job in m._core.router.jobs.values()] == ["hold"]
        # The timed-out handler still runs: the sequential child is busy, so this waits...
        queued = m.request("square", "seq", 9)
        assert m.process_stats("seq").requests_active == 1
        release.set()  # ...until the late answer comes back (and is dropped)
        assert queued.result(WAIT_S) == 81
        assert m.process_stats("seq").requests_active == 0
        assert m._core.router.jobs == {}
        assert m._core.router.workers["seq"].running == {}

        # Requests that time out while queued leave nothing behind and never run.
        inside.clear()
        release.clear()
        holder = m.request("call-master", "seq", ("hold", None))
        assert inside.wait(WAIT_S)
        handled = m.process_stats("seq").requests_handled
        for i in range(5):
            with pytest.raises(mpmesh.RequestTimeout, match="queued"):
                m.send_request("square", "seq", i, timeout=0.1)
        assert [job.action for job in jobs_from_master(m)] == ["call-master"]  # only the holder
        release.set()
        assert holder.result(WAIT_S) is True
        assert m.send_request("square", "seq", 4) == 16
        assert m.process_stats("seq").requests_handled == handled + 2
        assert m._core.router.jobs == {}


# -- children that die -------------------------------------------------------------------------

def test_child_killed_from_outside_mid_request_fails_promptly(start_method: str) -> None:
    entered: dict[str, Any] = {}
    inside = threading.Event()
    with mesh(start_method=start_method, timeout=30) as m:
        m.register_handler("entered", lambda info: (entered.update(info), inside.set()))
        m.spawn_child("victim", workers.basic, auto_restart=False)
        m.spawn_child("witness", workers.basic)
        fut = m.request("enter-then-sleep", "victim", 60)
        assert inside.wait(WAIT_S)
        assert entered["pid"] == m.process_stats("victim").pid
        killed = time.monotonic()
        os.kill(entered["pid"], signal.SIGKILL)
        with pytest.raises(mpmesh.WorkerLost) as caught:
            fut.result(5)
        elapsed = time.monotonic() - killed
        message = str(caught.value)
        for text in ("'victim'", "SIGKILL", "'enter-then-sleep'", str(entered["pid"])):
            assert text in message, f"{text!r} not in {message!r}"
        assert elapsed < PROMPT_S, f"WorkerLost came {elapsed:.2f} s after the kill"
        assert not m.is_alive("victim")
        assert m.children() == ["witness"]
        still_serving(m)


def test_children_exiting_mid_request_are_reported_with_their_codes(start_method: str) -> None:
    # Several deaths in a row: how an exit is noticed (zygote report, process sentinel)
    # differs by start method, and a race there must not take the broker down.
    with mesh(start_method=start_method) as m:
        victims = [f"victim-{code}" for code in (3, 4, 5)]
        for name in victims:
            m.spawn_child(name, workers.basic, auto_restart=False)
        m.spawn_child("witness", workers.basic)
        for code, name in zip((3, 4, 5), victims):
            with pytest.raises(mpmesh.WorkerLost) as caught:
                m.send_request("exit", name, code, timeout=3)
            assert f"code {code}" in str(caught.value) and repr(name) in str(caught.value)
            assert not m.is_alive(name)
            still_serving(m)
        assert m.children() == ["witness"]


def test_request_to_a_child_that_is_down_for_good_fails_fast() -> None:
    with mesh(timeout=30) as m:
        m.spawn_child("victim", workers.basic, auto_restart=False)
        m.spawn_group("g", workers.basic, size=1, auto_restart=False)
        m.spawn_child("witness", workers.basic)
        for target in ("victim", "g-0"):
            with pytest.raises(mpmesh.WorkerLost):
                m.send_request("exit", target, 0)
            assert not m.is_alive(target)
        for target in ("victim", "g", "g-0"):
            started = time.monotonic()
            with pytest.raises(mpmesh.MeshError) as caught:
                m.send_request("square", target, 2)
            assert time.monotonic() - started < 1.0
            assert not isinstance(caught.value, mpmesh.RequestTimeout)
            fut = m.request("square", target, 2)
            assert isinstance(fut.exception(1.0), mpmesh.MeshError)
        still_serving(m)


# -- bad bytes on the broker socket ----------------------------------------------------------

def raw_peer(address: str, authkey: bytes | None) -> socket.socket:
    """A raw connection to the broker; authenticated (mutual HMAC) when ``authkey`` is given."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(address)
    if authkey is None:
        return sock
    conn = Connection(Side.PEER, authkey, os.urandom)
    from mpmesh._wire._connection import Phase

    while conn.phase is Phase.HANDSHAKE:
        data = sock.recv(4096)
        assert data, "the broker hung up during the handshake"
        out = conn.receive_data(data)
        if out:
            sock.sendall(out)
    return sock


def hung_up(sock: socket.socket) -> bool:
    """Read until the broker closes the connection (True) or goes quiet for WAIT_S (False)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _hello(pid: int, role: int, name: str = "") -> bytes:
    return encode(Hello(pid, role, 0, name, "", "somewhere"))


def _request_before_hello() -> bytes:
    return encode(Request(1, 0, -1, 0, -1.0, 0.0, "square", "witness", b"\x80\x05K\x03."))


GARBAGE = {
    # id: (authenticate first?, bytes to send)
    "junk-before-auth": (False, b"\xff" * 64),
    "huge-length-before-auth": (False, HEADER.pack(0xFFFFFFF0, 2) + b"\0" * 16),
    "app-message-before-auth": (False, _hello(1, 0)),
    "junk-after-auth": (True, b"\xff" * 64),
    "huge-length-after-auth": (True, HEADER.pack(0x7FFFFFFF, Request.KIND) + b"\0" * 16),
    "unknown-kind-after-auth": (True, HEADER.pack(5, 250) + b"hello"),
    "truncated-request-after-auth": (True, HEADER.pack(3, Request.KIND) + b"abc"),
    "handshake-frame-after-auth": (True, encode(Challenge(b"n" * 32))),
    "request-before-hello": (True, _request_before_hello()),
    "hello-with-bad-role": (True, _hello(1, 99)),
    "hello-twice": (True, _hello(1, 0) + _hello(1, 0)),
    "hello-stealing-a-child-name": (True, _hello(1, 1, "witness")),
}


@pytest.mark.parametrize("auth, junk", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_on_the_broker_socket_closes_only_that_connection(auth: bool, junk: bytes) -> None:
    with mesh() as m:
        m.spawn_child("witness", workers.basic)
        bystander = SocketClient(m.address, m.authkey, make_hello(0))
        try:
            assert bystander.call("square", "witness", 3, timeout=5) == 9
            with raw_peer(m.address, m.authkey if auth else None) as sock:
                sock.sendall(junk)
                assert hung_up(sock), "the broker kept a connection that sent garbage"
            still_serving(m)
            assert bystander.call("square", "witness", 4, timeout=5) == 16  # other peers unaffected
        finally:
            bystander.close()
        assert m.process_stats("witness").pid == m.send_request("whoami", "witness")["pid"]  # type: ignore[index]


def test_wrong_authkey_is_refused_and_the_broker_keeps_serving() -> None:
    with mesh() as m:
        m.spawn_child("witness", workers.basic)
        bystander = SocketClient(m.address, m.authkey, make_hello(0))
        try:
            for _ in range(3):
                with pytest.raises(mpmesh.AuthenticationError) as caught:
                    SocketClient(m.address, b"wrong", make_hello(0))
                assert isinstance(caught.value, multiprocessing.AuthenticationError)
            # at the byte level: a wrong Answer gets Rejected, then the broker hangs up
            with raw_peer(m.address, None) as sock:
                wrong = Connection(Side.PEER, b"wrong", os.urandom)
                sock.sendall(wrong.receive_data(sock.recv(4096)))  # Challenge -> our Answer
                assert hung_up(sock)
            still_serving(m)
            assert bystander.call("square", "witness", 5, timeout=5) == 25
        finally:
            bystander.close()


# -- the master itself killed with SIGKILL -----------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the victim master printed nothing in time"
    return proc.stdout.readline()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_standalone_pool_owner_killed_mid_task_leaves_no_process(method: str, tmp_path: Path) -> None:
    # A standalone Pool has no broker: its workers learn of their owner's death from the
    # zygote (fork) or from their pool channel hanging up (spawn), even mid-task.
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/chaos/scripts/pool_owner_victim.py"),
                             method, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    tree: set[int] = set()
    try:
        line = _read_line(proc, 30)
        assert line, f"the pool's owner exited early with {proc.wait(5)}"
        assert json.loads(line)["owner"] == proc.pid
        tree = descendants(proc.pid)
        assert len(tree) >= 2, tree  # two workers busy in a task (and a zygote, for fork)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(5) == -signal.SIGKILL
        assert wait_for(lambda: all(_gone(pid) for pid in tree), 5.0), \
            f"still running 5 s after the pool's owner died: {sorted(p for p in tree if not _gone(p))}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_master_killed_with_sigkill_leaves_no_process_and_no_file(method: str) -> None:
    proc = subprocess.Popen([sys.executable, VICTIM, method], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    tree: set[int] = set()
    files: list[str] = []
    try:
        line = _read_line(proc, 30)
        assert line, f"the victim master exited early with {proc.wait(5)}"
        info = json.loads(line)
        children = set(info["children"].values())
        assert len(children) == 3 and info["master"] == proc.pid
        tree = descendants(proc.pid)  # the children, plus any helper process the master runs
        assert children <= tree
        files = [info["address"], info["key"]]
        assert all(os.path.exists(path) for path in files)

        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(5) == -signal.SIGKILL
        killed = time.monotonic()
        assert wait_for(lambda: all(_gone(pid) for pid in tree), 5.0), \
            f"still running 5 s after the master died: {sorted(p for p in tree if not _gone(p))}"
        assert wait_for(lambda: not any(os.path.exists(p) for p in files), 5.0 - (time.monotonic() - killed)), \
            f"left behind: {[p for p in files if os.path.exists(p)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in tree:  # never leave survivors on the machine, whatever the outcome
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in files:  # already asserted above; do not report it twice via the leak guard
            if os.path.exists(path):
                os.unlink(path)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_is_alive_is_false_as_soon_as_a_request_failed_with_the_exit() -> None:
    # The router learns of the exit (and fails what the child held) a moment before the
    # supervisor's record is updated; is_alive() must not say True in between.
    with mesh() as m:
        m.spawn_child("victim", workers.basic, auto_restart=False)
        seen: list[bool] = []
        report = m._supervisor._on_exit

        def on_exit(name: str, pid: int, code: int) -> None:
            report(name, pid, code)
            seen.append(m.is_alive(name))  # the supervisor's record still says running

        m._supervisor._on_exit = on_exit
        with pytest.raises(mpmesh.WorkerLost):
            m.send_request("exit", "victim", 3, timeout=30)
        assert wait_for(lambda: bool(seen), 30)
        assert seen == [False]
        assert not m.is_alive("victim")
