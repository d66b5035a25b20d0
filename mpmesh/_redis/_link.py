"""One mesh's connection to Redis: the clients, the key names, the error mapping.

redis-py is an optional dependency (``pip install 'mpmesh[redis]'``): it is imported
here, on first use of a backend, and its absence is a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from typing import Any, Final

from .._errors import AuthenticationError, BrokerUnavailable, MeshError, RequestTimeout

__all__ = ["AUTHKEY_ENV", "ENV", "Link", "backend_from_env", "check_url", "shared_authkey"]

# The environment variable a Master and ``connect()`` read their backend from.
ENV: Final = "MPMESH_BACKEND"
# ... and the key its hosts share.
AUTHKEY_ENV: Final = "MPMESH_AUTHKEY"
# The first byte of a sealed blob (``Link.seal``): no number starts with it, so a value
# Redis can count (decimal text) and a sealed pickle are told apart by it.
SEALED: Final = b"m"
MAC_BYTES: Final = 32
# How long a first connection to Redis may take before it counts as unreachable.
CONNECT_TIMEOUT_S: Final = 2.0
# The socket timeout of commands when the handle has none (``timeout=None``).
DEFAULT_COMMAND_TIMEOUT_S: Final = 30.0


def check_url(url: object) -> str:
    """``url`` if it names a Redis server (``redis://``, ``rediss://``, ``unix://``)."""
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"backend must be a redis://host:port/db URL, not {url!r}")
    return url


def backend_from_env(backend: str | None) -> str | None:
    """The backend a handle uses: its own argument, else ``$MPMESH_BACKEND``, else None."""
    if backend is None:
        backend = os.environ.get(ENV) or None
    return None if backend is None else check_url(backend)


def shared_authkey() -> bytes:
    """The key every host of a mesh on Redis shares, from ``$MPMESH_AUTHKEY``.

    Hosts do not share a key file, and nothing read from Redis is unpickled unless it
    was sealed with this key (``Link.seal``), so a mesh across hosts needs one given.
    """
    key = os.environ.get(AUTHKEY_ENV, "")
    if not key:
        raise ValueError("a mesh across hosts needs its authkey, the same on every host: "
                         f"pass authkey= or set {AUTHKEY_ENV}")
    return key.encode()


def _redis_module() -> Any:
    try:
        import redis
    except ImportError:
        raise MeshError("the Redis backend needs redis-py: pip install 'mpmesh[redis]'") from None
    return redis


class Link:
    """The Redis clients of one mesh in one process, and the names of its keys.

    ``redis`` serves plain commands, whose socket timeout is the handle's ``timeout``;
    ``blocking()`` makes a client of its own for a thread that waits in a blocking
    command. Every key of mesh ``m`` starts with ``mpmesh:{m}:`` (one hash slot per
    mesh, should the server be a cluster).
    """

    def __init__(self, url: str, mesh: str, authkey: bytes, *, timeout: float | None = None) -> None:
        self.url = check_url(url)
        self.mesh = mesh
        # BLAKE2b takes a key of at most 64 bytes: the mesh's key, hashed to that size.
        self._mac_key = hashlib.blake2b(bytes(authkey), digest_size=64, person=b"mpmesh-seal").digest()
        self.timeout = DEFAULT_COMMAND_TIMEOUT_S if timeout is None else max(timeout, 0.001)
        self.prefix = f"mpmesh:{{{mesh}}}:"
        self.redis = self._client(self.timeout)
        self._scripts: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _client(self, socket_timeout: float | None) -> Any:
        redis = _redis_module()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside redis-py: a call's timeout is ours to keep, and the callers
        # that should try again (the beat, the listeners) do so themselves.
        return redis.Redis.from_url(self.url, socket_timeout=socket_timeout,
                                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                                    retry=Retry(NoBackoff(), 0), health_check_interval=0)

    def blocking(self, wait_s: float) -> Any:
        """A client for one thread's blocking commands of at most ``wait_s`` seconds."""
        return self._client(wait_s + self.timeout)

    def key(self, *parts: object) -> str:
        """The name of this mesh's key made of ``parts``."""
        return self.prefix + ":".join(str(p) for p in parts)

    def script(self, source: str) -> Any:
        """A Lua script, loaded once per link (redis-py sends it by hash after that)."""
        with self._lock:
            found = self._scripts.get(source)
            if found is None:
                found = self._scripts[source] = self.redis.register_script(source)
            return found

    def seal(self, blob: bytes) -> bytes:
        """``blob`` with a MAC made with the mesh's key (keyed BLAKE2b): what this mesh writes to Redis
        and later unpickles. Anyone who can write to the server could otherwise make
        every host unpickle what they wrote."""
        return SEALED + self._mac(blob) + blob

    def _mac(self, blob: bytes) -> bytes:
        # Keyed BLAKE2b is a MAC by design, and several times faster than HMAC-SHA256
        # for the small blobs of requests and replies.
        return hashlib.blake2b(blob, key=self._mac_key, digest_size=MAC_BYTES).digest()

    def unseal(self, sealed: bytes) -> bytes:
        """The blob ``seal`` wrapped, once its MAC checks out.

        Raises:
            AuthenticationError: not sealed with this mesh's key (never unpickle it).
        """
        head = len(SEALED) + MAC_BYTES
        if len(sealed) < head or not sealed.startswith(SEALED) or not hmac.compare_digest(
                sealed[len(SEALED):head], self._mac(sealed[head:])):
            raise AuthenticationError(f"a value in Redis at {self.url} was not written with this mesh's key")
        return sealed[head:]

    def now_ms(self) -> int:
        """Redis's clock, in milliseconds: the one clock every host agrees on."""
        with self.errors("reading the time"):
            seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn redis-py's errors into mpmesh's: unreachable -> ``BrokerUnavailable``,
        too slow -> ``RequestTimeout``."""
        redis = _redis_module()
        try:
            yield
        except redis.exceptions.TimeoutError as exc:
            raise RequestTimeout(f"Redis at {self.url} did not answer in time ({what})") from exc
        except redis.exceptions.ConnectionError as exc:
            raise BrokerUnavailable(f"Redis at {self.url} is unreachable ({what}): {exc}") from exc

    def close(self) -> None:
        self.redis.close()

    def __repr__(self) -> str:
        return f"<mpmesh Redis link {self.url} mesh={self.mesh!r}>"
