"""A Master's state broker: the process of its own that keeps the mesh's shared state
(see ``docs/architecture.md`` for why), and the Master's connection to it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

from .._client import _binding
from .._client._base import ClientBase, make_hello
from .._client._futures import dispatcher
from .._client._socket import SocketClient
from .._host import _process as _broker_process
from .._host._inproc import listen, write_key
from .._io import _paths
from .._state._shared import state_address
from .._wire._messages import Role

__all__ = ["StateBroker"]


class StateBroker:
    """Forks the state broker without waiting for it: its socket and key file are made
    here first, so a child or ``connect()``ed process that comes early waits in the
    socket's backlog, and the Master's own connection is made on first use."""

    def __init__(self, mesh_address: str, authkey: bytes, *, near_cache: bool, timeout: float | None) -> None:
        self._authkey, self._timeout = authkey, timeout
        self.address = state_address(mesh_address)
        dispatcher.retire()  # our idle callback thread would cost the fork
        name = os.path.basename(self.address)[: -len(".sock")]
        listener = listen(self.address)
        try:
            write_key(_paths.key_path(name), authkey)
            self.proc = _broker_process.start(
                _broker_process.Config(name, authkey, host_name="master-state", address=self.address,
                                       near_cache=near_cache, lazy=True),
                listener=listener, wait=False)
        except BaseException:
            for path in (self.address, _paths.key_path(name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        finally:
            listener.close()  # the broker's now: we must not keep connections waiting on it
        self._lock = threading.Lock()
        self._client: ClientBase | None = None

    def connect(self, check_open: Callable[[], None]) -> ClientBase:
        """Our end of the socketpair made with the state broker, once it listens (one
        connection, whichever thread asks first)."""
        with self._lock:
            client = self._client
            if client is None:
                check_open()
                self.proc.ready()
                # The Master's timeout: a shared-state call ends within it if the state
                # broker stops answering (None: no deadline, but a broker silent for
                # DEFAULT_TIMEOUT_S is still given up).
                client = SocketClient(self.proc.address, self._authkey, make_hello(Role.CLIENT),
                                      sock=self.proc.sock, timeout=self._timeout)
                self._client = client
                _binding.bind(self.address, client)
        return client

    def stop(self) -> None:
        """Stop the broker; the Master closed its connection (if any) before."""
        self._client = None
        self.proc.stop()
