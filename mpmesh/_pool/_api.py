"""``mpmesh.Pool``: the ``multiprocessing.Pool`` API, standalone or on a Master's group.

The methods and their behaviour are the stdlib's (``multiprocessing/pool.py``, 3.11):
argument checks, chunk sizes, result objects, ``close``/``join``/``terminate``, the
context manager that terminates on exit. What differs is what the stdlib gets wrong: a
worker that dies fails (or retries) the task it was running instead of hanging the pool;
results that cannot be pickled fail their task; ``terminate()`` fails unfinished results
with ``MeshClosed`` instead of leaving them waiting forever; ``imap`` reads its input
lazily; functions travel by value when they must (lambdas, closures, ``__main__``).
See ``_engine.py`` for how tasks move, ``_io.py`` for the threads and sockets around it.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from .._io import _deadline
from .._procs._supervisor import START_METHODS, Supervisor, default_start_method
from .._wire import _pool as P
from ._engine import Engine, Source, State
from ._feeder import LazySource, chunked
from ._io import ChannelIO, listen_channel
from ._processes import Home, WorkerHandle, WorkerProcesses, standalone_supervisor
from ._progress import check_mode, make_bar
from ._results import ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult

__all__ = ["Pool"]

# imap/imap_unordered: how many items may be read ahead of what the caller consumed.
READ_AHEAD_ITEMS: Final = 4096


def _cpu_count() -> int:
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return int(count or 1)


class Pool:
    """A process pool with ``multiprocessing.Pool``'s API that never hangs on a dead worker.

    ``task_timeout`` fails a task running longer (``RequestTimeout``) and replaces its
    worker; ``retries`` re-runs a task whose worker died or timed out; ``progress=True``
    shows a tqdm bar for ``map``/``imap``/``starmap`` (``"force"``: even off a terminal).

    Raises:
        ValueError: ``processes < 1``, bad ``maxtasksperchild``, ``task_timeout`` or ``retries``.
        TypeError: ``initializer`` is not callable.
    """

    def __init__(self, processes: int | None = None, initializer: Callable[..., object] | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None, *, task_timeout: float | None = None, retries: int = 0,
                 progress: bool | str = False) -> None:
        self._setup(None, processes, initializer, initargs, maxtasksperchild, context,
                    task_timeout, retries, progress)

    @classmethod
    def _on_master(cls, master: Home, processes: int | None = None,
                   initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
                   maxtasksperchild: int | None = None, context: Any = None, *,
                   task_timeout: float | None = None, retries: int = 0,
                   progress: bool | str = False) -> Pool:
        """A pool whose workers are a group of ``master`` (``Master.Pool``)."""
        pool = cls.__new__(cls)
        pool._setup(master, processes, initializer, initargs, maxtasksperchild, context,
                    task_timeout, retries, progress)
        return pool

    def _setup(self, master: Home | None, processes: int | None,
               initializer: Callable[..., object] | None, initargs: Iterable[Any],
               maxtasksperchild: int | None, context: Any, task_timeout: float | None,
               retries: int, progress: bool | str) -> None:
        self._state_lock = threading.Lock()
        self._finished = False
        self._pid = os.getpid()  # a forked copy of this process never stops the pool
        if processes is None:
            processes = _cpu_count()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        _deadline.check_timeout(task_timeout, "task_timeout")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        self._progress = check_mode(progress)
        method = context.get_start_method() if context is not None else None
        if master is not None and method is not None and method != master.start_method:
            raise ValueError(f"this Master starts children with {master.start_method!r}, "
                             f"not the context's {method!r}")
        if master is None and method is not None and method not in START_METHODS:
            raise ValueError(f"start method must be one of {', '.join(START_METHODS)}, not {method!r}")
        self._processes = processes
        channel = listen_channel()
        token, challenge, nonce = (os.urandom(P.TOKEN_BYTES) for _ in range(3))
        answer, proof = P.handshake_for_workers(token, challenge, nonce)
        home: Home | tuple[Supervisor, str]
        if master is None:
            # No Master, no broker: the pool's own zygote, forked before any thread of ours
            # (and without the channel's listening socket), starts the workers.
            method = method or default_start_method()
            try:
                home = (standalone_supervisor(method, (channel[1].fileno(),)), method)
            except BaseException:
                channel[1].close()
                raise
        else:
            home = master
        procs = WorkerProcesses(home, (channel[0], answer, proof, initializer, tuple(initargs),
                                             maxtasksperchild))
        names = [procs.next_name() for _ in range(processes)]
        try:
            procs.launch(names)  # the zygote forks them while we build the engine
            engine = Engine(maxtasks=maxtasksperchild, task_timeout=task_timeout, retries=retries,
                            workers=names, next_name=procs.next_name)
            io = ChannelIO(engine, channel, token, challenge, spawn=procs.request_spawn, kill=procs.kill)
        except BaseException:
            channel[1].close()
            procs.close()
            raise
        procs.attach(io)
        self._engine, self._io, self._procs = engine, io, procs
        try:
            procs.start(names, io.on_exit, io.spawn_failed)
        except BaseException:
            self._teardown(terminate=True)
            raise
        self._finalizer = weakref.finalize(self, _collect, io, procs, self._pid,
                                           _describe(type(self), State.RUN, processes))

    # -- the stdlib API -----------------------------------------------------------------------

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = {}) -> Any:
        """Run ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] = {},
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None) -> ApplyResult:
        """Start ``func(*args, **kwds)`` in a worker; return an ``AsyncResult``."""
        self._check_running()
        result = ApplyResult(callback, error_callback)
        result._pool = self
        self._io.submit(Source(result, func, P.CALL, [(tuple(args), dict(kwds))], 1, 1))
        return result

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list[Any]:
        """``list(map(func, iterable))``, computed by the workers in chunks."""
        return self._map_async(func, iterable, False, chunksize).get()  # type: ignore[no-any-return]

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Callable[[Any], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None) -> MapResult:
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        """Like ``map``, with each item unpacked as arguments: ``func(*item)``."""
        return self._map_async(func, iterable, True, chunksize).get()  # type: ignore[no-any-return]

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Callable[[Any], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None) -> MapResult:
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """Results in input order, as they come; the input is read lazily."""
        return self._imap(IMapIterator(), func, iterable, chunksize)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> Iterator[Any]:
        """Results in the order they complete; the input is read lazily."""
        return self._imap(IMapUnorderedIterator(), func, iterable, chunksize)

    def close(self) -> None:
        """Accept no more tasks; workers exit once every submitted task is done."""
        self._io.close()

    def terminate(self) -> None:
        """Stop the workers now; results not done yet fail with ``MeshClosed``."""
        self._teardown(terminate=True)

    def join(self) -> None:
        """Wait for the workers to exit (after ``close()`` or ``terminate()``).

        Raises:
            ValueError: the pool is still running.
        """
        if self._engine.state is State.RUN:
            raise ValueError("Pool is still running")
        self._teardown(terminate=False)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self) -> str:
        return _describe(type(self), self._engine.state, self._processes)

    @property
    def _pool(self) -> list[WorkerHandle]:
        """The current workers, as ``multiprocessing.Process``-like handles (``pid``,
        ``exitcode``, ``is_alive()``, ``name``): code written for the standard Pool reads
        them from its ``_pool``. A snapshot: a worker that retired is replaced by a new one."""
        return self._procs.handles()

    def _repopulate_pool(self) -> None:
        """The standard Pool's refill, which code sometimes calls after workers retire:
        nothing to do here, since a retiring or lost worker is replaced at once."""

    # -- helpers ----------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._engine.state is not State.RUN:
            raise ValueError("Pool not running")

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], star: bool,
                   chunksize: int | None, callback: Callable[[Any], object] | None = None,
                   error_callback: Callable[[BaseException], object] | None = None) -> MapResult:
        self._check_running()
        items = iterable if type(iterable) in (list, tuple) else list(iterable)
        assert isinstance(items, (list, tuple))
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        elif chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        if not items:
            result = MapResult(0, 0, 0, callback, error_callback)
            result._done = True
            result._latch.open()  # the stdlib's: an empty map is ready at once, no callback
            return result
        n_chunks = -(-len(items) // chunksize)
        result = MapResult(n_chunks, chunksize, len(items), callback, error_callback)
        if chunksize == 1:
            kind = P.STAR1 if star else P.MAP1
        else:
            kind = P.STARMAP if star else P.MAP
        result._bar = make_bar(self._progress, len(items), _label(func))
        result._pool = self
        self._io.submit(Source(result, func, kind, list(items), chunksize, n_chunks))
        return result

    def _imap(self, result: IMapIterator, func: Callable[..., Any], iterable: Iterable[Any],
              chunksize: int) -> Iterator[Any]:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        io = self._io
        bound = max(4 * self._processes, READ_AHEAD_ITEMS // chunksize)
        kind = P.MAP1 if chunksize == 1 else P.MAP
        lazy = LazySource(io.feeder, result, func, kind, chunked(iterable, chunksize), bound)
        source = Source(result, func, kind, None, chunksize, 0, lazy=lazy)
        lazy.source = source
        result._source = lazy
        result._bar = make_bar(self._progress, total, _label(func))
        result._pool = self
        io.submit(source)
        io.feeder.add(lazy)
        if chunksize == 1:
            return result
        return (item for chunk in result for item in chunk)

    def _teardown(self, *, terminate: bool) -> None:
        if os.getpid() != self._pid:
            return  # a forked copy's handle, as with the standard Pool: the pool is its creator's
        with self._state_lock:
            if self._finished:
                return
            _stop(self._io, self._procs, terminate=terminate)
            self._finished = True
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()


def _describe(cls: type, state: State, size: int) -> str:
    return f"<{cls.__module__}.{cls.__qualname__} state={state.value} pool_size={size}>"


def _label(func: object) -> str:
    return str(getattr(func, "__qualname__", None) or type(func).__name__)


def _stop(io: ChannelIO, procs: WorkerProcesses, *, terminate: bool) -> None:
    """Stop a pool's workers (now, or wait until they exited after close()), then its threads."""
    if terminate:
        procs.terminate(io.terminate())
    else:
        io.wait_workers_gone()
    io.shutdown_threads()
    procs.close()


def _collect(io: ChannelIO, procs: WorkerProcesses, pid: int, shown: str) -> None:
    """A pool (``shown``: its repr while running) was garbage-collected, or the interpreter
    exits, before terminate() or join(): stop it, unless this is a forked copy of the
    process that made it; then warn, as the standard Pool does, if it was still running.

    The warning is the stdlib's, word for word, so that filters written for it apply. It
    comes last: turned into an error, it must not stop the cleanup. The last reference
    can go on one of the pool's own threads (a result drops its pool when it completes,
    under the pool's lock): stopping there would wait for that lock, or join the thread
    itself, so another thread does it.
    """
    if os.getpid() != pid:
        return
    running = io.engine.state is State.RUN
    if io.on_own_thread() or procs.on_own_thread():
        threading.Thread(target=_stop, args=(io, procs), kwargs={"terminate": True},
                         name="mpmesh-pool-collect", daemon=True).start()
    else:
        _stop(io, procs, terminate=True)
    if running:
        warnings.warn(f"unclosed running multiprocessing pool {shown}", ResourceWarning)
