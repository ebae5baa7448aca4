"""Named scenarios: which faults a run injects, how often, and who is Byzantine.

A run's plan (its list of steps) is drawn from the scenario's weights with the run's seed
before anything executes, so a seed names the same plan on every machine; a step that does not
apply when its turn comes (removing a device from a two-member document) is recorded as
skipped. ``--faults`` adds fault classes to any scenario.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from proto.transport.memory import Faults

WORKLOAD = {"edit": 40, "rotate": 3, "add": 3, "remove": 2, "idle": 4}
"""Every scenario's workload; the fault classes below add their own steps."""

FAULT_STEPS: dict[str, dict[str, int]] = {
    "partition": {"partition": 4, "cut-one-way": 3, "heal": 4},
    "lossy": {},  # network-wide per-frame faults, see LOSSY
    "crash": {"node-crash": 3, "node-restart": 3, "device-crash": 3, "device-offline": 1,
              "device-restart": 3, "add-vanish": 2},
    "clock": {"clock-jump": 5},
    "contention": {"rotate-race": 6},
}
LOSSY = Faults(drop=0.03, duplicate=0.03, min_delay=0.001, max_delay=0.04, reorder=0.05,
               reorder_delay=0.05, ordered=True)
QUIET = Faults(ordered=True)
"""No faults, QUIC-like streams (what a simulated network always is)."""
MILD = Faults(min_delay=0.001, max_delay=0.01, ordered=True)


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    faults: frozenset[str] = frozenset()
    nodes: tuple[str, ...] = ("honest", "honest", "honest")
    """Behaviour of each syncnode (see :data:`simulations.world.SERVICES`)."""
    colluding: bool = False
    """A Byzantine majority: devices may split, and must then detect it."""
    extra: dict[str, int] = field(default_factory=dict)
    spares: int = 0
    """Syncnodes started besides ``nodes``, not named by the genesis (for replacements)."""
    acked_everywhere: bool = False
    """Invariant ``acked-stored``: once quiet, every honest syncnode of the document holds every
    acknowledged update (anti-entropy, issue 17)."""
    joins_complete: bool = False
    """Nothing here may stop a join (no network or crash faults, an honest majority): a device
    that was added must complete its join (invariant ``join-done``)."""

    def network_faults(self, faults: frozenset[str]) -> Faults:
        return LOSSY if "lossy" in faults else MILD if faults else QUIET

    def weights(self, faults: frozenset[str]) -> dict[str, int]:
        w = dict(WORKLOAD)
        for f in sorted(faults):
            for kind, weight in FAULT_STEPS[f].items():
                w[kind] = w.get(kind, 0) + weight
        for kind, weight in self.extra.items():
            w[kind] = w.get(kind, 0) + weight
        return w


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("baseline", "no faults: edits, joins, removals, key rotations, role changes",
             joins_complete=True, extra={"role": 3}),
    Scenario("partition", "symmetric and one-way partitions, and heals",
             frozenset({"partition", "contention"})),
    Scenario("lossy", "frames dropped, duplicated, delayed and reordered",
             frozenset({"lossy", "contention"})),
    Scenario("crash", "syncnode and device crashes (some power losses), long offline periods",
             frozenset({"crash", "contention"})),
    Scenario("clock", "wall-clock jumps of syncnodes and devices",
             frozenset({"clock"})),
    Scenario("withhold", "one syncnode stores everything and delivers nothing",
             frozenset({"contention"}), nodes=("withhold", "honest", "honest"),
             joins_complete=True),
    Scenario("stale", "one syncnode serves a decided log frozen at slot 1",
             frozenset({"contention"}), nodes=("honest", "stale", "honest"),
             joins_complete=True),
    Scenario("corrupt", "one syncnode's frames get a flipped byte (20% of them)",
             frozenset({"contention"}), nodes=("honest", "honest", "corrupt"),
             joins_complete=True),
    Scenario("forge", "one syncnode serves a forged genesis under the group's id to anyone "
             "(joiners read it first)", frozenset({"contention"}),
             nodes=("forge", "honest", "honest"), joins_complete=True, extra={"add": 6}),
    Scenario("equivocate", "two colluding syncnodes (a majority) accept two values per slot",
             frozenset({"contention"}), nodes=("equivocate", "equivocate", "honest"),
             colluding=True, extra={"rotate-race": 10}),
    Scenario("leases", "the fast path under contention: the lease holder commits again "
             "while a rival's commit is in flight; lossy network", frozenset({"lossy"}),
             extra={"lease-race": 12, "rotate": 6}),
    Scenario("migrate", "the document moves to spare syncnodes one replacement at a time "
             "while devices edit; syncnodes crash, old and new sets are partitioned, and "
             "replaced syncnodes retire (stopped, data deleted)",
             frozenset({"crash", "partition"}), spares=3,
             extra={"replace": 8, "retire": 4, "partition-sets": 2}),
    Scenario("wipe", "a syncnode's storage is wiped mid-run and it restarts with the same "
             "key (never while an earlier wipe is not yet reconciled), while devices edit; "
             "devices crash and go offline", frozenset({"contention"}), acked_everywhere=True,
             extra={"node-wipe": 5, "device-crash": 2, "device-restart": 2}),
    Scenario("compact", "compactions of the history under syncnode and device crashes, "
             "long offline periods and partitions", frozenset({"crash", "partition"}),
             extra={"compact": 8, "device-offline": 3}),
    Scenario("chaos", "every fault class at once, one withholding syncnode, role changes",
             frozenset({"partition", "lossy", "crash", "clock", "contention"}),
             nodes=("honest", "withhold", "honest"), extra={"role": 3}),
]}


@dataclass(frozen=True)
class Step:
    index: int
    kind: str
    pick: tuple[int, ...]
    """Random numbers the step resolves its targets with when it runs."""
    pause: float
    """Virtual seconds to let the world run after the step."""


def plan(seed: int, steps: int, scenario: Scenario, faults: frozenset[str]) -> list[Step]:
    rng = random.Random(f"plan/{seed}")
    weights = scenario.weights(faults)
    kinds = sorted(weights)
    out = []
    for i in range(steps):
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        pick = tuple(rng.randrange(1 << 30) for _ in range(4))
        pause = rng.choice((0.0, 0.01, 0.05, 0.2, 0.5, 1.0, 3.0))
        out.append(Step(i, kind, pick, pause))
    return out
