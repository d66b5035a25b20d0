"""Per-peer protocol state: the authkey handshake, then framed messages.

Driven like h11: ``out = conn.receive_data(chunk)`` returns bytes to send back (only
during the handshake), ``conn.events()`` returns the messages that arrived, and
``conn.send(msg)`` returns the bytes for one message.

Handshake (mutual HMAC-SHA256 challenge/response, fixed-format frames, no pickle)::

    broker                               peer
    Challenge(nonce_b)        ───────►
                              ◄───────   Answer(hmac(key, "peer"|nonce_b), nonce_p)
    Welcome(hmac(key, "broker"|nonce_p)) ───────►       (or Rejected, then close)

Both sides have then proven the key; only then does the frame limit grow and do
application messages (whose payloads may be unpickled) flow. ``Connection.trusted``
skips it for a socketpair our zygote made, which nothing else can reach.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from .._errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from ._frames import MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES, FrameDecoder
from ._messages import (
    HANDSHAKE_KINDS, Answer, Challenge, Message, Op, Rejected, Welcome, decode, encode, op_frame,
    reply_payload,
)

__all__ = ["Connection", "Phase", "Side"]

NONCE_BYTES: Final = 32


class Side(enum.Enum):
    BROKER = "broker"
    PEER = "peer"


class Phase(enum.Enum):
    HANDSHAKE = "HANDSHAKE"
    READY = "READY"
    CLOSED = "CLOSED"


def _no_random(n: int) -> bytes:
    raise LocalProtocolError("a trusted connection makes no nonce")


def _digest(key: bytes, label: bytes, nonce: bytes) -> bytes:
    # HMAC pads a short key with zero bytes and hashes a long one, which would make
    # b"k" and b"k\0" (or a long key and its hash) one key: the key's length goes in first.
    mac_key = hashlib.sha256(len(key).to_bytes(8, "big") + key).digest()
    return hmac.digest(mac_key, b"mpmesh-1 " + label + b" " + nonce, "sha256")


class Connection:
    """Protocol state for one connection, from either side."""

    __slots__ = ("side", "phase", "_key", "_nonce", "_decoder", "_random", "_events")

    def __init__(self, side: Side, authkey: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self.side = side
        self.phase = Phase.HANDSHAKE
        self._key = authkey
        self._random = random_bytes
        self._nonce = b""
        self._decoder = FrameDecoder(MAX_HANDSHAKE_FRAME_BYTES)
        self._events: list[Message] = []

    @classmethod
    def trusted(cls, side: Side) -> Connection:
        """A connection that starts READY, with no handshake: for a socketpair our own
        zygote made for a child it forked, whose ends nothing else can reach."""
        conn = cls(side, b"", _no_random)
        conn._become_ready()
        return conn

    @property
    def ready(self) -> bool:
        """Whether the handshake is done (or was never needed) and messages may flow."""
        return self.phase is Phase.READY

    def initiate(self) -> bytes:
        """Broker side: the Challenge that opens the handshake."""
        if self.side is not Side.BROKER:
            raise LocalProtocolError("only the broker opens the handshake")
        self._nonce = self._random(NONCE_BYTES)
        return encode(Challenge(self._nonce))

    def send(self, msg: Message) -> bytes:
        if self.phase is not Phase.READY:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} in phase {self.phase.name}")
        return encode(msg)

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take bytes from the socket; return bytes the handshake wants sent back.

        Raises RemoteProtocolError for garbage and AuthenticationError for a wrong key;
        the connection is then CLOSED, and a broker sends ``rejection()`` before closing.
        """
        if self.phase is Phase.CLOSED:
            return b""
        self._decoder.feed(data)
        try:
            out = self._shake() if self.phase is Phase.HANDSHAKE else b""
            if self.phase is Phase.READY:
                for kind, body in self._decoder.frames():
                    if kind in HANDSHAKE_KINDS:
                        raise RemoteProtocolError("handshake message after the handshake")
                    self._events.append(decode(kind, body))
        except BaseException:
            self.phase = Phase.CLOSED
            raise
        return out

    def receive_handshake(self, data: bytes | bytearray | memoryview) -> bytes:
        """``receive_data`` for a channel whose messages are not this module's (a Pool's):
        the handshake only; what follows it stays buffered, undecoded, for ``leftover()``."""
        if self.phase is Phase.CLOSED:
            return b""
        self._decoder.feed(data)
        try:
            return self._shake()
        except BaseException:
            self.phase = Phase.CLOSED
            raise

    def leftover(self) -> bytes:
        """After ``receive_handshake``: the bytes that came after the handshake."""
        return self._decoder.take_buffered()

    def _shake(self) -> bytes:
        """Run the handshake frames buffered, one at a time (the frame limit grows with
        it); the bytes to send back."""
        out = b""
        while self.phase is Phase.HANDSHAKE:
            frames = self._decoder.frames(1)
            if not frames:
                break
            kind, body = frames[0]
            if kind not in HANDSHAKE_KINDS:
                raise RemoteProtocolError(f"message kind {kind} before the handshake finished")
            out += self._handshake(decode(kind, body))
        return out

    def take_reply(self, data: bytes | bytearray | memoryview, rid: int) -> bytes | None:
        """The short path of ``receive_data`` for a caller that waits on ``rid``: the
        payload if ``data`` is exactly one Reply to ``rid`` and nothing is buffered before
        it; else None, and nothing is taken (pass ``data`` to ``receive_data``)."""
        if self.phase is not Phase.READY or self._decoder._buf:
            return None
        return reply_payload(data, rid)

    def take_op(self, data: bytes | bytearray | memoryview) -> Op | None:
        """The short path of ``receive_data`` for the broker: the Op if ``data`` is
        exactly one Op frame and nothing is buffered before it; else None, and nothing
        is taken."""
        if self.phase is not Phase.READY or self._decoder._buf:
            return None
        return op_frame(data)

    def rejection(self, reason: str = "authentication failed") -> bytes:
        """The frame a broker sends a peer it refuses, just before closing."""
        self.phase = Phase.CLOSED
        return encode(Rejected(reason))

    def events(self) -> list[Message]:
        """Remove and return the application messages received so far."""
        events = self._events
        if events:
            self._events = []
        return events

    def _handshake(self, msg: Message) -> bytes:
        if self.side is Side.BROKER:
            if not isinstance(msg, Answer) or not self._nonce:
                raise RemoteProtocolError(f"expected Answer, got {type(msg).__name__}")
            if not hmac.compare_digest(msg.digest, _digest(self._key, b"peer", self._nonce)):
                self.phase = Phase.CLOSED
                raise AuthenticationError("peer failed the authkey challenge")
            self._become_ready()
            return encode(Welcome(_digest(self._key, b"broker", msg.nonce)))
        if isinstance(msg, Challenge) and not self._nonce:
            self._nonce = self._random(NONCE_BYTES)
            return encode(Answer(_digest(self._key, b"peer", msg.nonce), self._nonce))
        if isinstance(msg, Welcome) and self._nonce:
            if not hmac.compare_digest(msg.digest, _digest(self._key, b"broker", self._nonce)):
                raise AuthenticationError("the broker failed to prove the authkey")
            self._become_ready()
            return b""
        if isinstance(msg, Rejected):
            raise AuthenticationError(f"the broker rejected us: {msg.reason} (wrong authkey?)")
        raise RemoteProtocolError(f"unexpected {type(msg).__name__} during the handshake")

    def _become_ready(self) -> None:
        self.phase = Phase.READY
        self._decoder.max_frame = MAX_FRAME_BYTES
