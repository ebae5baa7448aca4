"""Length-prefixed framing: ``[u32 big-endian length][payload]``.

Sans-IO: :class:`FrameDecoder` is fed whatever bytes a transport read returned and hands out
complete frames, so the same code frames iroh streams, TCP sockets and the in-memory transport.
A frame longer than the configured maximum is refused from its header alone, before any of its
payload is buffered, so a hostile peer cannot make us allocate more than ``max_frame`` bytes.
"""

from __future__ import annotations

import struct

from proto.errors import FrameError

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
"""Default maximum payload size of one frame (16 MiB)."""

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


def encode_frame(payload: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix ``payload`` with its length; refuses payloads the receiver would reject."""
    if len(payload) > max_frame:
        raise FrameError("<frame>", f"payload of {len(payload)} bytes exceeds max {max_frame}")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser with a hard size bound."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not 0 < max_frame <= 0xFFFFFFFF:
            raise ValueError("max_frame must be in 1..2**32-1")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being assembled

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None if more bytes are needed."""
        if self._need is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise FrameError("<frame>", f"frame of {n} bytes exceeds max {self.max_frame}")
            self._need = n
        if len(self._buf) - HEADER_SIZE < self._need:
            return None
        end = HEADER_SIZE + self._need
        frame = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._need = None
        return frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def check_eof(self) -> None:
        """Call at end of stream: raises if the stream stopped inside a frame."""
        if self._buf:
            if self._need is None:
                raise FrameError("<frame>", f"truncated header ({len(self._buf)} of 4 bytes)")
            got = len(self._buf) - HEADER_SIZE
            raise FrameError("<frame>", f"truncated frame ({got} of {self._need} bytes)")
