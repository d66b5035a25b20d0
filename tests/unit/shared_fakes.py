"""Drive a shared-state component with Op messages and a fake clock; decode its answers."""

from __future__ import annotations

import itertools
from typing import Any

from mpmesh._broker._actions import Action, Close, Send
from mpmesh._broker._payload import pack
from mpmesh._client._futures import error_for
from mpmesh._wire import _codec
from mpmesh._wire._messages import Failure, Op, Push, Reply


class Driver:
    """``d.op(peer, "get", ("c", "k"), now=...)`` -> the decoded answer to that peer."""

    def __init__(self, component: Any, name: str) -> None:
        self.component = component
        self.name = name
        self.rids = itertools.count(1)
        self.now = 0.0

    def send(self, peer: int, op: str, payload: bytes, *, rid: int | None = None,
             timeout: float = -1.0) -> tuple[int, list[Action]]:
        rid = next(self.rids) if rid is None else rid
        return rid, self.component.on_op(peer, Op(rid, timeout, self.name, op, payload), self.now)

    def op(self, peer: int, op: str, head: object = (), *blobs: bytes, timeout: float = -1.0) -> Any:
        """Send one op; return its answer (raise its error) — it must be answered at once."""
        rid, actions = self.send(peer, op, pack(head, *blobs), timeout=timeout)
        return answer(actions, peer, rid)

    def tick(self, now: float) -> list[Action]:
        self.now = now
        return self.component.on_tick(now)


def answer(actions: list[Action], peer: int, rid: int) -> Any:
    found = [a.msg for a in actions if isinstance(a, Send) and a.peer == peer
             and isinstance(a.msg, (Reply, Failure)) and a.msg.rid == rid]
    assert len(found) == 1, f"expected one answer to rid {rid} for peer {peer}, got {actions}"
    msg = found[0]
    if isinstance(msg, Failure):
        raise error_for(msg)
    return _codec.loads(msg.payload)


def answers(actions: list[Action]) -> dict[tuple[int, int], Any]:
    """Every Reply/Failure in ``actions`` by (peer, rid): value, or the exception."""
    out: dict[tuple[int, int], Any] = {}
    for a in actions:
        if isinstance(a, Send) and isinstance(a.msg, Reply):
            out[(a.peer, a.msg.rid)] = _codec.loads(a.msg.payload)
        elif isinstance(a, Send) and isinstance(a.msg, Failure):
            out[(a.peer, a.msg.rid)] = error_for(a.msg)
    return out


def pushes(actions: list[Action]) -> list[tuple[int, Push]]:
    return [(a.peer, a.msg) for a in actions if isinstance(a, Send) and isinstance(a.msg, Push)]


def closes(actions: list[Action]) -> list[int]:
    return [a.peer for a in actions if isinstance(a, Close)]


def blob(value: object) -> bytes:
    return _codec.dumps(value)
