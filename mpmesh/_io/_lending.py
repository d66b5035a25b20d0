"""A broker peer's connection, and the loan of its socket to a caller that blocks on it.

A caller that will block on a request may borrow the socket of the worker running it
(``submit_lent``, ``read_for``): the loop stops watching that socket until the caller
gives it back, and the caller reads the reply itself. Whoever reads a socket holds its
``Peer.reading`` lock. ``Lending`` is part of ``BrokerLoop`` (``_loop.py``).
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .._broker._actions import Action, Send
from .._broker._core import LOCAL_PEER
from .._wire._connection import Connection
from .._wire._frames import RECV_BYTES
from .._wire._messages import Request
from . import _deadline
from ._reactor import Link, Selector
from ._readers import drain_pipe

if TYPE_CHECKING:
    from .._broker._actions import Notify
    from .._broker._core import BrokerCore
    from .._wire._messages import Message, Op

__all__ = ["DRAIN_READS", "LEND_RETURN_S", "Lease", "Lending", "Peer"]

# ``drain`` reads at most this many buffers from a peer that exited (64 MiB).
DRAIN_READS: Final = 256
# How long ``drain`` waits for a caller to hand back a socket it reads (it is woken).
LEND_RETURN_S: Final = 2.0


class Peer(Link):
    """A broker's connection to one peer: its wire state, and who reads its socket."""

    __slots__ = ("conn", "give_back", "id", "lent_to", "reading")

    def __init__(self, peer_id: int, sock: socket.socket, conn: Connection) -> None:
        super().__init__(sock)
        self.id = peer_id
        self.conn = conn
        # Whoever reads the socket holds ``reading``: the loop thread for one read, or a
        # caller that waits on this peer for a whole call (``read_for``).
        self.reading = threading.Lock()
        self.lent_to: Lease | None = None
        self.give_back = False

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
        self.conn: Peer | None = None
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


class Lending:
    """``BrokerLoop``'s socket lending (a mixin: the loop supplies the rest)."""

    if TYPE_CHECKING:
        core: BrokerCore
        lock: threading.Lock
        _conns: dict[int, Peer]
        _leases: list[Lease] | None
        _loop_ident: int | None

        def _take_inbox(self, now: float) -> list[Action]: ...
        def _perform(self, actions: list[Action]) -> tuple[list[Message], list[Notify]]: ...
        def _deliver(self, local: list[Message], notes: list[Notify]) -> None: ...
        def _combine(self) -> None: ...
        def _wake_for(self, msg: Request | Op, now: float) -> None: ...
        def _take_in(self, conn: Peer, view: memoryview) -> None: ...
        def _read(self, link: Peer) -> None: ...
        def _watch(self, link: Peer) -> None: ...

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
                    if (Selector.CAN_LEND and conn is not None and self._leases is not None
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

    def _lend(self, conn: Peer, lease: Lease | None) -> bool:
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
