"""``mpmesh.connect()``: join a named mesh from any process, or start a standalone broker.

A mesh named ``x`` listens at ``<runtime dir>/x.sock`` and leaves its authkey in
``x.key`` (mode 0600, in a 0700 directory: only this user can read it). ``connect``
reads that key unless given one, and says Hello as a ``CLIENT``.

With ``autospawn=True`` and no broker answering, it starts ``python -m mpmesh serve
--name x`` as a detached process (its own session: a terminal's Ctrl-C does not reach
it) and waits for its "ready" line. Concurrent autospawns of one user are serialized
by an advisory lock on the runtime directory, so two processes never race to bind the
same socket. The broker runs until ``python -m mpmesh stop --name x``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from .._broker._actions import Notify
from .._broker._admin import STOP_EVENT, Admin
from .._client import _near
from .._client._base import ClientBase, make_hello
from .._client._binding import read_key
from .._client._socket import DEFAULT_TIMEOUT_S, SocketClient
from .._errors import BrokerUnavailable
from .._host._process import read_line
from .._io import _deadline
from .._io import _paths
from .._redis._handle import RedisHandle
from .._redis._link import Link, backend_from_env, shared_authkey
from .._redis._remote import Remote
from .._state._shared import SharedState
from .._wire._messages import ErrorCode, Failure, Message, Request, Role

__all__ = ["MeshHandle", "connect", "serve"]

# How long an autospawned broker gets to say it is ready.
SPAWN_TIMEOUT_S: Final = 15.0
READY_PREFIX: Final = "mpmesh-ready"
# Brokers this process started, by pid, reaped once they exit (no zombies). Not Popen
# objects: a detached broker outlives us by design, and a Popen collected while its
# process runs warns that it leaked.
_spawned: set[int] = set()


class MeshHandle(SharedState):
    """A process's connection to a mesh it joined with ``mpmesh.connect()``.

    Offers the mesh's shared state (``cache``, ``lock``, ``subscribe``, ``call``,
    ``nodes``...) plus requests to the mesh's children and groups. Close it, or use it
    as a context manager.
    """

    _remote: Remote | None

    def __init__(self, name: str, address: str, client: SocketClient, *, timeout: float | None,
                 spawned: bool) -> None:
        self.name = name
        self.address = address
        self.timeout = timeout
        self.spawned = spawned
        self._client = client
        self.instance_id = client.instance_id
        self.pid = os.getpid()

    def request(self, action: str, target: str | int, data: object = None, *,
                timeout: float | None = None, priority: int = 0) -> concurrent.futures.Future[Any]:
        """Send a request to a child, a group, a node's instance id, or ``""`` (the master)."""
        _deadline.check_timeout(timeout)
        host = self._other_host(target)
        if host is not None:
            assert self._remote is not None
            return self._remote.send(host, action, target, data, priority=priority,
                                     timeout=self.timeout if timeout is None else timeout)
        return self._client.request(action, target, data, timeout=self.timeout if timeout is None else timeout,
                                    priority=priority)

    def send_request(self, action: str, target: str | int, data: object = None, *,
                     timeout: float | None = None, priority: int = 0) -> object:
        """``request`` and wait for the result (errors as in ``Master.send_request``)."""
        _deadline.check_timeout(timeout)
        host = self._other_host(target)
        if host is not None:
            assert self._remote is not None
            return self._remote.ask(host, action, target, data, priority=priority,
                                           timeout=self.timeout if timeout is None else timeout)
        return self._client.call(action, target, data, timeout=self.timeout if timeout is None else timeout,
                                 priority=priority)

    def _open_state_conn(self) -> ClientBase:
        """This process's connection to the mesh's state broker, with the handle's timeout."""
        client = super()._open_state_conn()
        client.timeout = self.timeout
        return client

    def _other_host(self, target: str | int) -> int | None:
        """The node of another host a request for ``target`` goes to (a mesh across
        hosts, and this host's Master does not serve it); None: this host's broker."""
        remote = self._remote
        if remote is None or target == "":
            return None
        here = remote.record_of(self.instance_id)
        if here is not None and remote.serves(here, target):
            return None
        return remote.host_for(target, free_only=False)

    def close(self) -> None:
        """Leave the mesh (idempotent); locks this process holds are released."""
        if self._remote is not None:
            self._remote.close()
        self._client.close()

    def __enter__(self) -> MeshHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpmesh mesh {self.name!r} as instance {self.instance_id}>"


def connect(name: str = "default", *, authkey: bytes | None = None, autospawn: bool = True,
            timeout: float | None = DEFAULT_TIMEOUT_S, near_cache_bytes: int | None = None,
            backend: str | None = None) -> MeshHandle | RedisHandle:
    """Join mesh ``name`` from any process of this user; start its broker if needed.

    ``timeout`` is the default of ``call`` and ``send_request`` on the handle, and of
    every other blocking call of it: an operation on shared state that gets no answer in
    ``timeout`` raises RequestTimeout, and a call that waits by design (``lock()``) ends
    with BrokerUnavailable if the broker stays silent that long (None: requests and
    operations wait as long as the broker is alive). ``near_cache_bytes`` bounds the
    copies of shared state this process keeps (64 MiB).

    ``backend`` (or ``$MPMESH_BACKEND``): the Redis of a mesh across hosts. The handle
    joins through this host's Master when one runs here, and through Redis alone when
    none does (no broker is started then); its key is ``authkey``, else this host's
    mesh's key file, else ``$MPMESH_AUTHKEY``.

    Raises:
        BrokerUnavailable: no broker answers (and ``autospawn`` is False).
        AuthenticationError: ``authkey`` is not the mesh's.
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a mesh name must be a non-empty str without '/', not {name!r}")
    if authkey is not None and not isinstance(authkey, (bytes, bytearray)):
        raise TypeError("authkey must be bytes")
    _deadline.check_timeout(timeout)
    if near_cache_bytes is not None:
        _near.set_budget(near_cache_bytes)
    address = _paths.socket_path(name)
    backend = backend_from_env(backend)
    if backend is not None:
        if not os.path.exists(address):
            return RedisHandle(name, backend, bytes(authkey) if authkey else shared_authkey(), timeout=timeout)
        autospawn = False  # the mesh is this host's Master's
    try:
        client = _open(address, authkey, timeout)
        spawned = False
    except BrokerUnavailable:
        if not autospawn:
            raise
        with _spawn_lock(_deadline.after(SPAWN_TIMEOUT_S)):
            try:  # someone may have started it while we waited for the lock
                client = _open(address, authkey, timeout)
                spawned = False
            except BrokerUnavailable:
                _spawn(name, authkey)
                client = _open(address, authkey, timeout)
                spawned = True
    handle = MeshHandle(name, address, client, timeout=timeout, spawned=spawned)
    if backend is not None:
        key = bytes(authkey) if authkey is not None else read_key(address)
        try:
            handle._remote = Remote(Link(backend, name, key, timeout=timeout), handle.instance_id,
                                    role="client", name=client.name)
        except BaseException:
            client.close()
            raise
    return handle


def _open(address: str, authkey: bytes | None, timeout: float | None) -> SocketClient:
    if not os.path.exists(address):
        raise BrokerUnavailable(f"no mesh listens at {address}")
    key = bytes(authkey) if authkey is not None else read_key(address)
    return SocketClient(address, key, make_hello(Role.CLIENT), timeout=timeout)


@contextlib.contextmanager
def _spawn_lock(deadline: float) -> Iterator[None]:
    """An advisory lock on the runtime directory (no extra file to clean up)."""
    fd = os.open(_paths.runtime_dir(), os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if _deadline.expired(deadline):
                    raise BrokerUnavailable("timed out waiting for another process's broker start") from None
                time.sleep(0.01)  # the lock's holder is bounded by SPAWN_TIMEOUT_S
        yield
    finally:
        os.close(fd)  # also releases the lock


def _reap_spawned() -> None:
    for pid in list(_spawned):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _spawned.discard(pid)


def _spawn(name: str, authkey: bytes | None) -> None:
    """Start a detached ``python -m mpmesh serve`` (its own session; it moves to ``/``) and
    wait until it listens."""
    _reap_spawned()
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "mpmesh", "serve", "--name", name, "--detached"]
    if authkey is not None:
        argv.append("--authkey-stdin")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        pid = os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2)])
    except BaseException:
        for fd in (in_w, out_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, devnull):
            os.close(fd)
    _spawned.add(pid)
    try:
        if authkey is not None:
            os.write(in_w, bytes(authkey).hex().encode() + b"\n")  # a line: the pipe takes it whole
    except OSError:
        pass  # it exited already; the missing ready line says so
    finally:
        os.close(in_w)
    try:
        line = read_line(out_r, _deadline.after(SPAWN_TIMEOUT_S))
    finally:
        os.close(out_r)
    if not line.startswith(READY_PREFIX):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        _spawned.discard(pid)
        raise BrokerUnavailable(f"the standalone broker for mesh {name!r} did not start "
                                f"(exit status {os.waitstatus_to_exitcode(status)}); run `python -m mpmesh "
                                f"serve --name {name}` to see why")


# -- the standalone broker ------------------------------------------------------------------

def serve(name: str, authkey: bytes | None = None, *, ready: Any = None) -> int:
    """Run a standalone broker for mesh ``name`` in this thread until stopped; exit status.

    ``ready``, if given, is called once the broker listens.
    """
    from .._host._inproc import BrokerHost

    holder: list[BrokerHost] = []

    def on_notify(notes: list[Notify]) -> None:
        if any(note.event == STOP_EVENT for note in notes) and holder:
            holder[0].loop.stop()

    host = BrokerHost(name, authkey or os.urandom(32), host_name="broker", on_notify=on_notify)
    holder.append(host)

    def no_master(msg: Message) -> None:
        # Requests to the mesh's master ("") come here, where nobody serves them.
        if type(msg) is Request:
            host.client._send(Failure(msg.rid, ErrorCode.NO_HANDLER,
                                      "this mesh has no master to serve requests "
                                      "(its broker is a standalone one)", b""))

    host.deliver_to(no_master)
    admin = host.core.components.get("admin")
    if isinstance(admin, Admin):
        admin.standalone = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # outlive the terminal that started us
    try:
        if ready is not None:
            ready()
        host.serve_forever()
    finally:
        host.close()
    return 0
