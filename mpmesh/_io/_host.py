"""BrokerHost: where a broker runs. One class for every kind of host.

A host owns the listening socket, the key file, the ``BrokerCore`` with its components,
the ``BrokerLoop`` and the in-process ``LocalClient``. It runs the loop either on a
thread of the current process (a ``Master``, a ``Manager``: the owner's own calls then
cost no socket hop at all) or in the current thread (``python -m mpmesh serve``).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable

from .._broker._actions import Notify
from .._broker._components import default_components
from .._broker._core import BrokerCore, Component
from .._client import LocalClient
from .._wire._messages import Message
from . import _paths
from ._loop import BrokerLoop

__all__ = ["BrokerHost", "listen", "write_key"]


class BrokerHost:
    """A broker listening at ``<runtime dir>/<name>.sock`` with its key in ``<name>.key``."""

    def __init__(self, name: str, authkey: bytes, *, host_name: str = "master",
                 on_notify: Callable[[list[Notify]], None] | None = None,
                 components: dict[str, Component] | None = None) -> None:
        self.name = name
        self.authkey = authkey
        self.address = _paths.socket_path(name)
        self.key_path = _paths.key_path(name)
        listener = listen(self.address)
        try:
            write_key(self.key_path, authkey)
        except BaseException:
            listener.close()
            os.unlink(self.address)
            raise
        self.core = BrokerCore(rng=random.Random())
        self.core.components.update(default_components() if components is None else components)
        self.client = LocalClient(None)  # type: ignore[arg-type]
        self.loop = BrokerLoop(self.core, listener, authkey, on_local=self.client.deliver,
                               on_notify=on_notify or (lambda notes: None))
        self.client._loop = self.loop
        self.core.add_local(host_name, os.getpid(), socket.gethostname(), time.monotonic())
        self._closed = False

    @property
    def cleanup_paths(self) -> list[str]:
        return [self.address, self.key_path]

    def start_thread(self) -> None:
        """Run the broker on a daemon thread of this process."""
        self.loop.start()

    def serve_forever(self) -> None:
        """Run the broker in this thread until ``close()`` or SIGTERM/SIGINT."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.loop.stop())
        self.loop._thread = threading.current_thread()
        try:
            self.loop._run()
        finally:
            self._remove_files()

    def deliver_to(self, on_incoming: Callable[[Message], None]) -> None:
        self.client.on_incoming = on_incoming

    def close(self) -> None:
        """Stop the loop, fail what is pending, remove the socket and key files."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        self.loop.stop()
        self._remove_files()

    def _remove_files(self) -> None:
        for path in self.cleanup_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def listen(path: str) -> socket.socket:
    """Bind a Unix socket at ``path``, replacing a stale one a dead broker left behind."""
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
    """Leave the authkey where only this user can read it, for ``mpmesh.connect``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
    finally:
        os.close(fd)
