"""This process's one client per broker address: the registry every proxy asks.

A ``Cache`` or ``LockGrant`` pickled into another process rebuilds itself there from
``(mesh address, name)`` only, and a Manager proxy from its token's address; on first
use each asks ``client_for(address)`` for this process's connection to that broker: the
Master's in-process client in the master, the ``Child``'s connection in a child, the
handle's connection after ``mpmesh.connect()``, a Manager's own client. Whoever owns a
connection binds it here (``bind``). A process with no binding for the address (a plain
``multiprocessing.Process``, say) gets one connection of its own, opened with the key
file of the private runtime directory (or, for a Manager with no key file, the given or
the process's ``authkey``), and closed at exit.

Entries remember the pid that bound them, so a forked process never uses its parent's.
"""

from __future__ import annotations

import atexit
import errno
import os
import stat
import threading
import weakref

from .._errors import AuthenticationError, BrokerUnavailable
from .._wire._messages import Role
from ._base import ClientBase, make_hello
from ._exit import exit_is_clean, process_ends
from ._socket import SocketClient

__all__ = ["bind", "client_for", "read_key", "unbind"]

Address = object  # a Unix socket path, or a (host, port) pair for a Manager over TCP

_lock = threading.Lock()
_bound: dict[object, tuple[int, weakref.ref[ClientBase]]] = {}
_own: dict[object, tuple[int, SocketClient]] = {}
_atexit_armed = False


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def _key(address: Address) -> object:
    return tuple(address) if isinstance(address, list) else address


def bind(address: Address, client: ClientBase) -> None:
    """Make ``client`` this process's connection to the broker at ``address``."""
    with _lock:
        _bound[_key(address)] = (os.getpid(), weakref.ref(client))


def unbind(address: Address, client: ClientBase | None = None) -> None:
    """Forget the binding for ``address`` (only if it is still ``client``, when given)."""
    key = _key(address)
    with _lock:
        entry = _bound.get(key)
        if entry is not None and (client is None or entry[1]() is client):
            del _bound[key]


def client_for(address: Address, authkey: bytes | None = None) -> ClientBase:
    """This process's client for the broker at ``address``, connecting one if needed
    (with the key file of a mesh, else ``authkey``).

    A bound client is used while it lives; a socket connection that broke is replaced
    (an in-process one that closed stays: its mesh was shut down, and says so)."""
    entry = _bound.get(_key(address))
    if entry is not None and entry[0] == os.getpid():
        client = entry[1]()
        if client is not None and (client._closed is None or not isinstance(client, SocketClient)):
            return client
    return _own_client(address, authkey)


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


def _own_client(address: Address, authkey: bytes | None) -> ClientBase:
    global _atexit_armed
    key = _key(address)
    pid = os.getpid()
    with _lock:
        entry = _own.get(key)
        if entry is not None and entry[0] == pid:
            if entry[1]._closed is None:
                return entry[1]
            entry[1].close()  # a broken one: free its socket
        client = SocketClient(address, _key_for(address, authkey), make_hello(Role.CLIENT))  # type: ignore[arg-type]
        _own[key] = (pid, client)
        _bound[key] = (pid, weakref.ref(client))
        if not _atexit_armed:
            atexit.register(_close_own)
            _atexit_armed = True
        return client


def _key_for(address: Address, authkey: bytes | None) -> bytes:
    """The key file next to a socket path, else ``authkey`` (a Manager's)."""
    if isinstance(address, str):
        try:
            return read_key(address)
        except BrokerUnavailable:
            if authkey is None:
                raise
    if authkey is None:
        raise BrokerUnavailable(f"no key for the broker at {address!r}")
    return authkey


def _close_own() -> None:
    """At exit: close this process's own connections, with a Goodbye if it ends cleanly."""
    pid = os.getpid()
    with _lock:
        mine = [client for owner, client in _own.values() if owner == pid]
        _own.clear()
    if mine:
        process_ends(exit_is_clean())
    for client in mine:
        client.close()
