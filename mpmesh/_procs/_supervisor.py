"""Process lifecycle: start children, learn how they end, stop them in order.

How a child starts depends on the start method:

- ``fork``: the zygote (``_io/_zygote.py``) forks it; the Master itself never forks
  once it runs threads. Script and module targets are forked and exec'd there too.
- ``spawn`` / ``forkserver``: ``multiprocessing`` starts it from the Master (both are
  safe from a threaded process).

Either way the broker loop learns of an exit without polling: the zygote reports it on
a socket, a ``multiprocessing`` child's sentinel becomes readable. ``on_exit(name, pid,
exitcode)`` then runs on the loop thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from .._client._futures import dispatcher
from .._errors import MeshError
from .._io import _zygote
from .._io._forking import close_quietly, fork_is_safe, reap
from .._io._spare import ZYGOTE_EXIT_S, Spare, park_spare, reap_zygote, take_spare
from .._wire import _codec
from .._wire._frames import FrameDecoder
from ._child import process_main, run_target

__all__ = ["ChildSpec", "ReaderLoop", "Supervisor", "default_start_method", "describe_exit"]

log = logging.getLogger("mpmesh")

START_METHODS: Final = ("fork", "spawn", "forkserver")
SPAWN_TIMEOUT_S: Final = 30.0


class ReaderLoop(Protocol):
    """The event loop a Supervisor listens on: a broker's, or a standalone pool's."""

    def add_reader(self, fd: int, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` on the loop's thread whenever ``fd`` is readable (None removes)."""


def default_start_method() -> str:
    """The start method ``multiprocessing`` would use, without fixing its context."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method:
        return method
    if sys.platform == "linux":
        return "fork" if sys.version_info < (3, 14) else "forkserver"
    return "spawn"


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> ``"died with SIGKILL"``, ``1`` -> ``"exited with code 1"``."""
    if exitcode is None:
        return "closed its connection"
    if exitcode < 0:
        try:
            return f"died with {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died with signal {-exitcode}"
    return f"exited with code {exitcode}"


# Every supervisor of this process with a zygote. A process forked from ours by anyone
# (multiprocessing's fork, a ProcessPoolExecutor) must not keep their ends of the zygote's
# pipes: the zygote learns that its master is gone, or done, from those pipes' EOF (the
# parked spare's are ``_io/_spare``'s to drop).
_with_zygote: weakref.WeakSet[Supervisor] = weakref.WeakSet()


def _drop_inherited_zygotes() -> None:
    for sup in list(_with_zygote):
        sup._disown_zygote()
    _with_zygote.clear()


os.register_at_fork(after_in_child=_drop_inherited_zygotes)


@dataclass
class ChildSpec:
    """Everything needed to start (and restart) a child the same way."""

    name: str
    target: Callable[..., Any] | str
    mode: str
    group: str | None
    max_concurrency: int
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] | None = None
    auto_restart: bool = True
    start_method: str = "fork"


@dataclass(eq=False)
class _Proc:
    name: str
    pid: int
    mp: multiprocessing.process.BaseProcess | None = None
    exitcode: int | None = None
    reported: bool = False


class Supervisor:
    """Starts children and turns their exits into ``on_exit`` calls on the loop thread."""

    def __init__(self, mesh: dict[str, Any], cleanup: list[str],
                 on_exit: Callable[[str, int, int], None]) -> None:
        """``cleanup``: files of ours the zygote removes when it ends (see ``remove_at_end``)."""
        self._mesh = mesh  # address, authkey, timeout: what every child needs
        self._cleanup = _zygote.identify(cleanup)
        self._on_exit = on_exit
        self._loop: ReaderLoop | None = None
        self._procs: dict[str, _Proc] = {}
        self._by_pid: dict[int, _Proc] = {}
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._starting: dict[int, tuple[str, concurrent.futures.Future[int]]] = {}
        self._ctl_w = self._report_r = self._life_w = -1
        self._zygote_pid = 0
        self._zygote_popen: subprocess.Popen[bytes] | None = None
        self._reports = FrameDecoder()
        self._report_fds: collections.deque[int] = collections.deque()  # came before their report
        self._adopt: Callable[[socket.socket, int], None] | None = None
        self.exited = threading.Condition(self._lock)

    # -- the zygote ---------------------------------------------------------------------

    def fork_zygote_if_safe(self, private_fds: tuple[int, ...] = ()) -> bool:
        """Fork the zygote now, if this process is single-threaded (fast path).

        ``private_fds`` are descriptors of ours the zygote (and so every child) must not keep.
        """
        dispatcher.retire()  # our own idle callback thread must not cost the fast path
        if not fork_is_safe():
            return False
        ctl_r, ctl_w = os.pipe()
        report_r, report_w = _zygote.channel()
        life_r, life_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the zygote
            for fd in (ctl_w, report_r, life_w, *private_fds):
                os.close(fd)
            _zygote.serve(ctl_r, report_w, life_r, self._cleanup)
        for fd in (ctl_r, report_w, life_r):
            os.close(fd)
        self._adopt_zygote(ctl_w, report_r, life_w)
        self._zygote_pid = pid
        return True

    def ensure_zygote(self) -> None:
        """Make sure a zygote runs: it also cleans up after a Master killed with SIGKILL."""
        if self._ctl_w < 0:
            with self._lock:
                if self._ctl_w < 0 and not self._adopt_spare():
                    self._exec_zygote()

    def _adopt_spare(self) -> bool:
        spare = take_spare()
        if spare is None:
            return False
        self._adopt_zygote(*spare.fds)
        self._zygote_popen = spare.popen
        self._brief_zygote()  # the working directory, import path and files are this mesh's now
        return True

    def remove_at_end(self, paths: list[str]) -> None:
        """Have the zygote remove ``paths`` when it ends (a master killed with SIGKILL
        leaves nothing behind), as they are now: a file that another mesh of the same name
        later puts in their place is left alone. Name only files that are ours already."""
        with self._lock:  # the lock a spawning thread writes to ctl_w under
            self._cleanup = _zygote.identify(paths)
            if self._ctl_w >= 0:
                try:
                    _zygote.write_frame(self._ctl_w, ("cleanup", self._cleanup))
                except OSError:
                    pass  # the zygote is gone: it removes nothing now

    def _brief_zygote(self) -> None:
        """Tell an exec'd zygote this mesh's import path, working directory and files to
        remove, and listen for its reports."""
        _zygote.write_frame(self._ctl_w, ("init", list(sys.path), os.getcwd(), self._cleanup))
        if self._loop is not None:
            self._loop.add_reader(self._report_r, self._on_report)

    def _exec_zygote(self) -> None:
        ctl_r, ctl_w = os.pipe()
        report_r, report_w = _zygote.channel()
        life_r, life_w = os.pipe()
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        try:
            self._zygote_popen = subprocess.Popen(
                [sys.executable, "-c", "from mpmesh._io._zygote import main; main()",
                 str(ctl_r), str(report_w), str(life_r)],
                pass_fds=(ctl_r, report_w, life_r), env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            for fd in (ctl_r, report_w, life_r):
                os.close(fd)
        self._adopt_zygote(ctl_w, report_r, life_w)
        self._brief_zygote()

    def _adopt_zygote(self, ctl_w: int, report_r: int, life_w: int) -> None:
        for fd in (ctl_w, report_r, life_w):
            os.set_inheritable(fd, False)  # exec drops them; a plain fork: _drop_inherited_zygotes
        self._ctl_w, self._report_r, self._life_w = ctl_w, report_r, life_w
        _with_zygote.add(self)

    def _disown_zygote(self) -> None:
        """In a forked copy of this process: close our copies of the zygote's pipes and
        forget it (it is the original's to stop and reap)."""
        for fd in (self._ctl_w, self._report_r, self._life_w, *self._report_fds):
            if fd >= 0:
                close_quietly(fd)
        self._ctl_w = self._report_r = self._life_w = -1
        self._report_fds.clear()
        self._zygote_pid = 0
        self._zygote_popen = None

    def attach(self, loop: ReaderLoop, adopt: Callable[[socket.socket, int], None] | None = None) -> None:
        """Start listening for exits on ``loop`` (called once the loop exists). ``adopt``
        takes the broker's end of a forked mesh child's connection, and the child's pid, on
        the loop's thread (a supervisor without a broker closes it: its children have no
        mesh to join)."""
        self._loop = loop
        self._adopt = adopt
        if self._report_r >= 0:
            loop.add_reader(self._report_r, self._on_report)

    def _on_report(self) -> None:
        try:
            data, fds = _zygote.read_report(self._report_r)
        except BlockingIOError:
            return
        self._report_fds.extend(fds)
        if not data:
            assert self._loop is not None
            self._loop.add_reader(self._report_r, None)
            with self._lock:  # a spawning thread writes to ctl_w and records its start under it
                died = self._ctl_w >= 0  # not our own close(): the zygote died under us
                if died:
                    os.close(self._ctl_w)
                    os.close(self._report_r)
                    self._ctl_w = self._report_r = -1
                starting, self._starting = self._starting, {}
            if died:
                log.error("the zygote (fork server) died; children it started are no longer supervised")
            for _, fut in starting.values():
                fut.set_exception(MeshError("the zygote (fork server) died before starting the child"))
            return
        proc: _Proc | None
        for report in _zygote.read_frames(self._reports, data):
            kind = report[0]
            if kind == "started":
                _, token, pid, connected = report
                if connected:
                    self._serve_child(self._report_fds.popleft(), pid)
                with self._lock:
                    name, fut = self._starting.pop(token)
                    proc = _Proc(name, pid)
                    self._procs[name] = self._by_pid[pid] = proc
                fut.set_result(pid)
            elif kind == "failed":
                _, token, text = report
                with self._lock:
                    _, fut = self._starting.pop(token)
                fut.set_exception(MeshError(text))
            elif kind == "exited":
                _, pid, code = report
                proc = self._by_pid.get(pid)
                if proc is not None:
                    self._exit(proc, code)

    def _serve_child(self, fd: int, pid: int) -> None:
        """Hand the broker's end of forked child ``pid``'s socketpair to the broker."""
        sock = socket.socket(fileno=fd)
        if self._adopt is None:
            sock.close()  # the child then finds its connection closed, and exits
        else:
            self._adopt(sock, pid)

    # -- starting ---------------------------------------------------------------------------

    def start(self, spec: ChildSpec) -> int:
        """Start the child described by ``spec``; return its pid."""
        return self.wait_started(spec.name, self.launch(spec))

    @staticmethod
    def wait_started(name: str, fut: concurrent.futures.Future[int]) -> int:
        try:
            return fut.result(SPAWN_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise MeshError(f"child {name!r} did not start within {SPAWN_TIMEOUT_S:g} s") from None

    def launch(self, spec: ChildSpec) -> concurrent.futures.Future[int]:
        """Start the child described by ``spec``; the future resolves to its pid."""
        config = {**self._mesh, "name": spec.name, "group": spec.group, "mode": spec.mode,
                  "max_concurrency": spec.max_concurrency, "env": spec.env}
        if isinstance(spec.target, str):
            return self._start_script(spec, config)
        config["target"] = _codec.dumps_by_value((spec.target, spec.args, spec.kwargs))
        if spec.start_method == "fork":
            config["zygote"] = True  # it ends the child if this process dies
            return self._via_zygote(spec.name, ("fork", 0, config, run_target))
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        ctx = multiprocessing.get_context(spec.start_method)
        blob = _codec.dumps(config)
        proc = ctx.Process(target=process_main, args=(blob,), name=f"mpmesh:{spec.name}")  # type: ignore[attr-defined]
        with _environ(spec.env):
            proc.start()
        assert proc.pid is not None and self._loop is not None
        record = _Proc(spec.name, proc.pid, mp=proc)
        with self._lock:
            self._procs[spec.name] = self._by_pid[proc.pid] = record
        self._loop.add_reader(proc.sentinel, lambda: self._on_sentinel(record))
        done.set_result(proc.pid)
        return done

    def _start_script(self, spec: ChildSpec, config: dict[str, Any]) -> concurrent.futures.Future[int]:
        target = str(spec.target)
        if target.endswith(".py") or os.sep in target:
            if not os.path.exists(target):
                raise ValueError(f"no script at {target!r}")
            argv = [sys.executable, os.path.abspath(target)]
        else:
            argv = [sys.executable, "-m", target]
        argv += [str(arg) for arg in spec.args]
        env = {**os.environ, **(spec.env or {})}
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        # The config (the authkey with it) goes through a descriptor the zygote makes,
        # not the environment, which every process the script starts would inherit.
        return self._via_zygote(spec.name, ("exec", 0, argv, env, os.getcwd(), _codec.dumps(config)))

    def _via_zygote(self, name: str, cmd: tuple[Any, ...]) -> concurrent.futures.Future[int]:
        self.ensure_zygote()
        token = next(self._tokens)
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            with self._lock:
                self._starting[token] = (name, fut)
                _zygote.write_frame(self._ctl_w, (cmd[0], token, *cmd[2:]))
        except OSError as exc:
            with self._lock:
                self._starting.pop(token, None)
            raise MeshError(f"cannot start child {name!r}: the zygote is gone ({exc})") from None
        return fut

    # -- exits ------------------------------------------------------------------------------

    def _on_sentinel(self, proc: _Proc) -> None:
        assert proc.mp is not None and self._loop is not None
        mp = proc.mp
        self._loop.add_reader(mp.sentinel, None)
        # The sentinel closes while the process exits, a moment before it can be reaped.
        mp.join(0.5)
        if mp.exitcode is not None:
            self._exit(proc, mp.exitcode)
            return

        def reap() -> None:  # it closed its sentinel yet lives on: wait for it elsewhere
            mp.join()
            self._exit(proc, mp.exitcode if mp.exitcode is not None else -1)

        threading.Thread(target=reap, name=f"mpmesh-reap-{proc.name}", daemon=True).start()

    def _exit(self, proc: _Proc, code: int) -> None:
        with self._lock:
            if proc.reported:
                return
            proc.reported = True
            self._by_pid.pop(proc.pid, None)
        if proc.mp is not None:
            proc.mp.close()
        try:
            self._on_exit(proc.name, proc.pid, code)
        finally:
            # Waiters wake only once the router knows how the process ended, so what
            # they do next (mark it shut down, fail what is left) cannot overtake it.
            with self._lock:
                proc.exitcode = code
                self.exited.notify_all()

    # -- control -------------------------------------------------------------------------------

    def record(self, name: str) -> _Proc | None:
        """Child ``name``'s record, if started and not forgotten: its ``pid``, and its
        ``exitcode`` once its exit is reported (the record stays valid after ``forget``)."""
        return self._procs.get(name)

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc is not None else None

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.exitcode is None

    def exitcode(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.exitcode if proc is not None else None

    def forget(self, name: str) -> None:
        """Drop the record of child ``name`` once its exit was reported (a pool that
        recycles workers would otherwise grow it)."""
        with self._lock:
            proc = self._procs.get(name)
            if proc is not None and proc.exitcode is not None:
                del self._procs[name]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.exitcode is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait_exited(self, names: list[str], timeout: float | None) -> bool:
        """Wait until every named child has been reported exited."""
        with self.exited:
            return self.exited.wait_for(lambda: not any(self.alive(n) for n in names), timeout)

    def close(self) -> None:
        """Stop the zygote (it kills whatever it still runs) and reap it; or, when it runs
        nothing and this process could not fork a new one, keep it for the next mesh."""
        if self._zygote_popen is not None and self._parkable():
            if self._loop is not None:
                self._loop.add_reader(self._report_r, None)
            try:
                _zygote.write_frame(self._ctl_w, ("cleanup", []))  # this mesh's files are not its job now
            except OSError:
                pass
            else:
                fds = (self._ctl_w, self._report_r, self._life_w)
                if park_spare(Spare(os.getpid(), fds, self._zygote_popen)):
                    self._ctl_w = self._report_r = self._life_w = -1
                    self._zygote_popen = None
                    return
        for fd in (self._ctl_w, self._life_w):
            if fd >= 0:
                os.close(fd)
        self._ctl_w = self._life_w = -1
        if self._zygote_pid:
            reap(self._zygote_pid, ZYGOTE_EXIT_S)
            self._zygote_pid = 0
        if self._zygote_popen is not None:
            reap_zygote(self._zygote_popen)
            self._zygote_popen = None
        if self._report_r >= 0:
            if self._loop is not None:
                self._loop.add_reader(self._report_r, None)
            os.close(self._report_r)
            self._report_r = -1
        while self._report_fds:
            os.close(self._report_fds.popleft())

    def _parkable(self) -> bool:
        """Idle: nothing starting, every child reported exited. Only an exec'd zygote is
        kept (a forked one is cheap to redo, and a fresh fork gives children this
        process's current state, as ``fork`` should)."""
        with self._lock:
            return (self._ctl_w >= 0 and not self._starting and not self._reports.buffered
                    and all(p.exitcode is not None for p in self._procs.values()))


class _environ:
    """Temporarily extend ``os.environ`` (a spawned child copies it at start)."""

    def __init__(self, extra: dict[str, str] | None) -> None:
        self._extra = extra or {}
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self._extra.items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
