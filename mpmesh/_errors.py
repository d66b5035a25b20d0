"""mpmesh's public exception tree (importable from ``mpmesh``), plus internal protocol errors.

Every public class derives from `MeshError`. Where mpmesh raises in place of a stdlib
class, it also derives from that class, so drop-in code keeps its ``except`` clauses
(``RequestTimeout`` is a ``TimeoutError`` *and* a ``multiprocessing.TimeoutError``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers
import multiprocessing.pool

__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "FencedError",
    "LocalProtocolError",
    "LockTimeout",
    "MeshClosed",
    "MeshError",
    "MessageTooLarge",
    "NoHandler",
    "NotFound",
    "RemoteError",
    "RemoteProtocolError",
    "RemoteTraceback",
    "RequestTimeout",
    "SerializationError",
    "WorkerLost",
]


class MeshError(Exception):
    """Base class of every error mpmesh raises."""


class RequestTimeout(MeshError, multiprocessing.TimeoutError, TimeoutError):
    """A request got no answer within its timeout (per attempt)."""


class NotFound(MeshError, LookupError):
    """No child, group or name matches the target."""


class NoHandler(MeshError):
    """The target process has no handler for the requested action."""


class WorkerLost(MeshError):
    """The process serving a request died, or was stopped, before it answered."""


class LockTimeout(MeshError, TimeoutError):
    """A lock was not granted within the time the caller was willing to wait."""


class FencedError(MeshError):
    """A fenced write used a lock grant that has expired or been superseded."""


class AuthenticationError(MeshError, multiprocessing.AuthenticationError):
    """A peer failed to prove the mesh's authkey (or we failed to prove it to the peer)."""


class SerializationError(MeshError, TypeError):
    """An object could be serialized neither by pickle nor by dill."""


class MeshClosed(MeshError):
    """The mesh, or this handle to it, was shut down by its owner."""


class BrokerUnavailable(MeshError, ConnectionError):
    """The broker cannot be reached, or went away under us."""


class MessageTooLarge(MeshError, ValueError):
    """One message (a request, an operation, its reply, a publish) would exceed
    ``mpmesh.MAX_MESSAGE_BYTES``. Raised by the sender before anything is sent (its
    connection stays usable); a reply that is too large reaches its caller as this error.
    Larger data belongs in shared memory or a file."""


class RemoteError(MeshError, multiprocessing.managers.RemoteError):
    """A remote handler raised an exception that could not be sent back as itself.

    ``str(err)`` holds the remote type, message and traceback as text.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Carries a remote traceback's text (``str()`` and ``.tb``); set as ``__cause__`` of a
# re-raised exception. The standard Pool's own class, not a subclass: code written for
# it checks ``type(exc.__cause__) is multiprocessing.pool.RemoteTraceback``.
RemoteTraceback: type[Exception] = multiprocessing.pool.RemoteTraceback  # type: ignore[attr-defined]


class LocalProtocolError(MeshError):
    """We were asked to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(MeshError):
    """A peer sent bytes that break the protocol: garbage, an oversized frame, a bad state."""
