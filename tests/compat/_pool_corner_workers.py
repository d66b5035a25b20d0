"""Task functions and payloads for ``test_pool_corners.py`` (importable by spawned workers)."""

from __future__ import annotations

import socket
import threading
from typing import Any


class RefusesPickling:
    """An argument whose ``__reduce__`` raises: pickle and dill both fail on it."""

    def __reduce__(self) -> Any:
        raise RuntimeError("this object refuses to be pickled")


class RefusingFunction(RefusesPickling):
    """A task function that cannot be pickled either."""

    def __call__(self, x: object) -> object:
        return x


def return_lock(_: object = None) -> Any:
    """A result that cannot go back: pickle refuses a lock (dill would make a new one)."""
    return threading.Lock()


_SOCKETS: list[socket.socket] = []  # kept open: a collected socket warns (ResourceWarning)


def return_socket(_: object = None) -> socket.socket:
    if not _SOCKETS:
        _SOCKETS.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    return _SOCKETS[0]


def return_lambda(_: object = None) -> Any:
    return lambda x: x + 1
