"""The pool's I/O thread: one selector over the listener, every worker's channel and a
wake-up pipe; timers for ``task_timeout`` and for workers that vanished.

Only this thread touches the selector. Other threads write with non-blocking sends under
the engine's lock; what the kernel does not take waits in the worker's outbox for
EVENT_WRITE. A channel another thread wants closed is handed over (``_orphans``). New
connections must prove the pool's token in their first frame (``HELLO``) before anything
they send is unpickled.

Until then a connection is a stranger: one whose peer runs as another uid is closed at
accept; the others may send only a HELLO-sized frame, must send it within
``HELLO_TIMEOUT_S``, and at most ``MAX_PENDING_HELLOS`` of them are held at once, so
nobody can make the pool buffer or hold much before proving the token.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Final

from .._errors import MeshClosed, RemoteProtocolError
from .._io._readers import Reader, Readers
from .._wire._frames import RECV_BYTES, FrameDecoder
from . import _protocol as P
from ._tasks import PoolWorker, WState

__all__ = ["ChannelIO", "listen_channel", "peer_credentials"]

log = logging.getLogger("mpmesh.pool")

# A connection that has not said HELLO by then is dropped (a worker sends it right after
# connecting, before it runs the initializer).
HELLO_TIMEOUT_S: Final = 5.0
# Connections waiting for their HELLO at most; further ones wait in the listen backlog
# (the pool stops accepting) until one of these says HELLO, fails, or times out.
MAX_PENDING_HELLOS: Final = 64
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Pending:
    """A connection that has not proved the token yet."""

    __slots__ = ("deadline", "reader", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.reader = FrameDecoder(P.MAX_HELLO_FRAME_BYTES)
        self.deadline = deadline


_WAKE = object()
_LISTENER = object()


class ChannelIO(Readers):
    """The I/O half of the engine (a mixin: ``Engine`` owns the state it reads)."""

    lock: threading.Lock
    token: bytes
    workers: dict[str, PoolWorker]
    _timers: list[tuple[float, int, PoolWorker]]
    _lost_timers: list[tuple[float, int, PoolWorker]]
    kill: Callable[[str], None]
    _seq: itertools.count[int]

    def _on_frames(self, w: PoolWorker, frames: list[tuple[int, bytes]]) -> None: ...
    def _disconnected(self, w: PoolWorker) -> None: ...
    def _on_timeout(self, w: PoolWorker) -> None: ...
    def _finish_worker(self, w: PoolWorker) -> None: ...
    def _settle(self, w: PoolWorker) -> None: ...
    def _dispatch(self, caller: bool = False) -> None: ...
    def _break(self, make_error: Callable[[], BaseException]) -> None: ...

    def _start_io(self, channel: tuple[str | bytes, socket.socket] | None) -> None:
        self.address, self._listener = channel or listen_channel()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._listening = True
        self._buf = bytearray(RECV_BYTES)
        self._view = memoryview(self._buf)
        self._pending: dict[socket.socket, _Pending] = {}
        self._want_write: set[PoolWorker] = set()
        self._orphans: list[socket.socket] = []
        self._init_readers()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mpmesh-pool-io", daemon=True)
        self._thread.start()

    def _write(self, w: PoolWorker, data: bytes) -> None:
        sock = w.sock
        if sock is None:
            return
        if w.out:
            w.out += data
            return
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return  # the reader sees the connection drop and settles this worker
        if n < len(data):
            w.out += data[n:]
            self._want_write.add(w)
            self._wake()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._sel_once()
        except Exception:  # pragma: no cover - a bug: fail loudly rather than hang
            log.exception("the pool's I/O thread failed")
            with self.lock:
                self._break(lambda: MeshClosed("the pool's I/O thread failed; see the log"))
        finally:
            self._close_all()

    def _sel_once(self) -> None:
        timeout = None
        heads = [h[0][0] for h in (self._timers, self._lost_timers) if h]
        heads += [p.deadline for p in self._pending.values()]
        if heads:
            timeout = max(0.0, min(heads) - time.monotonic())
        for key, mask in self._sel.select(timeout):
            data = key.data
            if data is _WAKE:
                self._drain_wake()
            elif data is _LISTENER:
                self._accept()
            elif type(data) is _Pending:
                self._read_pending(data)
            elif type(data) is Reader:
                data.callback()
            else:
                if mask & selectors.EVENT_WRITE:
                    self._flush(data)
                if mask & selectors.EVENT_READ:
                    self._read(data)
        if self._timers or self._lost_timers or self._pending:
            self._run_timers()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self.lock:
            want, self._want_write = self._want_write, set()
            orphans, self._orphans = self._orphans, []
        for sock in orphans:
            self._unregister_and_close(sock)
        self._apply_reader_changes()
        for w in want:
            if w.sock is not None and w.out and not w.writing:
                w.writing = True
                self._sel.modify(w.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, w)

    def _unregister_and_close(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _flush(self, w: PoolWorker) -> None:
        with self.lock:
            sock = w.sock
            if sock is None:
                return
            try:
                n = sock.send(w.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(w.out)
            del w.out[:n]
            if not w.out and w.writing:
                w.writing = False
                self._sel.modify(sock, selectors.EVENT_READ, w)

    def _accept(self) -> None:
        while len(self._pending) < MAX_PENDING_HELLOS:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not _peer_is_us(sock):
                sock.close()
                continue
            sock.setblocking(False)
            pending = _Pending(sock, time.monotonic() + HELLO_TIMEOUT_S)
            self._pending[sock] = pending
            self._sel.register(sock, selectors.EVENT_READ, pending)
        self._listen(False)

    def _listen(self, on: bool) -> None:
        """Watch the listener, or stop (too many connections wait for their HELLO)."""
        if on is self._listening:
            return
        self._listening = on
        if on:
            self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        else:
            self._sel.unregister(self._listener)

    def _read_pending(self, p: _Pending) -> None:
        try:
            data = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._reject(p)
            return
        try:
            # Only the first frame under the HELLO limit: a worker's next one may be larger.
            p.reader.feed(data)
            frames = p.reader.frames(1)
        except RemoteProtocolError as exc:
            log.debug("closed a connection to the pool that did not start with a HELLO: %s", exc)
            self._reject(p)
            return
        if not frames:
            return
        kind, body = frames[0]
        if kind != P.HELLO or len(body) < P.HELLO_HEAD.size:
            log.debug("closed a connection to the pool whose first frame (kind %d) is no HELLO", kind)
            self._reject(p)
            return
        token, pid = P.HELLO_HEAD.unpack_from(body)
        name = body[P.HELLO_HEAD.size:].decode("utf-8", "replace")
        if not hmac.compare_digest(token, self.token):
            log.warning("a process (pid %d) tried to join the pool without its token", pid)
            self._reject(p)
            return
        p.reader.max_frame = P.MAX_FRAME_BYTES
        with self.lock:
            w = self.workers.get(name)
            if w is not None and w.sock is None and w.state is WState.STARTING:
                w.sock, w.pid, w.reader = p.sock, pid, p.reader
            else:
                w = None
        if w is None:
            self._reject(p)
            return
        self._unpend(p)
        self._sel.modify(p.sock, selectors.EVENT_READ, w)
        self._feed_frames(w, b"")  # what came with the HELLO

    def _unpend(self, p: _Pending) -> None:
        self._pending.pop(p.sock, None)
        if len(self._pending) < MAX_PENDING_HELLOS:
            self._listen(True)

    def _reject(self, p: _Pending) -> None:
        self._unpend(p)
        self._unregister_and_close(p.sock)

    def _read(self, w: PoolWorker) -> None:
        sock = w.sock
        if sock is None:
            return
        try:
            n = sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop_conn(w)
            return
        self._feed_frames(w, self._view[:n])

    def _feed_frames(self, w: PoolWorker, data: bytes | memoryview) -> None:
        """Feed ``data`` to ``w``'s frame reader and handle the frames it completes."""
        try:
            w.reader.feed(data)
            frames = w.reader.frames()
        except RemoteProtocolError:
            log.warning("%s sent a malformed frame; dropping it", w.describe())
            self._drop_conn(w)
            return
        if frames:
            self._on_frames(w, frames)

    def _drop_conn(self, w: PoolWorker) -> None:
        with self.lock:
            self._close_sock(w)
            self._disconnected(w)

    def _close_sock(self, w: PoolWorker) -> None:
        """Close ``w``'s channel (lock held); only the I/O thread touches the selector."""
        sock, w.sock = w.sock, None
        if sock is None:
            return
        if threading.current_thread() is self._thread:
            self._unregister_and_close(sock)
        else:
            self._orphans.append(sock)
            self._wake()

    def _run_timers(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            log.debug("closed a connection to the pool that sent no HELLO within %.0f s", HELLO_TIMEOUT_S)
            self._reject(p)
        timers, lost = self._timers, self._lost_timers
        if not ((timers and timers[0][0] <= now) or (lost and lost[0][0] <= now)):
            return
        with self.lock:
            while timers and timers[0][0] <= now:
                w = heapq.heappop(timers)[2]
                w.armed = False
                if w.state is not WState.READY or not w.inflight or w.deadline is None:
                    continue
                if w.deadline > now:  # the chunk it was armed for finished; re-arm for the next
                    w.armed = True
                    heapq.heappush(timers, (w.deadline, next(self._seq), w))
                    continue
                self._on_timeout(w)
            while lost and lost[0][0] <= now:
                w = heapq.heappop(lost)[2]
                if self.workers.get(w.name) is not w:
                    continue
                if w.exit_how is not None:  # exited, yet its channel stays open (inherited?)
                    self._close_sock(w)
                    self._finish_worker(w)
                elif w.state is WState.LOST and w.lost_head is not None:
                    log.warning("%s closed its connection but has not exited; killing it", w.describe())
                    self.kill(w.name)
                    self._settle(w)
            self._dispatch()

    def _close_all(self) -> None:
        with self.lock:
            socks = [w.sock for w in self.workers.values() if w.sock is not None]
            for w in self.workers.values():
                w.sock = None
            socks += self._orphans
            self._orphans = []
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
        socks += list(self._pending)
        self._pending.clear()
        for sock in socks:
            sock.close()
        self._forget_readers()
        self._sel.close()
        self._listener.close()
        os.close(wake_r)
        os.close(wake_w)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process that connected ``sock``, as the kernel recorded
    them at ``connect()`` (SO_PEERCRED); None where the platform does not record them."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return pid, uid, gid


def _peer_is_us(sock: socket.socket) -> bool:
    """Whether the peer of a connection just accepted runs as our (effective) uid.

    Without SO_PEERCRED the channel is a file in the 0700 runtime directory (see
    ``listen_channel``), which no other user can reach, so there is nothing to check.
    """
    try:
        cred = peer_credentials(sock)
    except OSError as exc:
        log.warning("refused a connection to the pool whose peer's credentials are unreadable: %s", exc)
        return False
    if cred is None:
        return True
    pid, uid, _ = cred
    if uid != os.geteuid():
        log.warning("refused a connection to the pool from pid %d, which runs as uid %d, not %d",
                    pid, uid, os.geteuid())
        return False
    return True


def listen_channel() -> tuple[str | bytes, socket.socket]:
    """A listening Unix socket: abstract on Linux (no file to leak), else in the runtime dir.

    Any local user can connect to an abstract socket; the pool refuses a peer of another
    uid at accept, by SO_PEERCRED, which exists wherever the abstract namespace does.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"mpmesh-pool-{os.getpid()}-{os.urandom(8).hex()}"
    try:
        if hasattr(socket, "SO_PEERCRED"):  # Linux
            address: str | bytes = "\0" + name
        else:  # pragma: no cover - macOS
            from .._io import _paths

            address = str(_paths.runtime_dir() / f"{name}.sock")
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return address, sock


