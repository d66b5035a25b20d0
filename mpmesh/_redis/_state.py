"""Mesh-wide shared state on Redis: the cache (``RedisCache``); locks are in ``_locks``.

Layout (``P`` = ``mpmesh:{mesh}:``; names are escaped, ``:`` -> ``\\:``, so no name can
reach into another's keys)::

    P cache:<name>:opts        "maxsize|ttl", written by the first open
    P cache:<name>:v:<key>     one entry: its value; its TTL is the key's own (PXAT)
    P cache:<name>:idx         zset of keys by last use (LRU order, len, clear)
    P cache:<name>:exp         zset of keys by expiry time (ms), for entries with a TTL
    P cache:<name>:clk         the use counter that scores ``idx``

Keys are stored in a canonical form: keys equal in Python (``1``, ``1.0``, ``True``) are
one entry. Values: integers of 64 bits as decimal text (so ``INCRBY`` works), floats as
``b"F"`` and 8 IEEE bytes (exact through Lua), anything else as its pickle sealed with
the mesh's key (``Link.seal``; first byte ``b"m"``), checked before it is unpickled.
Every operation is one script run, atomic on the server; expired keys leave ``idx``
lazily (a few per write, all of them before ``len``, ``keys``, eviction).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, final

from .._broker._cache import _check_size, _check_ttl
from .._errors import FencedError
from .._state._cache import CacheBase
from .._wire import _codec
from ._link import SEALED, Link
from ._locks import (RedisGrant, RedisLocks, check_name, close_links, esc, grant_of, link_for, lock_keys,
                     refused, remember_link, to_ms)

__all__ = ["RedisCache", "RedisGrant", "RedisLocks", "close_links", "link_for", "remember_link"]

_INT64: Final = range(-(2**63), 2**63)
_DOUBLE: Final = struct.Struct(">d")
_NOTHING: Any = object()

_CACHE_LUA: Final = r"""
local idx, exp, clk = KEYS[1], KEYS[2], KEYS[3]
local op, base, a = ARGV[1], ARGV[2], 3
if op == 'open' then
  local cur = redis.call('GET', KEYS[1])
  if not cur then redis.call('SET', KEYS[1], base) end
  return cur
end
if KEYS[4] then
  local held = redis.call('GET', KEYS[4])
  if not held or string.match(held, '^%d+') ~= ARGV[3] then return redis.error_reply('FENCED') end
  a = 4
end
local now
local function clock()
  if not now then local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
  return now
end
local function use(m) redis.call('ZADD', idx, redis.call('INCR', clk), m) end
local function drop(m) redis.call('DEL', base .. m); redis.call('ZREM', idx, m); redis.call('ZREM', exp, m) end
local function purge(limit)
  local gone
  if limit then gone = redis.call('ZRANGEBYSCORE', exp, '-inf', clock(), 'LIMIT', 0, limit)
  else gone = redis.call('ZRANGEBYSCORE', exp, '-inf', clock()) end
  for _, m in ipairs(gone) do drop(m) end
end
-- ttl: -1 never, 0 already expired, > 0 milliseconds
local function put(m, v, ttl)
  local k = base .. m
  if ttl == 0 then drop(m) return end
  if ttl < 0 then redis.call('SET', k, v); redis.call('ZREM', exp, m)
  else local at = clock() + ttl; redis.call('SET', k, v, 'PXAT', at); redis.call('ZADD', exp, at, m) end
  use(m)
end
local function keep(m, v) redis.call('SET', base .. m, v, 'KEEPTTL'); use(m) end
local function bound(maxsize)
  purge(16)
  if maxsize <= 0 or redis.call('ZCARD', idx) <= maxsize then return end
  purge()
  local over = redis.call('ZCARD', idx) - maxsize
  if over > 0 then
    local lru = redis.call('ZPOPMIN', idx, over)
    for i = 1, #lru, 2 do redis.call('DEL', base .. lru[i]); redis.call('ZREM', exp, lru[i]) end
  end
end
local function read(m)
  local v = redis.call('GET', base .. m)
  if v then use(m) else drop(m) end
  return v
end
if op == 'get' then return read(ARGV[a])
elseif op == 'mget' then
  local out = {}
  for i = a, #ARGV do out[#out + 1] = read(ARGV[i]) or false end
  return out
elseif op == 'delete' then
  local n = redis.call('DEL', base .. ARGV[a]); drop(ARGV[a]); return n
elseif op == 'pop' then
  local v = redis.call('GET', base .. ARGV[a]); drop(ARGV[a]); return v
elseif op == 'keys' then purge(); return redis.call('ZRANGE', idx, 0, -1)
elseif op == 'len' then purge(); return redis.call('ZCARD', idx)
elseif op == 'items' then
  purge()
  local out = {}
  for _, m in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
    local v = redis.call('GET', base .. m)
    if v then out[#out + 1] = m; out[#out + 1] = v else drop(m) end
  end
  return out
elseif op == 'clear' then
  local all = redis.call('ZRANGE', idx, 0, -1)
  for i = 1, #all, 500 do
    local batch = {}
    for j = i, math.min(i + 499, #all) do batch[#batch + 1] = base .. all[j] end
    redis.call('DEL', unpack(batch))
  end
  redis.call('DEL', idx, exp)
  return 0
end
local maxsize, ttl, m = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2]
if op == 'set' then put(m, ARGV[a + 3], ttl)
elseif op == 'mset' then
  for i = a + 2, #ARGV, 2 do put(ARGV[i], ARGV[i + 1], ttl) end
elseif op == 'setdefault' then
  local v = read(m)
  if v then return v end
  put(m, ARGV[a + 3], ttl)
  bound(maxsize)
  return ARGV[a + 3]
elseif op == 'cas' then
  local v, expected, new = redis.call('GET', base .. m), ARGV[a + 4], ARGV[a + 5]
  if not v then
    if ARGV[a + 3] ~= '1' then return {0} end
    put(m, new, ttl)
  elseif v ~= expected then return {0, v}
  else keep(m, new) end
elseif op == 'incr' then
  local kind, amount = ARGV[a + 3], ARGV[a + 4]
  local k = base .. m
  local v, x = redis.call('GET', k), 0
  if not v then
    if kind == 'i' then put(m, amount, ttl); bound(maxsize); return {1, amount} end
  elseif string.byte(v) == SEALED then return {0, v}
  elseif string.byte(v) == 70 then x = struct.unpack('>d', v, 2)
  elseif kind == 'i' then
    if type(redis.pcall('INCRBY', k, amount)) == 'table' then return {0, v} end
    use(m)
    return {1, redis.call('GET', k)}
  else x = tonumber(v) end
  local y
  if kind == 'i' then y = tonumber(amount) else y = struct.unpack('>d', amount) end
  local new = 'F' .. struct.pack('>d', x + y)
  if v then keep(m, new) else put(m, new, ttl) end
  bound(maxsize)
  return {1, new}
end
bound(maxsize)
return {1}
""".replace("SEALED", str(SEALED[0]))


# -- keys: canonical bytes, so that keys equal in Python are one entry ---------------------

def _key(key: object) -> bytes:
    """The canonical bytes of cache key ``key``; TypeError unless a built-in hashable value."""
    hash(key)  # an unhashable key: the TypeError a dict raises
    out: list[bytes] = []
    _encode_key(key, out)
    return b"".join(out)


def _encode_key(k: Any, out: list[bytes]) -> None:
    t = type(k)
    if t is str:
        b = k.encode("utf-8", "surrogatepass")
        out += (b"s%d:" % len(b), b)
    elif t is int or t is bool or (t is float and k.is_integer()):
        out.append(b"i%d;" % k)
    elif t is float:
        out.append(b"f%s;" % repr(k).encode())
    elif t is bytes:
        out += (b"b%d:" % len(k), k)
    elif k is None:
        out.append(b"n")
    elif t is tuple:
        out.append(b"(")
        for item in k:
            _encode_key(item, out)
        out.append(b")")
    elif t is frozenset:
        out += (b"{", *sorted(_key(item) for item in k), b"}")
    elif t is complex:
        if k.imag == 0:
            _encode_key(k.real, out)
        else:
            out.append(b"c%s,%s;" % (repr(k.real).encode(), repr(k.imag).encode()))
    elif t is range:
        n = len(k)
        out.append(b"r%d,%d,%d;" % ((k.start, n, k.step if n > 1 else 1) if n else (0, 0, 1)))
    else:
        raise TypeError(f"a cache key must be a built-in value (str, bytes, int, float, None, "
                        f"tuples and frozensets of them...), not {t.__module__}.{t.__qualname__}")


def _decode_key(d: bytes, i: int = 0) -> tuple[Any, int]:
    """The key encoded at ``d[i:]``, and where its encoding ends."""
    tag = d[i:i + 1]
    i += 1
    if tag in (b"s", b"b"):
        colon = d.index(b":", i)
        start = colon + 1
        raw = d[start:start + int(d[i:colon])]
        return (raw.decode("utf-8", "surrogatepass") if tag == b"s" else raw), start + len(raw)
    if tag == b"n":
        return None, i
    if tag in (b"(", b"{"):
        items = []
        while d[i:i + 1] not in (b")", b"}"):
            item, i = _decode_key(d, i)
            items.append(item)
        return (tuple(items) if tag == b"(" else frozenset(items)), i + 1
    end = d.index(b";", i)
    text = d[i:end].decode()
    if tag == b"i":
        return int(text), end + 1
    if tag == b"f":
        return float(text), end + 1
    if tag == b"c":
        return complex(*map(float, text.split(","))), end + 1
    start, n, step = map(int, text.split(","))
    return range(start, start + n * step, step), end + 1


# -- the cache ------------------------------------------------------------------------------

@final
class RedisCache(CacheBase):
    """A named cache of the mesh held in Redis, with the public surface of ``Cache``.

    ``cache[k]`` and ``del cache[k]`` raise ``KeyError`` when ``k`` is missing; ``get``
    and ``mget`` return ``None`` (or ``default``); ``set`` without ``ttl`` uses the
    cache's default TTL. ``maxbytes`` cannot be kept on Redis: asking for it is an error.

    Raises:
        ValueError: it exists with different options, or an option is invalid.
    """

    __slots__ = ("name", "options", "_link", "_script", "_keys", "_base", "_maxsize", "_ttl")

    def __init__(self, link: Link, name: str, maxsize: int | None = None, ttl: float | None = None,
                 maxbytes: int | None = None) -> None:
        check_name("a cache name", name)
        maxsize, ttl = _check_size("maxsize", maxsize), _check_ttl(ttl)
        if _check_size("maxbytes", maxbytes) is not None:
            raise ValueError("maxbytes is not available with a Redis backend (Redis cannot bound a "
                             "cache's bytes atomically): use maxsize, or Redis's own maxmemory")
        asked = {"maxsize": maxsize, "maxbytes": None, "ttl": ttl}
        mine = f"{'' if maxsize is None else maxsize}|{'' if ttl is None else repr(ttl)}"
        opts = link.key("cache", esc(name), "opts")
        with link.errors(f"opening cache {name!r}"):
            found = link.script(_CACHE_LUA)(keys=[opts], args=["open", mine])
        if found is not None:
            size, _, lasts = found.decode().partition("|")
            options = {"maxsize": int(size) if size else None, "maxbytes": None,
                       "ttl": float(lasts) if lasts else None}
            clash = {k: v for k, v in asked.items() if v is not None and v != options[k]}
            if clash:
                raise ValueError(f"cache {name!r} already exists with {options}; cannot reopen it with {clash}")
            asked = options
        remember_link(link, replace=False)
        self._setup(link, name, asked)

    def _setup(self, link: Link, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options
        self._link = link
        self._script = link.script(_CACHE_LUA)
        head = link.key("cache", esc(name))
        self._keys = (head + ":idx", head + ":exp", head + ":clk")
        self._base = head + ":v:"
        self._maxsize = options["maxsize"] or 0
        lasts = options["ttl"]
        self._ttl = -1 if lasts is None else self._ttl_arg(lasts)

    @staticmethod
    def _ttl_arg(ttl: float) -> int:
        ms = to_ms(ttl)
        return -1 if ms is None else ms

    def _new_ttl(self, ttl: float | None) -> int:
        """The TTL argument of the scripts: -1 never, 0 expired, else milliseconds."""
        if ttl is None:
            return self._ttl
        checked = _check_ttl(ttl)
        return self._ttl if checked is None else self._ttl_arg(checked)

    def __reduce__(self) -> tuple[Any, ...]:
        link = self._link
        return (_rebuild_cache, (link.url, link.mesh, link.timeout, self.name, self.options))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedisCache) and other._base == self._base and other._link.url == self._link.url

    def __hash__(self) -> int:
        return hash((self._link.url, self._base))

    # -- values: 64-bit integers as decimal text, floats as b"F" + IEEE bytes, anything
    # -- else as a pickle sealed with the mesh's key (checked before it is unpickled) ----

    def _value(self, value: object) -> bytes:
        if type(value) is int and value in _INT64:
            return b"%d" % value
        if type(value) is float:
            return b"F" + _DOUBLE.pack(value)
        return self._link.seal(_codec.dumps(value))

    def _load(self, raw: bytes) -> Any:
        if raw[:1] == SEALED:
            return _codec.loads(self._link.unseal(raw))
        if raw[:1] == b"F":
            return _DOUBLE.unpack_from(raw, 1)[0]
        return int(raw)

    def _builtin(self, raw: bytes) -> Any:
        """``raw``'s value if it is made of built-in types only (else TypeError): what the
        cache may compare and compute on without running user code."""
        return _codec.loads_builtin(self._link.unseal(raw)) if raw[:1] == SEALED else self._load(raw)

    def _same(self, current: bytes, expected: bytes) -> bool:
        """Whether two stored values are equal: by value for built-in types, else by bytes."""
        if current == expected:
            return True
        try:
            return bool(self._builtin(current) == self._builtin(expected))
        except Exception:  # not built-in, not ours, or a comparison that fails
            return False

    def _run(self, what: str, op: str, *args: Any, grant: object = None) -> Any:
        """One run of the cache script: one round trip, atomic on the server."""
        keys: tuple[str, ...] = self._keys
        head: tuple[Any, ...] = (op, self._base)
        if grant is not None:
            name, token = grant_of(grant)
            keys, head = (*keys, lock_keys(self._link, name)[0]), (op, self._base, token)
        what = f"{what} in cache {self.name!r}"
        try:
            with self._link.errors(what):
                return self._script(keys=keys, args=head + args)
        except Exception as exc:
            error = refused(exc, what)
            if error is None:
                raise
            if grant is not None and str(exc).startswith("FENCED"):
                raise FencedError(f"lock {name!r} grant {token} has expired or been superseded; "
                                  "the write was refused") from None
            raise error from exc

    # -- single keys ----------------------------------------------------------------------

    def _read(self, key: Any) -> bytes | None:
        """``key``'s stored bytes. Without ``maxsize`` a read moves nothing (no LRU
        order to keep), so it is a plain ``GET``: no script to run on the server."""
        if self._maxsize:
            return self._run("reading", "get", _key(key))  # type: ignore[no-any-return]
        with self._link.errors(f"reading in cache {self.name!r}"):
            return self._link.redis.get(self._base.encode() + _key(key))  # type: ignore[no-any-return]

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is missing (or expired)."""
        raw = self._read(key)
        return default if raw is None else self._load(raw)

    def __getitem__(self, key: Any) -> Any:
        raw = self._read(key)
        if raw is None:
            raise KeyError(key)
        return self._load(raw)

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (None: the cache's TTL)."""
        m, blob, lasts = _key(key), self._value(value), self._new_ttl(ttl)
        self._run("writing", "set", self._maxsize, lasts, m, blob)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Any) -> None:
        if not self._run("deleting", "delete", _key(key)):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        m = _key(key)
        with self._link.errors(f"reading in cache {self.name!r}"):
            return bool(self._link.redis.exists(self._base.encode() + m))

    def pop(self, key: Any, default: Any = _NOTHING) -> Any:
        """Remove ``key`` and return its value (``default``, or KeyError, when missing)."""
        raw = self._run("popping", "pop", _key(key))
        if raw is None:
            if default is _NOTHING:
                raise KeyError(key)
            return default
        return self._load(raw)

    def setdefault(self, key: Any, default: Any = None, ttl: float | None = None) -> Any:
        """Atomically: store ``default`` unless ``key`` exists; return the value it now has."""
        m, blob, lasts = _key(key), self._value(default), self._new_ttl(ttl)
        return self._load(self._run("writing", "setdefault", self._maxsize, lasts, m, blob))

    def incr(self, key: Any, amount: int | float = 1) -> Any:
        """Add ``amount`` to the number under ``key`` (a missing key counts from 0); return it.

        The entry keeps its remaining TTL.
        """
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"incr/decr need a number, not {type(amount).__name__}")
        m = _key(key)
        if isinstance(amount, float):
            kind, arg = "f", _DOUBLE.pack(amount)
        elif amount in _INT64:
            kind, arg = "i", b"%d" % amount
        else:
            return self._incr_slowly(key, m, int(amount), _NOTHING)
        done, raw = self._run("counting", "incr", self._maxsize, self._ttl, m, kind, arg)
        if done:
            return self._load(raw)
        return self._incr_slowly(key, m, amount, raw)

    def _incr_slowly(self, key: Any, m: bytes, amount: int | float, raw: Any) -> Any:
        """``incr`` past 64 bits (or of a pickled number): compute here, store by ``cas``."""
        while True:
            if raw is _NOTHING:
                with self._link.errors(f"counting in cache {self.name!r}"):
                    raw = self._link.redis.get(self._base.encode() + m)
            value: Any = 0
            if raw is not None:
                value = self._builtin(raw)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"cannot incr/decr {key!r}: it holds a {type(value).__name__}, not a number")
            value += amount
            if self._swap_raw(m, raw, self._value(value)):
                return value
            raw = _NOTHING

    def _swap_raw(self, m: bytes, raw: bytes | None, blob: bytes) -> bool:
        """Replace the stored bytes ``raw`` (None: missing) by ``blob``; whether it did."""
        result = self._run("counting", "cas", self._maxsize, self._ttl, m, "1" if raw is None else "0",
                           raw or b"", blob)
        return bool(result[0] == 1)

    def decr(self, key: Any, amount: int | float = 1) -> Any:
        """Subtract ``amount`` (see ``incr``)."""
        return self.incr(key, -amount)

    def cas(self, key: Any, expected: Any, new: Any) -> bool:
        """Atomically replace ``key``'s value by ``new`` if it equals ``expected``; whether it did.

        A missing key equals ``None``. Built-in values compare by value, others by their
        pickled form. The entry keeps its remaining TTL.
        """
        return self._cas(key, expected, new, None)

    def _cas(self, key: Any, expected: Any, new: Any, grant: object) -> bool:
        m, old, blob = _key(key), self._value(expected), self._value(new)
        attempt, none = old, "1" if expected is None else "0"
        while True:
            result = self._run("writing", "cas", self._maxsize, self._ttl, m, none, attempt, blob, grant=grant)
            if result[0] == 1:
                return True
            # The script compares bytes; equal values may differ in bytes (1 and 1.0, dicts
            # in another order): try again with the very bytes found, if they are equal.
            if len(result) < 2 or not self._same(result[1], old):
                return False
            attempt = result[1]

    # -- fenced writes ----------------------------------------------------------------------

    def fenced_set(self, grant: Any, key: Any, value: Any, ttl: float | None = None) -> None:
        """``set``, only while ``grant`` is its lock's current grant.

        Raises:
            FencedError: the grant has expired or been superseded; nothing was written.
        """
        m, blob, lasts = _key(key), self._value(value), self._new_ttl(ttl)
        self._run("writing", "set", self._maxsize, lasts, m, blob, grant=grant)

    def fenced_delete(self, grant: Any, key: Any) -> bool:
        """Delete ``key`` (whether it was there), only while ``grant`` is current (else FencedError)."""
        return bool(self._run("deleting", "delete", _key(key), grant=grant))

    def fenced_cas(self, grant: Any, key: Any, expected: Any, new: Any) -> bool:
        """``cas``, only while ``grant`` is current (else FencedError)."""
        grant_of(grant)
        return self._cas(key, expected, new, grant)

    # -- many keys --------------------------------------------------------------------------

    def mget(self, keys: Iterable[Any]) -> list[Any]:
        """The values of ``keys``, ``None`` for each one missing."""
        ms = [_key(k) for k in keys]
        if not ms:
            return []
        return [None if raw is None else self._load(raw) for raw in self._run("reading", "mget", *ms)]

    def mset(self, mapping: Mapping[Any, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` at once (one round trip, atomic)."""
        args: list[bytes] = []
        for k, v in mapping.items():
            args += (_key(k), self._value(v))
        lasts = self._new_ttl(ttl)
        if args:
            self._run("writing", "mset", self._maxsize, lasts, *args)

    def keys(self) -> list[Any]:  # type: ignore[override]
        """A snapshot of the keys, least recently used first."""
        return [_decode_key(m)[0] for m in self._run("listing", "keys")]

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        """A snapshot of the ``(key, value)`` pairs."""
        flat = self._run("listing", "items")
        return [(_decode_key(flat[i])[0], self._load(flat[i + 1])) for i in range(0, len(flat), 2)]

    def values(self) -> list[Any]:  # type: ignore[override]
        return [v for _, v in self.items()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return int(self._run("counting", "len"))

    def clear(self) -> None:
        """Remove every entry (one round trip)."""
        self._run("clearing", "clear")


def _rebuild_cache(url: str, mesh: str, timeout: float, name: str, options: dict[str, Any]) -> RedisCache:
    cache: RedisCache = RedisCache.__new__(RedisCache)
    cache._setup(link_for(url, mesh, timeout), name, options)
    return cache


