#!/usr/bin/env python3
"""Benchmark of real ``syncnode run`` processes over iroh on loopback.

(a) durable ingest: 10 concurrent clients (one iroh endpoint and one authenticated member each)
    store 1 KiB envelopes into one syncnode, pipelining up to ``--depth`` requests each; a store
    counts once the node acknowledged it as durable. Run twice in the same invocation: with group
    commit, and with ``--no-group-commit`` (one transaction + fsync per envelope).
(b) Paxos decision latency: one device decides successive slots (real MLS key-update commits,
    about 1.3 KB values) on 3 syncnodes; latency is from the first request to the proposer
    holding a certificate (the announcement of the decision to the syncnodes is not timed).
    Every decision after the first takes the fast path (the lease the previous one left);
    ``--no-fast-path`` measures the full protocol (Prepare and Accept) instead.
(c) resident memory of a syncnode hosting 10,000 idle groups: after registering them, and after
    a restart (state is loaded lazily, so an idle node stays small).

Usage: ``python scripts/bench_syncnode.py [--seconds S] [--decisions N] [--groups N]
[--phases abc] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from device.paxos_driver import LeaseBook, announce_decision, propose
from proto.envelope import Envelope
from proto.identity import SecretKey
from proto.paxos.messages import Decided
from proto.rpc import SyncnodeClient
from proto.transport.iroh import IrohTransport
from scripts.bench_kit import pct
from syncnode.procs import NodeProcess, start_cluster
from tests.syncnode_kit import Device, add_value, new_group, update_value

CLIENTS = 10
ENVELOPE = 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _connect(stack: AsyncExitStack, node: NodeProcess, device: Device | None
                   ) -> SyncnodeClient:
    transport = await IrohTransport.bind(SecretKey.generate())
    stack.push_async_callback(transport.aclose)
    assert node.ticket is not None
    client = await stack.enter_async_context(SyncnodeClient.connect(transport, node.ticket))
    if device is not None:
        await client.authenticate(device.key)
    return client


async def ingest(node: NodeProcess, seconds: float, depth: int) -> float:
    """Acknowledged envelopes per second into ``node`` from CLIENTS concurrent members."""
    devices = [Device(f"d{i}") for i in range(CLIENTS)]
    g = new_group(devices[0], [node.entry])
    async with AsyncExitStack() as stack:
        admin = await _connect(stack, node, devices[0])
        await admin.register_group(g.values[0])
        v = add_value(g, devices[0], devices[1:])
        outcome = await propose(devices[0].key, [admin], g.group_id, 1, v.encode(),
                                g.manifest.acceptors())
        assert isinstance(outcome, Decided)
        clients = [admin] + [await _connect(stack, node, d) for d in devices[1:]]
        payload = os.urandom(ENVELOPE)  # the syncnode never decrypts: any ciphertext will do
        # Pre-sign enough envelopes so the client side measures the server, not its own signing.
        per_client = int(seconds * 2500 / CLIENTS) + 200
        envs = [[Envelope.seal(d.key, g.group_id, s, 1, payload) for s in range(1, per_client)]
                for d in devices]
        acked = 0

        async def pump(client: SyncnodeClient, mine: list[Envelope]) -> None:
            nonlocal acked
            it = iter(mine)

            async def worker() -> None:
                nonlocal acked
                for env in it:
                    await client.store(env)
                    acked += 1

            async with trio.open_nursery() as n:
                for _ in range(depth):
                    n.start_soon(worker)

        started = time.perf_counter()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as n:
                for client, mine in zip(clients, envs, strict=True):
                    n.start_soon(pump, client, mine)
        return acked / (time.perf_counter() - started)


async def decision_latency(nodes: list[NodeProcess], decisions: int, fast: bool = True
                           ) -> list[float]:
    alice = Device("alice")
    leases = LeaseBook() if fast else None
    g = new_group(alice, [n.entry for n in nodes])
    latencies = []
    async with AsyncExitStack() as stack:
        clients = [await _connect(stack, n, alice) for n in nodes]
        for c in clients:
            await c.register_group(g.values[0])
        for _ in range(decisions):
            v = update_value(g, alice)
            raw = v.encode()
            started = time.perf_counter()
            outcome = await propose(alice.key, clients, g.group_id, g.next_slot, raw,
                                    g.manifest.acceptors(), announce=False, leases=leases)
            latencies.append(time.perf_counter() - started)
            assert isinstance(outcome, Decided)
            await announce_decision(clients, outcome)
            g.values.append(v)
            alice.mls.apply(v.commit)
    return latencies


async def idle_groups(node: NodeProcess, count: int) -> float:
    """Register ``count`` groups (a few creators, pipelined); returns seconds taken."""
    creators = [Device(f"c{i}") for i in range(max(1, count // 900))]
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        for i, creator in enumerate(creators):
            client = await _connect(stack, node, None)
            todo = [new_group(creator, [node.entry]).values[0]
                    for _ in range(count // len(creators) + (i < count % len(creators)))]

            async def worker(client: SyncnodeClient = client, todo: list = todo) -> None:  # type: ignore[type-arg]
                while todo:
                    await client.register_group(todo.pop())

            async with trio.open_nursery() as n:
                for _ in range(32):
                    n.start_soon(worker)
    return time.perf_counter() - started


def ingest_phase(root: Path, args: argparse.Namespace, out: dict[str, float]) -> None:
    print(f"(a) durable ingest, {CLIENTS} clients, {ENVELOPE} B envelopes, "
          f"{args.seconds:.0f} s per mode, depth {args.depth}")
    rates = {}
    for mode, extra in (("group commit", []), ("one fsync per message",
                                               ["--no-group-commit"])):
        (node,) = start_cluster(root / mode.replace(" ", "-"), 1, extra)
        try:
            rates[mode] = trio.run(ingest, node, args.seconds, args.depth)
            _, metrics = node.get("/metrics")
            batch = [ln for ln in metrics.splitlines()
                     if ln.startswith("syncnode_write_batch_size_")]
            count = float(next(x for x in batch if "_count" in x).split()[-1])
            total = float(next(x for x in batch if "_sum" in x).split()[-1])
        finally:
            node.stop()
        print(f"    {mode:24s} {rates[mode]:9.0f} msgs/s   mean batch {total / count:6.1f}")
    ratio = rates["group commit"] / rates["one fsync per message"]
    print(f"    ratio                    {ratio:9.1f}x   (target >= 10x)")
    out.update(ingest_group_commit_per_s=rates["group commit"],
               ingest_one_fsync_per_s=rates["one fsync per message"], ingest_ratio=ratio)


def paxos_phase(root: Path, args: argparse.Namespace, out: dict[str, float]) -> None:
    print(f"(b) Paxos decision latency, 3 syncnodes, {args.decisions} decisions")
    nodes = start_cluster(root / "paxos", 3)
    try:
        lat = trio.run(decision_latency, nodes, args.decisions, not args.no_fast_path)
    finally:
        for n in nodes:
            n.stop()
    print(f"    p50 {pct(lat, 50) * 1e3:6.2f} ms   p99 {pct(lat, 99) * 1e3:6.2f} ms   "
          f"mean {statistics.mean(lat) * 1e3:6.2f} ms")
    out.update(decision_p50_ms=pct(lat, 50) * 1e3, decision_p99_ms=pct(lat, 99) * 1e3)


def idle_phase(root: Path, args: argparse.Namespace, out: dict[str, float]) -> None:
    print(f"(c) RSS with {args.groups} idle groups")
    d = root / "idle"
    d.mkdir()
    (node,) = start_cluster(d, 1)
    (d / "node0" / "syncnode.toml").write_text(
        "[limits]\nmax_groups_per_connection = 100000\nmax_groups_per_key = 100000\n"
        "group_creations_per_second = 1000000.0\ngroup_creation_burst = 1000000\n"
        "endpoint_group_creations_per_hour = 1000000\n")
    node.stop()
    node.start()
    try:
        assert node.proc is not None
        empty = rss_mib(node.proc.pid)
        took = trio.run(idle_groups, node, args.groups)
        loaded = rss_mib(node.proc.pid)
        info = node.info()
        assert node.terminate() == 0
        node.start()
        time.sleep(2)
        restarted = rss_mib(node.proc.pid)
    finally:
        node.stop()
    print(f"    registered {info['groups']} groups in {took:.1f} s "
          f"({args.groups / took:.0f}/s), {int(info['storage_bytes']) / 1e6:.1f} MB on disk")
    print(f"    RSS empty {empty:.0f} MiB, after registering {loaded:.0f} MiB, "
          f"after restart {restarted:.0f} MiB")
    out.update(idle_rss_empty_mib=empty, idle_rss_loaded_mib=loaded,
               idle_rss_restarted_mib=restarted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each ingest run")
    ap.add_argument("--depth", type=int, default=16, help="requests in flight per client")
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--phases", default="abc", help="which of (a), (b), (c) to run")
    ap.add_argument("--json", help="also write the figures here (scripts/bench_peers.py reads it)")
    ap.add_argument("--no-fast-path", action="store_true", help="(b) without leases")
    args = ap.parse_args()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-syncnode-") as tmp:
        root = Path(tmp)
        for phase, run in (("a", ingest_phase), ("b", paxos_phase), ("c", idle_phase)):
            if phase in args.phases:
                run(root, args, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
