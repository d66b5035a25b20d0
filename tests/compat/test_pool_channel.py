"""The standalone Pool's channel against strangers: a connection that has not proven the
pool's token (the broker's handshake, keyed with it) and said HELLO is refused if its
peer runs as another uid, may send only handshake-sized frames and a HELLO-sized one,
gets a few seconds for both, and only so many of them are held at once. Whatever a
stranger does closes its own connection; the pool keeps serving its workers.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mpmesh
from mpmesh._errors import AuthenticationError, RemoteProtocolError
from mpmesh._io import _reactor
from mpmesh._pool._io import listen_channel
from mpmesh._pool._results import MapResult
from mpmesh._wire import _pool as P
from mpmesh._wire._connection import Connection, Side
from mpmesh._wire._frames import FrameDecoder
from mpmesh._wire._messages import Challenge, encode
from tests.conftest import wait_for
from tests.integration import pool_workers as W

LONG = 60.0
# What "promptly" means for a refusal, which needs no deadline: generous for a loaded CI
# machine, far below the hello deadline the tests that use it set.
PROMPT_S = 10.0
# A connection that never says HELLO must be closed within this ("a few seconds").
HELLO_DEADLINE_BOUND_S = 15.0
NOBODY = 65534

needs_peercred = pytest.mark.skipif(not hasattr(socket, "SO_PEERCRED"), reason="SO_PEERCRED is Linux's")


@pytest.fixture
def pool() -> Iterator[mpmesh.Pool]:
    with mpmesh.Pool(2) as p:
        yield p


@pytest.fixture
def no_hello_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections accepted from now on get a minute to say HELLO: within the test, only
    what they send (or who they are) can get them closed."""
    monkeypatch.setattr(_reactor, "HANDSHAKE_TIMEOUT_S", 60.0)


def connect(pool: mpmesh.Pool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(pool._io.address)
    except BaseException:
        sock.close()
        raise
    return sock


def prove(sock: socket.socket, pool: mpmesh.Pool, token: bytes | None = None) -> None:
    """Do a worker's half of the handshake on ``sock``: answer the pool's challenge with
    ``token`` (the pool's own by default), then check the pool's proof
    (AuthenticationError if it fails, or the pool hangs up on us)."""
    conn = Connection(Side.PEER, pool._io.token if token is None else token, os.urandom)
    sock.sendall(conn.receive_handshake(encode(Challenge(pool._io.challenge))))
    sock.settimeout(PROMPT_S)
    while not conn.ready:
        data = sock.recv(4096)
        if not data:
            raise AuthenticationError("the pool hung up during the handshake")
        conn.receive_handshake(data)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the other end closes ``sock`` within ``within`` seconds (anything it sends
    first is read and ignored)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def backlog_waiting(pool: mpmesh.Pool) -> bool:
    """Whether a connection waits in the pool's listen backlog, not yet accepted."""
    return bool(select.select([pool._io._listener], [], [], 0)[0])


def start_blocked_map(pool: mpmesh.Pool, tmp_path: Path) -> tuple[MapResult, Path]:
    """A map with a task running on each worker, blocked until the returned file exists."""
    release = tmp_path / "release"
    markers = [tmp_path / f"running-{i}" for i in range(2)]
    result = pool.starmap_async(W.mark_and_block, [(str(m), str(release)) for m in markers], chunksize=1)
    for marker in markers:
        assert W.wait_for_file(str(marker))
    return result, release


@needs_peercred
@pytest.mark.timeout(60)
def test_the_real_peer_credentials_are_ours() -> None:
    address, listener = listen_channel()
    with listener, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(address)
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            assert _reactor.peer_credentials(accepted) == (os.getpid(), os.geteuid(), os.getegid())


@needs_peercred
@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can start a process of another uid")
@pytest.mark.usefixtures("no_hello_deadline")
def test_a_process_of_another_uid_is_refused(pool: mpmesh.Pool, caplog: pytest.LogCaptureFixture) -> None:
    # The child starts as root (the interpreter may sit where nobody cannot reach it), then
    # drops to nobody before it connects: exit 0 if the pool closes the connection.
    child = """if True:
        import os, socket, sys
        address, within = bytes.fromhex(sys.argv[1]), float(sys.argv[2])
        os.setgroups([])
        os.setgid(%d)
        os.setuid(%d)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        print(os.getpid(), flush=True)
        sock.settimeout(within)
        try:
            sys.exit(3 if sock.recv(1) else 0)
        except ConnectionResetError:
            sys.exit(0)
        except TimeoutError:
            sys.exit(2)
    """ % (NOBODY, NOBODY)
    address = os.fsencode(pool._io.address)
    with caplog.at_level(logging.WARNING, logger="mpmesh.pool"):
        done = subprocess.run([sys.executable, "-c", child, address.hex(), str(PROMPT_S)],
                              capture_output=True, text=True, timeout=LONG)
    assert done.returncode == 0, f"the pool did not close it (exit {done.returncode}): {done.stderr}"
    assert f"from pid {done.stdout.strip()}, which runs as uid {NOBODY}" in caplog.text
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@needs_peercred
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
def test_a_peer_of_another_uid_is_refused_and_the_pool_goes_on(
        pool: mpmesh.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Connections from this (the test's) process look as if another uid made them; the
    # workers' own connections keep their real credentials.
    real = _reactor.peer_credentials

    def credentials(sock: socket.socket) -> tuple[int, int, int] | None:
        cred = real(sock)
        if cred is None or cred[0] != os.getpid():
            return cred
        return cred[0], cred[1] + 1, cred[2]

    monkeypatch.setattr(_reactor, "peer_credentials", credentials)
    running, release = start_blocked_map(pool, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mpmesh.pool"), connect(pool) as stranger:
        assert closed_by_peer(stranger, PROMPT_S)  # at accept: it need not say anything
    assert f"which runs as uid {os.geteuid() + 1}" in caplog.text
    release.touch()
    assert len(running.get(LONG)) == 2
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
def test_an_oversized_frame_before_hello_closes_only_that_connection(pool: mpmesh.Pool, tmp_path: Path) -> None:
    running, release = start_blocked_map(pool, tmp_path)
    with connect(pool) as stranger:
        # A header announcing a MiB, and far more body than any HELLO has: the pool must
        # not wait to buffer the rest.
        stranger.sendall(P.HEADER.pack(1 << 20, P.HELLO) + bytes(64 * 1024))
        assert closed_by_peer(stranger, PROMPT_S)
    release.touch()
    assert len(running.get(LONG)) == 2
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
def test_a_wrong_token_closes_only_that_connection(pool: mpmesh.Pool, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    running, release = start_blocked_map(pool, tmp_path)
    with connect(pool) as stranger, caplog.at_level(logging.WARNING, logger="mpmesh.pool"):
        with pytest.raises(AuthenticationError):
            prove(stranger, pool, bytes(len(pool._io.token)))
        assert closed_by_peer(stranger, PROMPT_S)
        assert wait_for(lambda: "without its token" in caplog.text)
    release.touch()
    assert len(running.get(LONG)) == 2
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
def test_a_hello_before_the_handshake_closes_the_connection(pool: mpmesh.Pool) -> None:
    with connect(pool) as stranger:
        # What a worker says once it proved the token, said first: refused unread.
        stranger.sendall(P.frame(P.HELLO, P.HELLO_HEAD.pack(os.getpid()) + b"pool-9"))
        assert closed_by_peer(stranger, PROMPT_S)
    assert wait_for(lambda: not pool._io._strangers)
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
def test_the_right_token_and_a_hello_join_only_under_a_name_the_pool_expects(pool: mpmesh.Pool) -> None:
    with connect(pool) as impostor:
        prove(impostor, pool)
        impostor.sendall(P.frame(P.HELLO, P.HELLO_HEAD.pack(os.getpid()) + b"nobody-we-started"))
        assert closed_by_peer(impostor, PROMPT_S)
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tls": bytes.fromhex("16030100f4010000f00303") + bytes(32),
}


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_before_hello_closes_only_that_connection(pool: mpmesh.Pool, tmp_path: Path, garbage: str) -> None:
    running, release = start_blocked_map(pool, tmp_path)
    with connect(pool) as stranger:
        stranger.sendall(GARBAGE[garbage])
        assert closed_by_peer(stranger, PROMPT_S)
    release.touch()
    assert len(running.get(LONG)) == 2
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
def test_a_connection_that_never_says_hello_is_closed_after_the_deadline(pool: mpmesh.Pool) -> None:
    opened = time.monotonic()
    with connect(pool) as silent, connect(pool) as halfway:
        prove(halfway, pool)  # the token proven, but not a whole HELLO
        halfway.sendall(P.frame(P.HELLO, P.HELLO_HEAD.pack(os.getpid()) + b"x")[:7])
        assert pool.map(W.square, range(20)) == [x * x for x in range(20)]
        assert closed_by_peer(silent, HELLO_DEADLINE_BOUND_S)
        assert closed_by_peer(halfway, HELLO_DEADLINE_BOUND_S)
        # Accepted after connect(), so closed no earlier than the deadline after it.
        assert time.monotonic() - opened >= _reactor.HANDSHAKE_TIMEOUT_S
    assert wait_for(lambda: not pool._io._strangers)
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_hello_deadline")
def test_connections_waiting_for_hello_are_capped(pool: mpmesh.Pool) -> None:
    engine, io = pool._engine, pool._io
    # Every worker connected first: one still to say HELLO would wait behind the strangers.
    assert wait_for(lambda: engine.workers and all(w.connected for w in engine.workers.values()))
    cap = _reactor.MAX_HANDSHAKING
    idle: list[socket.socket] = []
    try:
        for _ in range(cap + 1):
            idle.append(connect(pool))
        # The pool holds the cap and leaves the next connection in the listen backlog.
        assert wait_for(lambda: len(io._strangers) == cap and backlog_waiting(pool))
        assert pool.map(W.square, range(20)) == [x * x for x in range(20)]
        for sock in idle[:cap]:
            sock.close()
        # Slots free: the pool accepts the one that waited.
        assert wait_for(lambda: len(io._strangers) == 1 and not backlog_waiting(pool))
    finally:
        for sock in idle:
            sock.close()
    assert wait_for(lambda: not io._strangers)
    assert pool.map(W.square, range(20)) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
def test_the_hello_limit_holds_only_for_the_first_frame() -> None:
    # A worker whose initializer fails at once may have its HELLO and a long INIT_FAILED
    # read together; the pool must not take the second for a stranger's oversized frame.
    hello = P.frame(P.HELLO, P.HELLO_HEAD.pack(1) + b"pool-0")
    failed = P.frame(P.INIT_FAILED, bytes(64 * 1024))
    reader = FrameDecoder(P.MAX_HELLO_FRAME_BYTES)
    reader.feed(hello + failed)
    assert [kind for kind, _ in reader.frames(1)] == [P.HELLO]
    reader.max_frame = P.MAX_FRAME_BYTES
    assert reader.frames() == [(P.INIT_FAILED, bytes(64 * 1024))]
    stranger = FrameDecoder(P.MAX_HELLO_FRAME_BYTES)
    stranger.feed(failed)
    with pytest.raises(RemoteProtocolError, match="exceeds the 4096-byte limit"):
        stranger.frames()
