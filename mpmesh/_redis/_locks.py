"""Mesh-wide locks on Redis (``RedisLocks``, ``RedisGrant``), and what every module of
shared state on Redis needs: one ``Link`` per mesh in each process, and key names.

Layout (``P`` = ``mpmesh:{mesh}:``)::

    P lock:<name>              "<token>:<holder>:<nonce>", PX its TTL or lease
    P lock:<name>:wake         a release pushes here; waiters BLPOP it
    P lock-tokens              the fencing-token counter of the mesh

A lock is ``SET NX PX``; its token comes from the one counter of the mesh, so tokens
increase across hosts and locks. Release and extend go by token (a script compares,
then deletes or extends). A lock taken with ``ttl=None`` is held on a lease that its
process renews (``renew``), so it is freed when the process dies. The nonce names one
acquire: an acquire or release Redis did not confirm is undone by it later.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Final, final

from .._errors import MeshError
from .._io._deadline import check_timeout
from .._state._grant import Grant
from ._link import Link, _redis_module, shared_authkey

__all__ = ["DEFAULT_LEASE_MS", "RedisGrant", "RedisLocks", "check_name", "close_links", "esc",
           "grant_of", "link_for", "lock_keys", "refused", "remember_link", "to_ms"]

# How long a lock taken with ttl=None outlives its holder's last renewal.
DEFAULT_LEASE_MS: Final = 5000
# The longest a lock waiter blocks before it looks again (a release wakes it sooner).
POLL_S: Final = 0.25
# Idle blocking clients a RedisLocks keeps for its waiters.
POOL_SIZE: Final = 4
# How late Redis may time out a blocked command: it does so on its clock tick (``hz``,
# 10 a second by default). A waiter blocks that much less than it means to wait...
TICK_S: Final = 0.1
# ... and waits out a pause shorter than a tick in sleeps of this, client-side.
SPIN_S: Final = 0.01

_LOCK_LUA: Final = r"""
local op = ARGV[1]
local function token(k) local v = redis.call('GET', k); return v and string.match(v, '^%d+') end
local function wake(w) redis.call('LPUSH', w, 1); redis.call('LTRIM', w, 0, 0); redis.call('PEXPIRE', w, 1000) end
if op == 'acquire' then
  local left = redis.call('PTTL', KEYS[1])
  if left ~= -2 then return {0, left} end
  local t = string.format('%d', redis.call('INCR', KEYS[2]))
  redis.call('SET', KEYS[1], t .. ':' .. ARGV[3] .. ':' .. ARGV[4], 'PX', ARGV[2])
  return {1, t}
elseif op == 'release' then
  if token(KEYS[1]) ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[1]); wake(KEYS[2]); return 1
elseif op == 'extend' then
  if token(KEYS[1]) ~= ARGV[2] then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[3]); return 1
end
-- renew: KEYS = n leased locks, then (lock, wake) pairs to withdraw;
-- ARGV = op, lease ms, n, the n tokens, one nonce per pair
local n, held = tonumber(ARGV[3]), {}
for i = 1, n do
  if token(KEYS[i]) == ARGV[3 + i] then redis.call('PEXPIRE', KEYS[i], ARGV[2]); held[i] = 1 else held[i] = 0 end
end
for j = n + 1, #KEYS, 2 do
  local v, nonce = redis.call('GET', KEYS[j]), ':' .. ARGV[4 + n + (j - n - 1) / 2]
  if v and string.sub(v, -#nonce) == nonce then redis.call('DEL', KEYS[j]); wake(KEYS[j + 1]) end
end
return held
"""

# -- one Link per (url, mesh) in each process, for handles that arrive pickled -------------
# A pickle never carries the mesh's key: a handle rebuilt in another process uses that
# process's own link to the mesh (the first a handle was made with, or one given to
# ``remember_link``), else one made with the key of ``$MPMESH_AUTHKEY``.

_links: dict[tuple[str, str, int], Link | weakref.ref[Link]] = {}  # a link made here, or a reference
_tables: dict[tuple[str, str, int], RedisLocks] = {}
_links_lock = threading.Lock()


def remember_link(link: Link, *, replace: bool = True) -> None:
    """Make ``link`` the one handles that arrive pickled in this process use for its mesh
    (while it is alive: this keeps only a weak reference)."""
    place = (link.url, link.mesh, os.getpid())
    with _links_lock:
        if replace or _live(_links.get(place)) is None:
            _links[place] = weakref.ref(link)


def _live(entry: Link | weakref.ref[Link] | None) -> Link | None:
    return entry() if isinstance(entry, weakref.ref) else entry


def link_for(url: str, mesh: str, timeout: float | None = None) -> Link:
    """This process's ``Link`` to ``mesh`` at ``url``; made on first use (with ``timeout``
    and the key of ``$MPMESH_AUTHKEY``) if it has none."""
    place = (url, mesh, os.getpid())
    with _links_lock:
        link = _live(_links.get(place))
        if link is None:
            link = _links[place] = Link(url, mesh, shared_authkey(), timeout=timeout)
        return link


def close_links() -> None:
    """Forget every link of this process; close those ``link_for`` made."""
    with _links_lock:
        made = [entry for (_, _, pid), entry in _links.items() if pid == os.getpid() and isinstance(entry, Link)]
        _links.clear()
    for link in made:
        link.close()


def esc(name: str) -> str:
    return name.replace("\\", "\\\\").replace(":", "\\:")


def check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str, not {name!r}")
    return name


def to_ms(seconds: float) -> int | None:
    """``seconds`` in whole milliseconds (at least 1 if positive); None for never."""
    if seconds >= 1e12:
        return None
    return 0 if seconds == 0 else max(1, round(seconds * 1000))


def refused(exc: BaseException, what: str) -> MeshError | None:
    """A command Redis refused (redis-py's ResponseError) as mpmesh's error; None for others."""
    if isinstance(exc, _redis_module().exceptions.ResponseError):
        return MeshError(f"Redis refused {what}: {exc}")
    return None


def grant_of(grant: object) -> tuple[str, int]:
    """``(lock name, token)`` of a grant, for a fenced write; TypeError if it is none."""
    name, token = getattr(grant, "name", None), getattr(grant, "token", None)
    if not isinstance(name, str) or not isinstance(token, int) or isinstance(token, bool):
        raise TypeError("a fenced write needs a LockGrant")
    return name, token


def lock_keys(link: Link, name: str) -> tuple[str, str]:
    key = link.key("lock", esc(name))
    return key, key + ":wake"


# -- locks ------------------------------------------------------------------------------------

class RedisLocks:
    """This process's side of the mesh's locks: acquiring, and keeping its leases alive.

    A lock taken with ``ttl=None`` is stored with a lease of ``lease_ms`` that ``renew``
    (called every second by the process's beat) extends while this process lives; if it
    dies, the lock is free once the lease runs out.
    """

    def __init__(self, link: Link, holder_id: int, *, lease_ms: int = DEFAULT_LEASE_MS) -> None:
        self._link = link
        self._holder = holder_id
        self._lease_ms = lease_ms
        self._script = link.script(_LOCK_LUA)
        self._tokens = link.key("lock-tokens")
        self._leases: dict[int, str] = {}  # token -> lock key, for the grants on a lease
        self._orphans: dict[str, tuple[str, str]] = {}  # nonce -> keys, to release when Redis answers
        self._idle: list[Any] = []  # blocking clients for waiters
        self._closed = False
        self._lock = threading.Lock()
        remember_link(link, replace=False)
        with _links_lock:
            _tables[(link.url, link.mesh, os.getpid())] = self

    def acquire(self, name: str, ttl: float | None, wait: float | None) -> RedisGrant | None:
        """Lock ``name`` for ``ttl`` seconds (None: a lease), waiting up to ``wait`` seconds
        (None: forever; 0: try once); None if not granted in time."""
        check_name("a lock name", name)
        check_timeout(ttl, "ttl")
        check_timeout(wait, "wait")
        ms = None if ttl is None else to_ms(ttl)
        lock, wake = lock_keys(self._link, name)
        nonce = os.urandom(8).hex()
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                with self._link.errors(f"acquiring lock {name!r}"):
                    granted, value = self._script(keys=[lock, self._tokens], args=[
                        "acquire", self._lease_ms if ms is None else max(ms, 1), self._holder, nonce])
            except BaseException:  # interrupted, or no answer: a grant may follow, for nobody
                with self._lock:
                    self._orphans[nonce] = (lock, wake)
                raise
            if granted:
                token = int(value)
                if ms is None:
                    with self._lock:
                        self._leases[token] = lock
                return RedisGrant(self._link, name, token, ttl, nonce, self)
            pause = POLL_S if value < 0 else min(POLL_S, value / 1000)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                pause = min(pause, left)
            if pause > TICK_S:
                self._sleep(name, wake, pause - TICK_S)
            else:
                time.sleep(min(pause, SPIN_S))

    def _sleep(self, name: str, wake: str, pause: float) -> None:
        """Wait up to ``pause`` seconds for a release of the lock."""
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = self._link.blocking(POLL_S)
        try:
            with self._link.errors(f"waiting for lock {name!r}"):
                client.blpop([wake], timeout=pause)
        finally:
            with self._lock:
                keep = len(self._idle) < POOL_SIZE and not self._closed
                if keep:
                    self._idle.append(client)
            if not keep:
                client.close()

    def renew(self, lease_ms: int | None = None) -> int:
        """Extend every lease of this process still held (one round trip), forget the others,
        and release the grants whose acquire or release Redis did not confirm; how many
        leases are held."""
        with self._lock:
            leases = list(self._leases.items())
            orphans = list(self._orphans.items())
        if not leases and not orphans:
            return 0
        keys = [lock for _, lock in leases]
        for _, (lock, wake) in orphans:
            keys += (lock, wake)
        args: list[Any] = ["renew", lease_ms or self._lease_ms, len(leases)]
        args += [token for token, _ in leases] + [nonce for nonce, _ in orphans]
        with self._link.errors("renewing lock leases"):
            held = self._script(keys=keys, args=args)
        with self._lock:
            for (token, _), still in zip(leases, held):
                if not still:
                    self._leases.pop(token, None)
            for nonce, _ in orphans:
                self._orphans.pop(nonce, None)
        return sum(held)

    def _forget(self, token: int) -> None:
        with self._lock:
            self._leases.pop(token, None)

    def _lease(self, token: int, lock: str) -> None:
        with self._lock:
            self._leases[token] = lock

    def _orphan(self, nonce: str, lock: str, wake: str) -> None:
        with self._lock:
            self._orphans[nonce] = (lock, wake)

    def close(self) -> None:
        """Close the waiters' clients (the leases are no longer renewed)."""
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for client in idle:
            client.close()
        with _links_lock:
            place = (self._link.url, self._link.mesh, os.getpid())
            if _tables.get(place) is self:
                del _tables[place]


@final
class RedisGrant(Grant):
    """A lock granted in Redis. Releasing twice, or after the TTL ran out, does nothing."""

    __slots__ = ("_link", "_nonce", "_table")

    def __init__(self, link: Link, name: str, token: int, ttl: float | None, nonce: str,
                 table: RedisLocks | None = None) -> None:
        super().__init__(name, token, ttl)
        self._link = link
        self._nonce = nonce
        self._table = table

    def _locks(self) -> RedisLocks | None:
        """The lock table that keeps this grant's lease: the one that granted it, else (a
        grant that arrived pickled) this process's table for the mesh, if any."""
        if self._table is None:
            link = self._link
            self._table = _tables.get((link.url, link.mesh, os.getpid()))
        return self._table

    def release(self) -> None:
        """Release the lock now (a waiter learns it at once).

        Raises:
            RequestTimeout, BrokerUnavailable: Redis did not confirm it; the process's
            lock table releases it once Redis answers again.
        """
        if self._released:
            return
        self._released = True
        table = self._locks()
        if table is not None:
            table._forget(self.token)
        lock, wake = lock_keys(self._link, self.name)
        try:
            with self._link.errors(f"releasing lock {self.name!r}"):
                self._link.script(_LOCK_LUA)(keys=[lock, wake], args=["release", self.token])
        except MeshError:
            if table is not None:
                table._orphan(self._nonce, lock, wake)
            raise

    def extend(self, ttl: float | None) -> bool:
        """Make the grant expire ``ttl`` seconds from now (None: held on a lease, as long as
        this process lives); False if it already ended."""
        check_timeout(ttl, "ttl")
        ms = None if ttl is None else to_ms(ttl)
        table = self._locks()
        lease = DEFAULT_LEASE_MS if table is None else table._lease_ms
        lock = lock_keys(self._link, self.name)[0]
        with self._link.errors(f"extending lock {self.name!r}"):
            ok = bool(self._link.script(_LOCK_LUA)(
                keys=[lock], args=["extend", self.token, lease if ms is None else max(ms, 1)]))
        if ok:
            self.ttl = ttl
            if table is not None:
                if ms is None:
                    table._lease(self.token, lock)
                else:
                    table._forget(self.token)
        return ok

    def __reduce__(self) -> tuple[Any, ...]:
        link = self._link
        return (_rebuild_grant, (link.url, link.mesh, link.timeout, self.name, self.token, self.ttl, self._nonce))


def _rebuild_grant(url: str, mesh: str, timeout: float, name: str, token: int, ttl: float | None,
                   nonce: str) -> RedisGrant:
    return RedisGrant(link_for(url, mesh, timeout), name, token, ttl, nonce)
