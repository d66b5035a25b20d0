"""The floor of a shared-state round trip: a bare Python socket echo server.

One ``poll`` loop in its own process serves every client over a Unix socket, as a broker
does, with no protocol at all: a client sends a 64-byte message and waits for it to come
back. Whatever mpmesh or a ``multiprocessing`` manager adds (framing, pickling, dispatch,
the shared state itself) comes on top of this; a bar set above it cannot be met by Python
code on that machine.

``python -m benchmarks._echo ADDRESS`` prints ``ready`` once it listens, and exits when
its standard input closes (the benchmark ended, or died).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Final

__all__ = ["MESSAGE", "EchoServer", "connect", "echo_client", "pinger", "round_trips"]

MESSAGE: Final = b"m" * 64
START_TIMEOUT_S: Final = 30.0


def serve(address: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    stdin = sys.stdin.fileno()
    poller.register(stdin, select.POLLIN)
    conns: dict[int, socket.socket] = {}
    buf = bytearray(65536)
    view = memoryview(buf)
    print("ready", flush=True)
    while True:
        for fd, _ in poller.poll():
            if fd == stdin:
                return
            if fd == listener.fileno():
                conn, _ = listener.accept()
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.POLLIN)
                continue
            conn = conns[fd]
            n = conn.recv_into(buf)
            if n:
                conn.sendall(view[:n])
            else:
                poller.unregister(fd)
                del conns[fd]
                conn.close()


class EchoServer:
    """``serve`` in a subprocess (it inherits this process's CPU affinity)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="mpmesh-bench-echo-")
        self.address = os.path.join(self._dir, "echo.sock")
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks._echo", self.address],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT_S)
        if not ready or self._proc.stdout.readline().strip() != b"ready":
            self.close()
            raise RuntimeError("the echo server did not start")

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(self.address)
        os.rmdir(self._dir)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def echo_client(address: str) -> Iterator[socket.socket]:
    sock = connect(address)
    try:
        yield sock
    finally:
        sock.close()


def pinger(sock: socket.socket) -> Callable[[], None]:
    """One echo round trip of ``MESSAGE`` on ``sock`` per call."""
    view = memoryview(bytearray(len(MESSAGE)))
    size = len(MESSAGE)
    send, recv_into = sock.sendall, sock.recv_into

    def ping() -> None:
        send(MESSAGE)
        got = 0
        while got < size:
            n = recv_into(view[got:])
            if not n:
                raise ConnectionError("the echo server hung up")
            got += n

    return ping


def round_trips(sock: socket.socket, n: int) -> float:
    """Seconds for ``n`` echo round trips on ``sock``."""
    ping = pinger(sock)
    start = time.perf_counter()
    for _ in range(n):
        ping()
    return time.perf_counter() - start


if __name__ == "__main__":
    serve(sys.argv[1])
