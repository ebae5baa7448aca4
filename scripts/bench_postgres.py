#!/usr/bin/env python3
"""Benchmark of the storage backends under the real service: SQLite against PostgreSQL, and
1, 2 and 4 processes of one node over one PostgreSQL database, in one run; prints a table.

Each "process" is a separate OS process running the real :class:`syncnode.service.Service`
(signature checks, group commit, signed acks, Paxos driver) over its own storage, driven in
process by its own load (no network: this measures what the database and the service cost, not
iroh, which ``scripts/bench_syncnode.py`` covers). Every process ingests envelopes into groups
of its own (64 requests in flight) for ``--seconds``, then decides ``--decisions`` slots one
after the other (Prepare, Accept, learn), timing each decision. All processes of a run share
one node key and one database, as ``syncnode run`` processes of one node do.

Also measured: the cost of a read on PostgreSQL (a thread hop plus a round trip) against
SQLite's, the thread hop alone, and how long a change committed by one process takes to be
heard by another (LISTEN/NOTIFY).

Needs PostgreSQL: ``SYNCNODE_TEST_POSTGRES`` (a DSN), else a throwaway cluster is started
with ``scripts/pg_throwaway.sh`` and stopped at the end. Run it under ``nice`` on a shared
machine: ``nice -n 10 .venv/bin/python scripts/bench_postgres.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

SCRIPT = Path(__file__).resolve().parent / "pg_throwaway.sh"
IN_FLIGHT = 64


def worker(where: str, key_raw: bytes, index: int, seconds: float, decisions: int,
           start: Any, out: Any) -> None:
    try:
        out.put(trio.run(_worker, where, key_raw, index, seconds, decisions, start))
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


async def _worker(where: str, key_raw: bytes, index: int, seconds: float, decisions: int,
                  start: Any) -> dict[str, Any]:
    from proto.envelope import Envelope
    from proto.identity import SecretKey
    from proto.manifest import SyncnodeEntry
    from proto.paxos.messages import Accepted, Decided
    from proto.paxos.quorum import make_certificate
    from proto.service import RegisterGroup
    from syncnode.budgets import TokenBucket
    from syncnode.config import Limits
    from syncnode.service import Service
    from syncnode.session import Session
    from tests.syncnode_kit import Device, new_group, signed_accept, signed_prepare, update_value

    key = SecretKey(key_raw)
    limits = Limits(requests_per_second=1e9, request_burst=10**9, max_groups_per_key=10**6)
    service = Service(key, where, limits=limits)
    creator = Device(f"p{index}")
    session = Session(creator.endpoint, TokenBucket(1e9, 10**9))
    session.keys[creator.key_fpr] = creator.key.public
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        groups = [new_group(creator, [SyncnodeEntry(key.public, ())]) for _ in range(8)]
        for g in groups:
            reply = await service.handle(session, RegisterGroup(g.values[0].encode()))
            assert reply.created, reply
        envs = [Envelope.seal(creator.key, groups[i % 8].group_id, i // 8 + 1, 0, b"x" * 200)
                for i in range(int(seconds * 6000))]
        await trio.to_thread.run_sync(start.wait)  # every process starts at once
        stored = 0
        nxt = iter(envs)
        began = time.perf_counter()
        deadline = trio.current_time() + seconds

        async def pump() -> None:
            nonlocal stored
            for env in nxt:
                if trio.current_time() >= deadline:
                    return
                reply = await service.handle(session, env)
                assert type(reply).__name__ == "Stored", reply
                stored += 1

        async with trio.open_nursery() as pumps:
            for _ in range(IN_FLIGHT):
                pumps.start_soon(pump)
        rate = stored / (time.perf_counter() - began)
        g = groups[-1]  # the MLS group the device made last is its current one
        latencies = []
        for slot in range(1, decisions + 1):
            value = update_value(g, creator)
            t0 = time.perf_counter()
            await service.handle(session, signed_prepare(creator, g.group_id, slot, 1))
            acc = await service.handle(session, signed_accept(creator, g.group_id, slot, 1,
                                                              value.encode()))
            assert isinstance(acc, Accepted), acc
            cert = make_certificate(g.group_id, slot, acc.ballot, acc.value_hash,
                                    {acc.acceptor: acc.signature})
            done = await service.handle(session, Decided(value.encode(), cert))
            latencies.append(time.perf_counter() - t0)
            assert getattr(done, "count", 0) == 1, done
            g.values.append(value)
            creator.mls.apply(value.commit)
        await service.aclose()
        nursery.cancel_scope.cancel()
    return {"rate": rate, "latencies": latencies}


def run_config(where: str, processes: int, seconds: float, decisions: int) -> dict[str, float]:
    from proto.identity import SecretKey

    key = SecretKey.generate()
    raw = key.seed
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(where, raw, i, seconds, decisions, start, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    results = [out.get(timeout=300) for _ in procs]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        for p in procs:
            p.kill()
        raise SystemExit(f"a benchmark process failed: {errors[0]}")
    for p in procs:
        p.join(30)
    lat = sorted(x for r in results for x in r["latencies"])
    return {"rate": sum(r["rate"] for r in results),
            "p50": statistics.median(lat) * 1000, "p95": lat[int(len(lat) * 0.95)] * 1000}


async def micro(dsn: str, db: Path) -> dict[str, float]:
    """Read cost on each backend, the thread hop alone, and NOTIFY latency across processes
    (two storages on one database: what two processes have)."""
    from syncnode.storage import Change
    from syncnode.storage.postgres import PostgresStorage
    from syncnode.storage.sqlite import SqliteStorage

    out: dict[str, float] = {}
    gid = b"\x01" * 16

    async def timed(fn: Any, n: int = 2000) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        return (time.perf_counter() - t0) / n * 1e6

    out["hop"] = await timed(lambda: trio.to_thread.run_sync(lambda: None))
    sqlite = SqliteStorage(db)
    pg, other = PostgresStorage(dsn), PostgresStorage(dsn)
    async with trio.open_nursery() as nursery:
        for s in (sqlite, pg, other):
            await nursery.start(s.run)
        for s in (sqlite, pg):
            await s.create_group(gid, b"c" * 32, b"genesis", 1.0)
        out["read_sqlite"] = await timed(lambda: sqlite.group(gid))
        out["read_pg"] = await timed(lambda: pg.group(gid))
        heard: list[float] = []
        got = trio.Event()

        def hear(change: Change) -> None:
            if change.kind == "envelope":
                heard.append(time.perf_counter())
                got.set()

        other.on_change = hear
        delays, writes = [], []
        for seq in range(1, 101):
            got = trio.Event()
            before = len(heard)
            submitted = time.perf_counter()
            await pg.store_envelope(gid, b"a" * 32, seq, b"d%d" % seq, b"e")
            writes.append(time.perf_counter() - submitted)
            with trio.fail_after(5):
                await got.wait()
            delays.append(heard[before] - submitted)
        delays.sort()
        writes.sort()
        out["notify_p50"], out["notify_p95"] = delays[50] * 1000, delays[95] * 1000
        out["write_p50"] = writes[50] * 1000
        for s in (sqlite, pg, other):
            await s.aclose()
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="ingest time per run")
    ap.add_argument("--decisions", type=int, default=30, help="decisions per process")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    dsn = os.environ.get("SYNCNODE_TEST_POSTGRES")
    own = not dsn
    if own:
        dsn = subprocess.run([str(SCRIPT), "start", str(root / "pg")], check=True,
                             capture_output=True, text=True).stdout.strip()
    assert dsn is not None
    from tests.pg_kit import new_schema

    try:
        rows = []
        print(f"ingest {args.seconds:.0f} s per run, {IN_FLIGHT} stores in flight per process, "
              f"{args.decisions} decisions per process; {os.cpu_count()} CPUs", flush=True)
        rows.append(("SQLite", 1, run_config(str(root / "bench.db"), 1, args.seconds,
                                             args.decisions)))
        for n in (1, 2, 4):
            where = new_schema(dsn, f"bench{n}")
            rows.append(("PostgreSQL", n, run_config(where, n, args.seconds, args.decisions)))
        m = trio.run(micro, new_schema(dsn, "benchmicro"), root / "micro.db")
    finally:
        if own:
            subprocess.run([str(SCRIPT), "stop", str(root / "pg")], capture_output=True)
    print()
    print(f"{'backend':<11} {'processes':>9} {'envelopes/s':>12} {'decision p50':>13} "
          f"{'decision p95':>13}")
    for name, n, r in rows:
        print(f"{name:<11} {n:>9} {r['rate']:>12.0f} {r['p50']:>10.1f} ms {r['p95']:>10.1f} ms")
    print()
    print(f"read of one row: SQLite {m['read_sqlite']:.0f} us, PostgreSQL {m['read_pg']:.0f} us "
          f"(of which the trio.to_thread hop alone: {m['hop']:.0f} us)")
    print(f"a write submitted by one process, heard by another once committed "
          f"(LISTEN/NOTIFY): p50 {m['notify_p50']:.2f} ms, p95 {m['notify_p95']:.2f} ms; the "
          f"write alone returns to its caller in {m['write_p50']:.2f} ms (p50)")


if __name__ == "__main__":
    main()
