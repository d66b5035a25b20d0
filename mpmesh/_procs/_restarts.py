"""When a Master restarts a child that exited: back-off, and a guard against restart storms."""

from __future__ import annotations

import collections

__all__ = ["RestartPolicy"]


class RestartPolicy:
    """Exponential back-off plus a storm guard: at most ``limit`` restarts per ``window``."""

    def __init__(self, limit: int, window: float, backoff: float, backoff_max: float) -> None:
        self.limit, self.window, self.backoff, self.backoff_max = limit, window, backoff, backoff_max
        self._recent: dict[str, collections.deque[float]] = {}

    def next_delay(self, name: str, now: float) -> float | None:
        """Seconds to wait before restarting ``name``; None when it restarts too often."""
        recent = self._recent.setdefault(name, collections.deque())
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            return None
        delay = 0.0 if not recent else min(self.backoff * 2 ** (len(recent) - 1), self.backoff_max)
        recent.append(now + delay)
        return delay
