"""The ``admin`` component: who is connected, broker-wide statistics, and ``stop``.

It reads the core's peer table and asks every other component for its ``stats(now)``,
so ``m.nodes()``, ``m.stats()`` and ``python -m mpmesh status|stats|stop`` work the same
against a Master's broker and a standalone one. ``stop`` is honoured only by a
standalone broker (``standalone = True``, set by ``python -m mpmesh serve``): it answers,
then asks its host to exit with ``Notify("stop")``. A Master's mesh is stopped by its
Master.

Nothing here does I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._wire._messages import Op, Role
from ._actions import Action, Notify, Send
from ._payload import fail, reply

if TYPE_CHECKING:
    from ._core import BrokerCore

__all__ = ["Admin", "STOP_EVENT"]

STOP_EVENT = "stop"


class Admin:
    """Introspection and control of one broker."""

    def __init__(self, core: BrokerCore, *, standalone: bool = False) -> None:
        self.core = core
        self.standalone = standalone

    def on_op(self, peer: int, msg: Op, now: float) -> list[Action]:
        op = msg.op
        try:
            if op == "ping":
                return [Send(peer, reply(msg.rid, self._whoami(peer)))]
            if op == "nodes":
                return [Send(peer, reply(msg.rid, (self._iid(peer), self.nodes())))]
            if op == "stats":
                return [Send(peer, reply(msg.rid, self.stats(now)))]
            if op == "stop":
                if not self.standalone:
                    raise ValueError("this mesh is hosted by a Master; shut it down from there")
                return [Send(peer, reply(msg.rid, True)), Notify(STOP_EVENT, {"by": self._iid(peer)})]
            raise ValueError(f"unknown admin operation {op!r}")
        except Exception as exc:
            return [Send(peer, fail(msg.rid, exc))]

    def on_peer_lost(self, peer: int, now: float) -> list[Action]:
        return []

    def on_tick(self, now: float) -> list[Action]:
        return []

    def next_deadline(self) -> float | None:
        return None

    # -- answers ----------------------------------------------------------------------------

    def _iid(self, peer: int) -> int:
        p = self.core.peers.get(peer)
        return p.instance_id if p is not None else -1

    def _host(self) -> Any:
        return self.core.peers.get(0)

    def _whoami(self, peer: int) -> dict[str, Any]:
        host = self._host()
        return {"instance_id": self._iid(peer), "broker_pid": host.pid if host else 0,
                "standalone": self.standalone, "host": host.name if host else ""}

    def nodes(self) -> list[tuple[int, str, str | None, int, str, str]]:
        """(instance_id, name, group, pid, hostname, role) of every process that said Hello."""
        found = []
        for peer in self.core.peers.values():
            if not peer.hello:
                continue
            name = peer.name or (peer.worker.name if peer.worker is not None else "")
            role = "broker" if peer.id == 0 and self.standalone else Role(peer.role).name.lower()
            found.append((peer.instance_id, name, peer.group or None, peer.pid, peer.hostname, role))
        found.sort()
        return found

    def stats(self, now: float) -> dict[str, Any]:
        core = self.core
        roles: dict[str, int] = {}
        for peer in core.peers.values():
            if peer.id != 0 and peer.hello:
                key = Role(peer.role).name.lower()
                roles[key] = roles.get(key, 0) + 1
        router = core.router
        queued = router.pending_count()
        host = self._host()
        out: dict[str, Any] = {
            "broker_pid": host.pid if host else 0, "standalone": self.standalone,
            "ops": core.ops, "connections": sum(1 for p in core.peers if p != 0),
            "connections_by_role": roles, "requests_queued": queued,
            "requests_in_flight": len(router.jobs) - queued,
        }
        for name, component in core.components.items():
            if component is self:
                continue
            stats = getattr(component, "stats", None)
            if callable(stats):
                try:
                    out.update(stats(now))
                except Exception as exc:  # pragma: no cover - a component's bug must not hide the rest
                    out[f"{name}_stats_error"] = repr(exc)
        return out
