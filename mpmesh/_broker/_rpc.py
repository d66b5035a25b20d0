"""RPC pools: functions registered by name by any process, called least-busy.

    caller                      broker (this component)                    registrant
    Op("rpc","call") ──────►    pick the registrant with the fewest calls
                                in flight (ties: least recently picked)
                                calls[cid] = (caller, rid, registrant)  ──► Push(-cid, name, args)
                                                                             runs fn on a thread pool
                                ◄────────── Op("rpc","result", rid=0: cid, code, message, payload)
    Reply / Failure  ◄──────    pop calls[cid]

A registrant that is lost (exit, crash, SIGKILL) fails the calls it holds with
``WorkerLost``. A call whose timeout passes fails with ``RequestTimeout`` and the
registrant is told to skip it if it has not started (``Push(-cid, "", b"")``); a call
that did start still counts against its registrant until the late answer arrives (and
is dropped), so a hung registrant stops being picked while healthy ones are free.

Nothing here does I/O.
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .._wire._messages import ErrorCode, Failure, Op, Push, Reply
from ._actions import Action, Send
from ._limits import MAX_RPC_NAMES, check
from ._payload import fail, reply, split

__all__ = ["RESULT", "RpcPools", "pack_call", "pack_result"]

# Call ids (Push.stream = -call id) start here, leaving smaller streams to other components.
CALL_BASE: Final = 1 << 40
RESULT: Final = struct.Struct("!qiI")  # call id, ErrorCode (0 = success), message length
_NAME: Final = struct.Struct("!H")
OK: Final = 0


def pack_call(name: str, args: bytes) -> bytes:
    raw = name.encode()
    return b"".join((_NAME.pack(len(raw)), raw, args))


def pack_result(call_id: int, code: int, message: str, payload: bytes) -> bytes:
    raw = message.encode()
    return b"".join((RESULT.pack(call_id, code, len(raw)), raw, payload))


@dataclass(eq=False, slots=True)
class _Call:
    id: int
    name: str
    caller: int
    rid: int
    registrant: int
    deadline: float
    timeout: float
    done: bool = False      # answered (or failed) for the caller; waiting for the late answer


@dataclass(eq=False, slots=True)
class _Registrant:
    peer: int
    names: set[str]
    label: str
    busy: int = 0
    picked: int = 0         # when it was last picked, for tie-breaking
    calls: int = 0


class RpcPools:
    """Every registered function name of one broker: the ``rpc`` component."""

    def __init__(self, describe: Callable[[int], str] | None = None) -> None:
        self._describe = describe or (lambda peer: f"peer {peer}")
        self.names: dict[str, list[int]] = {}
        self.registrants: dict[int, _Registrant] = {}
        self.calls: dict[int, _Call] = {}
        self._by_caller: dict[int, set[int]] = {}
        self._ids = itertools.count(CALL_BASE)
        self._picks = itertools.count(1)
        self._timers: list[tuple[float, int]] = []
        self.completed = self.failed = self.timeouts = self.lost = self.ops = 0

    # -- Component protocol ---------------------------------------------------------------

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        self.ops += 1
        op = msg.op
        try:
            if op == "call":
                return self._call(peer, msg.rid, msg.payload, msg.timeout, now)
            if op == "result":
                return self._result(peer, msg.payload)
            head, _ = split(msg.payload)
            if op == "register":
                return [Send(peer, reply(msg.rid, self._register(peer, head)))]
            if op == "unregister":
                return [Send(peer, reply(msg.rid, self._unregister(peer, head)))]
            raise ValueError(f"unknown rpc operation {op!r}")
        except Exception as exc:
            return [Send(peer, fail(msg.rid, exc))] if msg.rid else []

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        actions: list[Action] = []
        for cid in self._by_caller.pop(peer, ()):  # the caller is gone: nobody to answer
            call = self.calls.get(cid)
            if call is not None and not call.done:
                call.done = True
                actions.append(Send(call.registrant, Push(-cid, "", b"")))
        reg = self.registrants.pop(peer, None)
        if reg is None:
            return actions
        for name in reg.names:
            self._drop_name(name, peer)
        for call in [c for c in self.calls.values() if c.registrant == peer]:
            del self.calls[call.id]
            if not call.done:
                self.lost += 1
                self._forget_caller(call)
                actions.append(Send(call.caller, Failure(
                    call.rid, ErrorCode.WORKER_LOST,
                    f"{reg.label}, serving {call.name!r}, was lost while handling call "
                    f"{call.id - CALL_BASE}", b"")))
        return actions

    def on_tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, cid = heapq.heappop(timers)
            call = self.calls.get(cid)
            if call is None or call.done:
                continue
            call.done = True
            self.timeouts += 1
            self._forget_caller(call)
            actions.append(Send(call.caller, Failure(
                call.rid, ErrorCode.TIMEOUT,
                f"{call.name!r} did not answer within {call.timeout:g} s", b"")))
            actions.append(Send(call.registrant, Push(-cid, "", b"")))
        return actions

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and (timers[0][1] not in self.calls or self.calls[timers[0][1]].done):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    # -- operations -------------------------------------------------------------------------

    def _register(self, peer: int, name: object) -> bool:
        if not isinstance(name, str) or not name:
            raise ValueError(f"an RPC name must be a non-empty str, not {name!r}")
        reg = self.registrants.get(peer)
        if reg is None:
            reg = self.registrants[peer] = _Registrant(peer, set(), self._describe(peer))
        if name in reg.names:
            return False
        if name not in self.names:
            check(len(self.names), MAX_RPC_NAMES, "registered names")
        reg.names.add(name)
        self.names.setdefault(name, []).append(peer)
        return True

    def _unregister(self, peer: int, name: object) -> bool:
        reg = self.registrants.get(peer)
        if reg is None or name not in reg.names:
            return False
        reg.names.discard(name)
        self._drop_name(name, peer)
        return True

    def _drop_name(self, name: str, peer: int) -> None:
        peers = self.names.get(name)
        if peers is not None and peer in peers:
            peers.remove(peer)
            if not peers:
                del self.names[name]

    def _pick(self, name: str) -> _Registrant | None:
        peers = self.names.get(name)
        if not peers:
            return None
        regs = self.registrants
        best = min((regs[p] for p in peers), key=lambda r: (r.busy, r.picked))
        best.picked = next(self._picks)
        return best

    def _call(self, peer: int, rid: int, payload: bytes, timeout: float, now: float) -> list[Action]:
        try:
            (n,) = _NAME.unpack_from(payload)
            if 2 + n > len(payload):
                raise ValueError("truncated name")
            name = payload[2:2 + n].decode()
        except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
            raise TypeError("malformed rpc call") from None
        reg = self._pick(name)
        if reg is None:
            return [Send(peer, Failure(rid, ErrorCode.NOT_FOUND,
                                       f"no process has registered {name!r}", b""))]
        cid = next(self._ids)
        deadline = now + timeout if timeout >= 0 else math.inf
        self.calls[cid] = _Call(cid, name, peer, rid, reg.peer, deadline, timeout)
        self._by_caller.setdefault(peer, set()).add(cid)
        reg.busy += 1
        reg.calls += 1
        if timeout >= 0:
            heapq.heappush(self._timers, (deadline, cid))
        return [Send(reg.peer, Push(-cid, name, payload[2 + n:]))]

    def _result(self, peer: int, payload: bytes) -> list[Action]:
        try:
            cid, code, n = RESULT.unpack_from(payload)
        except struct.error:
            raise TypeError("malformed rpc result") from None
        call = self.calls.get(cid)
        if call is None or call.registrant != peer:
            return []
        del self.calls[cid]
        reg = self.registrants.get(peer)
        if reg is not None:
            reg.busy -= 1
        if call.done:
            return []  # a late answer: its caller already had a timeout (or left)
        self._forget_caller(call)
        start = RESULT.size
        body = payload[start + n:]
        if code == OK:
            self.completed += 1
            return [Send(call.caller, Reply(call.rid, body))]
        self.failed += 1
        message = payload[start:start + n].decode(errors="replace")
        return [Send(call.caller, Failure(call.rid, code, message, body))]

    def _forget_caller(self, call: _Call) -> None:
        cids = self._by_caller.get(call.caller)
        if cids is not None:
            cids.discard(call.id)
            if not cids:
                del self._by_caller[call.caller]

    # -- observability ----------------------------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        return {"rpc_names": {name: len(peers) for name, peers in self.names.items()},
                "rpc_in_flight": sum(1 for c in self.calls.values() if not c.done),
                "rpc_completed": self.completed, "rpc_failed": self.failed,
                "rpc_timeouts": self.timeouts, "rpc_lost": self.lost}
