"""What the pool's engine asks its driver to do. The engine (``_engine.py``) never does it
itself; the driver (``_io.py``) carries each action out, in order, under the pool's lock.

Workers are named by their name (``"pool-3"``), as the broker core names peers by id.
"""

from __future__ import annotations

from typing import Any, Union

from .._wire._record import record
from ._results import Lazy

__all__ = ["Action", "Complete", "Deadline", "Gone", "Hangup", "Kill", "Log", "Progress", "Send",
           "Spawn", "StopFeeding"]


@record
class Send:
    """Write ``data`` (whole frames) to ``worker``'s channel; dropped if it has none."""

    worker: str
    data: bytes


@record
class Hangup:
    """Close ``worker``'s channel: it sent something no worker sends."""

    worker: str


@record
class Spawn:
    """Start a new worker process named ``worker`` (the engine already counts it)."""

    worker: str


@record
class Kill:
    """SIGKILL ``worker``'s process (it overran ``task_timeout`` or hung up without exiting)."""

    worker: str


@record
class Gone:
    """The engine forgot ``worker``: close its channel if still open; ``join()`` may be
    waiting for the last one."""

    worker: str


@record
class Complete:
    """Every chunk of ``job`` is settled: run its callbacks (never on the engine's caller
    if it has any), then wake its waiters (``job._finish``)."""

    job: Any


@record
class Progress:
    """Advance ``job``'s progress bar by ``n`` items (user code: the callback thread)."""

    job: Any
    n: int


@record
class StopFeeding:
    """Read no more of this ``imap`` input: its job has failed."""

    lazy: Lazy


@record
class Deadline:
    """A timer was set for ``at`` (monotonic seconds): the driver must call ``on_tick`` by
    then, so a thread other than its own wakes it to look again."""

    at: float


@record
class Log:
    """Log ``message % args`` at ``level`` to the ``mpmesh.pool`` logger."""

    level: int
    message: str
    args: tuple[object, ...] = ()


Action = Union[Send, Hangup, Spawn, Kill, Gone, Complete, Progress, StopFeeding, Deadline, Log]
