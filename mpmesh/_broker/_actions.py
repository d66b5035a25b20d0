"""What the broker core asks its driver to do. The core never performs I/O itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Union

from .._wire._messages import Message
from .._wire._record import record

__all__ = ["WARNING", "Action", "Close", "Inspect", "Notify", "Offload", "Send"]

# The event of a ``Notify`` the host logs as a warning (``info["message"]``) instead of
# passing it on: something a process did that its user should hear about.
WARNING = "warning"


@record
class Send:
    """Deliver ``msg`` to peer ``peer``."""

    peer: int
    msg: Message


@record
class Close:
    """Close the connection to ``peer`` (after flushing what is queued for it)."""

    peer: int
    reason: str


@record
class Notify:
    """Something the owner of the broker may want to hear about (``m.on`` events)."""

    event: str
    info: dict[str, object] = field(default_factory=dict)


@record
class Offload:
    """Run user code (a method of a registered Manager type) off the loop thread.

    The host calls ``job()`` on a worker thread (it never raises: it returns its
    outcome), then ``done(outcome, now)`` under the core lock, and performs the actions
    ``done`` returns, e.g. with ``BrokerLoop.run_core``. The loop itself passes an
    Offload to the host's ``on_notify`` sink with the ``Notify`` events.
    """

    job: Callable[[], object]
    done: Callable[[object, float], list[Action]]


@record
class Inspect:
    """Say which of these processes are on a CPU now (running or runnable): the driver
    looks, and answers with ``BrokerCore.on_running`` (children silent past their
    heartbeats: one starved by a long GIL-holding call is busy, not stuck)."""

    pids: tuple[int, ...]


Action = Union[Send, Close, Notify, Offload, Inspect]
