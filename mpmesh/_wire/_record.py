"""``record``: the class decorator of wire messages and broker actions.

They are values: nothing changes one once it is built. mypy enforces that (it reads a
``record`` as a frozen dataclass); at run time a record is a plain slotted dataclass,
because a frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
and builds ~4x slower (a Request: 0.92 us against 0.24 us on 3.11), and every request
builds several of them on the broker's hot path.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, TypeVar

__all__ = ["record"]

_T = TypeVar("_T")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform

    @dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
    def record(cls: type[_T]) -> type[_T]: ...
else:
    def record(cls):
        return dataclasses.dataclass(slots=True)(cls)
