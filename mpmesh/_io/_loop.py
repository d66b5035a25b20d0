"""The broker's event loop: one selector serves every connection; no thread per client.

It is the broker's protocol layer on the shared loop (``_reactor.Reactor``: selector,
listener, strangers, outboxes) and drives a ``BrokerCore``: bytes in -> ``Connection`` -> messages -> core -> actions ->
bytes out. The core is guarded by one lock, so the host process's own threads (a
Master's callers) can also submit messages in-process and write the resulting frames
themselves, without a thread hop (``submit_local``).

Writes never block: frames are appended to the peer's outbound buffer and flushed with
non-blocking sends; what the kernel does not take waits for EVENT_WRITE. Messages for
the in-process host and ``Notify`` events are handed to callbacks *after* the lock is
released, on the thread that produced them; those callbacks must not block.

A caller that will block on a request may borrow the socket of the worker running it
(``_lending.py``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from .._broker._actions import Action, Close, Inspect, Notify, Send
from .._broker._core import LOCAL_PEER, BrokerCore
from .._broker._payload import fail
from .._errors import AuthenticationError, MessageTooLarge, RemoteProtocolError
from .._wire._connection import Connection, Phase, Side
from .._wire._frames import HEADER, MAX_HANDSHAKE_FRAME_BYTES
from .._wire._messages import MAX_MESSAGE_BYTES, Failure, Message, Op, Ready, Reply, Request, encode
from . import _reactor
from ._forking import on_cpu
from ._lending import Lease, Lending, Peer
from ._reactor import Reactor, peer_pid
from ._segment import Segment, send_with_fd

__all__ = ["BrokerLoop", "Lease", "peer_pid"]

log = logging.getLogger("mpmesh.broker")

# A peer whose unsent output passes this and who took none of it for OUTBOUND_STALL_S
# is not reading: disconnect it rather than let the broker grow without bound (pub/sub
# drops messages well before this; see _pubsub). One that takes bytes may run past it
# (a big message in flight), by up to one message of MAX_MESSAGE_BYTES.
MAX_OUTBOUND_BYTES: Final = 256 * 2**20
OUTBOUND_STALL_S: Final = 5.0
# The version table's lease (``_near``): renewed this often, for this long. A reader
# trusts its copies only inside the lease, so a broker that died stops vouching for
# them within LEASE_S.
LEASE_S: Final = 0.25
RENEW_S: Final = 0.05
# Before a peer has proven the key, a read takes no more than one handshake frame.
_HANDSHAKE_READ: Final = HEADER.size + MAX_HANDSHAKE_FRAME_BYTES
_READY: Final = Phase.READY
# Answers ``_take_op`` writes itself, when that small.
_ANSWERS: Final = (Reply, Failure)
_SEND_AT_ONCE: Final = 64 * 1024
_NEVER: Final = float("inf")


LocalSink = Callable[[list[Message]], None]
NotifySink = Callable[[list[Notify]], None]


def _no_local(msgs: list[Message]) -> None:
    """Messages for an in-process host that has none."""


class BrokerLoop(Lending, Reactor[Peer]):
    """Runs the broker on the shared selector loop; start it on a thread with ``start()``."""

    def __init__(self, core: BrokerCore, listener: socket.socket, authkey: bytes, *,
                 on_local: LocalSink | None = None, on_notify: NotifySink) -> None:
        # Over TCP a peer of any uid may hold the key: the handshake is the check.
        super().__init__(listener, Peer, logger=log.name, same_uid_only=False)
        self.core = core
        self._authkey = authkey
        # Where messages for the in-process host go (its ``LocalClient``, made with us).
        self.on_local: LocalSink = on_local or _no_local
        self._on_notify = on_notify
        self._conns: dict[int, Peer] = {}
        self._next_id = LOCAL_PEER + 1
        self._leases: list[Lease] | None = []  # None once closed
        self._deferred: list[tuple[list[Message], list[Notify]]] = []
        self._inbox: collections.deque[Message] = collections.deque()
        self._sleep_until = 0.0
        self._deadline: float | None = None  # the core's, as of when it last moved
        # The version table handed to local peers with their Ready (``_segment``).
        self.segment: Segment | None = None
        self._renew_at = 0.0

    # -- running (the loop's hooks) -----------------------------------------------------------

    def start(self, name: str = "mpmesh-broker") -> None:
        super().start(name)

    def _timers(self) -> float | None:
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
        return deadline

    def _after_turn(self) -> None:
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

    # -- connections ------------------------------------------------------------------------

    def _admit(self, sock: socket.socket) -> None:
        self._serve(sock, Connection(Side.BROKER, self._authkey, os.urandom), peer_pid(sock))

    def _expired(self, key: object) -> None:
        assert isinstance(key, Peer)
        self._lost(key, f"did not authenticate within {_reactor.HANDSHAKE_TIMEOUT_S:g} s")

    def _is_live(self, link: Peer) -> bool:
        return link.id in self._conns

    def _read_stranger(self, data: object) -> None:  # pragma: no cover - the broker registers none
        raise AssertionError(f"unexpected selector data {data!r}")

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
        conn = Peer(peer_id, sock, wire)
        with self.lock:
            self._conns[peer_id] = conn
            if wire.phase is Phase.READY:
                self.core.on_connect(peer_id, time.monotonic(), pid=pid)
            else:
                self._hold(conn, pid)
                conn.out += wire.initiate()
                self._flush(conn, on_loop=True)
        if peer_id in self._conns:
            self._sel.register(sock, conn.interest(), conn)

    def _read(self, conn: Peer) -> None:
        if not conn.reading.acquire(blocking=False):
            return  # a caller waiting on this peer reads it (read_for)
        try:
            self._take_in(conn, self._view)
        finally:
            conn.reading.release()

    def _take_in(self, conn: Peer, view: memoryview) -> None:
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
                pid = self._release(conn)
                self.core.on_connect(conn.id, now, pid=pid, hello_by=now + _reactor.HANDSHAKE_TIMEOUT_S)
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

    def _take_op(self, conn: Peer, op: Op) -> None:
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

    def _lost(self, conn: Peer, why: str) -> None:
        with self.lock:
            self._drop(conn)
            local, notes = self._perform(self.core.on_peer_lost(conn.id, time.monotonic()))
        log.debug("peer %d lost: %s", conn.id, why)
        self._deliver(local, notes)

    def _drop(self, conn: Peer) -> None:
        """Forget a connection and close its socket (lock held)."""
        if self._conns.pop(conn.id, None) is None:
            return
        self._release(conn)
        self._write_soon.discard(conn)
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
        touched: dict[int, Peer] = {}
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
    def _check_reading(conn: Peer) -> None:
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

    def _hand_segment(self, conn: Peer, frame: bytes) -> None:
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

    def _closed_by_us(self, conn: Peer) -> None:
        """Drop a peer the broker closes, now its last output is out; tell the core."""
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

    def _close_links(self) -> None:
        if self.segment is not None:
            self.segment.close()  # before the peers see their connections end
        for conn in list(self._conns.values()):
            self._drop(conn)
        leases, self._leases = self._leases or [], None
        for lease in leases:
            lease.close()


def _refused(peer: int, msg: Message, exc: MessageTooLarge) -> bytes:
    """What goes to ``peer`` instead of ``msg``, too large to send: for a Reply, a Failure
    its caller raises (MessageTooLarge); anything else is dropped (its sender's own
    check keeps such messages from arising)."""
    if type(msg) is Reply:
        log.warning("peer %d: a reply too large to send (%s); the caller gets an error instead", peer, exc)
        return encode(fail(msg.rid, MessageTooLarge(f"the reply is too large to send back: {exc}")))
    log.error("peer %d: dropped a %s too large to send: %s", peer, type(msg).__name__, exc)
    return b""
