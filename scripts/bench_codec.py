"""Wire codec benchmark: decode speed of typical messages, and what hostile frames cost.

Run from the repository root::

    .venv/bin/python scripts/bench_codec.py              # everything
    .venv/bin/python scripts/bench_codec.py --typical    # only the per-message timings
    .venv/bin/python scripts/bench_codec.py --reference  # the same with the reference decoder

``--reference`` runs :func:`proto.codec.reference_decode`, the unpack-everything-then-validate
decoder that was ``decode`` before issue 14: the "before" numbers, from the same tree.

Typical messages are timed with ``timeit`` (best of 5 repeats, microseconds per decode). Each
large frame is decoded in a fresh subprocess so its peak memory is its own: the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the first decode in the process)
minus the resident set before it; and the best wall time of three decodes. RSS rather than
tracemalloc because it also sees allocations outside Python's allocator and does not slow the
decode down.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


def typical_messages() -> dict[str, Any]:
    """One realistic instance of each message the codec decodes most often."""
    from proto.envelope import Envelope
    from proto.paxos.messages import Accept, Ballot
    from proto.service import BackfillPage

    def envelope(seq: int, size: int = 1024) -> Envelope:
        return Envelope(b"g" * 32, b"s" * 32, seq, 7, b"c" * size, b"x" * 64)

    return {
        "Envelope (1 KiB ciphertext)": envelope(1),
        "Accept (2 KiB value)": Accept(b"g" * 32, 12, Ballot(3, b"p" * 32), b"v" * 2048,
                                       b"x" * 64),
        "BackfillPage (100 x 1 KiB envelopes)": BackfillPage(
            tuple(envelope(i) for i in range(100)), True, b"i" * 16, 1, b"x" * 64),
    }


def valid_16mib_frame() -> bytes:
    """A valid frame just under 16 MiB: a BackfillPage of 1,000 envelopes of 16 KiB."""
    from proto.codec import encode
    from proto.envelope import Envelope
    from proto.service import BackfillPage

    envs = tuple(Envelope(b"g" * 32, b"s" * 32, i, 1, b"c" * 16_500, b"x" * 64)
                 for i in range(1000))
    return encode(BackfillPage(envs, False, b"i" * 16, 1, b"x" * 64))


def dense_frame() -> bytes:
    """The valid frame with the most values the schema allows: a DecidedPage of 1,024 decisions
    of 31 signatures each (about 3 MiB, 105,000 values)."""
    import msgpack

    from proto.codec import tag_of
    from proto.service import DecidedPage

    sig = [b"a" * 32, b"s" * 64]
    cert = [b"", 300, [300, b"p" * 32], b"h" * 32, [sig] * 31]
    out = msgpack.packb([tag_of(DecidedPage), b"", None, [[b"", cert]] * 1024, 0],
                        use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def bomb(kind: str) -> bytes:
    """Hostile frames of about 16 MiB (built from bytes: building them as objects would cost
    what decoding them costs)."""
    n = (1 << 20) - 6  # so that the frame fits in 16 MiB
    if kind == "wide":  # the frame: an array of 16 arrays of ~1M empty arrays
        return b"\xdc\x00\x10" + b"".join(
            b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n for _ in range(16))
    if kind == "deep":  # 16M nested one-element arrays
        return b"\x91" * (16 * MIB - 1) + b"\xc0"
    if kind == "maps":  # 16 arrays of ~1M empty maps
        return b"\xdc\x00\x10" + b"".join(
            b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n for _ in range(16))
    if kind == "ints-for-bytes":  # an Envelope whose ciphertext is 16 arrays of ~1M tiny ints
        from proto.codec import tag_of
        from proto.envelope import Envelope

        m = n - 10
        return (b"\x97" + bytes([tag_of(Envelope)]) + b"\xc4\x20" + b"g" * 32
                + b"\xc4\x20" + b"s" * 32 + b"\x01\x01" + b"\xdc\x00\x10"
                + b"".join(b"\xdd" + m.to_bytes(4, "big") + b"\x01" * m for _ in range(16))
                + b"\xc4\x40" + b"x" * 64)
    raise ValueError(kind)


BOMBS = ("wide", "deep", "maps", "ints-for-bytes")

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {scripts!r})
import bench_codec
import proto.messages, proto.paxos, proto.service, proto.envelope, proto.manifest  # registry
from proto import codec
from proto.errors import DecodeError
decode = codec.reference_decode if sys.argv[2] == "reference" else codec.decode

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)

kind = sys.argv[1]
frame = (bench_codec.valid_16mib_frame() if kind == "valid" else
         bench_codec.dense_frame() if kind == "dense" else bench_codec.bomb(kind))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")

def once():
    start = time.perf_counter()
    try:
        decode(frame)
        outcome = "decoded"
    except DecodeError as exc:
        outcome = "DecodeError: " + str(exc)[:90]
    return time.perf_counter() - start, outcome

elapsed, outcome = once()  # the first decode in this process: its memory is measured
peak_growth = status("VmHWM") - before
elapsed = min(elapsed, *(once()[0] for _ in range(2)))  # time: best of 3
print(json.dumps({{"kind": kind, "frame": len(frame), "seconds": elapsed,
                  "peak_growth": peak_growth, "outcome": outcome}}))
"""


def measure_in_child(kind: str, decoder: str) -> dict[str, Any]:
    code = _CHILD.format(root=str(ROOT), scripts=str(ROOT / "scripts"))
    out = subprocess.run([sys.executable, "-c", code, kind, decoder], capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def bench_typical(decoder: str) -> None:
    import proto.envelope
    import proto.paxos
    import proto.service  # noqa: F401  (registers the messages)
    from proto import codec
    from proto.codec import encode

    decode = codec.reference_decode if decoder == "reference" else codec.decode
    print(f"{decoder}: decode of typical messages (best of 5, microseconds per call):")
    for name, msg in typical_messages().items():
        raw = encode(msg)
        assert decode(raw) == msg
        timer = timeit.Timer(lambda raw=raw: decode(raw))
        n, _ = timer.autorange()
        best = min(timer.repeat(5, n)) / n
        enc = min(timeit.Timer(lambda msg=msg: encode(msg)).repeat(5, n)) / n
        print(f"  {name:40s} {len(raw):8d} B  decode {best * 1e6:9.1f} us"
              f"  encode {enc * 1e6:9.1f} us")


def bench_hostile(decoder: str) -> None:
    print(f"{decoder}: one decode per fresh process (peak RSS growth, best of 3 wall times):")
    for kind in ("valid", "dense", *BOMBS):
        r = measure_in_child(kind, decoder)
        print(f"  {r['kind']:15s} {r['frame'] / MIB:6.2f} MiB frame  "
              f"peak +{r['peak_growth'] / MIB:8.1f} MiB  "
              f"({r['peak_growth'] / r['frame']:6.2f}x)  {r['seconds'] * 1e3:9.1f} ms  "
              f"{r['outcome']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--typical", action="store_true", help="only time typical messages")
    p.add_argument("--hostile", action="store_true", help="only measure hostile frames")
    p.add_argument("--reference", action="store_true",
                   help="measure the reference decoder (the one before issue 14)")
    args = p.parse_args()
    decoder = "reference" if args.reference else "decode"
    start = time.perf_counter()
    if not args.hostile:
        bench_typical(decoder)
    if not args.typical:
        bench_hostile(decoder)
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
