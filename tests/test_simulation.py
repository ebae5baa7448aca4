"""The deterministic simulator: reproducible, and its checkers catch planted bugs.

The CI sweep itself (100+ seeds over every scenario) runs from ``make test`` through the CLI;
these tests pin the properties the sweep relies on. They run the CLI in a subprocess, as users
do (it fixes PYTHONHASHSEED, which a run's determinism needs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from simulations.scenarios import FAULT_STEPS, SCENARIOS, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sim(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simulations", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def trace_hash(out: str) -> str:
    m = re.search(r"trace ([0-9a-f]{16})", out)
    assert m, out
    return m.group(1)


def test_a_seed_replays_exactly() -> None:
    """Same seed, same trace hash, across processes; another seed, another trace."""
    runs = [sim("run", "--seed", str(s), "--steps", "40", "--scenario", "chaos")
            for s in (21, 21, 22)]
    hashes = [trace_hash(r.stdout) for r in runs]
    assert hashes[0] == hashes[1], [r.stdout[-400:] for r in runs]
    assert hashes[0] != hashes[2]


def test_every_scenario_injects_its_faults() -> None:
    """Each named scenario's plan draws its fault steps (a scenario that never fires its
    faults would pass vacuously)."""
    for sc in SCENARIOS.values():
        kinds = {s.kind for s in plan(1, 200, sc, sc.faults)}
        for fault in sc.faults:
            assert not FAULT_STEPS[fault] or kinds & FAULT_STEPS[fault].keys(), (sc.name, fault)


def test_a_run_prints_its_trace_and_a_clean_run_passes() -> None:
    r = sim("run", "--seed", "3", "--steps", "30", "--scenario", "partition", "--trace")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "partition" in r.stdout or "cut" in r.stdout
    assert "quiet" in r.stdout


@pytest.mark.parametrize(("variant", "scenario", "seeds"), [
    ("early-apply", "baseline", "0..5"),
    ("ignore-promises", "lossy", "0..11"),
    # Rare in the sweep (seeds 7 and 20 of 0..29 catch it at this commit; schedules shift
    # with any timing change); the lease explorer catches it exhaustively (test_paxos_model).
    ("lease-forgets", "leases", "0..29"),
    ("join-early", "baseline", "0..5"),
    ("trust-first-genesis", "forge", "0..3"),
    ("members-govern", "baseline", "0..7"),
    ("readers-send", "baseline", "0..5"),
    ("blind-witness", "withhold", "0..3"),
    ("no-reconcile", "wipe", "0..3"),
    ("silent-reset", "wipe", "0..3"),
    ("delete-beyond", "compact", "0..5"),
    ("send-unsynced", "crash", "0..5"),
])
def test_negative_controls_are_caught(variant: str, scenario: str, seeds: str) -> None:
    """A planted bug makes the sweep fail within a few seeds, naming the invariant."""
    r = sim("sweep", "--seeds", seeds, "--scenario", scenario, "--break", variant,
            "--stop-on-violation", "--jobs", "2")
    assert r.returncode == 1, r.stdout[-3000:]
    invariants = ("agreement|certificates|converged|acked-delivered|alarms|join-complete|"
                  "join-done|admin-only|reader-silent|withholding-detected|acked-stored|acked-kept|"
                  "compacted")
    assert re.search(rf"({invariants}): ", r.stdout), r.stdout[-3000:]
    assert "reproduce: python -m simulations run --seed" in r.stdout
