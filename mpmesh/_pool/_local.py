"""What a Pool never sends between processes: objects that mean something only where they are.

Pickle refuses them, as the standard Pool does; dill would send a look-alike (a new,
unrelated lock; the file opened again by name), so task data and results must not hold
them. Kept apart from the pure engine modules, which may not import ``threading``.
"""

from __future__ import annotations

import io
import threading
from typing import Final

__all__ = ["LOCAL_TYPES"]

LOCAL_TYPES: Final = (type(threading.Lock()), type(threading.RLock()), io.FileIO, io.BufferedReader,
                      io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
