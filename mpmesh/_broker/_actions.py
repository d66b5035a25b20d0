"""What the broker core asks its driver to do. The core never performs I/O itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .._wire._messages import Message

__all__ = ["Action", "Close", "Notify", "Send"]


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``msg`` to peer ``peer``."""

    peer: int
    msg: Message


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection to ``peer`` (after flushing what is queued for it)."""

    peer: int
    reason: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Something the owner of the broker may want to hear about (``m.on`` events)."""

    event: str
    info: dict[str, object] = field(default_factory=dict)


Action = Union[Send, Close, Notify]
