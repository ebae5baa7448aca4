#!/usr/bin/env python3
"""Our benchmarks and the peer systems', interleaved in one run, with one table of ratios.

The peers live in ``../shared/peers`` (y-websocket + y-leveldb, etcd, Automerge; their
README). This script runs their ``setup.sh`` when they are not installed yet, then, for each
repetition, one peer step and our step of the same shape right after it, so a slow spell of
the machine hits both sides of a ratio:

* data path (issue 18): ``y_bench.mjs --persist 1`` (phase a: change on A until visible on B;
  phase b: 5 writers + 5 readers, closed loop ``window:32``) against ``bench_e2e.py`` (the same
  shapes over real syncnode processes, every update MLS-encrypted, fsynced on the sending
  device and on a quorum of syncnodes; y-leveldb does not fsync); syncnode ingest with group
  commit against one fsync per message (``bench_syncnode.py --phases a``).
* control path (issue 19, ``--control``): etcd put p50 (3 members, fsync) and Automerge's warm
  load of a 10k-change document (``am_bench.mjs --phases c``) against ``bench_commit.py``: our
  Paxos decision p50 on 3 syncnodes, a key rotation applied on all of 2 / 5 / 10 devices, the
  join of a 10k-change document and the first join after a quiet spell.

While it runs, a sampler records the machine's busy cores and the cores used by processes that
are not this script's descendants ("foreign" load); the table shows it next to each step, so a
contended run can be recognised. Every step has a time limit, and every server is started and
stopped by the benchmark that owns it.

Usage::

    .venv/bin/python scripts/bench_peers.py                 # data path, 2 repetitions
    .venv/bin/python scripts/bench_peers.py --control --reps 3 --out results/

Exit codes: 0 the run completed (goals met or not: the table says), 1 a step failed (its log is
in the output folder), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_kit import PEERS, REPO, ensure_peers

PY = sys.executable


# -- foreign CPU ---------------------------------------------------------------------------------

def _ticks(pid: int) -> tuple[int, int] | None:
    """(utime+stime, ppid) of ``pid``, or None if it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12]), int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler:
    """Once a second: the machine's busy cores and those used by our process tree; the rest is
    foreign load (other users of the machine) that would distort a ratio."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, busy, ours)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._clk = os.sysconf("SC_CLK_TCK")
        self._dead = 0  # ticks of our descendants that ended during an interval

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _machine() -> tuple[int, int]:
        p = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = p[3] + p[4]
        return sum(p[:8]) - idle, sum(p[:8])

    def _ours(self) -> dict[int, int]:
        table: dict[int, tuple[int, int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and (t := _ticks(int(d))) is not None:
                table[int(d)] = t
        me, out = os.getpid(), {}
        for pid in table:
            p, hops = pid, 0
            while p > 1 and hops < 64:
                if p == me:
                    out[pid] = table[pid][0]
                    break
                p, hops = table[p][1] if p in table else 0, hops + 1
        return out

    def _run(self) -> None:
        b0, t0 = self._machine()
        o0 = self._ours()
        while not self._stop.wait(1.0):
            b1, t1 = self._machine()
            o1 = self._ours()
            # A process that ended inside the interval is not counted as ours: a short
            # over-estimate of foreign load, never an under-estimate.
            ours = sum(v - o0.get(pid, 0) for pid, v in o1.items()) / self._clk
            busy = (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)
            self.samples.append((time.time(), busy, ours))
            b0, t0, o0 = b1, t1, o1

    def foreign(self, t0: float, t1: float) -> dict[str, float]:
        rows = [(b, o) for t, b, o in self.samples if t0 <= t <= t1]
        if not rows:
            return {"foreign_mean": float("nan"), "foreign_max": float("nan")}
        f = [max(0.0, b - o) for b, o in rows]
        return {"foreign_mean": statistics.fmean(f), "foreign_max": max(f),
                "ours_mean": statistics.fmean(o for _, o in rows)}


# -- steps ---------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    cwd: Path
    argv: list[str]
    timeout: float
    parse: Callable[[dict[str, Any]], dict[str, float]]
    results: list[dict[str, float]] = field(default_factory=list)
    contention: list[dict[str, float]] = field(default_factory=list)


def _yjs(d: dict[str, Any]) -> dict[str, float]:
    b = next(x for x in d["b_throughput"] if x["mode"].startswith("window"))
    a = d["a_latency"]
    return {"latency_p50_ms": a["median_ms"], "latency_p99_ms": a["p99_ms"],
            "changes_per_s": b["writer_changes_per_s"]}


def _e2e(d: dict[str, Any]) -> dict[str, float]:
    a = d["a_latency"]
    return {"latency_p50_ms": a["median_ms"], "latency_p99_ms": a["p99_ms"],
            "changes_per_s": d["b_one_node"]["changes_per_s"],
            "changes_per_s_3": d["c_three_nodes"]["changes_per_s"],
            "device_cpu_ms": d["b_one_node"].get("device_cpu_ms_per_change", float("nan")),
            "syncnode_cpu_ms": d["b_one_node"].get("syncnode_cpu_ms_per_change", float("nan"))}


def _etcd(d: dict[str, Any]) -> dict[str, float]:
    return {"put_p50_ms": d["a_seq_put_leader"]["median_ms"]}


def _automerge(d: dict[str, Any]) -> dict[str, float]:
    return {"warm_load_ms": d["c_load_history"]["warm_server_load_ms"]["median_ms"]}


def steps(args: argparse.Namespace, out: Path) -> list[Step]:
    n, pace, dur = str(args.n), str(args.pace_ms), str(args.duration)
    s = [
        Step("y-websocket", PEERS / "yjs",
             ["node", "y_bench.mjs", "--phases", "ab", "--persist", "1", "--n", n, "--pace_ms",
              pace, "--duration", dur, "--b_modes", "window:32"], 600, _yjs),
        Step("ours e2e", REPO,
             [PY, "scripts/bench_e2e.py", "--n", n, "--pace-ms", pace, "--duration", dur]
             + (["--layout", args.layout] if args.layout else []), 900, _e2e),
        Step("ours ingest", REPO,
             [PY, "scripts/bench_syncnode.py", "--phases", "a", "--seconds", "5"], 300,
             lambda d: {k: d[k] for k in ("ingest_group_commit_per_s", "ingest_one_fsync_per_s",
                                          "ingest_ratio")}),
    ]
    if args.control:
        s += [
            Step("etcd", PEERS / "etcd",
                 [str(PEERS / "venv/bin/python"), "etcd_bench.py", "--phases", "a", "--seq",
                  "2000", "--reps", "1"], 600, _etcd),
            Step("automerge", PEERS / "automerge",
                 ["node", "am_bench.mjs", "--phases", "c", "--cold_reps", "0", "--data_dir",
                  str(out / "am-data")], 600, _automerge),
            Step("ours control", REPO,
                 [PY, "scripts/bench_commit.py", "--skip-peers", "--skip-260k"], 900,
                 lambda d: {k: v for k, v in d.items() if isinstance(v, float)}),
        ]
    return s


def run_step(step: Step, rep: int, out: Path, sampler: CpuSampler) -> bool:
    tag = f"{step.name.replace(' ', '_')}.{rep}"
    res = out / f"{tag}.json"
    argv = step.argv + (["--out", str(res)] if step.cwd != REPO else ["--json", str(res)])
    print(f"[{time.strftime('%H:%M:%S')}] {step.name} (rep {rep}): {' '.join(argv)}",
          file=sys.stderr, flush=True)
    t0 = time.time()
    with open(out / f"{tag}.log", "w") as log:
        try:
            rc = subprocess.run(argv, cwd=step.cwd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=step.timeout, env={**os.environ, "PYTHONPATH": str(REPO)}
                                ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    t1 = time.time()
    step.contention.append(sampler.foreign(t0, t1))
    if rc != 0 or not res.exists():
        print(f"  {step.name} failed (rc {rc}); see {out / (tag + '.log')}", file=sys.stderr)
        return False
    step.results.append(step.parse(json.loads(res.read_text())))
    return True


# -- the table -----------------------------------------------------------------------------------

def _vals(step: Step, key: str) -> list[float]:
    return [r[key] for r in step.results if key in r]


def _range(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}-{format(hi, fmt)}"


def table(by: dict[str, Step]) -> list[str]:
    """One row per goal: our figures, the peer's, the ratio per repetition (paired)."""
    rows = ["| | ours | peer | ratio (per repetition) | goal | met |",
            "|---|---|---|---|---|---|"]

    def row(label: str, ours: list[float], peer: list[float], unit: str, fmt: str,
            goal: str, ok: Callable[[float], bool], peer_label: str = "") -> None:
        ratios = [o / p for o, p in zip(ours, peer, strict=False) if p]
        met = "yes" if ratios and all(ok(r) for r in ratios) else ("no" if ratios else "-")
        rows.append(f"| {label} | {_range(ours, fmt)} {unit} | {peer_label}"
                    f"{_range(peer, fmt)} {unit} | {_range(ratios, '.2f')}x | {goal} | {met} |")

    y, e = by.get("y-websocket"), by.get("ours e2e")
    if y and e:
        row("latency A->B p50, 1 syncnode", _vals(e, "latency_p50_ms"),
            _vals(y, "latency_p50_ms"), "ms", ".2f", "<= 2x", lambda r: r <= 2)
        row("changes/s, 5 writers + 5 readers, window 32, 1 syncnode",
            _vals(e, "changes_per_s"), _vals(y, "changes_per_s"), "", ".0f",
            ">= 1x (issue: >= 0.5x)",
            lambda r: r >= 0.5)
        row("same, 3 syncnodes", _vals(e, "changes_per_s_3"), _vals(y, "changes_per_s"), "",
            ".0f", ">= 0.7x", lambda r: r >= 0.7)
        rows.append(f"| CPU per change, 1 syncnode (ours: the 10 devices' process + the "
                    f"syncnode) | {_range(_vals(e, 'device_cpu_ms'), '.2f')} + "
                    f"{_range(_vals(e, 'syncnode_cpu_ms'), '.2f')} ms | | | | |")
    i = by.get("ours ingest")
    if i:
        row("syncnode ingest, group commit vs one fsync per message",
            _vals(i, "ingest_group_commit_per_s"), _vals(i, "ingest_one_fsync_per_s"), "msg/s",
            ".0f", ">= 10x", lambda r: r >= 10, "one fsync per message: ")
    t, c, am = by.get("etcd"), by.get("ours control"), by.get("automerge")
    if t and c:
        put = _vals(t, "put_p50_ms")
        row("Paxos decision p50, 3 syncnodes vs etcd put p50 (3 members)",
            _vals(c, "decision_p50_ms"), put, "ms", ".2f", "<= 3x", lambda r: r <= 3)
        for n in (2, 5, 10):
            row(f"key rotation applied on all {n} devices vs etcd put",
                _vals(c, f"rotation_all_ms_{n}"), put, "ms", ".1f", "<= 6x", lambda r: r <= 6)
    if am and c:
        warm = _vals(am, "warm_load_ms")
        row("join of a 10k-change document vs Automerge warm load", _vals(c, "join_10k_ms"),
            warm, "ms", ".0f", "<= 1x", lambda r: r <= 1)
        row("first join after a quiet spell vs Automerge warm load",
            _vals(c, "join_first_after_quiet_ms"), warm, "ms", ".0f", "<= 1x (no outlier)",
            lambda r: r <= 1)
    rows.append("")
    rows.append("| step | foreign load, mean cores (max) per repetition |")
    rows.append("|---|---|")
    for s in by.values():
        rows.append(f"| {s.name} | " + ", ".join(
            f"{c['foreign_mean']:.2f} ({c['foreign_max']:.2f})" for c in s.contention) + " |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="exit codes: 0 done, 1 a step failed, 2 usage error")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions (default 2)")
    ap.add_argument("--n", type=int, default=300, help="changes in the latency phase")
    ap.add_argument("--pace-ms", type=float, default=10.0, help="pause between latency changes")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of the window:32 run")
    ap.add_argument("--control", action="store_true",
                    help="also the control path (bench_commit.py vs etcd and Automerge)")
    ap.add_argument("--layout", choices=("one-process", "process-per-device"),
                    help="bench_e2e.py's device layout (default: its own)")
    ap.add_argument("--out", type=Path, help="results folder (default: a new bench-results/<time>)")
    args = ap.parse_args()
    if not PEERS.is_dir():
        print(f"error: the peers are not at {PEERS}", file=sys.stderr)
        return 2
    ensure_peers()
    out = args.out or REPO / "bench-results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    sampler = CpuSampler()
    sampler.start()
    ok = True
    plan = steps(args, out)
    try:
        for rep in range(1, args.reps + 1):
            for step in plan:
                ok = run_step(step, rep, out, sampler) and ok
    finally:
        sampler.stop()
    lines = table({s.name: s for s in plan})
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {s.name: {"results": s.results, "contention": s.contention} for s in plan}, indent=2))
    print(text)
    print(f"\nresults in {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
