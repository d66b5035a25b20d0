"""The selector loop every server of a process runs on: the broker's and a standalone Pool's.

A ``Reactor`` owns one selector and what any of its users needs around it: a wake-up pipe
for other threads, a listener whose connections it accepts (refusing another uid's, if
asked; backing off while accept() fails for want of descriptors), a bounded set of
connections that have not proven the key yet, each with one deadline to do it, a
non-blocking outbox per connection flushed on EVENT_WRITE, the ``Readers`` other parts
of the process watch through it, and the closing of all of it.

A protocol layer subclasses it and supplies what is its own: how a connection is read,
what it does with a new one, which timers it keeps (``BrokerLoop`` in ``_loop.py``,
``ChannelIO`` in ``_pool/_io.py``). Only the loop's thread touches the selector, except
for what a subclass does under its own rules (lending a socket, dropping a peer).
"""

from __future__ import annotations

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
from typing import Final, Generic, TypeVar

from .._wire._frames import RECV_BYTES
from ._readers import Reader, Readers, drain_pipe

__all__ = ["ACCEPT_BACKOFF_MAX_S", "ACCEPT_BACKOFF_S", "HANDSHAKE_TIMEOUT_S", "MAX_HANDSHAKING", "Link", "Reactor",
           "Selector", "peer_credentials", "peer_pid"]

# A connection must prove the key within this long of being accepted (the broker then
# gives it as long again to say Hello), or it is closed.
HANDSHAKE_TIMEOUT_S: Final = 5.0
# At most this many connections wait to prove the key at once; later ones wait in the
# listen backlog (the listener is not watched) until one of them proves it or goes.
MAX_HANDSHAKING: Final = 64
# While accept() fails for want of descriptors or memory, the listener is not watched
# for this long, doubling up to the maximum (it stays readable: retrying at once spins).
ACCEPT_BACKOFF_S: Final = 0.1
ACCEPT_BACKOFF_MAX_S: Final = 1.0
_NO_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRIES: Final = 64  # accept() calls per readiness of the listener, at most
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NEVER: Final = float("inf")
# The selector data of the loop's own descriptors.
_WAKE: Final = object()
_LISTENER: Final = object()


if hasattr(selectors, "EpollSelector"):
    class Selector(selectors.EpollSelector):
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
    class Selector(selectors.DefaultSelector):  # type: ignore[no-redef]
        CAN_LEND = False

        def set_events(self, fd: int, events: int, data: object) -> None:
            self.modify(fd, events, data)


class Link:
    """A connection the loop serves: its socket and the bytes that wait to be sent on it."""

    __slots__ = ("closing", "out", "sock", "took_at", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.writing = False  # watched for EVENT_WRITE
        self.closing = ""  # why it is to close once its output is out (or why a write failed)
        # While output waits: when the peer last took some (or the wait began); else 0.
        self.took_at = 0.0

    def interest(self) -> int:
        """The events the selector watches this connection for."""
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if self.writing else 0)


L = TypeVar("L", bound=Link)


class Reactor(Readers, Generic[L]):
    """One selector loop and its listener; subclasses supply the protocol (see the hooks).

    ``lock`` guards the subclass's state and every connection's outbox: whoever queues
    bytes or flushes holds it. The selector data of a served connection is its ``Link``
    (of ``link_type``); of a stranger the subclass registers, anything else.
    """

    _sel: Selector

    def __init__(self, listener: socket.socket, link_type: type[L], *, logger: str, same_uid_only: bool) -> None:
        """``same_uid_only``: close, at accept, a connection whose peer runs as another uid."""
        self.lock = threading.Lock()
        self.log = logging.getLogger(logger)
        self._listener = listener
        self._link_type = link_type
        self._same_uid_only = same_uid_only
        self._sel = Selector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._buf = bytearray(RECV_BYTES)
        self._view = memoryview(self._buf)
        self._write_soon: set[L] = set()  # output another thread left for the loop to flush
        self._orphans: list[socket.socket] = []  # sockets another thread wants closed
        # Connections that have not proven the key (loop thread): their deadline, and the
        # pid the OS gave for them.
        self._strangers: dict[object, tuple[float, int | None]] = {}
        self._listening = True  # the listener is watched (see ``_guard``)
        self._accept_pause = 0.0  # the current back-off of a failing accept(); 0: none
        self._accept_at = 0.0  # watch the listener again from then
        self._stopping = False
        self._torn_down = False  # descriptors closed (``_close_all`` ran)
        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None  # the thread running ``_run``
        self._init_readers()
        listener.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)

    # -- what a protocol layer supplies -------------------------------------------------------

    def _read(self, link: L) -> None:
        """``link`` is readable."""
        raise NotImplementedError

    def _read_stranger(self, data: object) -> None:
        """A descriptor the subclass registered with ``data`` of its own is readable."""
        raise NotImplementedError

    def _admit(self, sock: socket.socket) -> None:
        """Start serving a connection just accepted (loop thread); usually ``_hold`` it."""
        raise NotImplementedError

    def _expired(self, key: object) -> None:
        """The stranger ``key`` did not prove the key in time: close it (``_release``)."""
        raise NotImplementedError

    def _is_live(self, link: L) -> bool:
        """Whether ``link`` is still served (lock held)."""
        raise NotImplementedError

    def _closed_by_us(self, link: L) -> None:
        """``link`` has a ``closing`` reason and nothing left to send (loop thread, lock held)."""
        raise NotImplementedError

    def _timers(self) -> float | None:
        """Run what is due before the loop waits; return when something next is."""
        return None

    def _after_turn(self) -> None:
        """Called once a pass, after the ready descriptors were served."""

    def _close_links(self) -> None:
        """Close every connection and stranger (lock held); the loop is going away."""
        raise NotImplementedError

    def _crashed(self) -> None:
        """The loop raised (a bug): called in the ``except`` block, before ``_close_all``."""
        self.log.exception("the I/O loop crashed")

    # -- running ------------------------------------------------------------------------------

    def start(self, name: str) -> None:
        """Run the loop on a daemon thread of its own."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def run_here(self) -> None:
        """Run the loop on the calling thread until ``stop()`` (a broker's own process)."""
        self._thread = threading.current_thread()
        self._run()

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
                self._turn()
        except Exception:  # pragma: no cover - a bug; make it loud, then fail peers
            self._crashed()
        finally:
            self._close_all()

    def _turn(self) -> None:
        deadline = self._timers()
        if self._strangers or not self._listening:
            deadline = self._guard(deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        link_type = self._link_type
        for key, mask in self._sel.select(timeout):
            data = key.data
            if type(data) is link_type:
                if mask & selectors.EVENT_READ:
                    self._read(data)
                if mask & selectors.EVENT_WRITE:
                    with self.lock:
                        if self._is_live(data):
                            self._flush(data, on_loop=True)
            elif data is _WAKE:
                self._on_wake()
            elif data is _LISTENER:
                self._accept()
            elif type(data) is Reader:
                data.callback()
            else:
                self._read_stranger(data)
        self._after_turn()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway

    def _on_wake(self) -> None:
        """Carry out what other threads left for the loop: flushes, closes, watches."""
        drain_pipe(self._wake_r)
        with self.lock:
            soon, self._write_soon = self._write_soon, set()
            for link in soon:
                if self._is_live(link):
                    self._flush(link, on_loop=True)
            orphans, self._orphans = self._orphans, []
        for sock in orphans:
            self._unregister_and_close(sock)
        self._apply_reader_changes()

    # -- accepting, and strangers -------------------------------------------------------------

    def _accept(self) -> None:
        """Take in the connections waiting at the listener, while fewer than
        MAX_HANDSHAKING strangers are held."""
        failed = 0
        for _ in range(_ACCEPT_TRIES):
            if len(self._strangers) >= MAX_HANDSHAKING:
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
                self.log.debug("accept() failed: %s", exc)
                failed += 1
                continue
            if self._accept_pause:
                self.log.info("accepting connections again")
                self._accept_pause = 0.0
            if self._same_uid_only and not self._same_uid(sock):
                sock.close()
                continue
            self._admit(sock)
        if failed == _ACCEPT_TRIES:  # not one connection's trouble: do not spin on it
            self._back_off(OSError(f"accept() failed {failed} times in a row"))

    def _same_uid(self, sock: socket.socket) -> bool:
        """Whether the peer of a connection just accepted runs as our (effective) uid.

        Where the platform does not record it, the listener is a file in the 0700 runtime
        directory, which no other user can reach: there is nothing to check.
        """
        try:
            cred = peer_credentials(sock)
        except OSError as exc:
            self.log.warning("refused a connection whose peer's credentials are unreadable: %s", exc)
            return False
        if cred is None:
            return True
        pid, uid, _ = cred
        if uid != os.geteuid():
            self.log.warning("refused a connection from pid %d, which runs as uid %d, not %d",
                             pid, uid, os.geteuid())
            return False
        return True

    def _back_off(self, exc: OSError) -> None:
        """Stop watching the listener for a while (logged once per episode of failures)."""
        if self._accept_pause:
            self._accept_pause = min(2 * self._accept_pause, ACCEPT_BACKOFF_MAX_S)
        else:
            self._accept_pause = ACCEPT_BACKOFF_S
            self.log.error("cannot accept connections (%s); retrying every %g s at most until it clears",
                           exc, ACCEPT_BACKOFF_MAX_S)
        self._accept_at = time.monotonic() + self._accept_pause
        self._listen(False)

    def _listen(self, on: bool) -> None:
        """Watch the listener, or stop (connections then wait in its backlog); loop thread."""
        if on is self._listening:
            return
        if on:
            self._sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        else:
            self._sel.unregister(self._listener)
        self._listening = on

    def _hold(self, key: object, pid: int | None = None) -> None:
        """Count ``key`` among the strangers, due to prove the key within HANDSHAKE_TIMEOUT_S."""
        self._strangers[key] = (time.monotonic() + HANDSHAKE_TIMEOUT_S, pid)

    def _hold_stranger(self, sock: socket.socket, key: object) -> None:
        """Hold ``key`` and watch its ``sock``: ``_read_stranger(key)`` when it is readable."""
        sock.setblocking(False)
        self._hold(key)
        self._sel.register(sock, selectors.EVENT_READ, key)

    def _drop_stranger(self, sock: socket.socket, key: object) -> None:
        """Close a stranger held with ``_hold_stranger`` (loop thread)."""
        self._release(key)
        self._unregister_and_close(sock)

    def _release(self, key: object) -> int | None:
        """``key`` proved the key or went: no longer a stranger. The pid it was held with."""
        return self._strangers.pop(key, (0.0, None))[1]

    def _guard(self, deadline: float | None) -> float | None:
        """Close the strangers that did not prove the key in time, and watch the listener
        again once allowed; return ``deadline`` brought forward to the next of these timers."""
        now = time.monotonic()
        for key in [k for k, (due, _) in self._strangers.items() if due <= now]:
            self._expired(key)
            self._strangers.pop(key, None)
        if (not self._listening and now >= self._accept_at and not self._stopping
                and len(self._strangers) < MAX_HANDSHAKING):
            self._listen(True)
        soonest = min((due for due, _ in self._strangers.values()), default=_NEVER)
        if not self._listening and self._accept_at > now:
            soonest = min(soonest, self._accept_at)
        if soonest == _NEVER:
            return deadline
        return soonest if deadline is None else min(deadline, soonest)

    # -- output -------------------------------------------------------------------------------

    def _flush(self, link: L, on_loop: bool) -> None:
        """Send what the kernel takes now; arrange EVENT_WRITE for the rest (lock held)."""
        out = link.out
        before = len(out)
        while out:
            try:
                sent = link.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                out.clear()
                link.closing = link.closing or "write failed"
                break
            del out[:sent]
        if out:
            if len(out) < before or not link.took_at:
                link.took_at = time.monotonic()  # the peer took some, or a backlog begins
            if not link.writing:
                if on_loop:
                    link.writing = True
                    if link.sock.fileno() >= 0:
                        try:
                            self._watch(link)
                        except KeyError:
                            pass  # registered by the subclass right after this flush
                else:
                    self._write_soon.add(link)
                    self._wake()
            return
        link.took_at = 0.0
        if link.writing and on_loop:
            link.writing = False
            self._watch(link)
        if link.closing:
            if on_loop:
                self._closed_by_us(link)
            else:
                self._write_soon.add(link)
                self._wake()

    def _watch(self, link: L) -> None:
        """Make the selector watch ``link`` for ``link.interest()`` (lock held)."""
        self._sel.set_events(link.sock.fileno(), link.interest(), link)

    # -- closing ------------------------------------------------------------------------------

    def _close_soon(self, sock: socket.socket) -> None:
        """Unregister and close ``sock`` now on the loop's thread, or soon from another (lock held)."""
        if threading.get_ident() == self._loop_ident:
            self._unregister_and_close(sock)
        else:
            self._orphans.append(sock)
            self._wake()

    def _unregister_and_close(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _close_all(self) -> None:
        with self.lock:
            if self._torn_down:
                return
            self._torn_down = True
            self._close_links()
            orphans, self._orphans = self._orphans, []
            self._strangers.clear()
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
        for sock in orphans:
            sock.close()
        self._forget_readers()
        self._sel.close()
        self._listener.close()
        os.close(wake_r)
        os.close(wake_w)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process that connected ``sock``, as the kernel recorded
    them at ``connect()`` (SO_PEERCRED); None where the platform does not record them."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return pid, uid, gid


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that connected ``sock``, as the kernel recorded it at
    ``connect()``; None over TCP, where the platform does not say, or for a process
    outside our pid namespace (reported as 0)."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        if hasattr(socket, "SO_PEERCRED"):  # Linux
            pid = peer_credentials(sock)[0]  # type: ignore[index]
        elif sys.platform == "darwin":  # pragma: no cover - SOL_LOCAL, LOCAL_PEERPID
            pid = struct.unpack("i", sock.getsockopt(0, 2, 4))[0]
        else:  # pragma: no cover
            return None
    except OSError:
        return None
    return pid or None
