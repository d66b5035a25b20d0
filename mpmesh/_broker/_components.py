"""The shared-state components every broker host starts with, by name.

Each component owns one kind of broker-held state and receives the ``Op`` messages whose
``component`` field names it (see ``Component`` in ``_core``). A new kind of state is
added here, in one line, and nowhere else.
"""

from __future__ import annotations

from ._core import Component

__all__ = ["default_components"]


def default_components() -> dict[str, Component]:
    """Fresh instances of every built-in component, for a new broker."""
    components: dict[str, Component] = {}
    return components
