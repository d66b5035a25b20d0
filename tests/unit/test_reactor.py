"""The shared selector loop's limits on strangers, whichever protocol runs on it: at most
MAX_HANDSHAKING held at once (the rest wait in the listen backlog), each closed after
HANDSHAKE_TIMEOUT_S, and, when asked, none of another uid. A toy protocol on a Unix
socket of this process stands in for the broker and the Pool, which test_broker_hostile
and test_pool_channel check end to end.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from mpmesh._io import _reactor
from mpmesh._io._reactor import Link, Reactor
from tests.conftest import wait_for


class _Stranger:
    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class Toy(Reactor[Link]):
    """Holds every connection as a stranger until it hangs up or its time is up."""

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(listener, Link, logger="mpmesh.test", same_uid_only=True)
        self.expired: list[_Stranger] = []

    def _admit(self, sock: socket.socket) -> None:
        self._hold_stranger(sock, _Stranger(sock))

    def _read_stranger(self, data: object) -> None:
        assert isinstance(data, _Stranger)
        try:
            if data.sock.recv(64):
                return
        except OSError:
            pass
        self._drop_stranger(data.sock, data)

    def _expired(self, key: object) -> None:
        assert isinstance(key, _Stranger)
        self.expired.append(key)
        self._drop_stranger(key.sock, key)

    def _is_live(self, link: Link) -> bool:
        return True

    def _closed_by_us(self, link: Link) -> None:
        pass

    def _close_links(self) -> None:
        for key in self._strangers:
            key.sock.close()  # type: ignore[attr-defined]


@pytest.fixture
def toy() -> Iterator[tuple[Toy, str]]:
    address = f"\0mpmesh-test-reactor-{os.getpid()}-{os.urandom(4).hex()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    loop = Toy(listener)
    loop.start("test-reactor")
    try:
        yield loop, address
    finally:
        loop.stop()


def connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    return sock


def hung_up(sock: socket.socket, within: float = 10.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


needs_abstract = pytest.mark.skipif(not hasattr(socket, "SO_PEERCRED"), reason="abstract sockets are Linux's")


@needs_abstract
@pytest.mark.timeout(30)
def test_at_most_max_handshaking_strangers_the_rest_wait_in_the_backlog(
        toy: tuple[Toy, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reactor, "MAX_HANDSHAKING", 2)
    loop, address = toy
    socks = [connect(address) for _ in range(3)]
    try:
        assert wait_for(lambda: len(loop._strangers) == 2)
        assert not loop._listening and select.select([loop._listener], [], [], 0)[0]
        socks.pop(0).close()
        assert wait_for(lambda: len(loop._strangers) == 2 and not select.select([loop._listener], [], [], 0)[0])
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: not loop._strangers and loop._listening)


@needs_abstract
@pytest.mark.timeout(30)
def test_a_stranger_is_closed_after_the_handshake_timeout(
        toy: tuple[Toy, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_reactor, "HANDSHAKE_TIMEOUT_S", 0.2)
    loop, address = toy
    with connect(address) as sock:
        assert hung_up(sock)
    assert len(loop.expired) == 1 and not loop._strangers


@needs_abstract
@pytest.mark.timeout(30)
def test_a_peer_of_another_uid_is_closed_at_accept(toy: tuple[Toy, str], monkeypatch: pytest.MonkeyPatch) -> None:
    loop, address = toy
    monkeypatch.setattr(_reactor, "peer_credentials", lambda sock: (1, os.geteuid() + 1, 1))
    with connect(address) as sock:
        assert hung_up(sock)
    assert not loop._strangers and not loop.expired
