"""The broker's event loop: one selector serves every connection; no thread per client.

It drives a ``BrokerCore``: bytes in -> ``Connection`` -> messages -> core -> actions ->
bytes out. The core is guarded by one lock, so the host process's own threads (a
Master's callers) can also submit messages in-process and write the resulting frames
themselves, without a thread hop (``submit_local``).

Writes never block: frames are appended to the peer's outbound buffer and flushed with
non-blocking sends; what the kernel does not take waits for EVENT_WRITE. Messages for
the in-process host and ``Notify`` events are handed to callbacks *after* the lock is
released, on the thread that produced them; those callbacks must not block.

A caller that will block on a request may borrow the socket of the worker running it
(``submit_lent``, ``read_for``): the loop stops watching that socket until the caller
gives it back, and the caller reads the reply itself. Whoever reads a socket holds its
``_Conn.reading`` lock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from . import _deadline
from .._broker._actions import Action, Close, Inspect, Notify, Send
from ._forking import on_cpu
from .._broker._core import LOCAL_PEER, BrokerCore
from .._broker._payload import fail
from .._errors import AuthenticationError, MessageTooLarge, RemoteProtocolError
from .._wire._connection import Connection, Phase, Side
from .._wire._frames import HEADER, MAX_HANDSHAKE_FRAME_BYTES, RECV_BYTES
from .._wire._messages import MAX_MESSAGE_BYTES, Failure, Message, Op, Ready, Reply, Request, encode
from ._readers import Reader, Readers, drain_pipe
from ._segment import Segment, send_with_fd

__all__ = ["BrokerLoop", "Lease", "peer_pid"]

log = logging.getLogger("mpmesh.broker")

# A peer whose unsent output passes this and who took none of it for OUTBOUND_STALL_S
# is not reading: disconnect it rather than let the broker grow without bound (pub/sub
# drops messages well before this; see _pubsub). One that takes bytes may run past it
# (a big message in flight), by up to one message of MAX_MESSAGE_BYTES.
MAX_OUTBOUND_BYTES: Final = 256 * 2**20
OUTBOUND_STALL_S: Final = 5.0
# ``drain`` reads at most this many buffers from a peer that exited (64 MiB).
DRAIN_READS: Final = 256
# How long ``drain`` waits for a caller to hand back a socket it reads (it is woken).
LEND_RETURN_S: Final = 2.0
# The version table's lease (``_near``): renewed this often, for this long. A reader
# trusts its copies only inside the lease, so a broker that died stops vouching for
# them within LEASE_S.
LEASE_S: Final = 0.25
RENEW_S: Final = 0.05
# A peer must prove the key within this long of being accepted, and then say Hello
# within as long again (``BrokerCore.on_connect``), or it is closed.
HANDSHAKE_TIMEOUT_S: Final = 5.0
# At most this many peers mid-handshake at once; later connections wait in the listen
# backlog (the listener is not watched) until one of them authenticates or goes.
MAX_HANDSHAKING: Final = 64
# While accept() fails for want of descriptors or memory, the listener is not watched
# for this long, doubling up to the maximum (it stays readable: retrying at once spins).
ACCEPT_BACKOFF_S: Final = 0.1
ACCEPT_BACKOFF_MAX_S: Final = 1.0
_NO_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRIES: Final = 64  # accept() calls per readiness of the listener, at most
# Before a peer has proven the key, a read takes no more than one handshake frame.
_HANDSHAKE_READ: Final = HEADER.size + MAX_HANDSHAKE_FRAME_BYTES
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_READY: Final = Phase.READY
# Answers ``_take_op`` writes itself, when that small.
_ANSWERS: Final = (Reply, Failure)
_SEND_AT_ONCE: Final = 64 * 1024
_NEVER: Final = float("inf")


if hasattr(selectors, "EpollSelector"):
    class _Selector(selectors.EpollSelector):
        """Epoll with a cheap way to change what a registered descriptor is watched for."""

        CAN_LEND = True

        def set_events(self, fd: int, events: int, data: object) -> None:
            """``modify`` without its generic bookkeeping (0.4 us instead of 2.5; a lent
            socket changes twice per blocking request). ``events`` may be 0."""
            key = self._fd_to_key[fd]  # type: ignore[attr-defined]
            self._selector.modify(fd, (select.EPOLLIN if events & selectors.EVENT_READ else 0)  # type: ignore[attr-defined]
                                  | (select.EPOLLOUT if events & selectors.EVENT_WRITE else 0))
            self._fd_to_key[fd] = selectors.SelectorKey(key.fileobj, fd, events, data)  # type: ignore[attr-defined]
else:  # pragma: no cover - macOS: kqueue cannot watch a descriptor for nothing; no lending
    class _Selector(selectors.DefaultSelector):  # type: ignore[no-redef]
        CAN_LEND = False

        def set_events(self, fd: int, events: int, data: object) -> None:
            self.modify(fd, events, data)


class _Conn:
    __slots__ = ("id", "sock", "conn", "out", "closing", "writing", "reading", "lent_to", "give_back",
                 "took_at")

    def __init__(self, peer_id: int, sock: socket.socket, conn: Connection) -> None:
        self.id = peer_id
        self.sock = sock
        self.conn = conn
        self.out = bytearray()
        self.closing = ""
        self.writing = False
        # Whoever reads the socket holds ``reading``: the loop thread for one read, or a
        # caller that waits on this peer for a whole call (``read_for``).
        self.reading = threading.Lock()
        self.lent_to: Lease | None = None
        self.give_back = False
        # While output waits: when the peer last took some (or the wait began); else 0.
        self.took_at = 0.0

    def interest(self) -> int:
        """The events the loop's selector watches: none to read while a caller reads."""
        return (0 if self.lent_to is not None else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if self.writing else 0)


class Lease:
    """A caller's loan of one peer's socket (``submit_lent``): the peer, a receive
    buffer, and a pipe that wakes the caller while it waits in ``poll``.

    Whoever settles the caller's call from another thread (a timeout, a lost worker,
    shutdown) calls ``wake``. The loop keeps returned leases for the next caller and
    closes them with itself.
    """

    __slots__ = ("conn", "owner", "r", "w", "view", "poller", "woken")

    def __init__(self) -> None:
        self.conn: _Conn | None = None
        self.owner = 0
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.view = memoryview(bytearray(RECV_BYTES))
        self.poller = select.poll()  # the pipe, and the lent socket while there is one
        self.poller.register(self.r, select.POLLIN)
        self.woken = False  # a byte may be in the pipe

    def wake(self) -> None:
        if threading.get_ident() == self.owner:
            return  # the caller settled its own call while reading: it is not blocked
        self.woken = True
        try:
            os.write(self.w, b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway

    def clear(self) -> None:
        """Empty the pipe; a system call only if someone woke this lease."""
        if self.woken:
            self.woken = False
            drain_pipe(self.r)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


LocalSink = Callable[[list[Message]], None]
NotifySink = Callable[[list[Notify]], None]


def _no_local(msgs: list[Message]) -> None:
    """Messages for an in-process host that has none."""


class BrokerLoop(Readers):
    """Runs the broker on a selector; start it on a thread with ``start()``."""

    _sel: _Selector

    def __init__(self, core: BrokerCore, listener: socket.socket, authkey: bytes, *,
                 on_local: LocalSink | None = None, on_notify: NotifySink) -> None:
        self.core = core
        self.lock = threading.Lock()
        self._listener = listener
        self._authkey = authkey
        # Where messages for the in-process host go (its ``LocalClient``, made with us).
        self.on_local: LocalSink = on_local or _no_local
        self._on_notify = on_notify
        self._sel = _Selector()
        self._conns: dict[int, _Conn] = {}
        self._next_id = LOCAL_PEER + 1
        self._buf = bytearray(RECV_BYTES)
        self._view = memoryview(self._buf)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pending_write: set[_Conn] = set()
        self._leases: list[Lease] | None = []  # None once closed
        self._init_readers()
        self._deferred: list[tuple[list[Message], list[Notify]]] = []
        self._inbox: collections.deque[Message] = collections.deque()
        self._sleep_until = 0.0
        self._deadline: float | None = None  # the core's, as of when it last moved
        self._stopping = False
        self._closed = False  # descriptors closed (``_close_all`` ran)
        # Peers mid-handshake (loop thread): their deadline and the pid the OS gave.
        self._handshaking: dict[int, tuple[float, int | None]] = {}
        self._listening = True  # the listener is watched (see ``_guard``)
        self._accept_pause = 0.0  # the current back-off of a failing accept(); 0: none
        self._accept_at = 0.0  # watch the listener again from then
        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None  # the thread running ``_run``
        # The version table handed to local peers with their Ready (``_segment``).
        self.segment: Segment | None = None
        self._renew_at = 0.0
        listener.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mpmesh-broker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and close every connection (idempotent)."""
        self._stopping = True
        if self._thread is None:  # never ran: no ``_run`` will close the listener
            self._close_all()
            return
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            while not self._stopping:
                self._once()
        except Exception:  # pragma: no cover - a bug; make it loud, then fail peers
            log.exception("broker loop crashed")
        finally:
            self._close_all()

    def _once(self) -> None:
        # Timers first, and the next deadline, under the lock (other threads push timers).
        ticked: tuple[list[Message], list[Notify]] | None = None
        with self.lock:
            core = self.core
            if core.timers_moved:
                core.timers_moved = False
                self._deadline = core.next_deadline()
            deadline = self._deadline
            if deadline is not None and deadline <= time.monotonic():
                ticked = self._perform(core.on_tick(time.monotonic()))
                core.timers_moved = False
                deadline = self._deadline = core.next_deadline()
            self._sleep_until = _NEVER if deadline is None else deadline
        if ticked is not None and (ticked[0] or ticked[1]):
            self._deliver(*ticked)
            self._combine()
        if self.segment is not None:
            deadline = self._renew(deadline)
        if self._handshaking or not self._listening:
            deadline = self._guard(deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, mask in self._sel.select(timeout):
            obj = key.data
            if obj is None:
                if key.fileobj is self._listener:
                    self._accept()
                else:
                    self._drain_wake()
            elif type(obj) is _Conn:
                if mask & selectors.EVENT_READ:
                    self._read(obj)
                if mask & selectors.EVENT_WRITE and obj.id in self._conns:
                    with self.lock:
                        self._flush(obj, on_loop=True)
            elif type(obj) is Reader:
                obj.callback()
        if self._deferred:
            with self.lock:
                deferred, self._deferred = self._deferred, []
            for deferred_local, deferred_notes in deferred:
                self._deliver(deferred_local, deferred_notes)
        self._combine()

    def _renew(self, deadline: float | None) -> float:
        """Renew the version table's lease when due, and let the core do its idle work
        (``on_idle``); the next deadline, renewal included."""
        now = time.monotonic()
        if now >= self._renew_at:
            self.segment.table.renew(int((now + LEASE_S) * 1e9))  # type: ignore[union-attr]
            self._renew_at = now + RENEW_S
            with self.lock:
                done = self._perform(self.core.on_idle(now))
            self._deliver(*done)
            self._combine()
        return self._renew_at if deadline is None else min(deadline, self._renew_at)

    # -- cross-thread entry points ----------------------------------------------------------

    def run_core(self, fn: Callable[[float], list[Action]]) -> None:
        """Run ``fn(now)`` under the core lock and perform the actions it returns."""
        with self.lock:
            actions = fn(time.monotonic())
            self.core.timers_moved = True  # ``fn`` may have changed state directly
            local, notes = self._perform(actions)
        self._deliver(local, notes)
        self._combine()

    def submit_local(self, msg: Message) -> None:
        """Hand a message from the in-process host to the core (any thread, never blocks).

        Flat combining: the message joins a lock-free inbox, and whichever thread holds
        the core lock drains the inbox before it lets go. A caller that finds the lock
        busy (the broker thread is routing replies) returns at once instead of queueing
        on the lock, and a burst of requests is routed, and written, as one batch.
        """
        self._inbox.append(msg)
        self._combine()
        if type(msg) in (Request, Op):
            self._wake_for(msg, time.monotonic())  # type: ignore[arg-type]

    def _wake_for(self, msg: Request | Op, now: float) -> None:
        """A request or op that may wait (timeout >= 0) can bring the next deadline forward."""
        if msg.timeout >= 0 and now + msg.timeout < self._sleep_until:
            self._wake()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the core lock (from any thread); drain what callers queued meanwhile after."""
        with self.lock:
            try:
                yield
            finally:
                self.core.timers_moved = True
        self._combine()

    def _combine(self) -> None:
        """Drain the in-process inbox if the core lock is free; re-check after releasing."""
        inbox = self._inbox
        while inbox and self.lock.acquire(blocking=False):
            try:
                local, notes = self._perform(self._take_inbox(time.monotonic()))
            finally:
                self.lock.release()
            self._deliver(local, notes)

    def _take_inbox(self, now: float) -> list[Action]:
        """Run what the host's threads queued through the core, in order (lock held)."""
        inbox, on_message = self._inbox, self.core.on_message
        actions: list[Action] = []
        while inbox:
            actions += on_message(LOCAL_PEER, inbox.popleft(), now)
        return actions

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _drain_wake(self) -> None:
        drain_pipe(self._wake_r)
        with self.lock:
            pending, self._pending_write = self._pending_write, set()
            for conn in pending:
                if conn.id in self._conns:
                    self._flush(conn, on_loop=True)
        self._apply_reader_changes()

    # -- connections ------------------------------------------------------------------------

    def _accept(self) -> None:
        """Take in the connections waiting at the listener, while fewer than
        MAX_HANDSHAKING peers are mid-handshake."""
        failed = 0
        for _ in range(_ACCEPT_TRIES):
            if len(self._handshaking) >= MAX_HANDSHAKING:
                self._listen(False)  # the rest wait in the backlog until a slot frees
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _NO_RESOURCES:
                    self._back_off(exc)
                    return
                # That one connection failed (ECONNABORTED: it went away first; EPROTO,
                # EPERM...): the others are still served.
                log.debug("accept() failed: %s", exc)
                failed += 1
                continue
            if self._accept_pause:
                log.info("accepting connections again")
                self._accept_pause = 0.0
            self._serve(sock, Connection(Side.BROKER, self._authkey, os.urandom), peer_pid(sock))
        if failed == _ACCEPT_TRIES:  # not one connection's trouble: do not spin on it
            self._back_off(OSError(f"accept() failed {failed} times in a row"))

    def _back_off(self, exc: OSError) -> None:
        """Stop watching the listener for a while (logged once per episode of failures)."""
        if self._accept_pause:
            self._accept_pause = min(2 * self._accept_pause, ACCEPT_BACKOFF_MAX_S)
        else:
            self._accept_pause = ACCEPT_BACKOFF_S
            log.error("cannot accept connections (%s); retrying every %g s at most until it clears",
                      exc, ACCEPT_BACKOFF_MAX_S)
        self._accept_at = time.monotonic() + self._accept_pause
        self._listen(False)

    def _listen(self, on: bool) -> None:
        """Watch the listener, or stop (connections then wait in its backlog); loop thread."""
        if on is self._listening:
            return
        if on:
            self._sel.register(self._listener, selectors.EVENT_READ, None)
        else:
            self._sel.unregister(self._listener)
        self._listening = on

    def _guard(self, deadline: float | None) -> float | None:
        """Close the peers that did not authenticate in time, and watch the listener again
        once allowed; return ``deadline`` brought forward to the next of these timers."""
        now = time.monotonic()
        for peer in [p for p, (due, _) in self._handshaking.items() if due <= now]:
            conn = self._conns.get(peer)
            if conn is None:
                del self._handshaking[peer]
            else:
                self._lost(conn, f"did not authenticate within {HANDSHAKE_TIMEOUT_S:g} s")
        if (not self._listening and now >= self._accept_at and not self._stopping
                and len(self._handshaking) < MAX_HANDSHAKING):
            self._listen(True)
        soonest = min((due for due, _ in self._handshaking.values()), default=_NEVER)
        if not self._listening and self._accept_at > now:
            soonest = min(soonest, self._accept_at)
        if soonest == _NEVER:
            return deadline
        return soonest if deadline is None else min(deadline, soonest)

    def adopt(self, sock: socket.socket, pid: int | None = None) -> None:
        """Serve a connection our zygote made for a child it forked (the other end is the
        child's): it needs no handshake, and has no Hello deadline. ``pid``: the child's,
        as the zygote reported it (the socketpair's own credentials are the zygote's).
        Loop thread only."""
        if self._stopping or self._leases is None:
            sock.close()
            return
        self._serve(sock, Connection.trusted(Side.BROKER), pid)

    def _serve(self, sock: socket.socket, wire: Connection, pid: int | None = None) -> None:
        """Start serving a new connection: open its handshake, or take it as a peer now.
        ``pid``: the process at the other end, if known."""
        sock.setblocking(False)
        peer_id = self._next_id
        self._next_id += 1
        conn = _Conn(peer_id, sock, wire)
        with self.lock:
            self._conns[peer_id] = conn
            if wire.phase is Phase.READY:
                self.core.on_connect(peer_id, time.monotonic(), pid=pid)
            else:
                self._handshaking[peer_id] = (time.monotonic() + HANDSHAKE_TIMEOUT_S, pid)
                conn.out += wire.initiate()
                self._flush(conn, on_loop=True)
        if peer_id in self._conns:
            self._sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.writing else 0), conn)

    def _read(self, conn: _Conn) -> None:
        if not conn.reading.acquire(blocking=False):
            return  # a caller waiting on this peer reads it (read_for)
        try:
            self._take_in(conn, self._view)
        finally:
            conn.reading.release()

    def _take_in(self, conn: _Conn, view: memoryview) -> None:
        """One read from ``conn``'s socket into ``view``, then its messages through the core
        (by whoever holds ``conn.reading``)."""
        try:
            # Before the key is proven, small reads: such a peer gets no large buffer.
            n = conn.sock.recv_into(view, 0 if conn.conn.phase is _READY else _HANDSHAKE_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(conn, f"read failed: {exc}")
            return
        if n == 0:
            self._lost(conn, "closed the connection")
            return
        wire = conn.conn
        op = wire.take_op(view[:n])
        if op is not None:
            self._take_op(conn, op)
            return
        was_ready = wire.phase is Phase.READY
        try:
            reply = wire.receive_data(view[:n])
        except AuthenticationError as exc:
            log.warning("peer %d: %s; closing it", conn.id, exc)
            with self.lock:
                conn.out += wire.rejection()
                conn.closing = str(exc)
                self._flush(conn, on_loop=True)
            return
        except RemoteProtocolError as exc:
            log.warning("peer %d sent garbage (%s); closing it", conn.id, exc)
            self._lost(conn, f"protocol error: {exc}")
            return
        with self.lock:
            now = time.monotonic()
            if reply:
                conn.out += reply
            if not was_ready and wire.phase is Phase.READY:
                _, pid = self._handshaking.pop(conn.id, (0.0, None))
                self.core.on_connect(conn.id, now, pid=pid, hello_by=now + HANDSHAKE_TIMEOUT_S)
            actions: list[Action] = []
            on_message = self.core.on_message
            for msg in wire.events():
                try:
                    actions += on_message(conn.id, msg, now)
                except Exception:
                    # A bug, or a message the core failed to validate: it costs this
                    # peer its connection, never the broker.
                    log.exception("peer %d: handling %s failed; closing it", conn.id, type(msg).__name__)
                    actions.append(Close(conn.id, f"the broker failed on its {type(msg).__name__}"))
                    break
            local, notes = self._perform(actions)
            if reply:
                self._flush(conn, on_loop=True)
        self._deliver(local, notes)
        self._combine()

    def _take_op(self, conn: _Conn, op: Op) -> None:
        """``_take_in`` for a read that held exactly one Op (a proxy call, say): an answer
        that is all the core has to say goes straight out, without the batch machinery."""
        with self.lock:
            try:
                actions = self.core.on_message(conn.id, op, time.monotonic())
            except Exception:
                log.exception("peer %d: handling Op failed; closing it", conn.id)
                actions = [Close(conn.id, "the broker failed on its Op")]
            if len(actions) == 1 and not conn.out and not conn.closing:
                action = actions[0]
                if type(action) is Send and action.peer == conn.id and type(action.msg) in _ANSWERS:
                    try:
                        frame = encode(action.msg)
                    except MessageTooLarge:
                        frame = b""  # too large to send: ``_perform`` answers with a Failure
                    if 0 < len(frame) <= _SEND_AT_ONCE:
                        try:
                            sent = conn.sock.send(frame)
                        except (BlockingIOError, InterruptedError):
                            sent = 0
                        except OSError:
                            sent = -1  # the general path meets the error again and handles it
                        if sent == len(frame):
                            actions = []
                        elif sent >= 0:
                            conn.out += frame[sent:]
                            self._flush(conn, threading.get_ident() == self._loop_ident)
                            actions = []
            local, notes = self._perform(actions) if actions else (None, None)
        if local or notes:
            self._deliver(local, notes)  # type: ignore[arg-type]
        self._combine()

    def drain(self, peer: int) -> None:
        """Take in all that ``peer`` sent before it went away, before its end is acted on.

        A process's last replies and the news of its exit come on two descriptors, and
        the selector may report either first: a reply must not lose that race and turn
        into WorkerLost. Loop thread only (elsewhere a no-op). Bounded: a process the
        peer forked may still hold its socket and write.
        """
        if threading.get_ident() != self._loop_ident:
            return
        conn = self._conns.get(peer)
        lease = conn.lent_to if conn is not None else None
        if conn is not None and lease is not None:
            conn.give_back = True
            lease.wake()
            if not conn.reading.acquire(timeout=LEND_RETURN_S):
                return
            conn.reading.release()
        for _ in range(DRAIN_READS):
            conn = self._conns.get(peer)
            if conn is None:
                return
            try:
                conn.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return  # all in
            except OSError:
                pass  # _read reports it
            self._read(conn)

    def submit_lent(self, msg: Request) -> Lease | None:
        """``submit_local`` for a request its caller will block on.

        If the core starts it on a socket peer at once, that peer's socket is lent to the
        caller (taken off the selector's read set) before the frame is written, so the
        reply cannot wake the loop first; pass the lease to ``read_for``, which always
        gives it back. None when the request is queued or the peer is being read (the
        caller then waits the usual way).
        """
        lease: Lease | None = None
        with self.lock:
            now = time.monotonic()
            actions = self._take_inbox(now)  # what was queued earlier goes first
            mine = self.core.on_message(LOCAL_PEER, msg, now)
            actions += mine
            for action in mine:
                if type(action) is Send and type(action.msg) is Request:
                    conn = self._conns.get(action.peer)
                    if (_Selector.CAN_LEND and conn is not None and self._leases is not None
                            and conn.reading.acquire(blocking=False)):
                        lease = self._leases.pop() if self._leases else Lease()
                        lease.owner, lease.conn = threading.get_ident(), conn
                        if not self._lend(conn, lease):
                            conn.reading.release()
                            self._leases.append(lease)
                            lease = None
                    break
            local, notes = self._perform(actions)
            self._wake_for(msg, now)
        self._deliver(local, notes)
        self._combine()
        return lease

    def read_for(self, lease: Lease, settled: Callable[[], bool], deadline: float) -> None:
        """Read the lent socket until ``settled()``, then give it back.

        Leader/follower for a Master's blocking call: the caller reads its worker's reply
        itself, so the answer wakes one thread instead of the loop and then the caller.
        Everything else that arrives meanwhile goes through the core as the loop would
        take it. Also returns at ``deadline``, or when the loop wants the socket back
        (``drain``).
        """
        conn = lease.conn
        assert conn is not None
        fd = conn.sock.fileno()
        poller = lease.poller
        try:
            if fd < 0:  # dropped since it was lent
                return
            poller.register(fd, select.POLLIN)
            view = lease.view
            self._take_in(conn, view)  # the reply is often in already (one CPU: the worker ran first)
            while not settled() and not conn.give_back and conn.id in self._conns:
                timeout = _deadline.remaining(deadline)
                if timeout == 0 or not (ready := poller.poll(None if timeout is None else timeout * 1000)):
                    return
                for ready_fd, _ in ready:
                    if ready_fd == fd:
                        self._take_in(conn, view)
                    else:
                        drain_pipe(lease.r)  # always: a late ``wake`` may have missed ``woken``
        finally:
            try:
                poller.unregister(fd)
            except (KeyError, ValueError):
                pass
            with self.lock:
                self._lend(conn, None)
                lease.conn, lease.owner = None, 0
                if self._leases is None:
                    lease.close()
                else:
                    lease.clear()
                    self._leases.append(lease)
            conn.reading.release()

    def _lend(self, conn: _Conn, lease: Lease | None) -> bool:
        """Take ``conn`` off the selector's read set for ``lease``, or give it back
        (None); lock held."""
        if conn.id not in self._conns:
            return False
        conn.lent_to, conn.give_back = lease, False
        try:
            self._watch(conn)
        except (KeyError, ValueError, OSError):
            conn.lent_to = None
            return False
        return True

    def _lost(self, conn: _Conn, why: str) -> None:
        with self.lock:
            self._drop(conn)
            local, notes = self._perform(self.core.on_peer_lost(conn.id, time.monotonic()))
        log.debug("peer %d lost: %s", conn.id, why)
        self._deliver(local, notes)

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection and close its socket (lock held)."""
        if self._conns.pop(conn.id, None) is None:
            return
        self._handshaking.pop(conn.id, None)
        self._pending_write.discard(conn)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- actions ----------------------------------------------------------------------------

    def _perform(self, actions: list[Action]) -> tuple[list[Message], list[Notify]]:
        """Queue every action's bytes, then flush each touched peer once (lock held)."""
        local: list[Message] = []
        notes: list[Notify] = []
        touched: dict[int, _Conn] = {}
        conns = self._conns
        for action in actions:
            cls = type(action)
            if cls is Send:
                peer = action.peer  # type: ignore[union-attr]
                if peer == LOCAL_PEER:
                    local.append(action.msg)  # type: ignore[union-attr]
                    continue
                conn = conns.get(peer)
                if conn is None or conn.closing:
                    continue
                if type(action.msg) is Ready and self.segment is not None:  # type: ignore[union-attr]
                    self._hand_segment(conn, encode(action.msg))  # type: ignore[union-attr]
                    touched[peer] = conn
                    continue
                try:
                    frame = encode(action.msg)  # type: ignore[union-attr]
                except MessageTooLarge as exc:
                    frame = _refused(peer, action.msg, exc)  # type: ignore[union-attr]
                conn.out += frame
                if len(conn.out) > MAX_OUTBOUND_BYTES and len(conn.out) > len(frame):
                    self._check_reading(conn)
                touched[peer] = conn
            elif cls is Close:
                conn = conns.get(action.peer)  # type: ignore[union-attr]
                if conn is not None:
                    conn.closing = action.reason  # type: ignore[union-attr]
                    touched[conn.id] = conn
            elif cls is Inspect:
                # The core asks which of these processes are on a CPU: look, and answer.
                running = {pid for pid in action.pids if on_cpu(pid)}  # type: ignore[union-attr]
                more_local, more_notes = self._perform(self.core.on_running(running, time.monotonic()))
                local += more_local
                notes += more_notes
            else:
                notes.append(action)  # type: ignore[arg-type]
        on_loop = threading.get_ident() == self._loop_ident
        for conn in touched.values():
            self._flush(conn, on_loop)
        return local, notes

    @staticmethod
    def _check_reading(conn: _Conn) -> None:
        """``conn`` has more than MAX_OUTBOUND_BYTES unsent, not all of it just queued:
        disconnect it if it took nothing for OUTBOUND_STALL_S, or if even a big message in
        flight does not account for it (lock held)."""
        backlog = len(conn.out)
        if backlog > MAX_OUTBOUND_BYTES + MAX_MESSAGE_BYTES:
            conn.closing = f"{backlog} bytes unsent: more than a peer reading one message at a time can owe"
        elif conn.took_at and time.monotonic() - conn.took_at > OUTBOUND_STALL_S:
            conn.closing = f"{backlog} bytes unsent, none taken for {OUTBOUND_STALL_S:g} s: the peer is not reading"
        else:
            return
        log.warning("peer %d: %s; disconnecting it", conn.id, conn.closing)
        conn.out.clear()

    def _hand_segment(self, conn: _Conn, frame: bytes) -> None:
        """Queue ``frame`` (a Ready) with the version table's descriptor on its first
        unsent byte, for a peer on a Unix socket (lock held). A peer whose socket will
        not take it now simply goes without: its reads are round trips."""
        data = bytes(conn.out) + frame
        conn.out.clear()
        sent = 0
        if conn.sock.family == socket.AF_UNIX and self.segment is not None and self.segment.fd >= 0:
            try:
                sent = send_with_fd(conn.sock, data, self.segment.fd)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass  # the flush that follows meets the same error and drops the peer
        conn.out += data[sent:]

    def _flush(self, conn: _Conn, on_loop: bool) -> None:
        """Send what the kernel takes now; arrange EVENT_WRITE for the rest (lock held)."""
        out = conn.out
        before = len(out)
        while out:
            try:
                sent = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                out.clear()
                conn.closing = conn.closing or "write failed"
                break
            del out[:sent]
        if out:
            if len(out) < before or not conn.took_at:
                conn.took_at = time.monotonic()  # the peer took some, or a backlog begins
            if not conn.writing:
                if on_loop:
                    conn.writing = True
                    if conn.id in self._conns and conn.sock.fileno() >= 0:
                        try:
                            self._watch(conn)
                        except KeyError:
                            pass  # registered by _accept right after this flush
                else:
                    self._pending_write.add(conn)
                    self._wake()
            return
        conn.took_at = 0.0
        if conn.writing and on_loop:
            conn.writing = False
            self._watch(conn)
        if conn.closing:
            if on_loop:
                self._drop_and_forget(conn)
            else:
                self._pending_write.add(conn)
                self._wake()

    def _watch(self, conn: _Conn) -> None:
        """Make the selector watch ``conn`` for ``conn.interest()`` (lock held)."""
        self._sel.set_events(conn.sock.fileno(), conn.interest(), conn)

    def _drop_and_forget(self, conn: _Conn) -> None:
        reason = conn.closing
        self._drop(conn)
        actions = self.core.on_peer_lost(conn.id, time.monotonic())
        if actions:
            log.debug("peer %d closed by the broker: %s", conn.id, reason)
            local, notes = self._perform(actions)
            # Called with the lock held: defer deliveries to the loop's next turn.
            self._deferred.append((local, notes))
            self._wake()

    def _deliver(self, local: list[Message], notes: list[Notify]) -> None:
        if local:
            self.on_local(local)
        if notes:
            self._on_notify(notes)

    def _close_all(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            if self.segment is not None:
                self.segment.close()  # before the peers see their connections end
            for conn in list(self._conns.values()):
                self._drop(conn)
            leases, self._leases = self._leases or [], None
            for lease in leases:
                lease.close()
        self._forget_readers()
        self._sel.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _refused(peer: int, msg: Message, exc: MessageTooLarge) -> bytes:
    """What goes to ``peer`` instead of ``msg``, too large to send: for a Reply, a Failure
    its caller raises (MessageTooLarge); anything else is dropped (its sender's own
    check keeps such messages from arising)."""
    if type(msg) is Reply:
        log.warning("peer %d: a reply too large to send (%s); the caller gets an error instead", peer, exc)
        return encode(fail(msg.rid, MessageTooLarge(f"the reply is too large to send back: {exc}")))
    log.error("peer %d: dropped a %s too large to send: %s", peer, type(msg).__name__, exc)
    return b""


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that connected ``sock``, as the kernel recorded it at
    ``connect()``; None over TCP, where the platform does not say, or for a process
    outside our pid namespace (reported as 0)."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        if hasattr(socket, "SO_PEERCRED"):  # Linux
            pid: int = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
        elif sys.platform == "darwin":  # pragma: no cover - SOL_LOCAL, LOCAL_PEERPID
            pid = struct.unpack("i", sock.getsockopt(0, 2, 4))[0]
        else:  # pragma: no cover
            return None
    except OSError:
        return None
    return pid or None
