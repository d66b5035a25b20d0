"""How much of the broker one peer, or all of them, may make it hold.

Every count a peer controls has a limit here, so no process (buggy or hostile, but
authenticated) can grow the broker without bound; what goes past one is refused with an
error that names the limit, and the broker goes on serving everyone else. Sizes of
messages are limited on the wire (``_wire/_frames``); the values and their reasons are
listed for users in ``docs/security.md``. ``FOREVER`` is here too: the one "no limit" of
time, which every layer's deadlines compare against.
"""

from __future__ import annotations

import math
from typing import Final

from .._errors import MeshError

__all__ = [
    "FOREVER", "MAX_CACHES", "MAX_IN_FLIGHT_PER_PEER", "MAX_LOCKS", "MAX_OBJECTS", "MAX_PARKED_PER_PEER",
    "MAX_RPC_NAMES", "MAX_SUBSCRIPTIONS_PER_PEER", "TooMany", "check",
]

# The deadline of a wait that has none (every layer compares deadlines with it).
FOREVER: Final = math.inf
# Requests one peer has waiting for an answer (queued, running or waiting to retry).
MAX_IN_FLIGHT_PER_PEER: Final = 100_000
# Named caches in one broker.
MAX_CACHES: Final = 10_000
# Locks that exist at once (held, or waited for) in one broker.
MAX_LOCKS: Final = 100_000
# Shared objects a Manager's broker holds at once.
MAX_OBJECTS: Final = 1_000_000
# Blocking calls one peer has parked in the broker at once (Manager lock waits, queue gets...).
MAX_PARKED_PER_PEER: Final = 10_000
# Subscriptions one peer holds.
MAX_SUBSCRIPTIONS_PER_PEER: Final = 10_000
# Names registered for ``register``/``call`` in one broker.
MAX_RPC_NAMES: Final = 10_000


class TooMany(MeshError, ValueError):
    """A limit of this module was reached: the operation is refused, nothing changed."""


def check(count: int, limit: int, what: str) -> None:
    """Raise TooMany if one more ``what`` would pass ``limit``."""
    if count >= limit:
        raise TooMany(f"too many {what} (the limit is {limit:,})")
