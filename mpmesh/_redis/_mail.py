"""What a node's parts share: its link and instance id, its lock, threads and closed
flag, and the envelopes and replies that travel between nodes (sealed, see ``_node``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .._errors import MeshError, MessageTooLarge, RemoteError
from .._wire import _codec
from ._link import Link

__all__ = ["CALL", "LEFT", "LISTEN_S", "MAX_REDIS_VALUE_BYTES", "REQUEST", "RETRY_S", "Mail", "Running"]

# Kinds of what lands in an inbox (the first byte).
REQUEST: Final = b"Q"
CALL: Final = b"C"
LEFT: Final = b"L"
# A reply list nobody reads any more (its caller died) expires.
REPLY_TTL_MS: Final = 60_000
# How long an idle listener blocks in Redis before it looks at its own state again.
LISTEN_S: Final = 1.0
# The largest request or reply sent through Redis: Redis's own limit on one value
# (proto-max-bulk-len, 512 MiB by default), below the mesh's MAX_MESSAGE_BYTES.
MAX_REDIS_VALUE_BYTES: Final = 512 * 1024 * 1024
# After Redis failed, a listener or the beat tries again this often.
RETRY_S: Final = 0.5

# Answer request ARGV[3] (reply ARGV[4] to list ARGV[2]) and drop its record ARGV[5]
# from this node's taken list; an RPC call (ARGV[6] its name) is one less busy call.
_ANSWER = """
local p = ARGV[1]
redis.call('LPUSH', p .. 'reply:' .. ARGV[2], ARGV[4])
redis.call('PEXPIRE', p .. 'reply:' .. ARGV[2], ARGV[7])
redis.call('LREM', p .. 'taken:' .. ARGV[8], 1, ARGV[5])
redis.call('DEL', p .. 'alive:' .. ARGV[3])
if ARGV[6] ~= '' then redis.call('ZADD', p .. 'rpc:' .. ARGV[6], 'XX', 'INCR', -1, ARGV[8]) end
return 1
"""


@dataclass
class Running:
    """A request this node took from its inbox and has not answered yet."""

    envelope: bytes
    reply_to: int
    rpc: str | None = None


class Mail:
    """One node's shared parts: the registry answers what a departed node held with
    ``reply``, as the takers answer what they ran."""

    def __init__(self, link: Link, iid: int) -> None:
        self.link = link
        self.iid = iid
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._answer = link.script(_ANSWER)

    def start(self, loops: list[tuple[str, Callable[[], None]]]) -> None:
        """Start a daemon thread per loop; ``join`` waits for them all."""
        with self.lock:
            for what, fn in loops:
                thread = threading.Thread(target=fn, name=f"mpmesh-redis-{what}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def join(self, timeout: float) -> None:
        with self.lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def unseal(self, blob: bytes) -> Any:
        return _codec.loads(self.link.unseal(blob))

    def open(self, envelope: bytes) -> Any:
        """The fields of a request or call envelope (its kind byte first)."""
        return self.unseal(envelope[1:])

    def reply(self, reply_to: int, rid: str, ok: bool, value: object, *,
              running: Running | None = None) -> None:
        """Answer request ``rid`` to list ``reply:<reply_to>`` (and drop ``running``'s records)."""
        blob = self.link.seal(_outcome(rid, ok, value))
        if len(blob) > MAX_REDIS_VALUE_BYTES:
            blob = self.link.seal(_outcome(rid, False, MessageTooLarge(
                f"the reply is {len(blob):,} bytes; a reply to another host may be at most "
                f"{MAX_REDIS_VALUE_BYTES:,} (what Redis keeps in one value)")))
        envelope = running.envelope if running is not None else b""
        rpc = (running.rpc or "") if running is not None else ""
        with self.link.errors("a reply"):
            self._answer(args=[self.link.prefix, reply_to, rid, blob, envelope, rpc,
                               REPLY_TTL_MS, self.iid])


def _outcome(rid: str, ok: bool, value: object) -> bytes:
    """A reply's bytes; an exception that cannot be pickled travels as a RemoteError."""
    try:
        return _codec.dumps((rid, ok, value))
    except MeshError as exc:
        if ok:
            value = exc
        return _codec.dumps((rid, False, RemoteError(f"{type(value).__name__}: {value}")))
