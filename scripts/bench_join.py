"""Join benchmark: time from ``join(ticket)`` to a usable document equal to the inviter's.

Three real ``syncnode`` daemons; devices on iroh in this process. For documents of 1k and 10k
edits (one change each, like the Automerge harness's 10,000-change document: a map counter and a
one-character text insert per change) and the 260k-edit automerge-perf trace (applied in changes
of 1,000 edits), it times two paths:

* p2p: the new device gets the snapshot directly from the inviter (signed, hashed, chunked),
  then backfills only what came later;
* syncnodes: no direct transfer; the new device takes the copy of the document the inviter
  stored for it on the syncnodes (encrypted with the ticket's secret) before proposing the add.

The first join of each size comes after a quiet spell (the document was just built): it is
printed apart, since a join request used to wait for the inviter's 1 s mailbox poll then (it is
pushed to the inviter now).

Run: ``.venv/bin/python scripts/bench_join.py [--sizes 1000,10000,260000] [--reps 3]``.
Compare with ``node am_bench.mjs --phases c`` (Automerge sync server, 10,000-change document):
pass its JSON with ``--automerge FILE`` for the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from device.testdata import editing_trace, replay
from proto.logs import configure_logging
from syncnode.procs import NodeProcess, start_cluster

CONFIG = DeviceConfig()


def build(doc: Document, size: int) -> None:
    if size >= 100_000:
        patches, _ = editing_trace()
        replay(doc, patches, "text", per_change=1000)
        return
    for i in range(size):
        doc.change(lambda e, i=i: (e.map("m").insert("n", i), e.text("text").insert(i, "x")))


async def one_join(root: Path, inviter: Document, name: str, p2p: bool) -> float:
    config = replace(CONFIG, p2p_state_transfer=p2p)
    async with Device.open(root / name, config=config) as dev:
        ticket = inviter.invite()
        t0 = time.perf_counter()
        doc = await dev.join(ticket)
        target = inviter.value()
        with trio.fail_after(300):
            async with doc.events() as events:
                while doc.value() != target:
                    await events.receive()
        return time.perf_counter() - t0


async def run(root: Path, nodes: list[NodeProcess], sizes: list[int], reps: int
              ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    for size in sizes:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(Device.open(root / f"a{size}", config=CONFIG))
            doc = await a.create_document(tickets)
            t0 = time.perf_counter()
            build(doc, size)
            doc.flush()
            with trio.fail_after(300):
                await doc.wait_durable()
            built = time.perf_counter() - t0
            snapshot = len(doc.crdt.snapshot())
            res: dict[str, Any] = {"build_s": built, "snapshot_bytes": snapshot}
            for path, p2p in (("p2p", True), ("syncnodes", False)):
                times = [await one_join(root, doc, f"{path}{size}-{k}", p2p) for k in range(reps)]
                res[path] = {"median_s": statistics.median(times), "all_s": times}
            out[str(size)] = res
            print(f"{size:>7} edits (snapshot {snapshot / 1024:,.0f} KiB): join until converged "
                  f"p2p {res['p2p']['median_s'] * 1000:,.0f} ms, via syncnodes "
                  f"{res['syncnodes']['median_s'] * 1000:,.0f} ms (median of {reps}); first "
                  f"join after a quiet spell {res['p2p']['all_s'][0] * 1000:,.0f} ms; all p2p "
                  f"{', '.join(f'{t * 1000:,.0f}' for t in res['p2p']['all_s'])} ms",
                  flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,260000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--automerge", help="am_bench.mjs JSON with phase c, for the ratio")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    configure_logging("warning")
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-join-") as tmp:
        nodes = start_cluster(Path(tmp), 3)
        try:
            out = trio.run(run, Path(tmp), nodes, sizes, args.reps)
        finally:
            for n in nodes:
                n.stop()
    if args.automerge and "10000" in out:
        am = json.loads(Path(args.automerge).read_text())["c_load_history"]
        ours = out["10000"]["p2p"]["median_s"] * 1000
        for kind in ("warm_server_load_ms", "cold_server_load_ms"):
            am_ms = am[kind]["median_ms"]
            print(f"10k changes: ours (p2p) {ours:,.0f} ms vs Automerge sync server "
                  f"({kind.split('_')[0]}) {am_ms:,.0f} ms -> {ours / am_ms:.2f}x (goal < 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
