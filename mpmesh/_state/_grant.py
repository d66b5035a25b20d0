"""A granted lock, as ``lock()`` / ``try_lock()`` return it: its fencing token, release
and extension. ``Grant`` is what every backend's grant shares (the ``with`` block, its
repr); ``LockGrant`` is the broker's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

from .._broker._payload import pack
from .._client import _binding
from .._errors import BrokerUnavailable
from .._io import _deadline
from .._wire._messages import Op

if TYPE_CHECKING:
    from .._client._base import ClientBase

__all__ = ["Grant", "LockGrant"]


class Grant:
    """A granted lock: ``token`` is its fencing token; ``release()`` or leave the ``with``."""

    __slots__ = ("name", "token", "ttl", "_released")

    def __init__(self, name: str, token: int, ttl: float | None) -> None:
        self.name = name
        self.token = token
        self.ttl = ttl
        self._released = False

    def release(self) -> None:
        """Release the lock now (the next waiter gets it at once)."""
        raise NotImplementedError

    def extend(self, ttl: float | None) -> bool:
        """Make the grant expire ``ttl`` seconds from now (None: never); False if it already ended."""
        raise NotImplementedError

    def __enter__(self) -> Grant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<mpmesh.LockGrant {self.name!r} token={self.token}{' released' if self._released else ''}>"


@final
class LockGrant(Grant):
    """A granted lock: ``token`` is its fencing token; ``release()`` or leave the ``with``.

    Created by ``lock()`` / ``try_lock()`` only. Releasing twice, or after the TTL ran
    out, does nothing.
    """

    __slots__ = ("_address", "_client")

    def __init__(self, address: str, name: str, token: int, ttl: float | None,
                 client: ClientBase | None) -> None:
        super().__init__(name, token, ttl)
        self._address = address
        self._client = client

    def _bound(self) -> ClientBase:
        if self._client is None:
            self._client = _binding.client_for(self._address)
        return self._client

    def release(self) -> None:
        """Release the lock now (the next waiter gets it at once).

        Raises:
            RequestTimeout, BrokerUnavailable: the broker did not confirm it; the release
            is sent all the same, and takes effect if the broker runs again.
        """
        if self._released:
            return
        client = self._bound()
        payload = pack((self.name, self.token))
        if client._silent and client._closed is None:
            # New calls are refused while the broker is silent; a release needs no answer.
            client._send(Op(0, -1.0, "locks", "release", payload))
            self._released = True
            raise BrokerUnavailable(f"{client._silent} (lock {self.name!r}: its release is sent)")
        call = client.op("locks", "release", payload=payload)
        self._released = True
        client.wait(call, client.due())

    def extend(self, ttl: float | None) -> bool:
        """Make the grant expire ``ttl`` seconds from now (None: never); False if it already ended."""
        _deadline.check_timeout(ttl, "ttl")
        client = self._bound()
        call = client.op("locks", "extend", payload=pack((self.name, self.token, ttl)))
        ok = bool(client.wait(call, client.due()))
        if ok:
            self.ttl = ttl
        return ok

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_grant, (self._address, self.name, self.token, self.ttl))


def _rebuild_grant(address: str, name: str, token: int, ttl: float | None) -> LockGrant:
    return LockGrant(address, name, token, ttl, None)
