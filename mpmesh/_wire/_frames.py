"""Frame layout and an incremental decoder.

A frame is ``!IB`` (body length, kind byte) followed by the body. The decoder is fed
whatever the socket produced and yields every whole frame; it refuses a frame larger
than its limit before buffering it, so a garbage length cannot make us allocate.
"""

from __future__ import annotations

import struct
from typing import Final

from .._errors import RemoteProtocolError

__all__ = ["HEADER", "MAX_FRAME_BYTES", "MAX_HANDSHAKE_FRAME_BYTES", "RECV_BYTES", "FrameDecoder"]

HEADER: Final = struct.Struct("!IB")
# Larger payloads belong in shared memory or a file; this only guards against garbage.
MAX_FRAME_BYTES: Final = 1 << 30
# Before a peer has proven the authkey it may only send tiny, fixed-format frames.
MAX_HANDSHAKE_FRAME_BYTES: Final = 512
# How much one read of a connection asks for, into a buffer each reader keeps (so no
# read allocates): every reader of frames, the broker's, a client's, a pool's.
RECV_BYTES: Final = 256 * 1024


class FrameDecoder:
    """Accumulates bytes and yields ``(kind, body)`` for every complete frame."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def frames(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Remove and return the complete frames buffered so far (at most ``limit``)."""
        buf = self._buf
        end = len(buf)
        pos = 0
        out: list[tuple[int, bytes]] = []
        unpack = HEADER.unpack_from
        header_size = HEADER.size
        while end - pos >= header_size and (limit is None or len(out) < limit):
            length, kind = unpack(buf, pos)
            if length > self.max_frame:
                del buf[:]
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds the {self.max_frame}-byte limit"
                )
            stop = pos + header_size + length
            if stop > end:
                break
            out.append((kind, bytes(buf[pos + header_size : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out

    def take_buffered(self) -> bytes:
        """Remove and return every byte buffered, whole frames or not (a channel that
        changes hands after a handshake takes what came with it)."""
        data = bytes(self._buf)
        del self._buf[:]
        return data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)
