"""What the engine moves: chunks, the sources they are cut from, the workers that hold
them, how a batch of chunks is pickled, and how a worker's frames are read.

Nothing here does I/O or takes a lock. The engine pickles batches as it sends them;
the driver decodes what a worker sent (``read_frames``) before it takes the pool's lock,
so that unpickling results never holds up the threads that submit work.
"""

from __future__ import annotations

import collections
import enum
import itertools
import pickle
from collections.abc import Callable
from typing import Any, Final

from .._errors import RemoteError, RemoteProtocolError, SerializationError
from .._wire import _codec
from .._wire import _pool as P
from .._wire._frames import FrameDecoder
from ._local import LOCAL_TYPES
from ._results import Lazy, UnpicklableException, UnpicklableResult

__all__ = ["GARBAGE", "Chunk", "Event", "FnBlobs", "PoolWorker", "Source", "WState", "decode_result",
           "encode_batch", "read_frames"]

# What a worker said, decoded: ``(kind, chunk id, ok, value, seconds)``. Plain tuples: a
# map at chunksize 1 decodes one per item, and a record costs ~3x a tuple to build.
Event = tuple[int, int, bool, Any, float]
# The kind of an event that is no frame: the worker sent something unreadable, or a kind
# only the pool sends (its value says which). Its connection is to be dropped.
GARBAGE: Final = -1

_KIND_NAMES: Final = {P.CALL: "apply", P.MAP1: "map", P.MAP: "map", P.STAR1: "starmap", P.STARMAP: "starmap"}


class WState(enum.Enum):
    STARTING = "starting"   # spawned; not connected or not ready yet
    READY = "ready"         # takes work
    LOST = "lost"           # connection gone, waiting for its exit status
    DEAD = "dead"           # its work is settled; waiting for (or past) its exit


class Chunk:
    """One stdlib task: a call, or ``chunksize`` items of a map."""

    __slots__ = ("attempt", "cid", "data", "index", "isolate", "source")

    def __init__(self, cid: int, source: Source, index: int, data: object) -> None:
        self.cid = cid
        self.source = source
        self.index = index
        self.data = data
        self.attempt = 1
        self.isolate = False

    def describe(self) -> str:
        src = self.source
        name = getattr(src.fn, "__qualname__", None) or type(src.fn).__name__
        label = f"{_KIND_NAMES[src.kind]}({name})"
        if src.kind == P.CALL:
            return label
        return f"{label} {'item' if src.kind in (P.MAP1, P.STAR1) else 'chunk'} {self.index}"


class Source:
    """A job's chunks not sent yet: cut from a list on demand, or filled by the feeder."""

    __slots__ = ("chunksize", "end", "ended", "fn", "fn_by_value", "items", "job", "kind", "lazy", "next",
                 "pulled", "ready")

    def __init__(self, job: Any, fn: Any, kind: int, items: list[Any] | None, chunksize: int,
                 n_chunks: int, lazy: Lazy | None = None) -> None:
        self.job = job
        self.fn = fn
        self.kind = kind
        self.items = items
        self.chunksize = chunksize
        self.next = 0
        self.end = n_chunks
        self.lazy = lazy
        self.ready: collections.deque[tuple[int, Any]] = collections.deque()
        self.fn_by_value = False  # a worker could not import ``fn``: send it with dill
        # A lazy source, as the engine knows it from what the feeder handed over (the
        # feeder's own counters are its thread's): chunks pulled, and whether that is all.
        self.pulled = 0
        self.ended = False

    def available(self) -> int:
        return len(self.ready) if self.lazy is not None else self.end - self.next

    def drained(self) -> bool:
        if self.lazy is not None:
            return self.ended and not self.ready
        return self.next >= self.end

    def take(self, n: int, cids: itertools.count[int]) -> list[Chunk]:
        out: list[Chunk] = []
        if self.lazy is not None:
            ready = self.ready
            while ready and len(out) < n:
                index, data = ready.popleft()
                out.append(Chunk(next(cids), self, index, data))
            return out
        items, cs, start = self.items, self.chunksize, self.next
        stop = min(self.end, start + n)
        assert items is not None
        if cs == 1 or self.kind == P.CALL:
            out = [Chunk(next(cids), self, i, items[i]) for i in range(start, stop)]
        else:
            out = [Chunk(next(cids), self, i, items[i * cs:(i + 1) * cs]) for i in range(start, stop)]
        self.next = stop
        return out


class PoolWorker:
    """One worker process as the engine sees it."""

    __slots__ = (
        "armed",
        "assigned",
        "connected",
        "deadline",
        "ema",
        "exit_how",
        "inflight",
        "lost_head",
        "name",
        "pid",
        "ready_seen",
        "state",
        "stopping",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid = 0
        self.connected = False  # it proved the token and its channel is open
        self.state = WState.STARTING
        self.inflight: collections.deque[Chunk] = collections.deque()
        self.assigned = 0
        self.ema: float | None = None
        self.lost_head: Chunk | None = None
        self.exit_how: str | None = None
        self.ready_seen = False
        self.stopping = False
        self.deadline: float | None = None   # when the running chunk passes task_timeout
        self.armed = False                    # a timer entry for it is in the heap

    def describe(self) -> str:
        return f"worker {self.name!r} (pid {self.pid or '?'})"


def encode_batch(chunks: list[Chunk], isolated: bool, known_by_value: Callable[[object], bool],
                 fail: Callable[[Chunk, BaseException], None],
                 dump_fn: Callable[[object, bool], bytes]) -> tuple[bytes, list[Chunk], int]:
    """Pickle a batch: ``(body, chunks sent, BATCH flags)``; what cannot be pickled is ``fail``ed.

    Functions go by reference (plain pickle) unless a worker could not import one
    (``NACK_FN``: ``known_by_value``) or pickle refuses it (lambdas, closures): then by
    value, with dill. ``isolated`` (a lone chunk after ``NACK_DATA``) sends everything by
    value. The whole batch is pickled at once; only if that fails is each task's data
    pickled on its own, so that one bad item fails its own chunk and nothing else, with
    the exception pickling raised (as the stdlib's Pool fails it; see ``_refused``).
    Task data refuses ``LOCAL_TYPES`` (a lock, an open file), as pickle does, rather
    than travel as dill's look-alike.
    """
    fns: list[object] = []
    blobs: dict[int, int] = {}
    bad_fns: dict[int, BaseException] = {}
    tasks: list[tuple[int, int, int, object]] = []
    sent: list[Chunk] = []
    fns_by_value = True
    for c in chunks:
        src = c.source
        key = id(src)
        fi = blobs.get(key)
        if fi is None and key not in bad_fns:
            by_value = isolated or src.fn_by_value or known_by_value(src.fn)
            fns_by_value = fns_by_value and by_value
            try:
                fns.append(P.Blob(dump_fn(src.fn, by_value)))
                fi = blobs[key] = len(fns) - 1
            except SerializationError as exc:
                bad_fns[key] = _refused(exc, f"the function of {c.describe()}")
        if fi is None:
            fail(c, bad_fns[key])
            continue
        data = c.data
        if isolated:
            try:
                data = P.Blob(_codec.dumps_by_value(data, refuse=LOCAL_TYPES))
            except SerializationError as exc:
                fail(c, _refused(exc, c.describe()))
                continue
        tasks.append((c.cid, src.kind, fi, data))
        sent.append(c)
    if not sent:
        return b"", [], 0
    flags = (P.FNS_BY_VALUE if fns_by_value else 0) | (P.DATA_BY_VALUE if isolated else 0)
    try:
        return pickle.dumps((fns, tasks), 5), sent, flags
    except Exception:
        pass
    slow: list[tuple[int, int, int, object]] = []
    kept: list[Chunk] = []
    for c, (cid, kind, fi, data) in zip(sent, tasks):
        try:
            slow.append((cid, kind, fi, P.Blob(_codec.dumps(data, refuse=LOCAL_TYPES))))
        except SerializationError as exc:
            fail(c, _refused(exc, c.describe()))
            continue
        kept.append(c)
    if not kept:
        return b"", [], 0
    return pickle.dumps((fns, slow), 5), kept, flags


def _refused(exc: SerializationError, what: str) -> BaseException:
    """The exception pickling ``what`` raised, to fail its chunk with: the standard Pool
    raises that very exception (a ``__reduce__`` that raises, pickle's ``TypeError``), so
    code written for it catches it; on 3.11+ a note says which task it was."""
    error = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    if hasattr(error, "add_note"):
        error.add_note(f"mpmesh: cannot send {what} to a worker")
    return error


class FnBlobs:
    """The pool's pickled functions, by function: a loop of ``apply_async(f, ...)`` pickles
    ``f`` once, not once per batch (by value, with dill, that costs ~100x a trivial task)."""

    SIZE: Final = 64

    def __init__(self) -> None:
        self._blobs: collections.OrderedDict[tuple[object, bool], bytes] = collections.OrderedDict()

    def dump(self, fn: object, by_value: bool) -> bytes:
        key = (fn, by_value)
        try:
            blob = self._blobs.get(key)
        except TypeError:  # an unhashable callable: pickle it every time
            return _dump_fn(fn, by_value)
        if blob is None:
            blob = self._blobs[key] = _dump_fn(fn, by_value)
            if len(self._blobs) > self.SIZE:
                self._blobs.popitem(last=False)
        else:
            self._blobs.move_to_end(key)
        return blob


def _dump_fn(fn: object, by_value: bool) -> bytes:
    """A function for a worker: by reference when pickle can, else (or when asked) by value."""
    if by_value:
        return _codec.dumps_by_value(fn)
    return _codec.dumps(fn)


def read_frames(decoder: FrameDecoder, data: bytes | memoryview) -> list[Event]:
    """Feed what a worker sent to its ``decoder`` and decode every frame it completes.

    Results are unpickled here. A frame over the decoder's limit, or of a kind workers do
    not send, gives ``[(GARBAGE, 0, False, what it was, 0.0)]`` alone: whatever came with
    it is dropped with the connection.
    """
    try:
        decoder.feed(data)
        frames = decoder.frames()
    except RemoteProtocolError:
        return [(GARBAGE, 0, False, "a malformed frame", 0.0)]
    decoded: list[Event] = []
    for kind, body in frames:
        if kind == P.RESULT:
            cid, status, elapsed = P.RESULT_HEAD.unpack_from(body)
            ok, value = decode_result(status, memoryview(body)[P.RESULT_HEAD.size:])
            decoded.append((kind, cid, ok, value, elapsed))
        elif kind == P.NACK:
            decoded.append((kind, body[0], False, P.unpack_ids(memoryview(body)[1:])[0], 0.0))
        elif kind == P.INIT_FAILED:
            decoded.append((kind, 0, False, decode_result(body[0], memoryview(body)[1:])[1], 0.0))
        elif kind == P.READY:
            decoded.append((kind, 0, True, None, 0.0))
        else:
            return [(GARBAGE, 0, False, f"an unexpected frame (kind {kind})", 0.0)]
    return decoded


def decode_result(status: int, payload: memoryview) -> tuple[bool, Any]:
    """``(ok, value or exception)`` for a RESULT frame's status and payload."""
    if status == P.OK:
        try:
            return True, pickle.loads(payload)
        except Exception as exc:
            return False, SerializationError(f"cannot unpickle a task's result here: {exc!r}")
    if status == P.ERROR:
        data, text = P.split_error_payload(bytes(payload))
        return False, _codec.unpack_exception(data, text)
    if status == P.UNSENDABLE:
        reason, value = P.split_pair(bytes(payload))
        return False, UnpicklableResult(reason.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    text = bytes(payload).decode("utf-8", "replace")
    if status == P.ERROR_TEXT:
        return False, UnpicklableException(text)
    if status == P.UNREADABLE:
        return False, SerializationError(text)
    return False, RemoteError(f"unknown result status {status}: {text}")
