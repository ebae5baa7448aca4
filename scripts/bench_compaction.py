"""Compaction benchmark (issue 17): catch-up after an offline period, and syncnode disk per group.

Real ``syncnode run`` daemons (3, loopback), devices on iroh, every update its own envelope.

* **catchup** (``--updates N``): device C goes offline; device A makes N edits, each sealed and
  stored on a quorum on its own. Then, from two identical copies of C's home: the time until
  C holds all N edits (a) without compaction (C replays N envelopes) and (b) after A compacted
  (C gets the state plus an empty tail). Goal: (b) at most etcd's 0.3-0.8 s, flat in N.
* **disk** (``--edits N``, ``--compact-every K``): A makes N edits with the automatic trigger
  at K updates (0: compaction off); prints, every ``--report`` edits, the group's stored bytes
  on each syncnode (its quota accounting: log values + envelopes), the database files' size,
  and the document's snapshot size. Goal: about 2x the state plus the tail.

Run: ``.venv/bin/python scripts/bench_compaction.py catchup --updates 10000`` and
``... disk --edits 100000 --compact-every 10000``. Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import trio

from device.agent import Device, DeviceConfig
from device.document import Document
from proto.logs import configure_logging
from syncnode.procs import NodeProcess, start_cluster
from syncnode.storage.sqlite_schema import storage_bytes

MANUAL = DeviceConfig(compact_every_updates=0, compact_every_bytes=0)


async def edit(doc: Document, prefix: str, count: int, *, batch: int = 256) -> None:
    """``count`` edits, each its own envelope; waits for durability every ``batch``."""
    for i in range(count):
        doc.change(lambda e, k=f"{prefix}{i}", i=i: e.map("m").insert(k, i))
        doc.flush()
        if i % batch == batch - 1:
            await doc.wait_durable()
    await doc.wait_durable()


async def catch_up(home: Path, want: int, timeout: float = 600.0) -> float:
    """Seconds from opening the device at ``home`` until its document holds ``want`` keys."""
    start = time.perf_counter()
    async with Device.open(home, config=MANUAL) as dev:
        doc = dev.documents()[0]
        with trio.fail_after(timeout):
            while len(doc.value().get("m", {})) < want:  # noqa: ASYNC110 - polls a document
                await trio.sleep(0.005)
        return time.perf_counter() - start


def group_bytes(nodes: list[NodeProcess], group_id: bytes) -> list[int]:
    out = []
    for n in nodes:
        with closing(sqlite3.connect(f"file:{n.data_dir / 'syncnode.db'}?mode=ro",
                                     uri=True)) as db:
            row = db.execute("SELECT bytes_used FROM groups WHERE group_id=?",
                             (group_id,)).fetchone()
        out.append(int(row[0]) if row else 0)
    return out


def disk_bytes(nodes: list[NodeProcess]) -> list[int]:
    return [storage_bytes(n.data_dir / "syncnode.db") for n in nodes]


async def bench_catchup(root: Path, nodes: list[NodeProcess], updates: int) -> dict[str, object]:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    async with Device.open(root / "a", config=MANUAL) as a:
        doc_a = await a.create_document(tickets)
        async with Device.open(root / "c", config=MANUAL) as c:
            await c.join(doc_a.invite())
        shutil.copytree(root / "c", root / "c2")
        t0 = time.perf_counter()
        await edit(doc_a, "k", updates)
        made = time.perf_counter() - t0
        plain = await catch_up(root / "c", updates)
        before = group_bytes(nodes, doc_a.group_id)
        t0 = time.perf_counter()
        await doc_a.compact()
        compact_s = time.perf_counter() - t0
        await trio.sleep(1.0)  # the syncnodes delete in the background
        after = group_bytes(nodes, doc_a.group_id)
        compacted = await catch_up(root / "c2", updates)
        return {"bench": "catchup", "updates": updates, "edit_s": round(made, 2),
                "catchup_replay_s": round(plain, 3), "catchup_from_state_s": round(compacted, 3),
                "compact_s": round(compact_s, 3), "group_bytes_before": before,
                "group_bytes_after": after, "state_bytes": len(doc_a.crdt.snapshot())}


async def bench_disk(root: Path, nodes: list[NodeProcess], edits: int, every: int,
                     report: int) -> list[dict[str, object]]:
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    cfg = replace(DeviceConfig(), compact_every_updates=every, compact_every_bytes=0,
                  compact_jitter=0.0)
    out = []
    async with Device.open(root / "a", config=cfg) as a:
        doc = await a.create_document(tickets)
        done = 0
        while done < edits:
            step = min(report, edits - done)
            await edit(doc, f"k{done}-", step)
            done += step
            await trio.sleep(0.5)  # a compaction due now is committed, its deletion runs
            row: dict[str, object] = {
                "bench": "disk", "edits": done, "compact_every": every,
                "compactions": doc.compactor.compactions,
                "group_bytes": group_bytes(nodes, doc.group_id), "db_bytes": disk_bytes(nodes),
                "state_bytes": len(doc.crdt.snapshot())}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="bench", required=True)
    c = sub.add_parser("catchup")
    c.add_argument("--updates", type=int, nargs="+", default=[10_000])
    d = sub.add_parser("disk")
    d.add_argument("--edits", type=int, default=100_000)
    d.add_argument("--compact-every", type=int, default=10_000)
    d.add_argument("--report", type=int, default=10_000)
    args = ap.parse_args()
    configure_logging("warning")
    for size in (args.updates if args.bench == "catchup" else [args.edits]):
        root = Path(tempfile.mkdtemp(prefix="bench-compaction-"))
        nodes = start_cluster(root / "nodes", 3)
        try:
            if args.bench == "catchup":
                print(json.dumps(trio.run(bench_catchup, root, nodes, size)), flush=True)
            else:
                trio.run(bench_disk, root, nodes, size, args.compact_every, args.report)
        finally:
            for n in nodes:
                n.stop()
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
