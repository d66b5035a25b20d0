"""A broker in a process of its own, gone with the process that started it.

The process that starts it (a ``Manager()``'s creator) keeps no thread for it: a
creator busy in Python cannot stall anyone else's shared-state operations, and a later
``os.fork()`` is as safe as with the standard library's manager, whose server is a
process too.

How it starts:

- If this process is single-threaded, ``os.fork()`` (a few milliseconds; the broker
  process starts its threads only after the fork).
- Otherwise (forking a threaded process can deadlock the child) a *launcher* forks it:
  a fresh interpreter, exec'd once per process (~200 ms) and kept for the next broker,
  single-threaded forever, which forks a broker per request (a few milliseconds), as
  ``multiprocessing``'s forkserver does. It exits when its starter closes its socket.

Either way the starter's connection is one end of a socketpair made before the broker
existed, so it needs no connect and no handshake; other processes connect to the
broker's socket with the key. The broker stops when the *life pipe* reaches EOF: only the
starter holds its write end (a process forked from the starter later closes its copy at
once), so a starter that dies, even by SIGKILL, takes its broker with it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pickle
import select
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import BrokerUnavailable
from .._io import _deadline
from .._io import _paths
from .._io._forking import exited, fork_is_safe, reap

__all__ = ["BrokerProcess", "Config", "discard_launcher", "launcher", "read_line", "start"]

# How long a broker process may take to listen (an exec'd one imports mpmesh first).
START_TIMEOUT_S: Final = 30.0
# How long it may take to exit once told to stop before it is killed.
STOP_TIMEOUT_S: Final = 5.0

# Life pipes' write ends this process holds, by the pid that made them: a process forked
# from this one must not keep them, or its broker would outlive the starter.
_life_fds: dict[int, int] = {}
_life_lock = threading.Lock()


def _drop_inherited_life_pipes() -> None:
    global _launcher
    if _launcher is not None:
        _launcher.sock.close()
        _launcher = None
    for fd in list(_life_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _life_fds.clear()


os.register_at_fork(after_in_child=_drop_inherited_life_pipes)


@dataclass(frozen=True)
class Config:
    """What a broker process serves: passed by fork, or pickled to an exec'd one."""

    name: str
    authkey: bytes
    host_name: str = "manager"
    address: object = None
    registry: dict[str, Any] | None = None  # a Manager's typeids (the object table's)
    sys_path: list[str] = field(default_factory=list)  # for an exec'd one: where imports come from
    cwd: str = ""
    near_cache: bool = True  # hand local peers the version table (``_segment``)
    # Build the broker only when someone first connects (a Master's state broker: a mesh
    # that never uses shared state then costs one idle forked process, no start-up work).
    lazy: bool = False


@dataclass(eq=False)
class BrokerProcess:
    """A running broker process: its pid, its address, and our end of the socketpair."""

    pid: int
    address: str | tuple[str, int]
    sock: socket.socket
    life_w: int
    paths: tuple[str, ...] = ()  # its socket and key files, removed here if it could not
    exitcode: int | None = None  # once stopped, as ``multiprocessing.Process`` reports it
    _stopped: bool = False
    _status: tuple[int, str, float] | None = None  # (status pipe, name, timeout) until ready()

    @property
    def name(self) -> str:
        return f"mpmesh-broker-{self.pid}"

    def is_alive(self) -> bool:
        return self.exitcode is None and not exited(self.pid, 0)

    def join(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout``) for the broker process to exit; it does once stopped."""
        if self.exitcode is not None:
            return
        if timeout is not None:
            exited(self.pid, timeout)
            return
        while not exited(self.pid, STOP_TIMEOUT_S):
            pass  # no deadline asked for: as Process.join(), wait as long as it runs

    def ready(self) -> None:
        """Wait until the broker listens (once); raise what kept it from starting.

        Raises:
            BrokerUnavailable: it could not start (its error says why).
            OSError: its address was taken, or another error binding it.
        """
        if self._status is None:
            return
        status_r, name, timeout = self._status
        self._status = None
        try:
            line = read_line(status_r, _deadline.after(timeout))
        finally:
            os.close(status_r)
        if not line.startswith("ok "):
            self.stop(0)
            self.sock.close()
            reason = line.removeprefix("error ").strip() or "it exited before it listened"
            if reason.startswith("OSError "):
                raise OSError(reason.removeprefix("OSError "))
            raise BrokerUnavailable(f"the broker process for {name!r} did not start: {reason}")
        address = json.loads(line[3:])
        self.address = tuple(address) if isinstance(address, list) else address
        self.paths = (_paths.key_path(name), *((address,) if isinstance(address, str) else ()))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close the life pipe (the broker stops and removes its files), reap it, and kill it
        if it has not exited within ``timeout``. Idempotent; a forked copy does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._status is not None:
            os.close(self._status[0])
            self._status = None
        self.sock.close()  # if no client took it over (a Master that never shared state)
        with _life_lock:
            owned = _life_fds.pop(self.life_w, None) == os.getpid()
        if not owned:
            return  # a forked copy of the starter: not ours to stop
        os.close(self.life_w)
        self.exitcode = reap(self.pid, timeout)
        for path in self.paths:  # a broker that was killed left them
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def kill(self) -> None:
        """SIGKILL the broker process (tests use it to play a crash)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(config: Config, *, timeout: float = START_TIMEOUT_S, listener: socket.socket | None = None,
          wait: bool = True) -> BrokerProcess:
    """Start a broker process for ``config``; with ``wait``, return once it listens.

    ``listener``: a socket the caller already bound at ``config.address`` (and whose key
    file it wrote): the broker serves it, and connections made before it runs wait in its
    backlog, so the caller need not wait (``wait=False``; ``ready()`` then tells whether
    it started).

    Raises:
        BrokerUnavailable: it could not start (its error says why).
        OSError: the address was taken, or another error binding it.
    """
    ours, theirs = socket.socketpair()
    life_r, life_w = os.pipe()
    status_r, status_w = os.pipe()
    fds = (theirs.fileno(), life_r, status_w, *(() if listener is None else (listener.fileno(),)))
    try:
        if fork_is_safe():
            pid = _fork(config, fds, (ours.fileno(), life_w, status_r))
        else:
            pid = _exec(config, fds)
    except BaseException:
        for fd in (life_r, life_w, status_r, status_w):
            os.close(fd)
        ours.close()
        theirs.close()
        raise
    theirs.close()
    os.close(life_r)
    os.close(status_w)
    with _life_lock:
        _life_fds[life_w] = os.getpid()
    proc = BrokerProcess(pid, config.address if listener is not None else "", ours, life_w)  # type: ignore[arg-type]
    proc._status = (status_r, config.name, timeout)
    if listener is not None and isinstance(config.address, str):
        proc.paths = (_paths.key_path(config.name), config.address)
    if wait or listener is None:
        proc.ready()
    return proc


def _fork(config: Config, fds: tuple[int, ...], close: tuple[int, ...]) -> int:
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:  # the broker process: never returns into the caller's code
        for fd in close:
            os.close(fd)
        status = serve(config, *fds)
    except BaseException:  # noqa: BLE001 - nothing may escape into the starter's stack
        pass
    finally:
        os._exit(status)


class _Launcher:
    """Our end of the launcher's socket; one request at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-c", "from mpmesh._host._process import launcher; launcher(3)"]
        try:
            self.pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.owner = os.getpid()
        self.lock = threading.Lock()

    def fork(self, config: Config, fds: tuple[int, ...]) -> int:
        """Have the launcher fork a broker serving ``config`` on ``fds``; its pid."""
        blob = _dumps(config)
        with self.lock:
            self.sock.settimeout(START_TIMEOUT_S)
            socket.send_fds(self.sock, [len(blob).to_bytes(8, "big")], list(fds))
            self.sock.sendall(blob)
            answer = _recv_exact(self.sock, 8)
        return int.from_bytes(answer, "big")

    def close(self) -> None:
        self.sock.close()  # it exits on EOF
        reap(self.pid, STOP_TIMEOUT_S)


_launcher: _Launcher | None = None


def _exec(config: Config, fds: tuple[int, ...]) -> int:
    global _launcher
    with _life_lock:
        if _launcher is None or _launcher.owner != os.getpid():
            _launcher = _Launcher()
        launcher_ = _launcher
    try:
        return launcher_.fork(config, fds)
    except (OSError, ConnectionError) as exc:
        with _life_lock:
            if _launcher is launcher_:
                _launcher = None
        launcher_.sock.close()
        raise BrokerUnavailable(f"the broker launcher failed: {exc}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker launcher exited")
        data += chunk
    return data


def discard_launcher() -> None:
    """Stop this process's launcher, if any (at exit; tests call it to account for processes)."""
    global _launcher
    launcher_, _launcher = _launcher, None
    if launcher_ is not None and launcher_.owner == os.getpid():
        launcher_.close()


atexit.register(discard_launcher)


def _dumps(config: Config) -> bytes:
    """The config for an exec'd broker: dill where a registered typeid's callable needs it."""
    try:
        return pickle.dumps(config)
    except Exception:  # noqa: BLE001 - e.g. a typeid callable defined in __main__
        import dill
        return dill.dumps(config, recurse=True)  # type: ignore[no-any-return]


def serve(config: Config, sock_fd: int, life_r: int, status_w: int, listener_fd: int = -1) -> int:
    """Run the broker in this (new) process until the life pipe closes; exit status."""
    from .._broker._objects import COMPONENT, ObjectTable
    from .._client._binding import bind
    from ._inproc import BrokerHost

    if config.lazy and listener_fd >= 0:
        # The address is the starter's own choice: it may connect at once.
        _write(status_w, "ok " + json.dumps(config.address))
        os.close(status_w)
        status_w = -1
        if not _first_use(listener_fd, sock_fd, life_r):
            # The starter is gone before anyone used us: its files are ours to remove.
            for path in (config.address, _paths.key_path(config.name)):
                if isinstance(path, str):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            return 0
    try:
        listener = None if listener_fd < 0 else socket.socket(fileno=listener_fd)
        host = BrokerHost(config.name, config.authkey, host_name=config.host_name,
                          address=config.address, listener=listener,  # type: ignore[arg-type]
                          near_cache=config.near_cache)
    except OSError as exc:
        _write(status_w, f"error OSError {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the starter, which raises it
        _write(status_w, f"error {type(exc).__name__}: {exc}")
        return 1
    table = host.core.components.get(COMPONENT)
    if isinstance(table, ObjectTable):
        table.address = host.address
        if config.registry is not None:
            table.registry = dict(config.registry)
    # Proxies that user code gets here (a Pool's callbacks, a Barrier's action, a registered
    # type's arguments) call this broker in-process, not through its socket and key.
    bind(host.address, host.client)
    host.loop.adopt(socket.socket(fileno=sock_fd))
    threading.Thread(target=_watch_life, args=(life_r, host), name="mpmesh-life", daemon=True).start()
    if status_w >= 0:
        _write(status_w, "ok " + json.dumps(host.address))
        os.close(status_w)
    try:
        # Ctrl-C reaches the whole foreground group; the starter stops us in its own time.
        host.serve_forever(stop_on=(signal.SIGTERM,))
    finally:
        host.close()
    return 0


def _first_use(listener_fd: int, sock_fd: int, life_r: int) -> bool:
    """Wait until a peer connects or the starter speaks on its socketpair (True), or the
    starter is gone (False)."""
    while True:
        try:
            ready, _, _ = select.select([listener_fd, sock_fd, life_r], [], [])
        except InterruptedError:
            continue
        if life_r in ready:
            try:
                if not os.read(life_r, 64):
                    return False
            except OSError:
                return False
        if listener_fd in ready or sock_fd in ready:
            return True


def _watch_life(life_r: int, host: Any) -> None:
    """Stop the broker when the starter's end of the life pipe closes (it exited or died)."""
    while True:
        try:
            if not os.read(life_r, 64):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    host.loop.stop()


def _write(fd: int, line: str) -> None:
    try:
        os.write(fd, line.encode() + b"\n")
    except OSError:
        pass


def read_line(fd: int, deadline: float) -> str:
    """One status line from a process we started (what came, if it ends or time runs out)."""
    data = b""
    while not data.endswith(b"\n"):
        timeout = _deadline.remaining(deadline)
        if timeout == 0 or not select.select([fd], [], [], timeout)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def launcher(fd: int) -> None:
    """The launcher's main loop: fork a broker for each request on socket ``fd`` until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the brokers we fork
    ctl = socket.socket(fileno=fd)
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(ctl, 8, 4)
            if len(head) < 8 or len(fds) not in (3, 4):
                break
            raw = _recv_exact(ctl, int.from_bytes(head, "big"))
        except OSError:
            break
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ctl.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                status = _serve_exec(raw, *fds)
            finally:
                os._exit(status)
        for passed in fds:
            os.close(passed)
        ctl.sendall(pid.to_bytes(8, "big"))
    sys.exit(0)


def _serve_exec(raw: bytes, *fds: int) -> int:
    """A broker forked by the launcher: the starter's import path and directory, then serve."""
    try:
        config: Config = pickle.loads(raw)
    except Exception:  # noqa: BLE001 - dill-made (see _dumps)
        import dill
        config = dill.loads(raw)
    if config.sys_path:
        sys.path[:] = config.sys_path
    if config.cwd:
        try:
            os.chdir(config.cwd)
        except OSError:
            pass
    return serve(config, *fds)
