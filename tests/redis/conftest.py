"""Real ``redis-server`` processes for the tests of the Redis backend.

``redis_url``: a flushed database on a server shared by this test process (one per
xdist worker). ``own_redis``: a server of the test's own, to stop, start, pause and
resume. Every server is killed, and its directory removed, at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server")
NO_SERVER = "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server)"
NO_CLIENT = "redis-py not installed: pip install 'mpmesh[redis]'"
AUTHKEY = b"mpmesh-redis-tests"
START_S = 10.0


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One command in RESP over a plain socket; the first line of the answer."""
    wire = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(wire)
        return sock.recv(1024).split(b"\r\n")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server on a loopback port, in a directory of its own."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mpm-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (on the same port as before, if it ran before); wait until it answers."""
        assert REDIS_SERVER is not None
        for _ in range(1 if self.port else 5):  # a free port may be taken before we bind it
            port = self.port or _free_port()
            proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._answers(port, proc):
                self.port, self.proc = port, proc
                return
            _end(proc)
        raise RuntimeError(f"redis-server did not start: {self.log()[-2000:]}")

    @staticmethod
    def _answers(port: int, proc: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _command(port, "PING", timeout=0.5) == b"+PONG":
                    return True
            except OSError:
                pass
            time.sleep(0.01)  # polling the server's readiness, bounded by the deadline
        return False

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(START_S)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        assert _command(self.port, "FLUSHALL") == b"+OK"

    def destroy(self) -> None:
        if self.proc is not None:
            _end(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait()


def _started_server() -> Iterator[RedisServer]:
    """A started redis-server, destroyed at the end (or the test skips, saying why)."""
    if REDIS_SERVER is None:
        pytest.skip(NO_SERVER)
    pytest.importorskip("redis", reason=NO_CLIENT)
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """This test process's redis-server (one per xdist worker)."""
    yield from _started_server()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, its data flushed."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for stopping, restarting and pausing."""
    yield from _started_server()


@pytest.fixture
def authkey() -> bytes:
    return AUTHKEY


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """``closing(x)`` returns ``x`` and closes it at teardown (last first), with every link
    that handles made for themselves in this process."""
    from mpmesh._redis._state import close_links

    things: list[Any] = []

    def keep(thing: Any) -> Any:
        things.append(thing)
        return thing

    yield keep
    for thing in reversed(things):
        thing.close()
    close_links()


@pytest.fixture
def make_link(redis_url: str, closing: Callable[[Any], Any]) -> Callable[..., Any]:
    """``make_link(mesh="t", timeout=5.0, url=redis_url)``: a ``Link``, closed at teardown."""
    from mpmesh._redis._link import Link

    def make(mesh: str = "t", timeout: float = 5.0, url: str | None = None) -> Link:
        return closing(Link(url or redis_url, mesh, AUTHKEY, timeout=timeout))

    return make


@pytest.fixture
def link(make_link: Callable[..., Any]) -> Any:
    return make_link()
