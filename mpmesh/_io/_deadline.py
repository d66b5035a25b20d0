"""Timeouts become absolute monotonic deadlines once, at the public edge, so nested
waits never add up to more than the caller asked for.

Below the API every blocking call takes a deadline and waits ``remaining(deadline)``;
no layer can stretch a timeout.
"""

from __future__ import annotations

import time
from typing import Final

from .._broker._limits import FOREVER

__all__ = ["FOREVER", "GUARD_SLACK_S", "after", "check_timeout", "expired", "remaining"]

# Slack a client adds to its own guard over a wait the broker times (a request's
# timeout, a lock's wait), so the broker's precise RequestTimeout or LockTimeout normally
# wins the race and the guard only catches a broker that stopped answering.
GUARD_SLACK_S: Final = 2.0


def check_timeout(timeout: float | None, what: str = "timeout") -> None:
    """Raise ValueError for a negative or NaN timeout, as the stdlib does."""
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"{what} must be a non-negative number or None, not {timeout!r}")


def after(timeout: float | None) -> float:
    """Return the deadline ``timeout`` seconds from now (``FOREVER`` for None)."""
    check_timeout(timeout)
    if timeout is None:
        return FOREVER
    return time.monotonic() + timeout


def remaining(deadline: float) -> float | None:
    """Seconds left until ``deadline`` (never negative), or None when it is ``FOREVER``."""
    if deadline == FOREVER:
        return None
    return max(0.0, deadline - time.monotonic())


def expired(deadline: float) -> bool:
    return deadline != FOREVER and time.monotonic() >= deadline
