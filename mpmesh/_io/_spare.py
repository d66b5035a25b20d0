"""The spare zygote: an exec'd zygote (``_zygote``) a closed mesh leaves running, for
the next mesh of this process that cannot fork one (it would have to exec a fresh
interpreter: ~100 ms instead of ~3 ms).

This process keeps at most one. ``park_spare`` leaves it here, ``take_spare`` hands it
to the next mesh, ``discard_spare`` stops it (at exit; tests call it to account for
processes). A process forked from this one closes its copies of the spare's pipes: the
zygote learns that its master is gone from their EOF, and it is not the copy's to command.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Final

from ._forking import close_quietly

__all__ = ["ZYGOTE_EXIT_S", "Spare", "discard_spare", "park_spare", "reap_zygote", "take_spare"]

# A zygote exits at once when its pipes close (after stopping what it still runs, which
# takes at most its TERM_GRACE_S); one that has not by then is killed.
ZYGOTE_EXIT_S: Final = 5.0


@dataclass
class Spare:
    """A parked zygote: our ends of its pipes, and its process."""

    owner: int  # the pid that parked it: a forked copy of this module must not take it
    fds: tuple[int, int, int]  # ctl_w, report_r, life_w
    popen: subprocess.Popen[bytes]


_spare: Spare | None = None
_spare_lock = threading.Lock()


def park_spare(spare: Spare) -> bool:
    """Keep ``spare`` for the next mesh; False (and the caller stops it) if this
    process already keeps one."""
    global _spare
    with _spare_lock:
        if _spare is not None and _spare.owner == os.getpid():
            return False
        _spare = spare
    return True


def take_spare() -> Spare | None:
    """The parked zygote, now the caller's, if this process parked one that still runs."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is None or spare.owner != os.getpid():
        return None  # inherited through a fork: not ours to command
    if spare.popen.poll() is not None:
        _stop(spare)
        return None
    return spare


def discard_spare() -> None:
    """Stop the parked zygote, if any (at exit; tests call it to account for processes)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None and spare.owner == os.getpid():
        _stop(spare)


def reap_zygote(popen: subprocess.Popen[bytes]) -> None:
    """Wait for an exec'd zygote whose pipes we closed to exit; kill it if it does not."""
    try:
        popen.wait(ZYGOTE_EXIT_S)
    except subprocess.TimeoutExpired:  # it exits on EOF; if it does not, make it
        popen.kill()
        popen.wait()


def _stop(spare: Spare) -> None:
    """Close our ends (the zygote exits on EOF) and reap it."""
    for fd in spare.fds:
        close_quietly(fd)
    reap_zygote(spare.popen)


def _drop_inherited_spare() -> None:
    global _spare
    if _spare is not None:
        for fd in _spare.fds:
            close_quietly(fd)
        _spare = None


atexit.register(discard_spare)
os.register_at_fork(after_in_child=_drop_inherited_spare)
