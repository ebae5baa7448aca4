"""Many seeds, in worker processes, with a summary table per scenario."""

from __future__ import annotations

import multiprocessing
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulations.scenarios import SCENARIOS


@dataclass(frozen=True)
class Job:
    seed: int
    scenario: str
    steps: int
    faults: frozenset[str]
    variant: str | None


@dataclass(frozen=True)
class Outcome:
    job: Job
    violations: tuple[str, ...]
    trace_tail: tuple[str, ...]
    trace_hash: str
    real_s: float
    stats: dict[str, Any]


def _one(job: Job) -> Outcome:
    from simulations.runner import run

    r = run(job.seed, steps=job.steps, scenario=job.scenario, faults=job.faults,
            variant=job.variant)
    return Outcome(job, tuple(str(v) for v in r.violations),
                   tuple(_minimal(r.trace)) if r.violations else (), r.trace_hash,
                   float(r.stats.get("real_s", 0.0)), r.stats)


def _minimal(trace: list[str]) -> list[str]:
    """The steps that did something, the outcomes of operations, and the violation."""
    return [line for line in trace if ": skipped" not in line]


def run_sweep(seeds: list[int], *, steps: int, scenario: str | None, faults: frozenset[str],
              variant: str | None, jobs: int, stop_on_violation: bool,
              echo: Callable[[str], None]) -> bool:
    names = sorted(SCENARIOS)
    work = [Job(s, scenario or names[s % len(names)], steps, faults, variant) for s in seeds]
    started = time.perf_counter()
    results: list[Outcome] = []
    failed: list[Outcome] = []
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no trio state
    with ctx.Pool(jobs, maxtasksperchild=20) as pool:
        for i, out in enumerate(pool.imap_unordered(_one, work), 1):
            results.append(out)
            mark = "ok" if not out.violations else "VIOLATION"
            echo(f"[{i}/{len(work)}] seed {out.job.seed:5d} {out.job.scenario:10s} {mark:9s} "
                 f"{out.real_s:5.1f}s trace {out.trace_hash[:12]}")
            if out.violations:
                failed.append(out)
                if stop_on_violation:
                    pool.terminate()
                    break
    elapsed = time.perf_counter() - started
    _table(results, elapsed, echo)
    for out in sorted(failed, key=lambda o: o.job.seed):
        echo(f"\nseed {out.job.seed} ({out.job.scenario}) violated:")
        for v in out.violations:
            echo(f"  {v}")
        echo("  minimal trace:")
        for line in out.trace_tail[-60:]:
            echo(f"    {line}")
        echo(f"  reproduce: python -m simulations run --seed {out.job.seed} --steps {steps} "
             f"--scenario {out.job.scenario}" + (f" --break {variant}" if variant else ""))
    return not failed


def _table(results: list[Outcome], elapsed: float, echo: Callable[[str], None]) -> None:
    by: dict[str, list[Outcome]] = defaultdict(list)
    for r in results:
        by[r.job.scenario].append(r)
    echo("")
    echo(f"{'scenario':12s} {'seeds':>5s} {'failed':>6s} {'edits':>6s} {'epochs':>6s} "
         f"{'crashes':>7s} {'cpu s/seed':>10s}")
    for name in sorted(by):
        rs = by[name]
        echo(f"{name:12s} {len(rs):5d} {sum(bool(r.violations) for r in rs):6d} "
             f"{sum(r.stats.get('edits', 0) for r in rs):6d} "
             f"{max(r.stats.get('epochs', 0) for r in rs):6d} "
             f"{sum(r.stats.get('crashes', 0) for r in rs):7d} "
             f"{sum(r.real_s for r in rs) / len(rs):10.2f}")
    total = len(results)
    bad = sum(bool(r.violations) for r in results)
    echo(f"{'total':12s} {total:5d} {bad:6d}   {total / elapsed:.2f} seeds/s wall "
         f"({elapsed:.0f} s)")
