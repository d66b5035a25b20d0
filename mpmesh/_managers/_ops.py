"""How this process's proxies and managers send ops to the broker's object table: the
payload of a call (``pack``), ops that get no answer (``post``), waits that withdraw
their call when interrupted, and the decrefs of collected proxies.

A proxy that is garbage queues its decref here (``release``), sent with the process's
next call (``flush_releases``), never from the finalizer itself, which may run while
this thread holds the client's or the broker's lock.
"""

from __future__ import annotations

import collections
import os
from multiprocessing import process
from typing import Any

from .._broker._objects import COMPONENT
from .._client import _binding
from .._client._base import ClientBase
from .._client._futures import Call
from .._errors import SerializationError
from .._wire import _codec

__all__ = ["client_for", "flush_releases", "pack", "pending_releases", "post", "release", "wait_call", "withdraw"]

_getpid = os.getpid
_dumps = _codec.dumps


def client_for(address: object, authkey: bytes | None = None) -> ClientBase:
    """This process's client for the manager at ``address``, connecting on first use
    with ``authkey``, or this process's ``authkey`` as the standard library's proxies do."""
    return _binding.client_for(address, bytes(authkey if authkey is not None
                                              else process.current_process().authkey))


def pack(call: object) -> bytes:
    """The payload of a call or create: what pickling raised propagates as itself, as from
    the standard library's proxies (they pickle as they send), not as SerializationError."""
    try:
        return _dumps(call)
    except SerializationError as exc:
        raise (exc.__cause__ or exc) from None


def post(client: ClientBase, op: str, args: object, timeout: float = -1.0) -> None:
    """Send an objects op that gets no answer (request id 0); quietly skip a closed client."""
    client.post_op(COMPONENT, op, args, timeout)


def wait_call(client: ClientBase, fut: Call, deadline: float) -> Any:
    """The answer to ``fut``, waited for until ``deadline``; the call is withdrawn if the
    wait is interrupted."""
    try:
        return client.wait(fut, deadline)
    except BaseException:
        if not fut.done():  # interrupted (Ctrl-C) while parked: withdraw the call
            post(client, "cancel", fut._rid)
        raise


def withdraw(client: ClientBase, rid: int) -> None:
    """The caller of ``rid`` gave up waiting (Ctrl-C while parked): withdraw the call."""
    post(client, "cancel", rid)


# -- releasing references ----------------------------------------------------------------

# (client, oid) of this process's collected proxies, until the next flush.
pending_releases: collections.deque[tuple[ClientBase, int]] = collections.deque()


def release(box: list[Any]) -> None:
    """Finalizer of a proxy: queue its decref (``deque.append`` is safe from any GC point)."""
    client, oid, pid = box
    if pid == _getpid():
        pending_releases.append((client, oid))


def flush_releases() -> None:
    """Send the decrefs of this process's collected proxies, one message per client."""
    batch: dict[ClientBase, list[int]] = {}
    while True:
        try:
            client, oid = pending_releases.popleft()
        except IndexError:
            break
        batch.setdefault(client, []).append(oid)
    for client, oids in batch.items():
        if client._closed is None:
            post(client, "decref", oids)


def _reset_after_fork() -> None:
    pending_releases.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
