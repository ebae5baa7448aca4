"""``python -m simulations``: deterministic simulation of syncnodes and devices.

    python -m simulations run --seed 7 --steps 60 --scenario partition
    python -m simulations sweep --seeds 0..99            # every scenario, round robin
    python -m simulations sweep --seeds 0..999 --jobs 2  # nightly
    python -m simulations sweep --seeds 0..40 --break early-apply   # negative control
"""

from __future__ import annotations

import os
import sys

import click

from simulations.broken import VARIANTS
from simulations.scenarios import FAULT_STEPS, SCENARIOS


def _fixed_hash_seed() -> None:
    """Sets of bytes iterate in hash order: a run is only reproducible with a fixed
    PYTHONHASHSEED, so the CLI re-executes itself with one."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, "-m", "simulations", *sys.argv[1:]], env)


def _seeds(text: str) -> range:
    lo, sep, hi = text.partition("..")
    try:
        return range(int(lo), int(hi) + 1) if sep else range(int(lo), int(lo) + 1)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected A..B (inclusive) or one seed") from None


def _faults(text: str) -> frozenset[str]:
    names = frozenset(f for f in text.split(",") if f)
    unknown = names - FAULT_STEPS.keys()
    if unknown:
        raise click.BadParameter(f"unknown fault class {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(FAULT_STEPS)})")
    return names


SCENARIO_HELP = "; ".join(f"{s.name}: {s.about}" for s in SCENARIOS.values())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run the real syncnode and device code many times over under seeded faults, checking
    invariants after every step (agreement, certificates, convergence, no loss of
    acknowledged updates, removed devices blind, no plaintext on syncnodes, equivocation
    detected). A seed reproduces its run exactly (same trace hash)."""
    _fixed_hash_seed()


@cli.command("run")
@click.option("--seed", type=int, required=True)
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default="baseline",
              show_default=True, help=SCENARIO_HELP)
@click.option("--faults", default="", help=f"extra fault classes, comma separated: "
              f"{', '.join(FAULT_STEPS)}")
@click.option("--break", "variant", type=click.Choice(sorted(VARIANTS)),
              help="plant a known bug (negative control)")
@click.option("--trace/--no-trace", default=False, help="print the whole trace")
@click.option("--keep", type=click.Path(file_okay=False), help="keep the databases here")
def run_cmd(seed: int, steps: int, scenario: str, faults: str, variant: str | None,
            trace: bool, keep: str | None) -> None:
    """Run one seed; exit 1 on a violation, printing the seed and the trace."""
    from pathlib import Path

    from simulations.runner import run

    r = run(seed, steps=steps, scenario=scenario, faults=_faults(faults), variant=variant,
            keep=Path(keep) if keep else None)
    if trace or not r.ok:
        for line in r.trace:
            click.echo(line)
    stats = " ".join(f"{k}={v}" for k, v in r.stats.items())
    click.echo(f"seed {seed} scenario {scenario}: {'ok' if r.ok else 'VIOLATION'} "
               f"trace {r.trace_hash[:16]} {stats}")
    if not r.ok:
        for v in r.violations:
            click.echo(f"  {v}", err=True)
        click.echo(f"reproduce: python -m simulations run --seed {seed} --steps {steps} "
                   f"--scenario {scenario}" + (f" --faults {faults}" if faults else "")
                   + (f" --break {variant}" if variant else ""), err=True)
        sys.exit(1)


@cli.command()
@click.option("--seeds", "seed_range", default="0..99", show_default=True,
              help="A..B, inclusive")
@click.option("--steps", type=int, default=60, show_default=True)
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)),
              help="one scenario for every seed (default: all, round robin by seed)")
@click.option("--faults", default="", help="extra fault classes for every run")
@click.option("--break", "variant", type=click.Choice(sorted(VARIANTS)),
              help="plant a known bug (negative control)")
@click.option("--jobs", type=int, default=os.cpu_count() or 1, show_default=True,
              help="worker processes")
@click.option("--stop-on-violation", is_flag=True, help="stop at the first failing seed")
def sweep(seed_range: str, steps: int, scenario: str | None, faults: str, variant: str | None,
          jobs: int, stop_on_violation: bool) -> None:
    """Run many seeds and print a summary table; exit 1 if any seed violated an invariant."""
    from simulations.sweep import run_sweep

    ok = run_sweep(list(_seeds(seed_range)), steps=steps, scenario=scenario,
                   faults=_faults(faults), variant=variant, jobs=max(1, jobs),
                   stop_on_violation=stop_on_violation, echo=click.echo)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli()
