"""End-to-end benchmark: devices on iroh, real syncnode daemons, every update MLS-encrypted
and fsynced on the syncnodes before it is pushed.

Shapes match the peer harness (``../shared/peers/yjs/y_bench.mjs``, ``automerge/am_bench.mjs``):

* (a) visible latency: a change on device A until it is applied on device B, ``--n`` changes
  spaced ``--pace-ms`` apart; median and p99.
* (b) 5 writers + 5 readers on one document for ``--duration`` s, closed loop ``window:32`` (a
  writer blocks until every reader has seen its change n-32); changes/s, then time until every
  reader converged. One syncnode.
* (c) the same with 3 syncnodes (every update stored on a quorum of 2 before it counts).

Run: ``.venv/bin/python scripts/bench_e2e.py`` (add ``--profile FILE`` to write a cProfile of
phase (b) of this process: devices only; the syncnodes are separate processes). Compare with
``node y_bench.mjs --phases ab --persist 1 --b_modes window:32`` and pass its JSON with
``--yjs FILE`` to print ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device.agent import Device, DeviceConfig
from device.document import Change, Document
from proto.logs import configure_logging
from scripts.bench_kit import cpu_seconds, pct
from syncnode.procs import NodeProcess, start_cluster

CONFIG = DeviceConfig()


def nodes_cpu(nodes: list[NodeProcess]) -> float:
    return sum(cpu_seconds(n.proc.pid) for n in nodes if n.proc is not None)


def counter_of(doc: Document, writer: int) -> int:
    return int(doc.value().get(f"w{writer}", {}).get("n", 0))


async def open_group(stack: AsyncExitStack, root: Path, nodes: list[NodeProcess], count: int
                     ) -> list[Document]:
    devices = [await stack.enter_async_context(Device.open(root / f"dev{i}", config=CONFIG))
               for i in range(count)]
    tickets = [n.ticket for n in nodes if n.ticket is not None]
    first = await devices[0].create_document(tickets)
    docs = [first]
    for d in devices[1:]:
        docs.append(await d.join(first.invite()))
        print(f"  device {len(docs)}/{count} joined", file=sys.stderr)
    for doc in docs:
        await doc.wait_connected(len(nodes))
    return docs


async def latency(a: Document, b: Document, n: int, pace: float) -> dict[str, float]:
    """Time from ``change()`` on A until B's change event shows the new value."""
    arrived: dict[int, float] = {}
    wake = trio.Event()

    def on(ev: Any) -> None:
        if isinstance(ev, Change) and ev.origin == "remote":
            arrived.setdefault(counter_of(b, 0), time.perf_counter())
            wake.set()

    b.subscribe(on)
    lat: list[float] = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        a.change(lambda e, i=i: e.map("w0").insert("n", i))
        with trio.fail_after(30):
            while i not in arrived:
                await wake.wait()
                wake = trio.Event()
        lat.append((arrived[i] - t0) * 1000)
        await trio.sleep(pace)
    return {"n": n, "median_ms": statistics.median(lat), "p99_ms": pct(lat, 99),
            "mean_ms": statistics.fmean(lat)}


async def throughput(docs: list[Document], writers: int, duration: float, window: int
                     ) -> dict[str, float]:
    ws, rs = docs[:writers], docs[writers:]
    progress = trio.Event()
    # Each reader's counters, read from its document again only after it changed: reading the
    # whole value at every check of the window was a twentieth of the devices' CPU, charged
    # to "CPU per change" though it is the harness's own work.
    counters: dict[int, list[int]] = {}

    def wake_for(i: int) -> Callable[[Any], None]:
        def wake(_ev: Any) -> None:
            nonlocal progress
            counters.pop(i, None)
            progress.set()
            progress = trio.Event()
        return wake

    def counter(i: int, k: int) -> int:
        if i not in counters:
            value = rs[i].value()
            counters[i] = [int(value.get(f"w{w}", {}).get("n", 0)) for w in range(writers)]
        return counters[i][k]

    for i, r in enumerate(rs):
        r.subscribe(wake_for(i))
    sent = [0] * writers
    stop = trio.current_time() + duration

    async def writer(k: int) -> None:
        doc = ws[k]
        while trio.current_time() < stop:
            n = sent[k] + 1
            while any(counter(i, k) < n - window for i in range(len(rs))):
                ev = progress
                with trio.move_on_after(0.05):
                    await ev.wait()
                if trio.current_time() >= stop:
                    return
            doc.change(lambda e, n=n, k=k: e.map(f"w{k}").insert("n", n))
            sent[k] = n
            await trio.lowlevel.checkpoint()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(writers):
            nursery.start_soon(writer, k)
    elapsed = time.perf_counter() - t0
    total = sum(sent)
    with trio.fail_after(120):
        while any(counter(i, k) < sent[k] for i in range(len(rs)) for k in range(writers)):
            ev = progress
            with trio.move_on_after(0.05):
                await ev.wait()
    converge = time.perf_counter() - t0 - elapsed
    return {"changes": total, "seconds": elapsed, "changes_per_s": total / elapsed,
            "converge_after_s": converge}


async def run_phases(args: argparse.Namespace, root: Path, nodes: list[NodeProcess],
                     phases: str, out: dict[str, Any], tag: str) -> None:
    if "a" in phases:
        async with AsyncExitStack() as stack:
            a, b = await open_group(stack, root / "latency", nodes, 2)
            out["a_latency"] = await latency(a, b, args.n, args.pace_ms / 1000)
            print(f"(a) visible latency A->B: median {out['a_latency']['median_ms']:.2f} ms, "
                  f"p99 {out['a_latency']['p99_ms']:.2f} ms over {args.n} changes")
    if tag == "b_one_node" and "b" not in phases:
        return
    if args.layout == "process-per-device":
        await per_process(root, nodes, out, tag, args.duration)
        return
    async with AsyncExitStack() as stack:
        print(f"setting up 10 devices on {len(nodes)} syncnode(s)...", file=sys.stderr)
        docs = await open_group(stack, root, nodes, 10)
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        cpu0, node0 = cpu_seconds(), nodes_cpu(nodes)
        res = await throughput(docs, 5, args.duration, 32)
        cpu1, node1 = cpu_seconds(), nodes_cpu(nodes)
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
        res["device_cpu_ms_per_change"] = (cpu1 - cpu0) * 1000 / max(1, res["changes"])
        res["syncnode_cpu_ms_per_change"] = (node1 - node0) * 1000 / max(1, res["changes"])
        out[tag] = res
        print(f"({tag[0]}) {len(nodes)} syncnode(s), 5 writers + 5 readers, window:32: "
              f"{res['changes_per_s']:.0f} changes/s ({res['changes']} in {res['seconds']:.1f} s), "
              f"all readers converged {res['converge_after_s'] * 1000:.0f} ms later; CPU per "
              f"change: devices {res['device_cpu_ms_per_change']:.2f} ms, syncnodes "
              f"{res['syncnode_cpu_ms_per_change']:.2f} ms")


async def per_process(root: Path, nodes: list[NodeProcess], out: dict[str, Any], tag: str,
                      duration: float) -> None:
    """Phase (b)/(c) with one process per device (:mod:`scripts.bench_layout`)."""
    from scripts.bench_layout import throughput_processes

    async with AsyncExitStack() as stack:
        print(f"setting up 10 devices on {len(nodes)} syncnode(s)...", file=sys.stderr)
        docs = await open_group(stack, root, nodes, 10)
        group_id = docs[0].group_id
        for doc in docs:
            doc.flush()
        with trio.fail_after(60):
            for doc in docs:
                await doc.wait_durable()
    homes = [root / f"dev{i}" for i in range(10)]
    node0 = nodes_cpu(nodes)
    res = await throughput_processes(homes, group_id, 5, duration, 32, CONFIG)
    node1 = nodes_cpu(nodes)
    res["device_cpu_ms_per_change"] = res.pop("devices_cpu_s") * 1000 / max(1, res["changes"])
    res["syncnode_cpu_ms_per_change"] = (node1 - node0) * 1000 / max(1, res["changes"])
    res["layout"] = "process-per-device"
    out[tag] = res
    print(f"({tag[0]}) {len(nodes)} syncnode(s), 5 writers + 5 readers, window:32, one process "
          f"per device: {res['changes_per_s']:.0f} changes/s ({res['changes']} in "
          f"{res['seconds']:.1f} s), all readers converged {res['converge_after_s'] * 1000:.0f} "
          f"ms later; CPU per change: devices {res['device_cpu_ms_per_change']:.2f} ms, "
          f"syncnodes {res['syncnode_cpu_ms_per_change']:.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="changes for the latency phase")
    ap.add_argument("--pace-ms", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--phases", default="abc")
    ap.add_argument("--flush-interval", type=float, default=None,
                    help="override DeviceConfig.flush_interval (seconds)")
    ap.add_argument("--profile", help="write a cProfile of phase (b) here")
    ap.add_argument("--yjs", help="y_bench.mjs JSON output to compare with")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--layout", choices=("one-process", "process-per-device"),
                    default="one-process",
                    help="phases (b)/(c): all ten devices in this process, or one process each "
                         "(the shape of real devices; the latency phase stays in one process)")
    args = ap.parse_args()
    configure_logging("warning")
    global CONFIG
    if args.flush_interval is not None:
        CONFIG = replace(CONFIG, flush_interval=args.flush_interval)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        if "a" in args.phases or "b" in args.phases:
            nodes = start_cluster(root / "one", 1)
            try:
                trio.run(run_phases, args, root / "one", nodes, args.phases, out, "b_one_node")
            finally:
                for n in nodes:
                    n.stop()
        if "c" in args.phases:
            nodes = start_cluster(root / "three", 3)
            args.profile = None
            try:
                trio.run(run_phases, args, root / "three", nodes, "", out, "c_three_nodes")
            finally:
                for n in nodes:
                    n.stop()
    if args.yjs:
        y = json.loads(Path(args.yjs).read_text())
        compare(out, y)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def compare(out: dict[str, Any], y: dict[str, Any]) -> None:
    """Print our numbers next to y_bench.mjs's (same shapes) as ratios."""
    print(f"\ncompared with y-websocket ({y.get('persistence') or 'no persistence'}):")
    ya, ours_a = y.get("a_latency"), out.get("a_latency")
    if ya and ours_a:
        print(f"  (a) median latency: ours {ours_a['median_ms']:.2f} ms, y-websocket "
              f"{ya['median_ms']:.2f} ms -> {ours_a['median_ms'] / ya['median_ms']:.1f}x "
              f"(goal <= 2x)")
    yb = next((b for b in y.get("b_throughput") or [] if b.get("mode") == "window:32"), None)
    for tag in ("b_one_node", "c_three_nodes"):
        if yb and tag in out:
            ours = out[tag]["changes_per_s"]
            print(f"  ({tag[0]}) changes/s: ours {ours:.0f}, y-websocket "
                  f"{yb['writer_changes_per_s']:.0f} -> {ours / yb['writer_changes_per_s']:.2f}x "
                  f"(goal >= 1x)")


if __name__ == "__main__":
    interrupted = False
    try:
        sys.exit(main())
    except* KeyboardInterrupt:  # every syncnode and device process is stopped on the way out
        interrupted = True
    if interrupted:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
