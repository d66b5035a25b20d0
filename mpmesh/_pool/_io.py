"""The pool's driver: its I/O thread, its sockets, its clock and its other threads, around
the pure engine (``_engine.py``).

Every entry point (work submitted by a caller, frames or a hang-up read by the I/O
thread, an exit reported by the lifecycle thread, a due timer) takes the pool's lock,
hands the event to the engine with the time, and carries out the actions it returns
before letting go: frames are written with non-blocking sends, in the engine's order;
what the kernel does not take waits in the channel's outbox for EVENT_WRITE, and only
the I/O thread touches the selector (a channel another thread wants closed is handed
over, ``_orphans``). A worker's frames are decoded, results unpickled, before the lock
is taken. User code never runs on the I/O thread: callbacks and progress bars run on
the callback thread, lazy inputs on the feeder thread.

New connections must prove the pool's token in their first frame (``HELLO``) before
anything they send is unpickled. Until then a connection is a stranger: one whose peer
runs as another uid is closed at accept; the others may send only a HELLO-sized frame,
must send it within ``HELLO_TIMEOUT_S``, and at most ``MAX_PENDING_HELLOS`` of them are
held at once, so nobody can make the pool buffer or hold much before proving the token.
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .._errors import MeshClosed, RemoteProtocolError
from .._io._readers import Reader, Readers
from .._supervisor import describe_exit
from .._wire._frames import RECV_BYTES, FrameDecoder
from .._wire import _pool as P
from ._actions import Action, Complete, Deadline, Gone, Hangup, Kill, Log, Progress, Send, Spawn, StopFeeding
from ._engine import Engine
from ._feeder import Feeder, LazySource
from ._tasks import Source, read_frames

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


class _Channel:
    """A worker's open connection: its socket, its frame decoder, what waits to be sent."""

    __slots__ = ("decoder", "name", "out", "sock", "writing")

    def __init__(self, name: str, sock: socket.socket, decoder: FrameDecoder) -> None:
        self.name = name
        self.sock = sock
        self.decoder = decoder
        self.out = bytearray()
        self.writing = False  # watched for EVENT_WRITE


_WAKE = object()
_LISTENER = object()


class ChannelIO(Readers):
    """Runs one pool's engine: the listening socket, each worker's channel, the I/O,
    feeder and callback threads, and the lock every call into the engine holds."""

    def __init__(self, engine: Engine, channel: tuple[str | bytes, socket.socket], token: bytes, *,
                 spawn: Callable[[str], None], kill: Callable[[str], None]) -> None:
        """``channel``: the listening socket workers connect to; ``token``: what they
        prove; ``spawn(name)`` / ``kill(name)``: start or SIGKILL a worker process
        (``_processes.py``, without blocking)."""
        self.engine = engine
        self.token = token
        self._spawn = spawn
        self._kill = kill
        self.lock = threading.Lock()
        self.all_gone = threading.Condition(self.lock)
        self._closed = False
        self._channels: dict[str, _Channel] = {}
        self._callbacks: queue.SimpleQueue[Callable[[], object] | None] | None = None
        self._callback_thread: threading.Thread | None = None
        self.feeder = Feeder(self)
        self.address, self._listener = channel
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
        self._want_write: set[_Channel] = set()
        self._orphans: list[socket.socket] = []
        self._init_readers()
        self._stopping = False
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name="mpmesh-pool-io",
                                                                 daemon=True)
        self._thread.start()

    # -- feeding the engine (any thread) ------------------------------------------------------

    def submit(self, source: Source) -> None:
        """Queue a job's chunks (``ValueError`` if the pool no longer takes work)."""
        with self.lock:
            actions = self.engine.submit(source, time.monotonic())
            if actions:  # most submits while the workers are busy only queue
                self._perform(actions)

    def add_lazy(self, lazy: LazySource, first: int, items: list[Any], error: BaseException | None,
                 ended: bool) -> None:
        """The feeder pulled ``items`` (chunks ``first``...) from an imap input."""
        source = lazy.source
        if source is None:
            return
        with self.lock:
            self._perform(self.engine.add_lazy(source, first, items, error, ended, time.monotonic()))

    def on_exit(self, name: str, pid: int, exitcode: int) -> None:
        """A worker process ended (the lifecycle thread)."""
        with self.lock:
            if not self._closed:
                self._perform(self.engine.on_exit(name, pid, describe_exit(exitcode), time.monotonic()))

    def spawn_failed(self, name: str, exc: BaseException) -> None:
        """A worker could not be started (the lifecycle thread)."""
        with self.lock:
            self._perform(self.engine.spawn_failed(name, exc))

    def close(self) -> None:
        with self.lock:
            self._perform(self.engine.close())
        self.feeder.lift_bounds()

    def terminate(self) -> list[str]:
        """Fail what is not done; return the names of the workers to stop."""
        with self.lock:
            self._perform(self.engine.terminate())
            return list(self.engine.workers)

    def wait_workers_gone(self, timeout: float | None = None) -> bool:
        with self.lock:
            return self.all_gone.wait_for(lambda: not self.engine.workers, timeout)

    # -- carrying out what the engine asks (lock held) -------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        for a in actions:
            if type(a) is Send:
                self._write(a.worker, a.data)
            elif type(a) is Complete:
                job = a.job
                if job._has_callbacks:
                    self._to_callbacks(job._finish)
                else:
                    job._finish()
            elif type(a) is Progress:
                self._to_callbacks(_progress(a.job, a.n))
            elif type(a) is Deadline:
                if threading.current_thread() is not self._thread:
                    self._wake()
            elif type(a) is Gone:
                self._hang_up(a.worker)
                self.all_gone.notify_all()
            elif type(a) is Hangup:
                self._hang_up(a.worker)
            elif type(a) is Spawn:
                self._spawn(a.worker)
            elif type(a) is Kill:
                self._kill(a.worker)
            elif type(a) is StopFeeding:
                with self.feeder.cond:
                    a.lazy.exhausted = True
            elif type(a) is Log:
                log.log(a.level, a.message, *a.args)

    def _write(self, name: str, data: bytes) -> None:
        ch = self._channels.get(name)
        if ch is None:
            return
        if ch.out:
            ch.out += data
            return
        try:
            n = ch.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return  # the reader sees the connection drop and settles this worker
        if n < len(data):
            ch.out += data[n:]
            self._want_write.add(ch)
            self._wake()

    def _hang_up(self, name: str) -> None:
        ch = self._channels.get(name)
        if ch is not None:
            self._close_channel(ch)

    def _close_channel(self, ch: _Channel) -> None:
        """Close a worker's channel; only the I/O thread touches the selector."""
        if self._channels.get(ch.name) is ch:
            del self._channels[ch.name]
        if threading.current_thread() is self._thread:
            self._unregister_and_close(ch.sock)
        else:
            self._orphans.append(ch.sock)
            self._wake()

    def _to_callbacks(self, fn: Callable[[], object]) -> None:
        if self._callbacks is None:
            self._callbacks = queue.SimpleQueue()
            self._callback_thread = threading.Thread(target=self._run_callbacks, args=(self._callbacks,),
                                                     name="mpmesh-pool-callbacks", daemon=True)
            self._callback_thread.start()
        self._callbacks.put(fn)

    @staticmethod
    def _run_callbacks(q: queue.SimpleQueue[Callable[[], object] | None]) -> None:
        while (fn := q.get()) is not None:
            try:
                fn()
            except Exception:
                log.exception("a pool callback raised")
            # Held while waiting for the next one, the last callback would keep its result
            # alive (its value, an exception's traceback, and through it the pool).
            del fn

    # -- threads ----------------------------------------------------------------------------------

    def on_own_thread(self) -> bool:
        """Whether the caller is one of the pool's threads (I/O, feeder, callbacks)."""
        return threading.current_thread() in (self._thread, self.feeder._thread, self._callback_thread)

    def shutdown_threads(self) -> None:
        """Stop the I/O, feeder and callback threads and close every descriptor."""
        with self.lock:
            self._closed = True
            for ch in self._channels.values():
                self._orphans.append(ch.sock)  # closed by the I/O thread on its way out
            self._channels.clear()
            self.engine.forget_workers()
            self.all_gone.notify_all()
        self.feeder.stop()
        me = threading.current_thread()
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not me:
            self._thread.join(10.0)
        q, thread = self._callbacks, self._callback_thread
        if q is not None and thread is not None:
            q.put(None)
            if thread is not me:
                thread.join(30.0)

    # -- the I/O thread ------------------------------------------------------------------------

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
                failed = self.engine.break_pool(lambda: MeshClosed("the pool's I/O thread failed; see the log"))
                self._perform(failed)
        finally:
            self._close_all()

    def _sel_once(self) -> None:
        # The engine's next deadline, read once a pass: a timer set during the pass (here,
        # or by a thread that then wakes us) falls due later, on a pass that reads it.
        due = self.engine.next_deadline()
        pending = self._pending
        timeout = None
        if due is not None or pending:
            heads = [p.deadline for p in pending.values()]
            if due is not None:
                heads.append(due)
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
        if pending or due is not None:
            self._run_timers(due)

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
        for ch in want:
            if self._channels.get(ch.name) is ch and ch.out and not ch.writing:
                ch.writing = True
                self._sel.modify(ch.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ch)

    def _unregister_and_close(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _flush(self, ch: _Channel) -> None:
        with self.lock:
            if self._channels.get(ch.name) is not ch:
                return
            try:
                n = ch.sock.send(ch.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(ch.out)
            del ch.out[:n]
            if not ch.out and ch.writing:
                ch.writing = False
                self._sel.modify(ch.sock, selectors.EVENT_READ, ch)

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
        ch = _Channel(name, p.sock, p.reader)
        with self.lock:
            taken = self.engine.on_connect(name, pid)
            if taken:
                self._channels[name] = ch
        if not taken:
            self._reject(p)
            return
        self._unpend(p)
        self._sel.modify(p.sock, selectors.EVENT_READ, ch)
        self._feed(ch, b"")  # what came with the HELLO

    def _unpend(self, p: _Pending) -> None:
        self._pending.pop(p.sock, None)
        if len(self._pending) < MAX_PENDING_HELLOS:
            self._listen(True)

    def _reject(self, p: _Pending) -> None:
        self._unpend(p)
        self._unregister_and_close(p.sock)

    def _read(self, ch: _Channel) -> None:
        try:
            n = ch.sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop(ch)
            return
        self._feed(ch, self._view[:n])

    def _feed(self, ch: _Channel, data: bytes | memoryview) -> None:
        """Decode what ``ch`` sent (outside the lock) and hand the frames to the engine."""
        events = read_frames(ch.decoder, data)
        if events:
            with self.lock:
                if self._channels.get(ch.name) is ch:
                    actions = self.engine.on_frames(ch.name, events, time.monotonic())
                    if actions:
                        self._perform(actions)

    def _drop(self, ch: _Channel) -> None:
        """``ch`` reached EOF (or failed): close it and tell the engine."""
        with self.lock:
            if self._channels.get(ch.name) is not ch:
                self._unregister_and_close(ch.sock)
                return
            self._close_channel(ch)
            self._perform(self.engine.on_disconnect(ch.name, time.monotonic()))

    def _run_timers(self, due: float | None) -> None:
        """Drop connections past their HELLO deadline; tick the engine if ``due`` has come."""
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            log.debug("closed a connection to the pool that sent no HELLO within %.0f s", HELLO_TIMEOUT_S)
            self._reject(p)
        if due is None or due > now:
            return
        with self.lock:
            self._perform(self.engine.on_tick(now))

    def _close_all(self) -> None:
        with self.lock:
            socks = [ch.sock for ch in self._channels.values()]
            self._channels.clear()
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


def _progress(job: Any, n: int) -> Callable[[], object]:
    return lambda: job._progress(n)


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


