"""What a Master reports of its children and groups (``process_stats``, ``group_stats``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupStats", "ProcessStats"]


@dataclass(frozen=True)
class ProcessStats:
    """What one child has done so far (``Master.process_stats``).

    ``average_response_time`` is an exponential moving average in seconds.
    """

    name: str
    pid: int | None
    alive: bool
    requests_handled: int
    requests_active: int
    average_response_time: float
    errors: int
    restarts: int
    healthy: bool
    group: str | None


@dataclass(frozen=True)
class GroupStats:
    """Totals for one group (``Master.group_stats``)."""

    name: str
    strategy: str
    members: list[str]
    max_concurrency: int | None
    queue_length: int
    requests_active: int
    requests_handled: int
    errors: int
    restarts: int
