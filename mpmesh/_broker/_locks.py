"""The lock table: named locks with an owner peer, a TTL, FIFO waiters and fencing tokens.

Theory of operation
-------------------
A lock is free, or held by one *grant*: ``(name, token, peer, expiry)``. Tokens come
from one broker-wide counter, so every grant's token is larger than any before it: a
store that remembers the last token it accepted, or asks ``valid()`` as the cache's
fenced writes do, can refuse a write from a holder whose grant has expired or been
superseded (Kleppmann's fencing token).

An ``acquire`` that cannot be granted at once is *parked*: the broker answers it later,
when the lock is granted to it (FIFO) or when its ``wait`` runs out (``LockTimeout``).
The loop never blocks. A grant ends by ``release``, by its TTL (``on_tick``), or when its
peer is lost (exit, crash, SIGKILL: ``on_peer_lost``); each time, the next live waiter is
granted in the same call.

    acquire ──(free, no queue)──► HELD ──(release | ttl | peer lost)──► next waiter HELD, or free
       └──(held)──► WAITING ──(granted)──► HELD
                       └──(wait runs out | withdraw | peer lost)──► gone (LockTimeout to the caller)

Nothing here does I/O.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import LockTimeout
from .._wire._messages import Op
from ._actions import Action, Send
from ._limits import MAX_LOCKS, check
from ._payload import fail, reply, split

__all__ = ["LockTable"]

# Rebuild the timer heap when stale entries outnumber live ones by this factor.
HEAP_SLACK: Final = 2


@dataclass(eq=False, slots=True)
class _Grant:
    name: str
    token: int
    peer: int
    rid: int
    expires: float
    live: bool = True


@dataclass(eq=False, slots=True)
class _Waiter:
    name: str
    peer: int
    rid: int
    ttl: float | None
    wait: float
    deadline: float
    live: bool = True


@dataclass(eq=False, slots=True)
class _Lock:
    holder: _Grant | None = None
    waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)
    live_waiters: int = 0


def _number(what: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{what} must be a non-negative number of seconds or None, not {value!r}")
    return float(value)


class LockTable:
    """Every named lock of one broker: the ``locks`` component."""

    def __init__(self) -> None:
        self.locks: dict[str, _Lock] = {}
        self._tokens = itertools.count(1)
        self._timers: list[tuple[float, int, _Grant | _Waiter]] = []
        self._live_timers = 0
        self._seq = itertools.count()
        self._by_peer: dict[int, collections.Counter[str]] = {}
        self.granted = self.expired = self.timeouts = self.ops = 0

    # -- queries --------------------------------------------------------------------------

    def valid(self, name: str, token: int, now: float) -> bool:
        """Whether ``(name, token)`` is the lock's current, unexpired grant (for fencing)."""
        lock = self.locks.get(name)
        holder = lock.holder if lock else None
        return holder is not None and holder.token == token and now < holder.expires

    # -- Component protocol ---------------------------------------------------------------

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        self.ops += 1
        try:
            head, _ = split(msg.payload)
            if not isinstance(head, tuple) or not head or not isinstance(head[0], str) or not head[0]:
                raise TypeError("a lock operation needs a non-empty lock name")
            op = msg.op
            if op == "acquire":
                return self._acquire(peer, msg.rid, head[0], _number("ttl", head[1]), _number("wait", head[2]), now)
            if op == "release":
                return self._release(peer, msg.rid, head[0], head[1], now)
            if op == "withdraw":
                return self._withdraw(peer, head[0], head[1], now)
            if op == "extend":
                return self._extend(peer, msg.rid, head[0], head[1], _number("ttl", head[2]), now)
            raise ValueError(f"unknown lock operation {op!r}")
        except Exception as exc:
            return [Send(peer, fail(msg.rid, exc))] if msg.rid else []

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        names = self._by_peer.pop(peer, None)
        if not names:
            return []
        actions: list[Action] = []
        for name in names:
            lock = self.locks.get(name)
            if lock is None:
                continue
            for waiter in list(lock.waiters):
                if waiter.live and waiter.peer == peer:
                    self._kill_waiter(lock, waiter, count=False)
            holder = lock.holder
            if holder is not None and holder.peer == peer:
                actions += self._end_grant(lock, holder, now, count=False)
            else:
                self._forget_if_idle(name, lock)
        return actions

    def on_tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, item = heapq.heappop(timers)
            if not item.live:
                continue
            self._live_timers -= 1
            lock = self.locks.get(item.name)
            if lock is None:  # pragma: no cover - a live item always has its lock
                continue
            if isinstance(item, _Grant):
                self.expired += 1
                actions += self._end_grant(lock, item, now, timer_done=True)
            else:
                self.timeouts += 1
                self._kill_waiter(lock, item, timer_done=True)
                self._forget_if_idle(item.name, lock)
                actions.append(Send(item.peer, fail(item.rid, LockTimeout(
                    f"lock {item.name!r} was not granted within {item.wait:g} s"))))
        return actions

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and not timers[0][2].live:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    # -- operations -------------------------------------------------------------------------

    def _acquire(self, peer: int, rid: int, name: str, ttl: float | None, wait: float | None,
                 now: float) -> list[Action]:
        lock = self.locks.get(name)
        if lock is None:
            check(len(self.locks), MAX_LOCKS, "locks held or waited for")
            lock = self.locks[name] = _Lock()
        holder = lock.holder
        actions: list[Action] = []
        if holder is not None and not now < holder.expires:  # expired; on_tick has not run yet
            self.expired += 1
            actions = self._end_grant(lock, holder, now)
            if self.locks.get(name) is not lock:
                lock = self.locks[name] = _Lock()
        if lock.holder is None and not lock.live_waiters:
            return actions + [self._grant(lock, name, peer, rid, ttl, now)]
        if wait == 0:
            self._forget_if_idle(name, lock)
            return actions + [Send(peer, reply(rid, None))]
        waiter = _Waiter(name, peer, rid, ttl, math.inf if wait is None else wait,
                         math.inf if wait is None else now + wait)
        lock.waiters.append(waiter)
        lock.live_waiters += 1
        self._by_peer.setdefault(peer, collections.Counter())[name] += 1
        if wait is not None:
            self._add_timer(waiter.deadline, waiter)
        return actions

    def _grant(self, lock: _Lock, name: str, peer: int, rid: int, ttl: float | None, now: float) -> Send:
        grant = _Grant(name, next(self._tokens), peer, rid, math.inf if ttl is None else now + ttl)
        lock.holder = grant
        self.granted += 1
        self._by_peer.setdefault(peer, collections.Counter())[name] += 1
        if ttl is not None:
            self._add_timer(grant.expires, grant)
        return Send(peer, reply(rid, (grant.token, ttl)))

    def _release(self, peer: int, rid: int, name: str, token: object, now: float) -> list[Action]:
        lock = self.locks.get(name)
        holder = lock.holder if lock else None
        if lock is None or holder is None or holder.token != token or not now < holder.expires:
            return [Send(peer, reply(rid, False))]
        return self._end_grant(lock, holder, now) + [Send(peer, reply(rid, True))]

    def _extend(self, peer: int, rid: int, name: str, token: object, ttl: float | None,
                now: float) -> list[Action]:
        lock = self.locks.get(name)
        holder = lock.holder if lock else None
        if holder is None or holder.token != token or not now < holder.expires:
            return [Send(peer, reply(rid, False))]
        if holder.expires != math.inf:
            holder.live = False  # its timer entry goes stale; a copy carries on
            self._live_timers -= 1
            holder = lock.holder = _Grant(name, holder.token, holder.peer, holder.rid, holder.expires)  # type: ignore[union-attr]
        holder.expires = math.inf if ttl is None else now + ttl
        if ttl is not None:
            self._add_timer(holder.expires, holder)
        return [Send(peer, reply(rid, True))]

    def _withdraw(self, peer: int, name: str, rid: object, now: float) -> list[Action]:
        """The caller gave up on acquire ``rid``: drop its waiter, or release what it got."""
        lock = self.locks.get(name)
        if lock is None:
            return []
        holder = lock.holder
        if holder is not None and holder.peer == peer and holder.rid == rid:
            return self._end_grant(lock, holder, now)
        for waiter in list(lock.waiters):
            if waiter.live and waiter.peer == peer and waiter.rid == rid:
                self._kill_waiter(lock, waiter)
                self._forget_if_idle(name, lock)
                break
        return []

    # -- bookkeeping --------------------------------------------------------------------------

    def _end_grant(self, lock: _Lock, grant: _Grant, now: float, *, count: bool = True,
                   timer_done: bool = False) -> list[Action]:
        """End ``grant`` and hand the lock to the next live waiter, if any."""
        grant.live = False
        if grant.expires != math.inf and not timer_done:
            self._live_timers -= 1
        lock.holder = None
        if count:
            self._uncount(grant.peer, grant.name)
        while lock.waiters:
            waiter = lock.waiters.popleft()
            if not waiter.live:
                continue
            self._kill_waiter(lock, waiter, count=False, in_queue=False)
            # The waiter's count on its peer carries over to the grant.
            send = self._grant(lock, grant.name, waiter.peer, waiter.rid, waiter.ttl, now)
            self._uncount(waiter.peer, grant.name)
            return [send]
        self._forget_if_idle(grant.name, lock)
        return []

    def _kill_waiter(self, lock: _Lock, waiter: _Waiter, *, count: bool = True,
                     timer_done: bool = False, in_queue: bool = True) -> None:
        waiter.live = False
        lock.live_waiters -= 1
        if waiter.deadline != math.inf and not timer_done:
            self._live_timers -= 1
        if count:
            self._uncount(waiter.peer, waiter.name)
        if in_queue and not lock.live_waiters:
            lock.waiters.clear()

    def _uncount(self, peer: int, name: str) -> None:
        names = self._by_peer.get(peer)
        if names is None:
            return
        names[name] -= 1
        if names[name] <= 0:
            del names[name]
            if not names:
                del self._by_peer[peer]

    def _forget_if_idle(self, name: str, lock: _Lock) -> None:
        if lock.holder is None and not lock.live_waiters and self.locks.get(name) is lock:
            del self.locks[name]

    def _add_timer(self, when: float, item: _Grant | _Waiter) -> None:
        timers = self._timers
        heapq.heappush(timers, (when, next(self._seq), item))
        self._live_timers += 1
        if len(timers) > HEAP_SLACK * self._live_timers + 64:
            self._timers = [t for t in timers if t[2].live]
            heapq.heapify(self._timers)

    # -- observability ----------------------------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        held = sum(1 for lock in self.locks.values() if lock.holder is not None)
        waiting = sum(lock.live_waiters for lock in self.locks.values())
        return {"locks_held": held, "lock_waiters": waiting, "locks_granted": self.granted,
                "locks_expired": self.expired, "lock_timeouts": self.timeouts, "lock_ops": self.ops}
