"""BrokerHost: where a broker runs. One class for every kind of host.

A host owns the listening socket, the key file, the ``BrokerCore`` with its components,
the ``BrokerLoop`` and the in-process ``LocalClient``. It runs the loop either on a
thread of the current process (a ``Master``, a ``Manager``: the owner's own calls then
cost no socket hop at all) or in the current thread (``python -m mpmesh serve``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from .._broker._actions import WARNING, Notify, Offload
from .._broker._components import default_components
from .._broker._core import BrokerCore, Component
from .._client._local import LocalClient
from .._io import _paths, _segment
from .._io._loop import LEASE_S, BrokerLoop
from .._io._threads import WorkerThreads
from .._wire._messages import Message

__all__ = ["BrokerHost", "listen", "write_key"]

log = logging.getLogger("mpmesh.broker")

# Pooled threads for offloaded user code (methods of registered Manager types, Barrier
# actions). Such a method may block (a user's queue.Queue.get) until another call runs,
# as the standard library's thread per client allows: a job that finds every pooled
# thread busy gets a thread of its own.
OFFLOAD_THREADS: Final = 128
# Threads of their own for jobs that find every pooled thread busy, at most; past that a
# job waits for a pooled thread, so no peer can make the broker start threads without end.
EXTRA_OFFLOAD_THREADS: Final = 896


class BrokerHost:
    """A broker listening at ``<runtime dir>/<name>.sock`` with its key in ``<name>.key``."""

    def __init__(self, name: str, authkey: bytes, *, host_name: str = "master",
                 on_notify: Callable[[list[Notify]], None] | None = None,
                 components: dict[str, Component] | None = None,
                 address: str | tuple[str, int] | None = None,
                 listener: socket.socket | None = None, near_cache: bool = True,
                 first_instance: int = 1) -> None:
        """``listener``: a socket already bound at ``address``, whose key file the caller
        wrote (a broker process started by a Master that must not wait for it).
        ``near_cache``: hand local peers the version table, so they keep near copies.
        ``first_instance``: the first instance id the broker hands out."""
        self.name = name
        self.authkey = authkey
        # ``address``: another Unix socket path, or (host, port) to serve over TCP (a
        # Manager's ``address=``); by default the mesh's socket in the runtime directory.
        if isinstance(address, list):
            address = (str(address[0]), int(address[1]))
        self.address: str | tuple[str, int] = _paths.socket_path(name) if address is None else address
        self.key_path = _paths.key_path(name)
        if listener is None:
            listener = listen(self.address)
            if isinstance(self.address, tuple):
                self.address = listener.getsockname()[:2]  # port 0: the port the system chose
            try:
                write_key(self.key_path, authkey)
            except BaseException:
                listener.close()
                if isinstance(self.address, str):
                    os.unlink(self.address)
                raise
        self.core = BrokerCore(rng=random.Random(), first_instance=first_instance)
        # The version table local peers read shared state through (not over TCP).
        self.segment = _segment.create() if near_cache and isinstance(self.address, str) else None
        versions = self.segment.table if self.segment is not None else None
        cells = self.segment.cells if self.segment is not None else None
        self.core.ring = self.segment.ring if self.segment is not None else None
        self.core.components.update(default_components(self.core, versions=versions, cells=cells)
                                    if components is None else components)
        self._on_notify = on_notify or (lambda notes: None)
        # Their threads start only when used; a job's own thread leaves once it is done.
        self._offload_pool = WorkerThreads(lambda n: f"mpmesh-offload_{n}", OFFLOAD_THREADS,
                                           logger=log, failed="an offloaded job %r raised")
        self._offload_extra = WorkerThreads("mpmesh-offload-extra", EXTRA_OFFLOAD_THREADS, idle_exit=0.0,
                                            logger=log, failed="an offloaded job %r raised")
        self._offload_lock = threading.Lock()  # jobs come from any thread that delivers
        self._offloaded = 0  # jobs running or queued, pooled or not
        self.loop = BrokerLoop(self.core, listener, authkey, on_notify=self._notes)
        self.client = LocalClient(self.loop)  # the in-process host's: what the core answers it
        self.loop.on_local = self.client.deliver
        self.loop.segment = self.segment
        self.core.add_local(host_name, os.getpid(), socket.gethostname(), time.monotonic())
        self._closed = False

    @property
    def cleanup_paths(self) -> list[str]:
        return [path for path in (self.address, self.key_path) if isinstance(path, str)]

    def start_thread(self) -> None:
        """Run the broker on a daemon thread of this process."""
        self.loop.start()

    def serve_forever(self, stop_on: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Run the broker in this thread until ``close()`` or a signal of ``stop_on``
        (the others of SIGTERM/SIGINT are ignored)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, (lambda *_: self.loop.stop()) if sig in stop_on else signal.SIG_IGN)
        try:
            self.loop.run_here()
        finally:
            self._remove_files()

    def _notes(self, notes: Sequence[Notify | Offload]) -> None:
        """Events go to the owner, warnings to the log; ``Offload`` jobs run on worker
        threads, never the loop's."""
        events: list[Notify] = []
        for note in notes:
            if isinstance(note, Offload):
                self._offload(note)
            elif note.event == WARNING:
                log.warning("%s", note.info["message"])
            else:
                events.append(note)
        if events:
            self._on_notify(events)

    def _offload(self, job: Offload) -> None:
        if self._closed:
            return
        with self._offload_lock:
            pooled = (self._offloaded < OFFLOAD_THREADS
                      or self._offloaded >= OFFLOAD_THREADS + EXTRA_OFFLOAD_THREADS)
            self._offloaded += 1

        def run() -> None:
            try:
                outcome = job.job()
                self.loop.run_core(lambda now: job.done(outcome, now))
            finally:
                with self._offload_lock:
                    self._offloaded -= 1

        (self._offload_pool if pooled else self._offload_extra).submit(run)

    def deliver_to(self, on_incoming: Callable[[Message], None]) -> None:
        self.client.on_incoming = on_incoming

    def close(self) -> None:
        """Stop the loop, fail what is pending, remove the socket and key files."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        self.loop.stop()
        self._offload_pool.close(wait=False, cancel=True)
        self._offload_extra.close(wait=False)
        self._remove_files()

    def _remove_files(self) -> None:
        for path in self.cleanup_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def listen(path: str | tuple[str, int]) -> socket.socket:
    """Bind a Unix socket at ``path``, replacing a stale one a dead broker left behind;
    or, for a ``(host, port)`` pair, a TCP socket (Nagle off: small frames go at once).

    Taking over from a dead broker waits out its version table's lease first
    (``LEASE_S``): until then its clients may still serve copies of what it held, and
    must not while a new broker at the same address accepts writes.
    """
    if isinstance(path, tuple):
        tcp = socket.create_server(path, backlog=128)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        return tcp
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
                time.sleep(LEASE_S)
            else:
                raise ValueError(f"a mesh is already listening at {path}") from None
            finally:
                probe.close()
            sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def write_key(path: str, key: bytes) -> None:
    """Leave the authkey where only this user can read it, for ``mpmesh.connect``.

    The key goes to a new private file beside ``path`` that is then renamed over it: a
    reader sees the old key or the new one, never a partial one, and a symlink planted at
    ``path`` is replaced, not followed.
    """
    directory, base = os.path.split(path)
    # A name nobody can guess, created only if nothing (not even a symlink) is there.
    tmp = os.path.join(directory, f".{base}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
