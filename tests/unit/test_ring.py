"""The write ring (``_broker/_ring``) on plain memory, and its process-shared mutex
(``_io/_mutex``) across real processes."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mpmesh._broker import _ring
from mpmesh._broker._ring import CAPACITY, MAX_ENTRY, MUTEX_AT, POKE_AT, RING_END, RingReader, RingWriter
from mpmesh._broker._versions import VERSIONS, WRITERS
from mpmesh._io import _mutex

pytestmark = pytest.mark.timeout(30)


class ThreadMutex:
    """A stand-in for the shared mutex: a thread lock, or one never had (``busy``)."""

    def __init__(self, busy: bool = False) -> None:
        self.lock = threading.Lock()
        self.busy = busy
        self.closed = False

    def acquire(self) -> object:
        if self.busy:
            return None
        self.lock.acquire()
        return self.lock

    def release(self, held: object) -> None:
        assert held is self.lock
        self.lock.release()

    def close(self) -> None:
        self.closed = True


def taken(reader: RingReader) -> list[bytes]:
    """What ``take`` gave, payloads only (every test entry is an objects call)."""
    entries = reader.take()
    assert all(kind == _ring.OBJECTS for kind, _ in entries)
    return [payload for _, payload in entries]


def put(writer: RingWriter, payload: bytes, s1: int, s2: int) -> int:
    """Append an objects entry noting nothing: its status (0, 1 or -1)."""
    return writer.append(payload, s1, s2, s1, s1)[0]


def ring(busy: bool = False) -> tuple[RingReader, RingWriter, memoryview]:
    memory = memoryview(bytearray(RING_END))
    reader = RingReader(memory)
    reader.open()
    return reader, RingWriter(memory, ThreadMutex(busy)), memory


def test_entries_come_out_whole_and_in_order_across_the_wrap() -> None:
    reader, writer, _ = ring()
    sent = []
    for i in range(3 * CAPACITY // 1000):  # laps the ring three times
        payload = bytes([i % 251]) * (997 + i % 7)
        assert put(writer, payload, VERSIONS, VERSIONS) >= 0
        sent.append(payload)
        if i % 50 == 49:
            assert taken(reader) == sent
            sent = []
    assert taken(reader) == sent
    assert not reader.pending() and taken(reader) == []


def test_a_write_bumps_its_slots_in_the_writers_region_only() -> None:
    _, writer, memory = ring()
    words = memory.cast("Q")
    assert put(writer, b"x", VERSIONS + 5, VERSIONS + 9) == 0
    assert put(writer, b"y", VERSIONS + 5, VERSIONS + 5) == 0
    assert words[VERSIONS + 5 + WRITERS] == 2 and words[VERSIONS + 9 + WRITERS] == 1
    assert words[VERSIONS + 5] == 0 and words[VERSIONS + 9] == 0  # the broker's words


def test_a_full_ring_a_large_entry_a_closed_ring_and_a_busy_mutex_say_send_it() -> None:
    reader, writer, memory = ring()
    assert put(writer, b"x" * (MAX_ENTRY + 1), VERSIONS, VERSIONS) == -1
    chunk = b"x" * (MAX_ENTRY - 8)
    results = [put(writer, chunk, VERSIONS, VERSIONS) for _ in range(CAPACITY // MAX_ENTRY + 1)]
    assert results[-1] == -1 and all(r >= 0 for r in results[:-1])
    assert results.count(1) == 1  # it asked for the ring to be emptied once, at POKE_AT
    assert results.index(1) == POKE_AT // MAX_ENTRY - 1
    assert len(taken(reader)) == len(results) - 1
    assert put(writer, chunk, VERSIONS, VERSIONS) == 0  # room again
    reader.close()
    assert put(writer, b"x", VERSIONS, VERSIONS) == -1
    assert not reader.pending() and taken(reader) == []
    _, busy, _ = ring(busy=True)
    assert put(busy, b"x", VERSIONS, VERSIONS) == -1


def test_garbage_in_the_ring_drops_what_is_left_and_nothing_else() -> None:
    reader, writer, memory = ring()
    put(writer, b"good", VERSIONS, VERSIONS)
    put(writer, b"bad!", VERSIONS, VERSIONS)
    data_at = RING_END - CAPACITY
    memory[data_at + 16:data_at + 20] = (MAX_ENTRY + 1).to_bytes(4, "little")  # the second's length
    assert taken(reader) == [b"good"]
    assert not reader.pending()
    put(writer, b"next", VERSIONS, VERSIONS)
    assert taken(reader) == [b"next"]


def test_threads_appending_at_once_lose_nothing() -> None:
    reader, writer, _ = ring()
    got: list[bytes] = []

    def append(tag: int) -> None:
        for i in range(2000):
            while put(writer, f"{tag}:{i}".encode(), VERSIONS, VERSIONS) < 0:
                pass  # full: the taker below empties it

    threads = [threading.Thread(target=append, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        got += taken(reader)
    got += taken(reader)
    assert len(got) == 8000
    for tag in range(4):  # each thread's writes in its own order
        mine = [int(e.split(b":")[1]) for e in got if e.startswith(f"{tag}:".encode())]
        assert mine == list(range(2000))


def test_a_closed_writer_lets_go_of_the_memory_and_says_send_it() -> None:
    _, writer, _ = ring()
    mutex = writer._mutex
    writer.close()
    assert isinstance(mutex, ThreadMutex) and mutex.closed
    assert put(writer, b"x", VERSIONS, VERSIONS) == -1


# -- the shared mutex, across processes ------------------------------------------------------

needs_mutex = pytest.mark.skipif(not _mutex.available(), reason="no process-shared robust mutex here")


@contextlib.contextmanager
def held_by_a_child(mm: mmap.mmap, then: Callable[[], object] = signal.pause) -> Iterator[int]:
    """A forked child takes the mutex at ``MUTEX_AT`` of ``mm`` and runs ``then()``
    holding it (by default: waits to be killed); yields its pid once it holds it. It is
    gone at the end of the block, killed if need be."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _mutex.SharedMutex(mm, MUTEX_AT).acquire()
            os.write(w, b"held")
            then()
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert os.read(r, 4) == b"held"
        yield pid
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@needs_mutex
def test_the_shared_mutex_excludes_another_process_and_is_freed_when_its_holder_is_killed() -> None:
    mm = mmap.mmap(-1, RING_END)
    mutex = _mutex.SharedMutex.create(mm, MUTEX_AT)
    try:
        with held_by_a_child(mm) as pid:
            assert mutex.acquire() is None  # held by the child: not had within WAIT_S
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        held = mutex.acquire()  # its holder died: the next taker has it
        assert held is not None
        mutex.release(held)
        held = mutex.acquire()
        assert held is not None
        mutex.release(held)
        del held  # it keeps the mapping exported
    finally:
        mutex.close()
        mm.close()


@needs_mutex
def test_a_writer_killed_while_holding_the_ring_leaves_it_whole_for_the_next() -> None:
    mm = mmap.mmap(-1, RING_END)
    _mutex.SharedMutex.create(mm, MUTEX_AT)
    reader = RingReader(memoryview(mm))
    reader.open()
    writer = RingWriter(memoryview(mm), _mutex.SharedMutex(mm, MUTEX_AT))
    assert put(writer, b"before", VERSIONS, VERSIONS) == 0
    with held_by_a_child(mm, then=lambda: os.kill(os.getpid(), signal.SIGKILL)):
        pass  # the child took the ring's mutex and died holding it
    assert put(writer, b"after", VERSIONS, VERSIONS) == 0
    assert taken(reader) == [b"before", b"after"]
    writer.close()
    reader.close()


def test_the_counter_of_appended_writes_grows() -> None:
    _, writer, _ = ring()
    before = _ring.appended[0]
    put(writer, b"x", VERSIONS, VERSIONS)
    assert _ring.appended[0] == before + 1


def test_an_entry_keeps_its_kind_and_the_noted_versions_are_those_after_it() -> None:
    reader, writer, memory = ring()
    words = memory.cast("Q")
    words[VERSIONS + 3] = 10  # the broker's word of the noted slot
    done, v1, v2 = writer.append(b"c", VERSIONS + 3, VERSIONS + 4, VERSIONS + 3, VERSIONS + 5,
                                        _ring.CACHE)
    assert done == 0 and v1 == 11 and v2 == 0  # slot 3 bumped once by this write; 5 not
    assert words[VERSIONS + 3] + words[VERSIONS + 3 + WRITERS] == v1
    assert reader.take() == [(_ring.CACHE, b"c")]


@needs_mutex
def test_after_one_wait_for_a_stuck_holder_the_mutex_is_only_tried() -> None:
    mm = mmap.mmap(-1, RING_END)
    mutex = _mutex.SharedMutex.create(mm, MUTEX_AT)
    try:
        with held_by_a_child(mm):
            start = time.monotonic()
            assert mutex.acquire() is None
            assert time.monotonic() - start >= _mutex.WAIT_S * 0.9  # one wait
            start = time.monotonic()
            for _ in range(20):
                assert mutex.acquire() is None
            assert time.monotonic() - start < _mutex.WAIT_S  # 20 tries, no waits
    finally:
        mutex.close()
        mm.close()
