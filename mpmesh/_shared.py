"""Shared-state API (API.md §2) offered alike by Master, Child and ``mpmesh.connect()``.

Every method reaches the broker through ``self._client`` (a ``ClientBase``): a Master
talks to its in-process broker directly, other processes over their socket.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._client import ClientBase

__all__ = ["SharedState"]


class SharedState:
    """Mixin: cache, locks, pub/sub, RPC pools and ``nodes()`` over ``self._client``."""

    _client: ClientBase
