from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto.errors import FrameError
from proto.framing import FrameDecoder, encode_frame


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 50), min_size=1))
def test_frames_survive_any_chunking(frames: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    dec = FrameDecoder(max_frame=1000)
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(wire):
        n = cuts[i % len(cuts)]
        dec.feed(wire[pos:pos + n])
        pos += n
        i += 1
        while (f := dec.next_frame()) is not None:
            out.append(f)
    dec.check_eof()
    assert out == frames


def test_oversized_frame_rejected_from_header() -> None:
    dec = FrameDecoder(max_frame=10)
    dec.feed((11).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="exceeds max 10"):
        dec.next_frame()
    with pytest.raises(FrameError):
        encode_frame(b"x" * 11, max_frame=10)


def test_default_limit_is_16_mib() -> None:
    dec = FrameDecoder()
    dec.feed((16 * 1024 * 1024 + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        dec.next_frame()


def test_truncated_frame_at_eof() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(b"hello")[:-2])
    assert dec.next_frame() is None
    with pytest.raises(FrameError, match="truncated frame"):
        dec.check_eof()
    dec2 = FrameDecoder()
    dec2.feed(b"\x00\x00")
    with pytest.raises(FrameError, match="truncated header"):
        dec2.check_eof()
