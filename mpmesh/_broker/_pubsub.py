"""Publish/subscribe: exact and prefix-wildcard channels, with slow-consumer protection.

Matching: a pattern ending in ``*`` matches every channel that starts with what precedes
the ``*`` (``"orders.*"`` matches ``"orders.created"`` and ``"orders.eu.created"``, not
``"orders"``); any other pattern matches that channel only. Prefix patterns are indexed
by length, so a publish costs one dict lookup per distinct prefix length, not one test
per subscription.

Slow consumers (credit-based; the core stays sans-IO)::

    broker                                       subscriber process
    Push(sub, channel, payload) ──────────────►  reader thread -> ordered delivery queue
      sent[peer] += cost                                 -> callback(payload, channel)
    unacked = sent - acked                       consumed += cost after each callback
    ◄────────────── Op("pubsub", "ack", consumed total) every ``ack_every`` bytes

The broker keeps, per subscriber *process*, the bytes it has pushed and the bytes that
process says its callbacks have consumed. Past ``high_water`` bytes unacknowledged, a
delivery to it is dropped and counted, so neither the broker's outbound buffer nor the
subscriber's delivery queue grows without bound; a subscriber that owes more than
``hard_limit`` bytes (unacknowledged plus dropped since its last ack) is disconnected.
Only pub/sub deliveries are ever dropped; replies and RPC never are.

Nothing here does I/O.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from .._wire._messages import Op, Push
from ._actions import Action, Close, Send
from ._limits import MAX_SUBSCRIPTIONS_PER_PEER, check
from ._payload import fail, reply, split

__all__ = ["ACK", "HARD_LIMIT_BYTES", "HIGH_WATER_BYTES", "PUSH_OVERHEAD_BYTES", "PubSub",
           "STREAM_BASE", "push_cost"]

# Bytes a subscriber process may have received but not yet consumed before deliveries
# to it are dropped. Larger absorbs longer bursts; smaller bounds memory tighter.
HIGH_WATER_BYTES: Final = 8 * 2**20
# Owed bytes (unacked + dropped since the last ack) past which the subscriber is
# considered stuck and disconnected.
HARD_LIMIT_BYTES: Final = 256 * 2**20
# What one delivery costs besides its payload and channel (frame header, fields).
PUSH_OVERHEAD_BYTES: Final = 32
# Subscribers number their subscriptions (Push.stream) from here, leaving smaller streams
# to other components. The subscriber picks the id, so it can file the subscription
# before the first delivery can possibly arrive.
STREAM_BASE: Final = 1 << 40
ACK: Final = struct.Struct("!q")
_CHANNEL: Final = struct.Struct("!H")


def push_cost(channel: str, payload: bytes) -> int:
    """What one delivery counts against a subscriber's credit (both sides compute it)."""
    return len(payload) + len(channel) + PUSH_OVERHEAD_BYTES


def pack_publish(channel: str, payload: bytes) -> bytes:
    raw = channel.encode()
    return b"".join((_CHANNEL.pack(len(raw)), raw, payload))


@dataclass(eq=False, slots=True)
class _Sub:
    id: int          # broker-wide
    peer: int
    pattern: str
    stream: int      # the subscriber's own id for it: Push.stream of its deliveries


@dataclass(eq=False, slots=True)
class _Subscriber:
    """Per subscriber process: its subscriptions and its credit."""

    subs: dict[int, _Sub] = field(default_factory=dict)
    sent: int = 0
    acked: int = 0
    dropped: int = 0          # messages
    dropped_bytes: int = 0    # since the last ack that made progress
    dropped_total_bytes: int = 0
    delivered: int = 0


class PubSub:
    """Every subscription of one broker: the ``pubsub`` component."""

    def __init__(self, *, high_water: int = HIGH_WATER_BYTES, hard_limit: int = HARD_LIMIT_BYTES) -> None:
        if not 0 < high_water <= hard_limit:
            raise ValueError("need 0 < high_water <= hard_limit")
        self.high_water = high_water
        self.hard_limit = hard_limit
        self.ack_every = max(1, high_water // 4)
        self._ids = itertools.count(1)
        self.exact: dict[str, dict[int, _Sub]] = {}
        self.prefixes: dict[str, dict[int, _Sub]] = {}
        self._prefix_lengths: dict[int, int] = {}  # length -> number of prefixes of that length
        self.subscribers: dict[int, _Subscriber] = {}
        self.published = self.delivered = self.dropped = self.disconnected = self.ops = 0

    # -- Component protocol ---------------------------------------------------------------

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        self.ops += 1
        op = msg.op
        try:
            if op == "publish":
                return self._publish(peer, msg.rid, msg.payload)
            if op == "ack":
                return self._ack(peer, msg.payload)
            head, _ = split(msg.payload)
            if op == "subscribe":
                return [Send(peer, reply(msg.rid, self._subscribe(peer, head)))]
            if op == "unsubscribe":
                return [Send(peer, reply(msg.rid, self._unsubscribe(peer, head)))]
            raise ValueError(f"unknown pubsub operation {op!r}")
        except Exception as exc:
            return [Send(peer, fail(msg.rid, exc))] if msg.rid else []

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        sub = self.subscribers.pop(peer, None)
        if sub is not None:
            for s in list(sub.subs.values()):
                self._remove(s)
        return []

    def on_tick(self, now: float) -> list[Action]:
        return []

    def next_deadline(self) -> float | None:
        return None

    # -- operations -------------------------------------------------------------------------

    def _subscribe(self, peer: int, head: object) -> int:
        """Add a subscription; answer how often the subscriber should acknowledge."""
        if not isinstance(head, tuple) or len(head) != 2:
            raise TypeError("malformed subscribe")
        pattern, stream = head
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a pattern must be a non-empty str, not {pattern!r}")
        if "*" in pattern[:-1]:
            raise ValueError(f"only a trailing '*' is supported in a pattern, not {pattern!r}")
        state = self.subscribers.get(peer)
        if (not isinstance(stream, int) or stream < STREAM_BASE
                or (state is not None and stream in state.subs)):
            raise ValueError(f"bad subscription id {stream!r}")
        if state is not None:
            check(len(state.subs), MAX_SUBSCRIPTIONS_PER_PEER, "subscriptions of one process")
        sub = _Sub(next(self._ids), peer, pattern, stream)
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            table = self.prefixes.get(prefix)
            if table is None:
                table = self.prefixes[prefix] = {}
                self._prefix_lengths[len(prefix)] = self._prefix_lengths.get(len(prefix), 0) + 1
            table[sub.id] = sub
        else:
            self.exact.setdefault(pattern, {})[sub.id] = sub
        self.subscribers.setdefault(peer, _Subscriber()).subs[stream] = sub
        return self.ack_every

    def _unsubscribe(self, peer: int, stream: object) -> bool:
        state = self.subscribers.get(peer)
        sub = state.subs.get(stream) if state is not None and isinstance(stream, int) else None
        if sub is None:
            return False
        self._remove(sub)
        return True

    def _remove(self, sub: _Sub) -> None:
        state = self.subscribers.get(sub.peer)
        if state is not None:
            state.subs.pop(sub.stream, None)
        if sub.pattern.endswith("*"):
            prefix = sub.pattern[:-1]
            table = self.prefixes.get(prefix)
            if table is not None:
                table.pop(sub.id, None)
                if not table:
                    del self.prefixes[prefix]
                    left = self._prefix_lengths[len(prefix)] - 1
                    if left:
                        self._prefix_lengths[len(prefix)] = left
                    else:
                        del self._prefix_lengths[len(prefix)]
        else:
            table = self.exact.get(sub.pattern)
            if table is not None:
                table.pop(sub.id, None)
                if not table:
                    del self.exact[sub.pattern]

    def matching(self, channel: str) -> list[_Sub]:
        """Every subscription ``channel`` reaches, exact ones first."""
        found = list(self.exact.get(channel, {}).values())
        prefixes = self.prefixes
        for length in self._prefix_lengths:
            if length <= len(channel):
                table = prefixes.get(channel[:length])
                if table:
                    found += table.values()
        return found

    def _publish(self, peer: int, rid: int, payload: bytes) -> list[Action]:
        try:
            (n,) = _CHANNEL.unpack_from(payload)
            if 2 + n > len(payload):
                raise ValueError("truncated channel")
            channel = payload[2:2 + n].decode()
        except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
            raise TypeError("malformed publish") from None
        if not channel:
            raise ValueError("a channel must be a non-empty str")
        data = payload[2 + n:]
        self.published += 1
        cost = push_cost(channel, data)
        actions: list[Action] = []
        reached = 0
        subscribers = self.subscribers
        high_water = self.high_water
        for sub in self.matching(channel):
            state = subscribers[sub.peer]
            unacked = state.sent - state.acked
            if unacked + cost > high_water and unacked >= self.ack_every:
                state.dropped += 1
                state.dropped_bytes += cost
                state.dropped_total_bytes += cost
                self.dropped += 1
                if unacked + state.dropped_bytes > self.hard_limit:
                    self.disconnected += 1
                    actions.append(Close(sub.peer, f"slow subscriber: owes {unacked + state.dropped_bytes} "
                                                   f"bytes of pub/sub deliveries"))
                    state.dropped_bytes = 0
                continue
            state.sent += cost
            state.delivered += 1
            reached += 1
            actions.append(Send(sub.peer, Push(sub.stream, channel, data)))
        self.delivered += reached
        if rid:
            actions.append(Send(peer, reply(rid, reached)))
        return actions

    def _ack(self, peer: int, payload: bytes) -> list[Action]:
        state = self.subscribers.get(peer)
        if state is None:
            return []
        try:
            (consumed,) = ACK.unpack_from(payload)
        except struct.error:
            raise TypeError("malformed ack") from None
        if consumed > state.acked:
            state.acked = min(consumed, state.sent)
            state.dropped_bytes = 0
        return []

    # -- observability ----------------------------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        per_peer = {peer: {"subscriptions": len(s.subs), "unacked_bytes": s.sent - s.acked,
                           "delivered": s.delivered, "dropped": s.dropped,
                           "dropped_bytes": s.dropped_total_bytes}
                    for peer, s in self.subscribers.items() if s.subs or s.sent > s.acked}
        return {"subscriptions": sum(len(s.subs) for s in self.subscribers.values()),
                "pubsub_published": self.published, "pubsub_delivered": self.delivered,
                "pubsub_dropped": self.dropped, "pubsub_disconnected": self.disconnected,
                "pubsub_queued_bytes": sum(s["unacked_bytes"] for s in per_peer.values()),
                "subscribers": per_peer}
