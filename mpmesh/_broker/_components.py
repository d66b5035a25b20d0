"""The shared-state components every broker host starts with, by name.

Each component owns one kind of broker-held state and receives the ``Op`` messages whose
``component`` field names it (see ``Component`` in ``_core``). A new kind of state is
added here, in one line, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import TYPE_CHECKING

from ._admin import Admin
from ._cache import CacheStore
from ._core import Component
from ._lockcells import LockCells
from ._locks import LockTable
from ._objects import ObjectTable
from ._pubsub import PubSub
from ._rpc import RpcPools
from ._versions import VersionTable

if TYPE_CHECKING:
    from ._core import BrokerCore

__all__ = ["default_components"]


def default_components(core: BrokerCore | None = None, *,
                       versions: VersionTable | None = None,
                       cells: LockCells | None = None) -> dict[str, Component]:
    """Fresh instances of every built-in component, for a new broker.

    Components that read the peer table (``admin``, ``rpc`` to name a lost registrant,
    ``objects`` to name a lost peer and learn whether it said Goodbye) get ``core``;
    without it, ``admin`` is left out. ``versions``: the table that ``cache`` and
    ``objects`` bump as they apply writes, for processes that keep copies (``_versions``);
    ``cells``: where Manager Locks keep their state (``_lockcells``; needs ``core``).
    """
    components: dict[str, Component] = {}
    locks = LockTable()
    components["locks"] = locks
    components["cache"] = CacheStore(fence=locks.valid, versions=versions)
    components["pubsub"] = PubSub()
    components["objects"] = ObjectTable(versions=versions) if core is None else ObjectTable(
        left_cleanly=_goodbye_said(core), describe=_describer(core), versions=versions,
        cells=cells, pid_of=_pid_of(core))
    components["rpc"] = RpcPools(describe=None if core is None else _describer(core))
    if core is not None:
        components["admin"] = Admin(core)
    return components


def _goodbye_said(core: BrokerCore) -> Callable[[int], bool]:
    def left_cleanly(peer_id: int) -> bool:
        peer = core.peers.get(peer_id)
        return peer is not None and peer.leaving
    return left_cleanly


def _pid_of(core: BrokerCore) -> Callable[[int], int]:
    def pid_of(peer_id: int) -> int:
        peer = core.peers.get(peer_id)
        return 0 if peer is None else peer.pid or (peer.known_pid or 0)
    return pid_of


def _describer(core: BrokerCore) -> Callable[[int], str]:
    def describe(peer_id: int) -> str:
        peer = core.peers.get(peer_id)
        if peer is None:
            return f"peer {peer_id}"
        name = peer.name or (peer.worker.name if peer.worker is not None else "")
        return f"process {name!r} (pid {peer.pid})"
    return describe
