#!/usr/bin/env python3
"""Benchmark of the pure Paxos core: decisions per second, 3 acceptors, in process, no I/O,
real Ed25519 signatures, and where the time goes (signing, verifying, everything else).

Each decision is a fresh slot: Prepare -> 3 Promises -> Accept -> 3 Accepteds -> certificate,
with every message signed and every signature checked by its receiver, exactly as in
production (minus the network and the fsync).

Usage: ``python scripts/bench_paxos_core.py [--decisions N] [--value-size BYTES]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proto import identity
from proto.identity import SecretKey, fingerprint
from proto.paxos import Acceptor, AcceptorSet, Decided, Proposer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=2000)
    ap.add_argument("--value-size", type=int, default=1024)
    args = ap.parse_args()

    nodes = [SecretKey.generate() for _ in range(3)]
    device = SecretKey.generate()
    members = {fingerprint(device.public): device.public}
    aset = AcceptorSet(frozenset(k.public for k in nodes))
    group = b"bench-group"
    acceptors = [Acceptor(k, lambda g, s: aset, lambda g, s, f: members.get(f)) for k in nodes]
    value = b"v" * args.value_size

    timers = {"sign": 0.0, "verify": 0.0}
    counts = {"sign": 0, "verify": 0}
    real_sign, real_verify = identity._ed25519_sign, identity._ed25519_verify

    def timed_sign(seed: bytes, msg: bytes) -> bytes:
        t = time.perf_counter()
        try:
            return real_sign(seed, msg)
        finally:
            timers["sign"] += time.perf_counter() - t
            counts["sign"] += 1

    def timed_verify(pub: bytes, msg: bytes, sig: bytes) -> bool:
        t = time.perf_counter()
        try:
            return real_verify(pub, msg, sig)
        finally:
            timers["verify"] += time.perf_counter() - t
            counts["verify"] += 1

    identity._ed25519_sign, identity._ed25519_verify = timed_sign, timed_verify  # type: ignore[assignment]
    start = time.perf_counter()
    for slot in range(args.decisions):
        p = Proposer(device, group, slot, value, aset)
        pending = list(p.start())
        while pending:
            msg = pending.pop()
            for a in acceptors:
                step = a.handle(msg)
                pending.extend(p.receive(step.reply))  # type: ignore[arg-type]
        assert isinstance(p.outcome, Decided)
        for a in acceptors:  # keep memory flat like a daemon would (decided slots leave RAM)
            a.slots.pop((group, slot), None)
    total = time.perf_counter() - start
    identity._ed25519_sign, identity._ed25519_verify = real_sign, real_verify

    n = args.decisions
    other = total - timers["sign"] - timers["verify"]
    print(f"paxos core: {n} decisions, 3 acceptors, {args.value_size} B values, signatures on")
    print(f"  decisions/s            {n / total:10,.0f}")
    print(f"  per decision           {total / n * 1e6:10,.0f} µs")
    print(f"  signing                {timers['sign'] / n * 1e6:10,.0f} µs "
          f"({counts['sign'] / n:.0f} signatures, {timers['sign'] / total:.0%})")
    print(f"  verifying              {timers['verify'] / n * 1e6:10,.0f} µs "
          f"({counts['verify'] / n:.0f} verifications, {timers['verify'] / total:.0%})")
    print(f"  logic + encoding       {other / n * 1e6:10,.0f} µs ({other / total:.0%})")


if __name__ == "__main__":
    main()
