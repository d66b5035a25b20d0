"""``SocketClient``: a process's connection to a broker over its Unix socket.

It has no dedicated reader thread by default: a thread that waits for a reply reads the socket itself (the
*leader*), dispatching whatever else arrives; other waiting threads are *followers* and
are woken when their reply lands or leadership frees up. A blocking call therefore costs
no thread hand-off. ``start_reader()`` adds a background reader for processes that must
receive pushes while nobody waits (subscribers).

A connection says Goodbye before it closes only if its process is not ending abnormally
(``_exit.py``): that is how the broker tells a clean exit from a crash.

Deadlines (``SocketClient``): no call blocks on a broker that stopped answering (SIGSTOP,
wedged, gone). An operation the broker answers at once waits until ``due()`` (the
handle's ``timeout``); a call that waits by design (a lock, ``Queue.get()``) waits as
long as it takes, while the broker proves it is alive: after half the ``timeout`` of
silence a ``ping`` goes out, and a ping unanswered for the other half makes the broker
*silent*: the waiting calls end (BrokerUnavailable; RequestTimeout for one whose own
deadline came), and each new call fails at once with BrokerUnavailable until the broker
answers that ping: a broker that was only paused serves again, with its objects, locks
and references intact (hanging up would have the broker release them all). A write the
broker takes nothing of for ``timeout`` closes the connection for good: a frame cut
short cannot be taken back. Sends and receives use socket timeouts (IO_SLICE_S, set
once), so the fast path costs nothing extra: deadline arithmetic starts only when a
read or write has waited a whole slice.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import socket as _socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Final

from .._broker._payload import pack
from .._broker._ring import OBJECTS
from .._errors import (
    AuthenticationError, BrokerUnavailable, MeshClosed, MeshError, MessageTooLarge, RemoteProtocolError, RequestTimeout,
)
from .._io import _deadline
from .._io import _segment
from .._wire import _codec, _frames
from .._wire._connection import Connection, Phase, Side
from .._wire._messages import Failure, Goodbye, Hello, Message, Push, Ready, Reply, encode, encode_op
from ._base import ClientBase
from ._exit import ends_uncleanly, watch_exit
from ._futures import Call, MeshFuture, error_for
from ._handlers import failure_from
from ._near import NearCache

__all__ = ["DEFAULT_TIMEOUT_S", "SocketClient"]

log = logging.getLogger("mpmesh.client")


CONNECT_TIMEOUT_S: Final = 10.0
# The ``timeout`` of a connection whose owner sets none: how long an operation waits for
# its answer, and how long a broker may stay silent while a call waits (see above). Long
# enough for a broker busy with a large value; short enough that a stopped one is noticed.
DEFAULT_TIMEOUT_S: Final = 30.0
# A blocked send or receive returns after this long without progress (SO_SNDTIMEO,
# SO_RCVTIMEO), so its thread can look at its deadline.
IO_SLICE_S: Final = 0.1
# How long close() waits for another thread's write before it leaves without a Goodbye.
GOODBYE_WAIT_S: Final = 1.0
_SLICE: Final = struct.pack("ll", 0, int(IO_SLICE_S * 1e6))  # a struct timeval
_PING: Final = (b"admin", b"ping", pack(()))
_HUNG_UP: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL


class SocketClient(ClientBase):
    """A connection to a broker's Unix socket, authenticated and introduced by Hello."""

    def __init__(self, address: str | tuple[str, int], authkey: bytes, hello: Hello, *,
                 connect_timeout: float = CONNECT_TIMEOUT_S, sock: _socket.socket | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        """``sock``: a connection the zygote made for this (forked) child; it is already
        the broker's, so there is no connect and no handshake. ``timeout``: see ``due``
        and the module's "Deadlines" (None: operations wait as long as the broker is alive)."""
        super().__init__()
        self.timeout = timeout
        self.address = address
        inherited = sock is not None
        if sock is None:
            self._conn = Connection(Side.PEER, authkey, os.urandom)
            if isinstance(address, (tuple, list)):  # a (host, port) broker: TCP, Nagle off
                address = self.address = (str(address[0]), int(address[1]))
                sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            else:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        else:
            self._conn = Connection.trusted(Side.PEER)
        self._sock = sock
        self._buf = bytearray(_frames.RECV_BYTES)
        self._view = memoryview(self._buf)
        self._send_lock = threading.Lock()
        self._outq: collections.deque[bytes] = collections.deque()
        self._read_lock = threading.RLock()
        self._leader: int | None = None
        self._cv = threading.Condition(threading.Lock())
        self._followers = 0
        self._reader: threading.Thread | None = None
        self._early: list[Message] = []
        self._pid = os.getpid()
        # Liveness probing (``_watch_broker``): the ping in flight, when it left, and when
        # the broker last answered one.
        self._probe_lock = threading.Lock()
        self._probe: Call | None = None
        self._probe_at = 0.0
        self._heard_at = 0.0
        deadline = _deadline.after(connect_timeout)
        try:
            sock.settimeout(connect_timeout)
            if not inherited:
                sock.connect(address)
            self._handshake(hello, deadline)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, _SLICE)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _SLICE)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._said_goodbye = False
        watch_exit(self)

    def _handshake(self, hello: Hello, deadline: float) -> None:
        try:
            while self._conn.phase is Phase.HANDSHAKE:
                self._sock.settimeout(_deadline.remaining(deadline))
                data = self._recv_handshake()
                if not data:
                    raise BrokerUnavailable(f"the broker at {self.address} closed the connection during the handshake")
                out = self._conn.receive_data(data)
                if out:
                    self._sock.sendall(out)
            self._sock.sendall(self._conn.send(hello))
            while True:
                events = self._conn.events()
                for i, msg in enumerate(events):
                    if isinstance(msg, Ready):
                        self.instance_id, self.name = msg.instance_id, msg.name
                        # What came with Ready (a Shutdown, say) is dispatched on first read.
                        self._early = events[i + 1 :]
                        return
                    raise RemoteProtocolError(f"expected Ready, got {type(msg).__name__}")
                self._sock.settimeout(_deadline.remaining(deadline))
                data = self._recv_handshake()
                if not data:
                    raise BrokerUnavailable(f"the broker at {self.address} refused us after the handshake")
                self._conn.receive_data(data)
        except AuthenticationError:
            raise
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BrokerUnavailable(f"no broker listens at {self.address}: {exc}") from None
        except _socket.timeout:
            raise BrokerUnavailable(f"the broker at {self.address} did not answer in time") from None
        except OSError as exc:
            raise BrokerUnavailable(f"cannot talk to the broker at {self.address}: {exc}") from None

    def _drop_near(self) -> None:
        near, self.near = self.near, None
        ring, self.ring = self.ring, None
        cells, self.cells = self.cells, None
        if self._pid == os.getpid():
            if ring is not None:
                ring.close()
            if cells is not None:
                cells.close()
            if near is not None:
                near.close()

    def leave(self, payload: bytes, s1: int, s2: int, n1: int, n2: int,
              kind: int = OBJECTS) -> tuple[int, int] | None:
        ring = self.ring
        if ring is None or not self.segment_usable():
            return None
        done, v1, v2 = ring.append(payload, s1, s2, n1, n2, kind)
        if done < 0:
            return None
        if done:  # a quarter full: any op makes the broker empty it first
            self.post_op("objects", "drain")
        return v1, v2

    def segment_usable(self) -> bool:
        # Only while the broker is there: its end of our socket is open (a broker that
        # died closed it: a write must fail as a sent one would), and it has not gone
        # silent on us (calls are refused until it answers again).
        if self._closed is not None or self._silent or self.ring is None:
            return False
        watch = getattr(self._hangup, "poll", None)
        if watch is None:  # a poll object may not be used by two threads at once
            watch = self._hangup.poll = select.poll()
            watch.register(self._sock, select.POLLIN)
        for _, events in watch.poll(0):
            if events & _HUNG_UP:
                return False
        return True

    def _recv_handshake(self) -> bytes:
        """A read before ``Ready``: with it may come the broker's version table."""
        if self._sock.family != _socket.AF_UNIX:
            return self._sock.recv(4096)
        data, ancdata, _, _ = self._sock.recvmsg(4096, _segment.ANCILLARY_BYTES)
        fd = _segment.received_fd(ancdata)
        if fd >= 0:
            mm = _segment.map_received(fd)
            if mm is not None and self.near is None:
                self.near = NearCache(mm)
                shared = _segment.writers(mm)
                if shared is not None:
                    self.ring, self.cells = shared
                self._hangup = threading.local()  # a poll object per thread (see segment_usable)
        return data

    # -- sending ----------------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        self._send_frame(encode(msg))

    def _send_frame(self, frame: bytes, stall: float | None = None) -> None:
        """Write ``frame`` (or queue it for the thread writing now); ``stall``: see
        ``_send_rest``."""
        if self._closed is not None:
            raise self._closed_error()
        # Combined writes: the frame joins a queue and whoever holds the send lock writes
        # everything queued in one call, so concurrent handlers' replies share syscalls.
        outq = self._outq
        outq.append(frame)
        lock = self._send_lock
        try:
            while outq and lock.acquire(blocking=False):
                try:
                    data = outq.popleft() if len(outq) == 1 else b"".join(
                        [outq.popleft() for _ in range(len(outq))])
                    try:
                        sent = self._sock.send(data)
                    except BlockingIOError:  # nothing taken for IO_SLICE_S
                        sent = 0
                    if sent != len(data):
                        self._send_rest(data, sent, stall)
                finally:
                    lock.release()
        except OSError as exc:
            self._broken(f"the connection to the broker failed: {exc}")
            raise self._closed_error() from None

    def _send_rest(self, data: bytes, sent: int, stall: float | None) -> None:
        """Write ``data`` from ``sent`` on (send lock held), however long it takes while the
        broker takes bytes. One that takes none for ``stall`` seconds (default: the
        window) is given up: a frame cut short cannot be taken back."""
        limit = self._window() if stall is None else stall
        view = memoryview(data)
        until = time.monotonic() + limit
        while sent < len(data):
            try:
                sent += self._sock.send(view[sent:])
            except BlockingIOError:
                if time.monotonic() < until:
                    continue
                self._give_up(f"the broker took no data for {limit:g} s (stopped or wedged); "
                              f"this connection is closed")
                raise self._closed_error() from None
            until = time.monotonic() + limit

    def send_message(self, msg: Message) -> None:
        """Send a message that expects no reply (Reply, Failure, Heartbeat...). A Reply
        too large to send goes as a Failure that says so: its caller must not wait in vain."""
        try:
            self._send(msg)
        except MessageTooLarge as exc:
            if type(msg) is not Reply:
                raise
            self._send(failure_from(msg.rid, MessageTooLarge(f"the reply is too large to send back: {exc}")))

    # -- receiving ---------------------------------------------------------------------------

    def wait(self, fut: MeshFuture | Call, deadline: float) -> object:
        """The answer ``fut`` stands for; RequestTimeout at ``deadline``, BrokerUnavailable
        once the broker stopped answering (see "Deadlines")."""
        settled = fut._settled
        try:
            if not settled() and not self.wait_until(settled, deadline, probe=True) and not settled():
                raise self._timed_out(fut)
        except BrokerUnavailable:
            fut.cancel()  # its answer, should one come, goes nowhere
            raise
        return fut.result()

    def _timed_out(self, fut: MeshFuture | Call) -> BaseException:
        """RequestTimeout for ``fut``; if the broker does not answer pings either, it is
        taken for silent too (new calls fail at once)."""
        if self._probe_unanswered():
            self._silent = self._silent or self._silence()
            fut.cancel()
            return RequestTimeout(f"no answer in time: {self._silent}")
        return super()._timed_out(fut)

    def _refuse(self) -> None:
        super()._refuse()
        if self._silent and not self._heard_again():
            raise BrokerUnavailable(self._silent)

    def _heard_again(self) -> bool:
        """Whether a silent broker answered its ping since (reading what came, if no other
        thread reads now); if so it is no longer taken for silent."""
        if self._leader is None and self._read_lock.acquire(blocking=False):
            self._leader = threading.get_ident()
            try:
                while self._closed is None and self._read_once(0.0):
                    pass
            finally:
                self._leader = None
                self._read_lock.release()
                self._wake_followers()
        with self._probe_lock:
            probe = self._probe
            if self._closed is None and (probe is None or probe._settled()):
                self._silent = ""
        return not self._silent

    def _silence(self) -> str:
        return (f"the broker at {self.address} did not answer for {self._window():g} s (stopped or wedged); "
                f"calls on this connection fail until it answers again")

    def call_op(self, component: str, op: str, payload: bytes,
                withdraw: Callable[[ClientBase, int], None] | None = None) -> object:
        answer = self._short_op(component, op, payload, withdraw)
        if answer is None:
            return super().call_op(component, op, payload, withdraw)
        if type(answer) is bytes:
            return _codec.loads(answer)
        raise error_for(answer)  # type: ignore[arg-type]

    def fetch_op(self, component: str, op: str, payload: bytes,
                 withdraw: Callable[[ClientBase, int], None] | None = None) -> tuple[object, bytes | None]:
        answer = self._short_op(component, op, payload, withdraw)
        if answer is None:
            return super().fetch_op(component, op, payload, withdraw)
        if type(answer) is bytes:
            return _codec.loads(answer), answer
        raise error_for(answer)  # type: ignore[arg-type]

    def _short_op(self, component: str, op: str, payload: bytes,
                  withdraw: Callable[[ClientBase, int], None] | None) -> bytes | Failure | None:
        """The short path: when no other thread reads the socket, this one sends the op
        and reads its own answer (a Reply's payload, or the Failure), with no Call record
        and no pending entry (nobody else can take the answer); what else arrives
        meanwhile is dispatched as usual. None: another thread reads, take the long path."""
        lock = self._read_lock
        if (self._leader is not None or self._early or self._closed is not None or self._silent
                or not lock.acquire(False)):
            return None
        self._leader = threading.get_ident()
        try:
            rid = next(self._rids)
            self._send_frame(encode_op(rid, -1.0, component.encode(), op.encode(), payload))
            try:
                answer = self._read_answer(rid)
            except BaseException:
                if withdraw is not None:
                    withdraw(self, rid)
                raise
        finally:
            self._leader = None
            lock.release()
            if self._followers:
                self._wake_followers()
        return answer

    def _read_answer(self, rid: int) -> bytes | Failure:
        """Read until the answer to ``rid`` comes (read lock held): a Reply's payload or
        the Failure."""
        sock, buf, view, conn = self._sock, self._buf, self._view, self._conn
        since = 0.0
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:  # nothing for IO_SLICE_S: wait on, watching the broker
                since = since or time.monotonic() - IO_SLICE_S
                self._await_data(since)
                continue
            except OSError as exc:
                self._broken(f"reading from the broker failed: {exc}")
                raise self._closed_error() from None
            if n == 0:
                self._broken("the broker closed the connection")
                raise self._closed_error()
            data = view[:n]
            payload = conn.take_reply(data, rid)
            if payload is not None:
                return payload
            try:
                conn.receive_data(data)
            except RemoteProtocolError as exc:
                self._broken(f"the broker sent garbage: {exc}")
                raise self._closed_error() from None
            answer: bytes | Failure | None = None
            others: list[Message] = []
            for msg in conn.events():
                cls = type(msg)
                if (cls is Reply or cls is Failure) and msg.rid == rid:  # type: ignore[attr-defined]
                    answer = msg.payload if cls is Reply else msg  # type: ignore[attr-defined,assignment]
                else:
                    others.append(msg)
            if others:
                self._dispatch(others)
            if answer is not None:
                return answer
            if self._closed is not None:
                raise self._closed_error()

    def _await_data(self, since: float) -> None:
        """Wait until the socket has data (read lock held), watching a broker quiet since
        ``since``; BrokerUnavailable once it stopped answering."""
        while True:
            if self._closed is not None:
                raise self._closed_error()
            now = time.monotonic()
            if self._poller.poll(max(0.0, self._watch_broker(since, now) - now) * 1000):
                return

    def _window(self) -> float:
        """How long the broker may stay silent while a call waits."""
        return self.timeout or DEFAULT_TIMEOUT_S

    def _watch_broker(self, since: float, now: float) -> float:
        """For a call waiting since ``since``: ping the broker once it has been quiet for
        half the window; when the ping is unanswered for the other half, the broker is
        silent (BrokerUnavailable here, and for new calls until it answers). Returns when
        to look again."""
        half = self._window() / 2
        with self._probe_lock:
            probe = self._probe
            if probe is not None and probe._settled():
                self._heard_at, self._probe, probe = self._probe_at, None, None
                self._silent = ""
            if probe is not None:
                if now - self._probe_at < half:
                    return self._probe_at + half
                self._silent = self._silent or self._silence()
                raise BrokerUnavailable(self._silent)
            quiet = max(self._heard_at, since)
            if now - quiet < half:
                return quiet + half
            if self._closed is not None:
                raise self._closed_error()
            rid = next(self._rids)
            self._probe = self._pending[rid] = Call(self, rid)
            self._probe_at = now
        self._send_frame(encode_op(rid, -1.0, *_PING), half)
        return now + half

    def _probe_unanswered(self) -> bool:
        """Whether a ping has been out for a while with no answer."""
        probe = self._probe
        return (probe is not None and not probe._settled()
                and time.monotonic() - self._probe_at >= self._window() / 4)

    def _give_up(self, why: str) -> None:
        """A frame could not be finished: fail every call, and hang up, so that the broker,
        should it run again, does not read the rest of the stream as frames."""
        self._broken(why)
        try:
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass

    def wait_until(self, predicate: Callable[[], bool], deadline: float, probe: bool = False) -> bool:
        """Block until ``predicate()`` holds (True) or ``deadline`` passes (False).

        The calling thread reads the socket itself when nobody else does. ``probe``: the
        predicate waits for the broker (an answer), so watch that it is alive meanwhile.
        """
        me = threading.get_ident()
        since = 0.0
        while not predicate():
            if self._closed is not None:
                return predicate()
            until = deadline
            if probe:
                now = time.monotonic()
                if now >= deadline:
                    return False  # the call's own deadline goes first
                since = since or now
                until = min(deadline, self._watch_broker(since, now))
            timeout = _deadline.remaining(until)
            if timeout == 0:
                if until == deadline:
                    return False
                continue
            if self._leader in (None, me) and self._read_lock.acquire(blocking=False):
                outer, self._leader = self._leader, me
                try:
                    while not predicate() and self._closed is None:
                        if not self._read_once(_deadline.remaining(until)):
                            break
                finally:
                    self._leader = outer
                    self._read_lock.release()
                    self._wake_followers()
            else:
                with self._cv:
                    self._followers += 1
                    try:
                        if not predicate() and self._leader is not None and self._closed is None:
                            self._cv.wait(timeout)
                    finally:
                        self._followers -= 1
        return True

    def _wake_followers(self) -> None:
        if self._followers:
            with self._cv:
                self._cv.notify_all()

    def _read_once(self, timeout: float | None) -> bool:
        """Read what is there (waiting up to ``timeout``) and dispatch it; False on timeout."""
        if self._early:
            early, self._early = self._early, []
            self._dispatch(early)
            return True
        try:
            if timeout is not None and not self._poller.poll(timeout * 1000):
                return False
            n = self._sock.recv_into(self._buf)
        except BlockingIOError:  # nothing for IO_SLICE_S (SO_RCVTIMEO)
            if timeout is None:
                self._poller.poll()  # no time limit: sleep until there is something
            return True
        except OSError as exc:
            self._broken(f"reading from the broker failed: {exc}")
            return True
        if n == 0:
            self._broken("the broker closed the connection")
            return True
        try:
            self._conn.receive_data(self._view[:n])
        except RemoteProtocolError as exc:
            self._broken(f"the broker sent garbage: {exc}")
            return True
        self._dispatch(self._conn.events())
        return True

    def _dispatch(self, events: list[Message]) -> None:
        for msg in events:
            cls = type(msg)
            if cls is Reply or cls is Failure:
                self._resolve(msg)  # type: ignore[arg-type]
                continue
            try:
                if cls is Push:
                    self.on_push(msg)  # type: ignore[arg-type]
                else:
                    self.on_incoming(msg)
            except Exception:
                log.exception("handling %s failed", cls.__name__)
        self._wake_followers()

    def start_reader(self) -> None:
        """Read in the background from now on, so pushes arrive while nobody waits."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_forever, name="mpmesh-reader", daemon=True)
            self._reader.start()

    def _read_forever(self) -> None:
        while self._closed is None:
            with self._read_lock:
                self._leader = threading.get_ident()
                try:
                    self._read_once(None)
                finally:
                    self._leader = None
            self._wake_followers()

    def _broken(self, why: str) -> None:
        if self._closed is None:
            self._closed = BrokerUnavailable(why)
            self._drop_near()
            log.debug("connection lost: %s", why)
            self._fail_pending(self._closed_error)
            try:
                self.on_incoming(Goodbye())
            except Exception:
                log.exception("handling the broker's departure failed")
        self._wake_followers()

    def say_goodbye(self) -> None:
        """Tell the broker this process is leaving cleanly (once), and stay connected:
        it may still have threads to finish."""
        if self._said_goodbye or self._closed is not None or self._pid != os.getpid():
            return
        self._said_goodbye = True
        try:
            self._send_frame(encode(Goodbye()), GOODBYE_WAIT_S)  # the process is ending: not for long
        except (MeshError, OSError):
            pass

    def close(self, *, goodbye: bool | None = None) -> None:
        """Close; pending requests fail with MeshClosed. Say Goodbye first if ``goodbye``
        (by default: unless this process is known to be ending abnormally)."""
        if self._closed is None:
            self._closed = MeshClosed("this connection to the mesh was closed")
            self._drop_near()
            if goodbye is None:
                goodbye = not ends_uncleanly()
            if goodbye and not self._said_goodbye and self._pid == os.getpid():
                self._said_goodbye = True
                # A write under way ends within the window; do not wait for it that long.
                if self._send_lock.acquire(timeout=GOODBYE_WAIT_S):
                    try:
                        self._sock.sendall(encode(Goodbye()))  # SO_SNDTIMEO bounds it
                    except OSError:
                        pass
                    finally:
                        self._send_lock.release()
            self._fail_pending(self._closed_error)
        try:
            self._sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._wake_followers()

    def fileno(self) -> int:
        return self._sock.fileno()
