#!/usr/bin/env python3
"""Control-path benchmark (issue 19): Paxos decisions, commits applied everywhere, joins, each
next to its peer (etcd put, Automerge warm load) measured in the same run.

Three real ``syncnode run`` daemons on loopback, devices on iroh in this process.

* decision: one device decides ``--decisions`` successive slots (real MLS key updates, ~1.3 KB
  values); latency from the first request to the proposer holding a certificate, as
  ``scripts/bench_syncnode.py`` (b) (the announcement is not timed). With the fast path, every
  decision after the first rides the lease the previous one left.
* rotation: ``Document.rotate_keys()`` on one of N members (2 / 5 / 10 devices) until every
  member applied it (each member's epoch reached the slot); median of ``--rotations``.
* join: ``join(ticket)`` until the new device's value equals the inviter's, for a 10k-change
  document (one map set + one text insert per change, like the Automerge harness) and the
  260k-edit automerge-perf trace; the first join of the 10k document comes after
  ``--quiet`` seconds of silence and is reported apart.
* peers: ``etcd_bench.py --phases a`` (3 members, sequential puts via the leader) and
  ``am_bench.mjs --phases c`` (warm load of a 10,000-change document), run as subprocesses.

Run: ``python scripts/bench_commit.py [--decisions 200] [--skip-260k] [--json out.json]``.
``--json`` writes flat keys (``decision_p50_ms``, ``rotation_all_ms_5``, ``join_10k_ms``, ...)
for ``scripts/bench_peers.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from device.agent import Device, DeviceConfig
from proto.logs import configure_logging
from scripts.bench_join import build, one_join
from scripts.bench_kit import PEERS, ensure_peers, pct
from scripts.bench_syncnode import decision_latency
from syncnode.procs import NodeProcess, start_cluster

CONFIG = DeviceConfig()


async def rotation(root: Path, tickets: list[str], devices: int, reps: int) -> list[float]:
    """Seconds from rotate_keys() on the creator until all ``devices`` members applied it."""
    async with AsyncExitStack() as stack:
        creator = await stack.enter_async_context(
            Device.open(root / f"r{devices}-0", config=CONFIG))
        doc = await creator.create_document(tickets)
        docs = [doc]
        for i in range(1, devices):
            dev = await stack.enter_async_context(
                Device.open(root / f"r{devices}-{i}", config=CONFIG))
            docs.append(await dev.join(doc.invite()))
        for d in docs:
            await d.wait_epoch(doc.epoch)
        await trio.sleep(0.5)  # let the joins' background work settle
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            slot = await doc.rotate_keys()
            with trio.fail_after(30):
                for d in docs:
                    await d.wait_epoch(slot)
            out.append(time.perf_counter() - t0)
            await trio.sleep(0.05)
        return out


async def joins(root: Path, tickets: list[str], size: int, reps: int, quiet: float
                ) -> list[float]:
    """Join times; the first comes after ``quiet`` seconds with no activity at all."""
    async with Device.open(root / f"j{size}", config=CONFIG) as inviter:
        doc = await inviter.create_document(tickets)
        build(doc, size)
        doc.flush()
        with trio.fail_after(300):
            await doc.wait_durable()
        await trio.sleep(quiet)
        return [await one_join(root, doc, f"j{size}-{k}", p2p=True) for k in range(reps)]


async def control_path(root: Path, nodes: list[NodeProcess], args: argparse.Namespace
                       ) -> dict[str, Any]:
    res: dict[str, Any] = {}
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    lat = await decision_latency(nodes, args.decisions)
    res["decision_p50_ms"], res["decision_p99_ms"] = pct(lat, 50) * 1e3, pct(lat, 99) * 1e3
    res["decision_mean_ms"] = statistics.mean(lat) * 1e3
    print(f"decision ({args.decisions}): p50 {res['decision_p50_ms']:.2f} ms, "
          f"p99 {res['decision_p99_ms']:.2f} ms", flush=True)
    full = await decision_latency(nodes, args.decisions, fast=False)  # no fast path
    res["decision_full_p50_ms"] = pct(full, 50) * 1e3
    res["decision_full_p99_ms"] = pct(full, 99) * 1e3
    print(f"decision, full protocol: p50 {res['decision_full_p50_ms']:.2f} ms, "
          f"p99 {res['decision_full_p99_ms']:.2f} ms", flush=True)
    for n in (2, 5, 10):
        times = await rotation(root, tickets, n, args.rotations)
        res[f"rotation_all_ms_{n}"] = statistics.median(times) * 1e3
        each = ", ".join(f"{t * 1e3:.1f}" for t in times)
        print(f"rotation applied on all {n:2d} devices: median "
              f"{res[f'rotation_all_ms_{n}']:.1f} ms ({each})", flush=True)
    times = await joins(root, tickets, 10_000, 1 + args.join_reps, args.quiet)
    res["join_first_after_quiet_ms"] = times[0] * 1e3
    res["join_10k_ms"] = statistics.median(times[1:]) * 1e3
    each = ", ".join(f"{t * 1e3:.0f}" for t in times)
    print(f"join 10k: median {res['join_10k_ms']:.0f} ms, first after {args.quiet:.0f} s quiet "
          f"{res['join_first_after_quiet_ms']:.0f} ms ({each})", flush=True)
    if not args.skip_260k:
        times = await joins(root, tickets, 260_000, 1 + args.join_reps, args.quiet)
        res["join_260k_first_after_quiet_ms"] = times[0] * 1e3
        res["join_260k_ms"] = statistics.median(times[1:]) * 1e3
        print(f"join 260k: median {res['join_260k_ms']:.0f} ms, first after quiet "
              f"{times[0] * 1e3:.0f} ms", flush=True)
    return res


def _etcd(tmp: Path, seq: int) -> float | None:
    out = tmp / "etcd.json"
    cmd = [str(PEERS / "venv/bin/python"), "etcd_bench.py", "--phases", "a", "--seq", str(seq),
           "--reps", "1", "--base", str(tmp / "etcd-run"), "--out", str(out)]
    if subprocess.run(cmd, cwd=PEERS / "etcd", capture_output=True).returncode != 0:
        return None
    return float(json.loads(out.read_text())["a_seq_put_leader"]["median_ms"])


def _automerge(tmp: Path) -> float | None:
    out = tmp / "am.json"
    cmd = ["node", "am_bench.mjs", "--phases", "c", "--cold_reps", "0", "--data_dir",
           str(tmp / "am-data"), "--out", str(out)]
    if subprocess.run(cmd, cwd=PEERS / "automerge", capture_output=True).returncode != 0:
        return None
    return float(json.loads(out.read_text())["c_load_history"]["warm_server_load_ms"]["median_ms"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--rotations", type=int, default=9, help="per device count")
    ap.add_argument("--join-reps", type=int, default=3, help="joins after the first")
    ap.add_argument("--quiet", type=float, default=5.0, help="silence before the first join")
    ap.add_argument("--skip-260k", action="store_true")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--etcd-seq", type=int, default=2000)
    ap.add_argument("--json", help="write the flat results here")
    args = ap.parse_args()
    configure_logging("warning")
    if not args.skip_peers:
        ensure_peers()  # before our part: a missing peer fails in seconds, not after it
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        root = Path(tmp)
        nodes = start_cluster(root / "cluster", 3)
        try:
            res = trio.run(control_path, root, nodes, args)
        finally:
            for n in nodes:
                n.stop()
        if not args.skip_peers:
            res["etcd_put_p50_ms"] = _etcd(root, args.etcd_seq)
            res["automerge_warm_load_ms"] = _automerge(root)
    etcd, am = res.get("etcd_put_p50_ms"), res.get("automerge_warm_load_ms")
    if etcd:
        for k in ["decision_p50_ms"] + [f"rotation_all_ms_{n}" for n in (2, 5, 10)]:
            res[k.replace("_ms", "_vs_etcd")] = res[k] / etcd
            print(f"{k}: {res[k]:.2f} ms = {res[k] / etcd:.1f}x etcd put p50 ({etcd:.2f} ms)")
    if am:
        for k in ("join_10k_ms", "join_first_after_quiet_ms"):
            res[k.replace("_ms", "_vs_automerge")] = res[k] / am
            print(f"{k}: {res[k]:.0f} ms = {res[k] / am:.2f}x Automerge warm load ({am:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
