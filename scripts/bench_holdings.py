"""Microseconds per signed statement (proto.holdings), against the envelope verification a
Store already pays: what issue 17's signed acks add to the Store path.

    PYTHONPATH=. python scripts/bench_holdings.py
"""

from __future__ import annotations

import time

from proto.codec import encode_struct
from proto.envelope import Envelope
from proto.holdings import ACK_CTX, AckBody
from proto.identity import SecretKey

N = 2000


def main() -> None:
    node, dev = SecretKey.generate(), SecretKey.generate()
    env = Envelope.seal(dev, b"g" * 32, 1, 0, b"c" * 1024)
    body = AckBody(node.public, b"i" * 16, env.group_id, env.sender, env.seq, env.digest(), 1)
    t = time.perf_counter()
    for _ in range(N):
        node.sign(ACK_CTX, encode_struct(body))
    sign = (time.perf_counter() - t) / N * 1e6
    t = time.perf_counter()
    for _ in range(N):
        Envelope(env.group_id, env.sender, env.seq, env.epoch, env.ciphertext,
                 env.signature).verify(dev.public)
    check = (time.perf_counter() - t) / N * 1e6
    print(f"sign an ack: {sign:.1f} us; verify a 1 KiB envelope (what a Store already does): "
          f"{check:.1f} us")


if __name__ == "__main__":
    main()
