#!/usr/bin/env python3
"""Benchmark of syncnode anti-entropy (issue 17), with real ``syncnode run`` processes on
loopback (iroh, SQLite with fsync) and a real device.

(a) a group with ``--envelopes`` envelopes (one update each, from one device) on 3 syncnodes;
    the device closes; one syncnode is killed, its database deleted, and started again with the
    same key and port. Reported: the time until it holds every envelope of the group again
    (its peers hand it the group, it verifies the log, pulls and verifies every envelope), with
    no device online.
(b) the cost of a reconciliation round for the in-sync group: the ``FetchDigests``,
    ``FetchMarks`` and ``Backfill`` requests its peers received over ``--rounds`` rounds (from
    their ``/metrics``), per round and peer, and the encoded size of one digest request and
    answer.

Usage: ``python scripts/bench_reconcile.py [--envelopes N] [--interval S] [--rounds N]``
(the lead's full size: ``--envelopes 10000``).
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from device.agent import Device, DeviceConfig
from proto.antientropy import Digests, FetchDigests, GroupDigest
from proto.codec import encode
from syncnode.procs import NodeProcess, start_cluster

CONFIG = DeviceConfig(flush_interval=0.005, reconnect_min=0.05, reconnect_max=0.5,
                      mailbox_interval=0.1, join_poll_interval=0.1, connect_timeout=5.0)
WAIT = 3600.0


def cluster(root: Path, interval: float) -> list[NodeProcess]:
    for i in range(3):
        node = NodeProcess(root / f"node{i}")
        node.init()
        toml = node.data_dir / "syncnode.toml"
        toml.write_text(toml.read_text().replace("reconcile_interval = 10.0",
                                                 f"reconcile_interval = {interval}"))
    return start_cluster(root, 3)


def count(node: NodeProcess, group_id: bytes) -> int:
    path = node.data_dir / "syncnode.db"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM envelopes WHERE group_id=?",
                              (group_id,)).fetchone()[0])


def requests(node: NodeProcess) -> dict[str, float]:
    _status, text = node.get("/metrics")
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^syncnode_requests_total\{type="(\w+)"\} ([0-9.e+]+)', text, re.M)}


async def main(envelopes: int, interval: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        root = Path(tmp)
        nodes = cluster(root / "nodes", interval)
        try:
            tickets = [n.ticket for n in nodes if n.ticket is not None]
            async with Device.open(root / "a", config=CONFIG) as a:
                doc = await a.create_document(tickets)
                t0 = time.perf_counter()
                for i in range(envelopes):
                    doc.change(lambda e, i=i: e.map("m").insert(f"h{i}", i))
                    doc.flush()
                    if i % 500 == 499:
                        await doc.wait_durable()
                await doc.wait_durable()
                gid = doc.group_id
                print(f"history: {envelopes} updates durable in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            want = max(count(n, gid) for n in nodes)
            with trio.move_on_after(WAIT):  # the third copy may come by reconciling
                while min(count(n, gid) for n in nodes) < want:  # noqa: ASYNC110
                    await trio.sleep(0.2)
            print(f"group: {want} envelopes on each of 3 syncnodes", flush=True)

            # (b) an in-sync round: what the two peers of node0 receive from it.
            before = [requests(n) for n in nodes]
            await trio.sleep(rounds * interval)
            after = [requests(n) for n in nodes]
            for kind in ("FetchDigests", "FetchMarks", "Backfill"):
                total = sum(a.get(kind, 0) - b.get(kind, 0) for a, b in zip(after, before,
                                                                            strict=True))
                # Each of the 3 nodes asks each of its 2 peers once a round.
                print(f"in sync: {kind}: {total / rounds / 6:.2f} per round and peer "
                      f"({total:.0f} in {rounds} rounds)")
            ask = len(encode(FetchDigests((gid,))))
            answer = len(encode(Digests((GroupDigest(gid, b"d" * 16, want),))))
            print(f"in sync: one group costs {ask} + {answer} bytes per peer and round "
                  f"(request + answer, before framing and QUIC; 256 groups share a request)")

            # (a) wipe node2 with no device online.
            node = nodes[2]
            assert node.ticket is not None
            node.listen = node.ticket.addrs[0]
            node.kill()
            for p in node.data_dir.glob("syncnode.db*"):
                p.unlink()
            t0 = time.perf_counter()
            node.start()
            started = time.perf_counter() - t0
            with trio.move_on_after(WAIT):
                while not (node.data_dir / "syncnode.db").exists() or \
                        count(node, gid) < want:  # noqa: ASYNC110 - another process's progress
                    await trio.sleep(0.1)
            took = time.perf_counter() - t0
            print(f"wiped syncnode: start {started:.1f} s; holds all {want} envelopes again "
                  f"after {took:.1f} s (reconcile_interval {interval} s)")
        finally:
            for n in nodes:
                n.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envelopes", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=1.0,
                    help="reconcile_interval of the syncnodes, seconds")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    trio.run(main, args.envelopes, args.interval, args.rounds)
