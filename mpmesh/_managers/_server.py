"""Where a manager's broker is hosted, and how each kind of host stops: the ``Server``
that ``get_server()`` returns, a broker on a thread of this process, a broker process,
a server process (``start(initializer)``). Every stop acts only in the process that
started the host, never in a forked child."""

from __future__ import annotations

import builtins
import os
import signal
from typing import Any

from .._broker._objects import COMPONENT, ObjectTable
from .._broker._refs import TypeSpec
from .._client import _binding
from .._client._base import ClientBase
from .._host import _process as _broker_process
from .._host._inproc import BrokerHost
from .._io import _paths
from .._io._forking import stop_in_turn

__all__ = ["Server", "close_client", "close_host", "end_process", "new_host", "stop_broker", "stop_server"]


def new_host(address: object, authkey: bytes, registry: builtins.dict[str, TypeSpec],
             near_cache: bool = True) -> BrokerHost:
    """A broker bound to ``address`` whose object table serves ``registry``'s typeids."""
    host = BrokerHost(_paths.new_mesh_name(), authkey, host_name="manager",
                      address=address, near_cache=near_cache)  # type: ignore[arg-type]
    table = host.core.components[COMPONENT]
    assert isinstance(table, ObjectTable)
    table.address = host.address
    table.registry = builtins.dict(registry)
    return host


def close_host(host: BrokerHost, pid: int) -> None:
    """Finalizer of a manager that hosts its broker (never acts in a forked child)."""
    if os.getpid() != pid:
        return
    _binding.unbind(host.address, host.client)
    host.close()


class Server:
    """What ``get_server()`` returns: a broker bound to the manager's address.

    ``serve_forever()`` runs it in the calling thread until SIGINT or SIGTERM.
    """

    def __init__(self, registry: builtins.dict[str, TypeSpec], address: object, authkey: bytes,
                 serializer: str = "pickle") -> None:
        self.registry = registry
        self._host = new_host(address, authkey, registry)
        self.address = self._host.address

    def serve_forever(self) -> None:
        _binding.bind(self.address, self._host.client)
        try:
            self._host.serve_forever()
        finally:
            _binding.unbind(self.address, self._host.client)
            self._host.close()

    def close(self) -> None:
        """Stop serving (from another thread) and release the address."""
        self._host.close()


def close_client(address: object, client: ClientBase, pid: int) -> None:
    """Finalizer of a manager that connected: drop this process's connection."""
    if os.getpid() != pid:
        return
    _binding.unbind(address, client)
    client.close()


def stop_broker(proc: _broker_process.BrokerProcess, client: ClientBase, pid: int) -> None:
    """Stop a manager's broker process: close our connection and its life pipe, reap it."""
    if os.getpid() != pid:
        return
    close_client(proc.address, client, pid)
    proc.stop()


def stop_server(address: object, client: ClientBase, proc: Any, timeout: float, pid: int) -> None:
    """Stop a manager's server process: SIGTERM (it finishes its loop), then SIGKILL."""
    if os.getpid() != pid:
        return
    close_client(address, client, pid)
    end_process(proc, timeout)


def end_process(proc: Any, timeout: float) -> None:
    """SIGTERM ``proc`` (a stopped one too), then SIGKILL if it lives on after ``timeout``."""
    def gone(wait: float) -> bool:
        proc.join(wait)
        return not proc.is_alive()

    if proc.is_alive() and not stop_in_turn(
            lambda sig: proc.terminate() if sig == signal.SIGTERM else proc.kill(), gone, timeout):
        proc.join()  # as Process.kill() leaves it: it ends

