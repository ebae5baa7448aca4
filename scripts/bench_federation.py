#!/usr/bin/env python3
"""Benchmark of changing a document's syncnodes, with real ``syncnode run`` processes on
loopback (iroh, MLS, SQLite with fsync) and real devices.

(a) add a syncnode to a document with ``--updates`` updates of history (one envelope each,
    from one device): the time from ``doc.add_syncnode`` to its return, which is the commit
    plus the new syncnode adopting the group, verifying the decided log and pulling and
    verifying every envelope from the others, until it reports its history complete.
(b) one replacement under load: two devices edit continuously (an update every
    ``--interval`` s each) while one of them replaces a syncnode by a fresh one; reports the
    replacement's duration, the updates made meanwhile, and how long the last of them took to
    become durable after the replacement returned.

Usage: ``python scripts/bench_federation.py [--updates N] [--interval S] [--runs N]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from syncnode.procs import start_cluster

CONFIG = DeviceConfig(flush_interval=0.005, reconnect_min=0.05, reconnect_max=0.5,
                      mailbox_interval=0.1, join_poll_interval=0.1, connect_timeout=5.0)


async def history(doc: Document, n: int) -> None:
    """``n`` updates, each sealed into its own envelope, durable on a quorum."""
    for i in range(n):
        doc.change(lambda e, i=i: e.map("m").insert(f"h{i}", i))
        doc.flush()
        if i % 500 == 499:
            await doc.wait_durable()
    await doc.wait_durable()


async def bench_add(root: Path, updates: int) -> float:
    nodes = start_cluster(root / "nodes", 4)
    try:
        tickets = [n.ticket for n in nodes if n.ticket is not None]
        async with Device.open(root / "a", config=CONFIG) as a:
            doc = await a.create_document(tickets[:3])
            t0 = time.perf_counter()
            await history(doc, updates)
            print(f"  history: {updates} updates durable in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            t0 = time.perf_counter()
            await doc.add_syncnode(tickets[3], wait=600)
            return time.perf_counter() - t0
    finally:
        for n in nodes:
            n.stop()


async def edit(doc: Document, who: str, interval: float, stop: trio.Event,
               made: list[int]) -> None:
    i = 0
    while not stop.is_set():
        doc.change(lambda e, i=i: e.map("m").insert(f"{who}{i}", i))
        made.append(i)
        i += 1
        await trio.sleep(interval)


async def bench_replace(root: Path, interval: float) -> tuple[float, int, float]:
    nodes = start_cluster(root / "nodes", 4)
    try:
        tickets = [n.ticket for n in nodes if n.ticket is not None]
        async with Device.open(root / "a", config=CONFIG) as a, \
                Device.open(root / "b", config=CONFIG) as b:
            doc_a = await a.create_document(tickets[:3])
            doc_b = await b.join(doc_a.invite())
            made: dict[str, list[int]] = {"a": [], "b": []}
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(edit, doc_a, "a", interval, stop, made["a"])
                nursery.start_soon(edit, doc_b, "b", interval, stop, made["b"])
                await trio.sleep(2.0)
                before = len(made["a"]) + len(made["b"])
                t0 = time.perf_counter()
                await doc_a.replace_syncnode(tickets[0].node_id.hex(), tickets[3], wait=600)
                took = time.perf_counter() - t0
                during = len(made["a"]) + len(made["b"]) - before
                stop.set()
            t1 = time.perf_counter()
            await doc_a.wait_durable()
            await doc_b.wait_durable()
            return took, during, time.perf_counter() - t1
    finally:
        for n in nodes:
            n.stop()


async def main(args: argparse.Namespace) -> None:
    adds, replaces = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            print(f"run {run + 1}: (a) add a syncnode to {args.updates} updates of history",
                  flush=True)
            adds.append(await bench_add(Path(tmp), args.updates))
            print(f"  add_syncnode: {adds[-1]:.2f} s", flush=True)
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            print(f"run {run + 1}: (b) replace a syncnode while 2 devices edit", flush=True)
            replaces.append(await bench_replace(Path(tmp), args.interval))
            took, during, drain = replaces[-1]
            print(f"  replace_syncnode: {took:.2f} s, {during} updates made meanwhile, "
                  f"all durable {drain:.2f} s after it returned", flush=True)
    print("\nsummary (median of runs)")
    print(f"  add a syncnode, {args.updates} updates of history: "
          f"{statistics.median(adds):.2f} s ({args.updates / statistics.median(adds):,.0f} "
          "updates/s pulled and verified)")
    print(f"  one replacement under load ({2 / args.interval:.0f} updates/s): "
          f"{statistics.median(r[0] for r in replaces):.2f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=0.02,
                   help="seconds between one device's updates in (b)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--tmp", default=None, help="directory for the data (default: system temp)")
    trio.run(main, p.parse_args())
