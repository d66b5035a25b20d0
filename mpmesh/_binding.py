"""Which client a shared-state proxy uses in this process, per mesh.

A ``Cache`` or ``LockGrant`` pickled into another process rebuilds itself there from
``(mesh address, name)`` only; on first use it asks ``client_for(address)`` for this
process's connection to that mesh: the Master's in-process client in the master, the
``Child``'s connection in a child, the handle's connection after ``mpmesh.connect()``.
Every ``SharedState`` owner binds its client here when it is created (see
``SharedState._client``). A process with no binding for the mesh (a plain
``multiprocessing.Process``, say) gets one connection of its own, opened with the key
file of the private runtime directory, and closed at exit.

Entries remember the pid that bound them, so a forked process never uses its parent's.
"""

from __future__ import annotations

import atexit
import errno
import os
import stat
import threading
import weakref
from typing import TYPE_CHECKING

from ._errors import AuthenticationError, BrokerUnavailable
from ._wire._messages import Role

if TYPE_CHECKING:
    from ._client import ClientBase, SocketClient

__all__ = ["bind", "client_for", "read_key"]

_lock = threading.Lock()
_bound: dict[str, tuple[int, weakref.ref[ClientBase]]] = {}
_own: dict[str, tuple[int, SocketClient]] = {}
_atexit_armed = False


def bind(address: str, client: ClientBase) -> None:
    """Make ``client`` this process's connection to the mesh at ``address``."""
    with _lock:
        _bound[address] = (os.getpid(), weakref.ref(client))


def client_for(address: str) -> ClientBase:
    """This process's client for the mesh at ``address`` (connecting one if needed)."""
    entry = _bound.get(address)
    if entry is not None and entry[0] == os.getpid():
        client = entry[1]()
        if client is not None:
            return client
    return _own_client(address)


def read_key(address: str) -> bytes:
    """The mesh's authkey from its key file (``<name>.key`` next to ``<name>.sock``).

    Only a regular file (not a link to one) that this user owns and nobody else can
    access is trusted: anyone else's file could hand us a key of their choosing.

    Raises:
        BrokerUnavailable: there is no key file.
        AuthenticationError: the key file is refused (the message says why).
    """
    path = address[: -len(".sock")] + ".key" if address.endswith(".sock") else address + ".key"
    try:
        # O_NONBLOCK: a FIFO planted there must not hang us before fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BrokerUnavailable(f"no mesh runs at {address} (no key file {path})") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: O_NOFOLLOW on the BSDs
            raise AuthenticationError(f"refusing key file {path}: it is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            problem = f"it is not a regular file ({stat.filemode(info.st_mode)})"
        elif info.st_uid != os.getuid():
            problem = f"it is owned by uid {info.st_uid}, not by us (uid {os.getuid()})"
        elif info.st_mode & 0o077:
            problem = (f"group or others can access it (mode {stat.S_IMODE(info.st_mode):04o}; "
                       f"it must be 0600)")
        else:
            chunks = []
            while chunk := os.read(fd, 4096):
                chunks.append(chunk)
            return b"".join(chunks)
    finally:
        os.close(fd)
    raise AuthenticationError(f"refusing key file {path}: {problem}")


def _own_client(address: str) -> ClientBase:
    from ._client import SocketClient, make_hello

    global _atexit_armed
    pid = os.getpid()
    with _lock:
        entry = _own.get(address)
        if entry is not None and entry[0] == pid and entry[1]._closed is None:
            return entry[1]
        client = SocketClient(address, read_key(address), make_hello(Role.CLIENT))
        _own[address] = (pid, client)
        _bound[address] = (pid, weakref.ref(client))
        if not _atexit_armed:
            atexit.register(_close_own)
            _atexit_armed = True
        return client


def _close_own() -> None:
    """At exit: close this process's own connections, with a Goodbye if it ends cleanly."""
    from ._client import exit_is_clean, process_ends

    pid = os.getpid()
    with _lock:
        mine = [client for owner, client in _own.values() if owner == pid]
        _own.clear()
    if mine:
        process_ends(exit_is_clean())
    for client in mine:
        client.close()
