"""The pool's driver: its I/O thread, its sockets, its clock and its other threads, around
the pure engine (``_engine.py``).

Every entry point (work submitted by a caller, frames or a hang-up read by the I/O
thread, an exit reported by the lifecycle thread, a due timer) takes the pool's lock,
hands the event to the engine with the time, and carries out the actions it returns
before letting go: frames are written with non-blocking sends, in the engine's order;
what the kernel does not take waits in the channel's outbox for EVENT_WRITE. The I/O
thread is the shared selector loop (``_io._reactor.Reactor``, the broker's too), and
only it touches the selector (a channel another thread wants closed is handed over). A worker's frames are decoded, results unpickled, before the lock
is taken. User code never runs on the I/O thread: callbacks and progress bars run on
the callback thread, lazy inputs on the feeder thread.

New connections prove the pool's token with the broker's handshake (``_wire._connection``:
a challenge each way, keyed with the token) and then say who they are (``HELLO``: pid,
name) before anything they send is unpickled. A worker's half is computed by the pool
and handed to it through the fork (``_wire._pool.handshake_for_workers``), so it
answers the moment it connects; the pool still proves the token back before a worker
reads anything it sends. Until then a connection is a stranger: one
whose peer runs as another uid is closed at accept; the others may send only
handshake-sized frames and a HELLO, must do it within the loop's
``HANDSHAKE_TIMEOUT_S``, and at most ``MAX_HANDSHAKING`` of them are held at once, so
nobody can make the pool buffer or hold much before proving the token.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import AuthenticationError, MeshClosed, RemoteProtocolError
from .._io import _reactor
from .._io._reactor import Link, Reactor, peer_pid
from .._io._threads import WorkerThreads
from .._procs._supervisor import describe_exit
from .._wire import _pool as P
from .._wire._connection import Connection, Phase, Side
from .._wire._frames import FrameDecoder
from ._actions import Action, Complete, Deadline, Gone, Hangup, Kill, Log, Progress, Send, Spawn, StopFeeding
from ._engine import Engine
from ._feeder import Feeder, LazySource
from ._tasks import Source, read_frames

__all__ = ["ChannelIO", "listen_channel"]

log = logging.getLogger("mpmesh.pool")

class _Pending:
    """A connection that has not proved the token, or not said HELLO, yet."""

    __slots__ = ("conn", "reader", "sock")

    def __init__(self, sock: socket.socket, token: bytes, challenge: bytes) -> None:
        self.sock = sock
        self.conn = Connection(Side.BROKER, token, lambda n: challenge)
        self.conn.initiate()  # already in the worker's hands: not sent
        self.reader = FrameDecoder(P.MAX_HELLO_FRAME_BYTES)


class _Channel(Link):
    """A worker's open connection: its socket, its frame decoder, what waits to be sent."""

    __slots__ = ("decoder", "name")

    def __init__(self, name: str, sock: socket.socket, decoder: FrameDecoder) -> None:
        super().__init__(sock)
        self.name = name
        self.decoder = decoder


class ChannelIO(Reactor[_Channel]):
    """Runs one pool's engine: the listening socket, each worker's channel, the I/O,
    feeder and callback threads, and the lock every call into the engine holds."""

    def __init__(self, engine: Engine, channel: tuple[str | bytes, socket.socket], token: bytes,
                 challenge: bytes, *, spawn: Callable[[str], None], kill: Callable[[str], None]) -> None:
        """``channel``: the listening socket workers connect to; ``token``: what they
        prove, answering ``challenge`` (both given to them when they start); ``spawn(name)``
        / ``kill(name)``: start or SIGKILL a worker process (``_processes.py``, without
        blocking)."""
        self.address, listener = channel
        super().__init__(listener, _Channel, logger=log.name, same_uid_only=True)
        self.engine = engine
        self.token = token
        self.challenge = challenge
        self._spawn = spawn
        self._kill = kill
        self.all_gone = threading.Condition(self.lock)
        self._closed = False
        self._channels: dict[str, _Channel] = {}
        # Callbacks and progress bars run here, one at a time, in the order they came.
        self._callbacks = WorkerThreads("mpmesh-pool-callbacks", logger=log, failed="a pool callback raised")
        self.feeder = Feeder(self)
        self.start("mpmesh-pool-io")

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
            self._flush(ch, threading.get_ident() == self._loop_ident)

    def _hang_up(self, name: str) -> None:
        ch = self._channels.get(name)
        if ch is not None:
            self._close_channel(ch)

    def _close_channel(self, ch: _Channel) -> None:
        """Close a worker's channel; only the I/O thread touches the selector."""
        if self._channels.get(ch.name) is ch:
            del self._channels[ch.name]
        self._close_soon(ch.sock)

    def _to_callbacks(self, fn: Callable[[], object]) -> None:
        self._callbacks.submit(fn)

    # -- threads ----------------------------------------------------------------------------------

    def on_own_thread(self) -> bool:
        """Whether the caller is one of the pool's threads (I/O, feeder, callbacks)."""
        return threading.current_thread() in (self._thread, self.feeder._thread) or self._callbacks.is_worker()

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
        self.stop(10.0)
        self._callbacks.close(timeout=30.0)

    # -- the I/O thread (the loop's hooks) -------------------------------------------------------

    def _crashed(self) -> None:  # pragma: no cover - a bug: fail loudly rather than hang
        log.exception("the pool's I/O thread failed")
        with self.lock:
            failed = self.engine.break_pool(lambda: MeshClosed("the pool's I/O thread failed; see the log"))
            self._perform(failed)

    def _timers(self) -> float | None:
        # The engine's next deadline, read once a pass: a timer set during the pass (here,
        # or by a thread that then wakes us) falls due later, on a pass that reads it.
        due = self.engine.next_deadline()
        if due is not None and due <= (now := time.monotonic()):
            with self.lock:
                self._perform(self.engine.on_tick(now))
            due = self.engine.next_deadline()
        return due

    def _is_live(self, link: _Channel) -> bool:
        return self._channels.get(link.name) is link

    def _closed_by_us(self, link: _Channel) -> None:
        """A write to ``link`` failed: its reader sees the connection drop and settles the worker."""

    def _admit(self, sock: socket.socket) -> None:
        p = _Pending(sock, self.token, self.challenge)
        self._hold_stranger(sock, p)

    def _expired(self, key: object) -> None:
        assert isinstance(key, _Pending)
        log.debug("closed a connection to the pool that sent no HELLO within %.0f s", _reactor.HANDSHAKE_TIMEOUT_S)
        self._reject(key)

    def _read_stranger(self, p: object) -> None:
        assert type(p) is _Pending
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
            if p.conn.phase is Phase.HANDSHAKE:
                if not self._say(p, p.conn.receive_handshake(data)) or not p.conn.ready:
                    return
                data = p.conn.leftover()
            # Only the first frame under the HELLO limit: a worker's next one may be larger.
            p.reader.feed(data)
            frames = p.reader.frames(1)
        except AuthenticationError:
            log.warning("a process (pid %s) tried to join the pool without its token", peer_pid(p.sock))
            self._reject(p)
            return
        except RemoteProtocolError as exc:
            log.debug("closed a connection to the pool that did not prove the token and say HELLO: %s", exc)
            self._reject(p)
            return
        if not frames:
            return
        kind, body = frames[0]
        if kind != P.HELLO or len(body) < P.HELLO_HEAD.size:
            log.debug("closed a connection to the pool whose first frame (kind %d) is no HELLO", kind)
            self._reject(p)
            return
        (pid,) = P.HELLO_HEAD.unpack_from(body)
        name = body[P.HELLO_HEAD.size:].decode("utf-8", "replace")
        p.reader.max_frame = P.MAX_FRAME_BYTES
        ch = _Channel(name, p.sock, p.reader)
        with self.lock:
            taken = self.engine.on_connect(name, pid)
            if taken:
                self._channels[name] = ch
        if not taken:
            self._reject(p)
            return
        self._release(p)
        self._sel.set_events(p.sock.fileno(), ch.interest(), ch)
        self._feed(ch, b"")  # what came with the HELLO

    def _say(self, p: _Pending, data: bytes) -> bool:
        """Send a handshake frame to a stranger (a few dozen bytes, into an empty socket
        buffer); one that cannot take it is dropped. Whether it went."""
        if not data:
            return True
        try:
            if p.sock.send(data) == len(data):
                return True
        except OSError:
            pass
        self._reject(p)
        return False

    def _reject(self, p: _Pending) -> None:
        if p in self._strangers:
            self._drop_stranger(p.sock, p)

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

    def _close_links(self) -> None:
        for ch in self._channels.values():
            ch.sock.close()
        self._channels.clear()
        for p in self._strangers:
            p.sock.close()  # type: ignore[attr-defined]


def _progress(job: Any, n: int) -> Callable[[], object]:
    return lambda: job._progress(n)


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


