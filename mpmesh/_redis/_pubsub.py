"""Publish/subscribe across hosts on Redis: ``RedisPubSub``, one per process.

Channel ``c`` of mesh ``m`` is the Redis channel ``mpmesh:{m}:ps:c``. A pattern
``"orders.*"`` is a ``PSUBSCRIBE`` of that prefix, its glob characters escaped, followed
by ``*``: every channel that starts with ``orders.``, at any depth; any other pattern is
a plain ``SUBSCRIBE``. Several subscriptions of a process to one pattern share its one
Redis subscription.

One connection per process carries every subscription; one reader thread
(``mpmesh-redis-pubsub``) reads it and only sorts messages into the *lane*: a queue that
one helper thread (``mpmesh-redis-callbacks``) empties, calling callbacks one at a time
in the order messages arrived (per publisher, publish order). Each subscription may
have at most ``high_water`` messages waiting there; past that, its messages are dropped
and counted (``stats()["pubsub_dropped"]``), so a slow callback cannot grow the process
without bound. Commands are written by the calling thread; their confirmations come back
in order on the reader, which hands each to its waiting caller.

If the connection is lost, the reader connects again (backoff from 50 ms to 2 s) and
subscribes to every pattern still wanted; messages published in between are lost (Redis
pub/sub keeps nothing). An idle connection is checked with a PING every 10 s. Payloads
are sealed with the mesh's key (``Link.seal``); one that is not is logged, never unpickled.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final, final

from .._errors import AuthenticationError, BrokerUnavailable, MeshClosed, MeshError, RequestTimeout, SerializationError
from .._io._threads import WorkerThreads
from .._wire import _codec
from ._link import CONNECT_TIMEOUT_S, Link, _redis_module
from ._locks import check_name, remember_link

__all__ = ["HIGH_WATER_MESSAGES", "RedisPubSub", "RedisSubscription"]

log = logging.getLogger("mpmesh.redis")

# Messages one subscription may have waiting for its callback before new ones are dropped.
HIGH_WATER_MESSAGES: Final = 10_000
# The reader's longest blocking read: how soon it notices close().
READ_WAIT_S: Final = 0.2
# Silence after which the reader checks the connection with a PING.
PING_AFTER_S: Final = 10.0
BACKOFF_MIN_S: Final = 0.05
BACKOFF_MAX_S: Final = 2.0
_GLOB: Final = str.maketrans({c: "\\" + c for c in "*?[]\\"})
_UNSUBSCRIBE: Final = {b"subscribe": b"unsubscribe", b"psubscribe": b"punsubscribe"}


class _Ack:
    """A command's confirmation, awaited by the caller that sent it. The subscriptions in
    ``arms`` get the messages the reader reads after it, and no earlier ones."""

    __slots__ = ("kind", "name", "done", "ok", "arms")

    def __init__(self, kind: bytes, name: bytes) -> None:
        self.kind, self.name = kind, name
        self.done = threading.Event()
        self.ok = False
        self.arms: list[RedisSubscription] = []

    def settle(self, ok: bool) -> None:
        self.ok = ok
        if ok:
            for sub in self.arms:
                sub._armed = True
        self.done.set()


@final
class RedisSubscription:
    """A live ``subscribe(pattern, callback)``; ``unsubscribe()`` ends it (idempotent).

    Also a context manager that unsubscribes on exit.
    """

    __slots__ = ("pattern", "callback", "_pubsub", "_name", "_active", "_armed", "_waiting")

    def __init__(self, pubsub: RedisPubSub, pattern: str, callback: Callable[[Any, str], object],
                 name: tuple[bytes, bytes]) -> None:
        self.pattern = pattern
        self.callback = callback
        self._pubsub = pubsub
        self._name = name  # (subscribe command, Redis channel or pattern)
        self._active = True
        self._armed = False  # set by the reader: from then on, messages are for it
        self._waiting = 0  # its messages in the lane

    @property
    def active(self) -> bool:
        return self._active

    def unsubscribe(self) -> None:
        """Stop deliveries to this callback; messages already under way are skipped."""
        self._pubsub._unsubscribe(self, wait=True)

    def __enter__(self) -> RedisSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r} {'active' if self._active else 'ended'}>"


class RedisPubSub:
    """This process's publishing and subscribing on the mesh's Redis (see the module)."""

    def __init__(self, link: Link, *, high_water: int = HIGH_WATER_MESSAGES) -> None:
        if high_water < 1:
            raise ValueError(f"high_water must be at least 1, not {high_water!r}")
        remember_link(link, replace=False)
        self._link = link
        self._pid = os.getpid()
        self._high_water = high_water
        self._prefix = link.key("ps", "").encode()
        self._lock = threading.Lock()  # the connection, the names, the acks
        self._conn: Any = None
        self._names: dict[tuple[bytes, bytes], list[RedisSubscription]] = {}
        self._acks: collections.deque[_Ack] = collections.deque()
        self._ping: float | None = None  # when the unanswered PING was sent
        self._last_read = 0.0
        self._lane = WorkerThreads("mpmesh-redis-callbacks", logger=log, failed="pub/sub delivery %r raised")
        self._lane_lock = threading.Lock()  # the counts, and each subscription's messages waiting
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()
        self._counts = dict.fromkeys(("pubsub_received", "pubsub_delivered", "pubsub_dropped",
                                      "pubsub_reconnects"), 0)

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, channel: str, payload: object = None) -> int:
        """Send ``payload`` to every subscriber of ``channel``; how many Redis subscriptions
        it reached (Redis's own count: each process counts once per matching pattern or
        channel it listens to, and a message its slow subscriber drops is counted)."""
        check_name("a channel", channel)
        if channel.endswith("*"):
            raise ValueError(f"publish to a channel, not a pattern: {channel!r}")
        blob = self._link.seal(_codec.dumps(payload))
        with self._link.errors(f"publishing to {channel!r}"):
            return int(self._link.redis.publish(self._prefix + channel.encode(), blob))

    # -- subscribing --------------------------------------------------------------------------

    def subscribe(self, pattern: str, callback: Callable[[Any, str], object]) -> RedisSubscription:
        """Call ``callback(payload, channel)`` for every message published to a matching
        channel, once Redis has confirmed the subscription.

        Raises:
            BrokerUnavailable, RequestTimeout: Redis did not confirm it; it is not kept.
        """
        check_name("a pattern", pattern)
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if "*" in pattern[:-1]:
            raise ValueError(f"only a trailing '*' is supported in a pattern, not {pattern!r}")
        if pattern.endswith("*"):
            name = (b"psubscribe", self._prefix.decode().translate(_GLOB).encode()
                    + pattern[:-1].translate(_GLOB).encode() + b"*")
        else:
            name = (b"subscribe", self._prefix + pattern.encode())
        sub = RedisSubscription(self, pattern, callback, name)
        with self._lock:
            if self._closing.is_set():
                raise MeshClosed("this process's pub/sub on Redis is closed")
            if self._pid != os.getpid():
                raise MeshError("a RedisPubSub serves the process that made it, not a fork of it")
            if self._reader is None:
                self._install(self._open())
                self._start()
            if self._conn is None:
                raise BrokerUnavailable(f"Redis at {self._link.url} is unreachable (subscribing to {pattern!r})")
            subs = self._names.get(name)
            if subs is None:
                subs = self._names[name] = []
                ack = self._send(*name)[0]
            else:
                # Redis already sends this process the pattern's messages: the ones read
                # before this PING's answer were published before this call.
                ack = self._send(b"ping")[0]
            ack.arms.append(sub)  # before the reader can settle it: it takes acks under this lock
            subs.append(sub)
        if not ack.done.wait(self._link.timeout):
            self._unsubscribe(sub, wait=False)
            raise RequestTimeout(f"Redis at {self._link.url} did not confirm the subscription to {pattern!r}")
        if not ack.ok:
            self._unsubscribe(sub, wait=False)
            raise BrokerUnavailable(f"Redis at {self._link.url} went away (subscribing to {pattern!r})")
        return sub

    def _unsubscribe(self, sub: RedisSubscription, *, wait: bool) -> None:
        ack = None
        with self._lock:
            if not sub._active:
                return
            sub._active = False
            subs = self._names.get(sub._name)
            if subs is not None and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._names[sub._name]
                    if self._conn is not None:
                        try:
                            ack = self._send(_UNSUBSCRIBE[sub._name[0]], sub._name[1])[0]
                        except (BrokerUnavailable, RequestTimeout):
                            pass  # the connection is gone, and the subscription with it
        if ack is not None and wait:
            ack.done.wait(self._link.timeout)

    def _send(self, kind: bytes, *names: bytes) -> list[_Ack]:
        """Send one command (the lock held); the confirmations it will get, one per name."""
        acks = [_Ack(kind, n) for n in names] or [_Ack(b"pong", b"")]
        try:
            with self._link.errors(f"sending {kind.decode().upper()}"):
                self._conn.send_command(kind, *names, check_health=False)
        except BaseException:
            self._drop_locked(self._conn)
            raise
        self._acks.extend(acks)
        return acks

    # -- the connection -------------------------------------------------------------------------

    def _open(self) -> Any:
        """A new connection to Redis, of the same kind and options as the link's."""
        pool = self._link.redis.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        with self._link.errors("connecting for pub/sub"):
            conn.connect()
        return conn

    def _install(self, conn: Any) -> None:
        """Use ``conn`` (the lock held), subscribed to every name still wanted."""
        self._conn = conn
        self._last_read = time.monotonic()
        for kind in (b"subscribe", b"psubscribe"):
            names = [n for k, n in self._names if k == kind]
            if names:
                self._send(kind, *names)

    def _drop_locked(self, conn: Any) -> None:
        """Forget a broken connection: its pending commands fail."""
        if conn is None or self._conn is not conn:
            return
        self._conn = None
        self._ping = None
        while self._acks:
            self._acks.popleft().settle(False)
        conn.disconnect()

    def _start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="mpmesh-redis-pubsub", daemon=True)
        self._reader.start()
        self._lane.start()

    def _read(self) -> None:
        """The reader thread: read, sort, reconnect; until ``close()``."""
        backoff = BACKOFF_MIN_S
        errors = (_redis_module().exceptions.RedisError, OSError)
        while not self._closing.is_set():
            conn = self._conn
            if conn is None:
                try:
                    fresh = self._open()
                    with self._lock:
                        if self._closing.is_set():
                            fresh.disconnect()
                            break
                        self._install(fresh)
                        self._counts["pubsub_reconnects"] += 1
                    backoff = BACKOFF_MIN_S
                except Exception:
                    self._closing.wait(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            try:
                if conn.can_read(timeout=READ_WAIT_S):
                    reply = conn.read_response(push_request=True)  # RESP3: messages are pushes
                    self._last_read = time.monotonic()
                    self._on_reply(conn, reply)
                else:
                    self._check(conn)
            except Exception as exc:
                if not self._closing.is_set():
                    level = logging.WARNING if isinstance(exc, errors) else logging.ERROR
                    log.log(level, "pub/sub connection to Redis at %s lost: %r", self._link.url, exc)
                with self._lock:
                    self._drop_locked(conn)
        with self._lock:
            self._drop_locked(self._conn)

    def _check(self, conn: Any) -> None:
        """After a silence, PING; drop the connection if the PING is not answered in time."""
        now = time.monotonic()
        with self._lock:
            if self._conn is not conn:
                return
            if self._ping is None:
                if now - self._last_read > PING_AFTER_S:
                    self._send(b"ping")
                    self._ping = now
            elif now - self._ping > self._link.timeout:
                log.warning("Redis at %s did not answer a PING: connecting again", self._link.url)
                self._drop_locked(conn)

    def _on_reply(self, conn: Any, reply: Any) -> None:
        if not isinstance(reply, list):  # b"PONG": a PING on a connection with no subscription
            reply = [reply.lower(), b""]
        kind = reply[0]
        if kind == b"message":
            self._deliver((b"subscribe", reply[1]), reply[1], reply[2])
        elif kind == b"pmessage":
            self._deliver((b"psubscribe", reply[1]), reply[2], reply[3])
        else:
            with self._lock:
                ack = self._acks.popleft() if self._acks else None
                if ack is None or ack.kind != kind or (ack.name and ack.name != reply[1]):
                    log.warning("unexpected reply on the pub/sub connection: %r", reply[:2])
                    self._drop_locked(conn)
                    return
                if kind == b"pong":
                    self._ping = None
            ack.settle(True)

    def _deliver(self, name: tuple[bytes, bytes], channel: bytes, data: bytes) -> None:
        subs = self._names.get(name)
        if not subs:
            return
        text = channel[len(self._prefix):].decode("utf-8", "surrogateescape")
        counts = self._counts
        with self._lane_lock:
            counts["pubsub_received"] += 1
            for sub in list(subs):
                if not sub._armed:
                    continue
                if sub._waiting >= self._high_water:
                    counts["pubsub_dropped"] += 1
                    continue
                sub._waiting += 1
                self._lane.submit(self._run, sub, data, text)

    # -- the callbacks --------------------------------------------------------------------------

    def _run(self, sub: RedisSubscription, data: bytes, channel: str) -> None:
        """On the lane's one thread: one callback at a time, in arrival order."""
        with self._lane_lock:
            sub._waiting -= 1
        if not sub._active:
            return
        try:
            value = _codec.loads(self._link.unseal(data))
        except (AuthenticationError, SerializationError):
            log.exception("cannot read a message on %r for %r", channel, sub.pattern)
            return
        try:
            sub.callback(value, channel)
        except Exception:
            log.exception("subscriber callback %r for %r raised on %r", sub.callback, sub.pattern, channel)
        with self._lane_lock:
            self._counts["pubsub_delivered"] += 1

    # -- the rest -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """This process's counters: messages received, delivered to callbacks, dropped (past
        a subscription's high-water mark), waiting; subscriptions; reconnections."""
        with self._lane_lock:
            found = dict(self._counts, pubsub_waiting=self._lane.queued())
        with self._lock:
            found["subscriptions"] = sum(len(subs) for subs in self._names.values())
        return found

    def close(self) -> None:
        """End every subscription, the threads and the connection."""
        with self._lock:
            self._closing.set()
            for subs in self._names.values():
                for sub in subs:
                    sub._active = False
            self._names.clear()
            reader = self._reader
        self._lane.close(timeout=CONNECT_TIMEOUT_S + 2 * READ_WAIT_S, cancel=True)
        if reader is not None and reader is not threading.current_thread():
            reader.join(CONNECT_TIMEOUT_S + 2 * READ_WAIT_S)
        with self._lock:
            self._drop_locked(self._conn)

    def __repr__(self) -> str:
        return f"<mpmesh Redis pub/sub {self._link.url} mesh={self._link.mesh!r}>"
