"""A Pool worker: a child process that runs tasks the pool sends over its direct channel.

The process is started, watched and stopped by a supervisor: the pool's own for a
standalone Pool (the worker then has no broker connection at all), or a Master's for
``m.Pool()`` (the worker is then a child of that mesh too). Either way tasks do not
travel as broker requests: the worker connects to the pool's own socket, proves the
pool's token, runs the initializer, says READY, then runs every chunk of every batch in
order, in its main thread, sending one RESULT frame per chunk as soon as the chunk is
done. Because results leave one by one, the pool always knows which chunk a dead worker
was running: the first one without a result.

A worker that has run ``maxtasks`` chunks exits with status 0 (the pool never sends it
more than that). A Shutdown from the broker (its master is stopping) ends the loop after
the current chunk.
"""

from __future__ import annotations

import hmac
import itertools
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from .._errors import SerializationError
from .._procs._child import RDHUP, Child, Detached, keep
from .._wire import _codec
from .._wire import _pool as P
from .._wire._frames import RECV_BYTES, FrameDecoder
from .._wire._messages import Goodbye, Message, Shutdown
from ._local import LOCAL_TYPES

__all__ = ["main"]

# Functions already unpickled here, by their pickled bytes: the pool sends the same bytes
# for every batch of a function, and unpickling one sent by value (dill) is slow.
FNS_KEPT: Final = 64
_FNS: dict[bytes, object] = {}


class _Undecodable(Exception):
    """A function or task that could not be unpickled here."""


def main(child: Child | Detached, address: str | bytes, answer: bytes, proof: bytes,
         initializer: Callable[..., object] | None, initargs: tuple[Any, ...],
         maxtasks: int | None) -> None:
    """The target of every pool worker (runs in the child process). ``answer``: this
    worker's half of the pool's handshake, ``proof``: the pool's, both computed by the
    pool (``_wire._pool.handshake_for_workers``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        # The answer, and who we are right behind it: nothing to wait for.
        sock.sendall(answer + P.frame(P.HELLO, P.HELLO_HEAD.pack(os.getpid()) + child.name.encode()))
    except OSError:
        sys.exit(1)  # the pool is already gone
    if isinstance(child, Child):
        _stop_on_shutdown(child, sock)
    elif not child.guarded:
        _exit_on_hangup(sock)
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            status, payload = P.error_payload(*_codec.pack_exception(exc))
            _send(sock, P.frame(P.INIT_FAILED, bytes([status]) + payload))
            sys.exit(1)
    _send(sock, P.frame(P.READY))
    try:
        _serve(sock, maxtasks, proof)
    finally:
        sock.close()


def _stop_on_shutdown(child: Child, sock: socket.socket) -> None:
    """When the master asks this child to stop (or vanishes), stop reading tasks.

    ``shutdown(SHUT_RD)`` makes the serving loop's next ``recv`` return EOF while the
    result of the chunk being run can still be sent.
    """
    client = child._client

    def on_incoming(msg: Message) -> None:
        if type(msg) in (Shutdown, Goodbye):
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    client.on_incoming = on_incoming
    client.start_reader()


def _exit_on_hangup(sock: socket.socket) -> None:
    """A detached worker that no zygote guards (``spawn``, ``forkserver``) has no broker
    telling it its pool is gone: the moment the pool's end of the channel hangs up, even
    in the middle of a task, the process exits."""
    if RDHUP:  # elsewhere the serving loop's next read sees EOF
        threading.Thread(target=keep, args=(sock.fileno(), None, lambda: True, lambda: False),
                         name="mpmesh-pool-watch", daemon=True).start()


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        sys.exit(0)  # the pool closed our channel: nothing left to do


def _serve(sock: socket.socket, maxtasks: int | None, proof: bytes) -> None:
    """Run what the pool sends until it says STOP or hangs up, once its first bytes are
    the ``proof`` of the token (a pool that does not prove it ends the process, having
    run nothing)."""
    reader = FrameDecoder(P.MAX_FRAME_BYTES)
    buf = bytearray(RECV_BYTES)
    done = 0
    while True:
        try:
            n = sock.recv_into(buf)
        except OSError:
            return
        if n == 0:
            return
        data = memoryview(buf)[:n]
        if proof:
            got = bytes(data[:len(proof)])
            if not hmac.compare_digest(got, proof[:len(got)]):
                sys.exit(1)
            proof, data = proof[len(got):], data[len(got):]
        reader.feed(data)
        for kind, body in reader.frames():
            if kind == P.STOP:
                return
            if kind != P.BATCH:
                return  # not something the pool sends: stop rather than guess
            done += _run_batch(sock, body)
            if maxtasks is not None and done >= maxtasks:
                return


def _run_batch(sock: socket.socket, body: bytes) -> int:
    """Run one batch; return how many chunks it reported on.

    What cannot be unpickled here is sent back (NACK) to be resent by value, unless it
    already was: then the chunks concerned fail with UNREADABLE.
    """
    flags = body[0]
    ids, offset = P.unpack_ids(memoryview(body)[1:])
    try:
        fns, tasks = pickle.loads(memoryview(body)[1 + offset:])
    except Exception as exc:
        if flags & P.DATA_BY_VALUE and len(ids) == 1:
            _send(sock, P.result_frame(ids[0], P.UNREADABLE, 0.0, _why("the task", exc)))
            return 1
        _send(sock, P.frame(P.NACK, bytes([P.NACK_DATA]) + P.pack_ids(ids)))
        return 0
    loaded: list[object] = []
    for fn in fns:
        func = _FNS.get(fn.data)
        if func is None:
            try:
                func = pickle.loads(fn.data)
            except Exception as exc:
                if not flags & P.FNS_BY_VALUE:
                    _send(sock, P.frame(P.NACK, bytes([P.NACK_FN]) + P.pack_ids(ids)))
                    return 0
                loaded.append(_Undecodable(_why("the function", exc).decode()))
                continue
            if len(_FNS) >= FNS_KEPT:
                _FNS.clear()
            _FNS[fn.data] = func
        loaded.append(func)
    perf = time.perf_counter
    send = sock.sendall
    dumps = _codec.dumps
    for cid, kind, fi, data in tasks:
        start = perf()
        fn = loaded[fi]
        try:
            if type(fn) is _Undecodable:
                raise fn
            if type(data) is P.Blob:
                try:
                    data = pickle.loads(data.data)
                except Exception as exc:
                    raise _Undecodable(_why("the task's arguments", exc).decode()) from None
            if kind == P.MAP1:
                value = fn(data)
            elif kind == P.CALL:
                value = fn(*data[0], **data[1])
            elif kind == P.MAP:
                value = list(map(fn, data))
            elif kind == P.STAR1:
                value = fn(*data)
            else:
                value = list(itertools.starmap(fn, data))
        except _Undecodable as exc:
            status, payload = P.UNREADABLE, str(exc).encode()
        except Exception as exc:
            status, payload = P.error_payload(*_codec.pack_exception(exc))
        else:
            try:
                status, payload = P.OK, dumps(value, refuse=LOCAL_TYPES)
            except SerializationError as exc:
                status, payload = P.UNSENDABLE, _unsendable(value, exc)
        frame = P.result_frame(cid, status, perf() - start, payload)
        try:
            send(frame)
        except OSError:
            sys.exit(0)
    return len(tasks)


def _why(what: str, exc: BaseException) -> bytes:
    return f"{what} could not be unpickled in the worker: {type(exc).__name__}: {exc}".encode()


def _unsendable(value: object, exc: SerializationError) -> bytes:
    """An UNSENDABLE payload: what pickling the result raised, and the result (reprs, as
    the stdlib's ``MaybeEncodingError`` holds them)."""
    reason = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    return P.pack_pair(_short_repr(reason).encode("utf-8", "replace"),
                       _short_repr(value).encode("utf-8", "replace"))


def _short_repr(obj: object) -> str:
    try:
        shown = repr(obj)
    except Exception:
        shown = f"<{type(obj).__qualname__} object>"
    if len(shown) > 200:
        shown = shown[:197] + "..."
    return shown
