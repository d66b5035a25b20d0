"""The pool's worker processes: start, replace, kill, stop, forget.

This is the one module that knows how a pool's workers come and go, so the policy can
change in one place. Two homes:

- a standalone ``Pool`` has no Master and no broker: its own ``Supervisor`` forks the
  workers from a zygote (forked while this process is single-threaded, as a Master's
  is) and hears their exits on the pool's I/O thread. The workers are ``Detached``:
  their pool channel is all they talk to, and the zygote ends them if this process
  dies. Start-up to the first result measured ~1.1-1.2x ``multiprocessing.Pool(2)``'s,
  against ~1.6-2.5x with a private Master (its broker, and a handshake per worker);
- ``m.Pool(...)`` puts the workers in a new group of the caller's mesh, as children of
  its Master (visible in ``m.children()``).

Workers are never restarted by a supervisor policy: the pool replaces a worker that
died, timed out or retired (``maxtasksperchild``) with a *new* process named
``f"{group}-{n}"`` (the stdlib names its workers ``ForkPoolWorker-N`` the same way);
a Master's back-off and storm guard, right for long-lived services, would stall a pool
that recycles workers by design (``maxtasksperchild=1`` exits a worker per task).

One *lifecycle* thread per pool does the blocking work: it starts replacement workers
(a start can take tens of milliseconds) and learns of exits by waiting on the
supervisor's exit condition (no polling), then reports ``(name, pid, exitcode)``. It
lives exactly as long as the pool: a pool that is done leaves no thread behind, so the
next pool or Master in this process can still fork its zygote the fast way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._io._forking import stop_in_turn
from .._procs._supervisor import ChildSpec, ReaderLoop, Supervisor
from . import _worker

if TYPE_CHECKING:
    from .._procs._supervisor import _Proc

__all__ = ["Home", "WorkerHandle", "WorkerProcesses", "standalone_supervisor"]

log = logging.getLogger("mpmesh.pool")

_group_ids = itertools.count(1)


def standalone_supervisor(start_method: str, private_fds: tuple[int, ...] = ()) -> Supervisor:
    """A supervisor for a pool without a Master, its zygote started (call it before the
    pool starts any thread, so the zygote can be forked rather than exec'd; it closes
    ``private_fds``)."""
    sup = Supervisor({}, [], lambda name, pid, code: None)
    if start_method == "fork":
        sup.fork_zygote_if_safe(private_fds)
        sup.ensure_zygote()
    return sup


class WorkerHandle:
    """A pool worker as a ``multiprocessing.Process`` shows one, for code written for the
    standard Pool that reads its ``_pool``: ``name``, ``pid``, ``exitcode`` (None until the
    supervisor has reaped it, ``-N`` for signal N), ``is_alive()``."""

    __slots__ = ("_record",)

    def __init__(self, record: _Proc) -> None:
        self._record = record

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def pid(self) -> int:
        return self._record.pid

    @property
    def exitcode(self) -> int | None:
        return self._record.exitcode

    def is_alive(self) -> bool:
        return self._record.exitcode is None

    def __repr__(self) -> str:
        code = self.exitcode
        state = "started" if code is None else f"exitcode={code}"
        return f"<{type(self).__name__} name={self.name!r} pid={self.pid} {state}>"


class Home(Protocol):
    """What a pool on a Master's group uses of its Master (the pool sits below it)."""

    start_method: str
    _supervisor: Supervisor

    def _names_in_use(self) -> set[str]: ...

    def _forget(self, name: str) -> None: ...

    def spawn_child(self, name: str, target: Callable[..., Any] | str, mode: str = ...,
                    group: str | None = ..., *, args: tuple[Any, ...] = ...,
                    auto_restart: bool = ...) -> None: ...

    def spawn_group(self, group: str, target: Callable[..., Any] | str, size: int,
                    mode: str = ..., strategy: str = ..., **child_opts: Any) -> list[str]: ...


class WorkerProcesses:
    """Starts and stops the pool's workers; reports exits and failed starts."""

    def __init__(self, home: Home | tuple[Supervisor, str], worker_args: tuple[Any, ...]) -> None:
        """``home``: the Master whose group the workers join, or, for a standalone pool,
        its own supervisor and start method."""
        if isinstance(home, tuple):
            self.master: Home | None = None
            self._sup, self._start_method = home
        else:
            self.master = home
            self._sup, self._start_method = home._supervisor, home.start_method
        self._args = worker_args
        self._on_exit: Callable[[str, int, int], None] = lambda name, pid, code: None
        self._on_spawn_failed: Callable[[str, BaseException], None] = lambda name, exc: None
        self._launched: list[tuple[str, concurrent.futures.Future[int]]] = []
        self._counter = itertools.count()
        self._watched: dict[str, None] = {}  # started, exit not reported yet (in start order)
        self._dead: list[str] = []           # exited; their records may go
        self._spawns: collections.deque[str] = collections.deque()
        self._stopping = False
        if self.master is None:
            self.group = "pool"
        else:
            taken = self.master._names_in_use()
            self.group = next(g for g in (f"pool{n}" for n in _group_ids) if g not in taken)
        self._thread: threading.Thread | None = None

    def attach(self, loop: ReaderLoop) -> None:
        """A standalone pool's supervisor listens on the pool's I/O loop."""
        if self.master is None:
            self._sup.attach(loop)

    def next_name(self) -> str:
        return f"{self.group}-{next(self._counter)}"

    def handles(self) -> list[WorkerHandle]:
        """The workers started and not yet reported exited, oldest first (``Pool._pool``)."""
        with self._sup.exited:
            records = [self._sup.record(name) for name in self._watched]
        return [WorkerHandle(r) for r in records if r is not None]

    def launch(self, names: list[str]) -> None:
        """Ask a standalone pool's zygote for the first workers now, without waiting: it
        forks them while the pool builds its engine. (Otherwise they start in ``start``:
        ``multiprocessing`` children need the loop that watches them.)"""
        if self.master is None and self._start_method == "fork":
            self._launched = [(name, self._sup.launch(self._spec(name))) for name in names]

    def start(self, names: list[str], on_exit: Callable[[str, int, int], None],
              on_spawn_failed: Callable[[str, BaseException], None]) -> None:
        """Start the first workers, named as ``spawn_group`` names them, and watch them;
        ``on_exit(name, pid, exitcode)`` and ``on_spawn_failed`` report on the lifecycle
        thread (start errors propagate)."""
        assert names == [f"{self.group}-{i}" for i in range(len(names))]
        self._on_exit, self._on_spawn_failed = on_exit, on_spawn_failed
        with self._sup.exited:
            self._watched.update(dict.fromkeys(names))
        self._thread = threading.Thread(target=self._run, name="mpmesh-pool-lifecycle", daemon=True)
        self._thread.start()
        if self.master is not None:
            self.master.spawn_group(self.group, _worker.main, len(names), mode="sequential",
                                    args=self._args, auto_restart=False)
            return
        launched, self._launched = self._launched, []
        # Ask for every process first, then wait: the starts overlap.
        for name, fut in launched or [(name, self._sup.launch(self._spec(name))) for name in names]:
            self._sup.wait_started(name, fut)

    def _spec(self, name: str) -> ChildSpec:
        return ChildSpec(name, _worker.main, "sequential", self.group, 1, self._args,
                         auto_restart=False, start_method=self._start_method)

    def request_spawn(self, name: str) -> None:
        """Have the lifecycle thread start a worker named ``name`` (never blocks)."""
        with self._sup.exited:
            self._spawns.append(name)
            self._sup.exited.notify_all()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._sup.kill(name, sig)

    def terminate(self, names: list[str]) -> None:
        """Stop the named workers now: SIGTERM, then SIGKILL (as ``Pool.terminate``)."""
        live = [n for n in names if self._sup.alive(n)]

        def send(sig: int) -> None:
            for name in live:
                self.kill(name, sig)

        stop_in_turn(send, lambda t: self._sup.wait_exited(live, t))

    def on_own_thread(self) -> bool:
        """Whether the caller is the lifecycle thread."""
        return threading.current_thread() is self._thread

    def close(self) -> None:
        """After the pool is done: stop the lifecycle thread; stop a standalone pool's
        zygote, or drop the records of the pool's dead workers from a shared Master."""
        with self._sup.exited:
            self._stopping = True
            self._sup.exited.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(30.0)
        if self.master is None:
            self._sup.close()
        else:
            self._forget_dead()

    # -- the lifecycle thread -------------------------------------------------------------------

    def _run(self) -> None:
        sup = self._sup
        while True:
            with sup.exited:
                while True:
                    if self._stopping:
                        return
                    exits = [(n, sup.pid(n) or 0, code) for n in self._watched
                             if (code := sup.exitcode(n)) is not None]
                    spawns = list(self._spawns)
                    self._spawns.clear()
                    if exits or spawns:
                        break
                    sup.exited.wait()
                for name, _, _ in exits:
                    self._watched.pop(name, None)
                    self._dead.append(name)
            for name, pid, code in exits:
                self._on_exit(name, pid, code)
            for name in spawns:
                self._spawn(name)

    def _spawn(self, name: str) -> None:
        self._forget_dead()
        with self._sup.exited:
            if self._stopping:
                return
            self._watched[name] = None
        try:
            if self.master is None:
                self._sup.start(self._spec(name))
            else:
                self.master.spawn_child(name, _worker.main, "sequential", self.group, args=self._args,
                                        auto_restart=False)
        except Exception as exc:
            with self._sup.exited:
                self._watched.pop(name, None)
            self._on_spawn_failed(name, exc)

    def _forget_dead(self) -> None:
        """Drop the records of workers that exited (a recycling pool would grow them)."""
        with self._sup.exited:
            dead, self._dead = self._dead, []
        for name in dead:
            self._sup.forget(name)
            if self.master is not None:
                self.master._forget(name)
