"""``progress=``: a tqdm bar over ``map`` / ``imap`` / ``starmap`` results.

tqdm is an optional extra (``pip install mpmesh[progress]``). ``progress=True`` shows a
bar only when tqdm is importable and the bar's stream (tqdm writes to stderr) is a
terminal; ``progress="force"`` shows it on any stream, as long as tqdm is there. The bar
is updated on the pool's callback thread, never on its I/O thread.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["check_mode", "make_bar"]

def check_mode(progress: object) -> bool | str:
    if progress is None:
        return False
    if progress is True or progress is False or progress == "force":
        return progress  # type: ignore[return-value,unused-ignore]
    raise ValueError(f"progress must be True, False or 'force', not {progress!r}")


def make_bar(mode: bool | str, total: int | None, desc: str) -> Any:
    """A tqdm bar, or None when progress is off, tqdm is missing or the stream is no terminal."""
    if not mode:
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    stream = sys.stderr
    if mode != "force":
        try:
            if stream is None or not stream.isatty():
                return None
        except (AttributeError, ValueError):
            return None
    return tqdm(total=total, desc=desc, unit="task", file=stream, leave=True)
