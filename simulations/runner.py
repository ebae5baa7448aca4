"""One simulated run: set the world up, play the seed's plan, heal, check.

Determinism: the plan comes from the seed; all protocol randomness from :mod:`proto.entropy`
seeded with it; the network's faults from its own seeded streams; time from trio's
``MockClock`` (autojump); trio's scheduler is put in its deterministic mode and seeded (what
its Hypothesis integration does); SQLite runs on the trio thread. The process must run with a
fixed ``PYTHONHASHSEED`` (the CLI sees to it), since sets of bytes iterate in hash order. MLS
encryption draws its own randomness inside the Rust library, so ciphertext *bytes* differ from
run to run; their lengths do not, and the trace records lengths.

The trace is the list of steps with their outcomes plus the network's frame-level trace; a
run's identity is the hash of both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from device.document import Document
from device.errors import NotAllowed
from proto import entropy
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import configure_logging
from proto.manifest import Role
from proto.transport.memory import MemoryNetwork
from simulations import broken
from simulations.compaction_steps import CompactionSteps
from simulations.governance import GovernanceSteps
from simulations.invariants import Checker, Violation, markers
from simulations.scenarios import QUIET, SCENARIOS, Scenario, Step, plan
from simulations.world import SimDevice, SimNode, World

MAX_DEVICES = 6
OP_TIMEOUT = 90.0
QUIESCE_TIMEOUT = 400.0
COLLUDING_QUIESCE = 60.0
JUMPS = (-2 * 86400.0, -3600.0, -600.0, 600.0, 3600.0, 3 * 86400.0)
EDIT_KINDS = ("text", "map", "list", "counter")


@dataclass
class Result:
    seed: int
    scenario: str
    steps: int
    violations: list[Violation]
    trace: list[str]
    trace_hash: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


class Stuck(Exception):
    """A run used up its real-time budget: something spins without letting time pass."""


class Run(GovernanceSteps, CompactionSteps):
    def __init__(self, seed: int, scenario: Scenario, faults: frozenset[str], steps: int,
                 root: Path, variant: str | None) -> None:
        self.seed = seed
        self.scenario = scenario
        self.faults = faults
        self.plan = plan(seed, steps, scenario, faults)
        self.root = root
        self.variant = variant
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.stats: dict[str, int] = {"edits": 0, "ops_ok": 0, "ops_failed": 0, "crashes": 0,
                                      "partitions": 0, "skipped": 0}
        self.net = MemoryNetwork(seed, QUIET, payload_digests=False)
        self.world: World
        self.checker: Checker

    # -- trace -----------------------------------------------------------------------------------

    def event(self, what: str) -> None:
        self.trace.append(f"{trio.current_time():10.4f} {what}")

    # -- the run ---------------------------------------------------------------------------------

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.net.run)
            self.world = World(self.root, self.net, nursery,
                               service_factory=broken.service_factory(self.variant))
            self.checker = Checker(self.world, colluding=self.scenario.colluding,
                                   joins_complete=self.scenario.joins_complete,
                                   acked_everywhere=self.scenario.acked_everywhere)
            with broken.planted(self.variant, self.world):
                await self.play_all()
            nursery.cancel_scope.cancel()

    async def play_all(self) -> None:
        await self.setup()
        self.net.faults = self.scenario.network_faults(self.faults)
        for step in self.plan:
            if self.violations:  # found already (a join's checks): the trace ends there
                break
            await self.play(step)
            await trio.sleep(step.pause)
            await self.restart_due(step.index)
            self.note_acks()
            found = self.checker.continuous()
            if found:
                self.fail(found)
                break
        if not self.violations:
            await self.quiesce()
            self.fail(self.checker.final())
        self.summary()

    def fail(self, found: list[Violation]) -> None:
        for v in found:
            self.event(f"VIOLATION {v}")
        self.violations += found

    async def setup(self) -> None:
        for behaviour in self.scenario.nodes:
            node = self.world.add_node(behaviour)
            await self.world.start_node(node)
        founder = self.world.add_device()
        await self.world.start_device(founder)
        assert founder.device is not None
        with entropy.wall_clock(founder.clock):  # the device's clock, not the runner's
            founder.doc = await founder.device.create_document(
                [n.ticket for n in self.world.nodes], name="sim")
        founder.joined = True
        self.world.group_id = founder.doc.group_id
        for _ in range(self.scenario.spares):
            await self.world.start_node(self.world.add_node(spare=True))
        self.event(f"setup: nodes {' '.join(n.behaviour for n in self.world.nodes)}; "
                   f"{founder.name} created the document")
        for _ in range(2):
            if not self.violations:
                await self.join(founder, wait=True)

    # -- steps -----------------------------------------------------------------------------------

    async def play(self, step: Step) -> None:
        handler = getattr(self, "do_" + step.kind.replace("-", "_"))
        outcome = await handler(step)
        if outcome is None:
            self.stats["skipped"] += 1
            outcome = "skipped"
        self.event(f"step {step.index:3d} {step.kind}: {outcome}")

    def pick(self, items: list[Any], n: int) -> Any:
        return items[n % len(items)] if items else None

    def running_members(self) -> list[SimDevice]:
        return [d for d in self.world.devices if d.up and d.active]

    def running_admins(self) -> list[SimDevice]:
        """Running members that are admins now (only admins invite; a role step may have
        demoted any device)."""
        return [d for d in self.running_members() if d.doc is not None
                and (me := d.doc.manifest.device(d.fingerprint)) is not None
                and me.role == Role.ADMIN]

    async def do_idle(self, step: Step) -> str:
        await trio.sleep(5.0)
        return "5 s"

    async def do_edit(self, step: Step) -> str | None:
        dev = self.pick(self.running_members(), step.pick[0])
        if dev is None:
            return None
        kind = EDIT_KINDS[step.pick[1] % len(EDIT_KINDS)]
        marker = f"MARK-{dev.name}-{dev.counter}"
        dev.counter += 1
        where = step.pick[2]

        def edit(e: Any) -> None:
            e.map("m").insert(marker, dev.counter)
            if kind == "text":
                t = e.text("t")
                t.insert(where % (t.len_unicode + 1), marker + " ")
            elif kind == "list":
                lst = e.list("l")
                lst.insert(where % (len(lst) + 1), marker)
            elif kind == "counter":
                e.counter("c").increment(1 + where % 5)

        assert dev.doc is not None
        try:
            with entropy.wall_clock(dev.clock):
                dev.doc.change(edit)
        except NotAllowed:
            return f"{dev.name} {kind}: refused, it is a reader"
        dev.made.append(marker)
        self.stats["edits"] += 1
        return f"{dev.name} {kind} {marker}"

    async def do_rotate(self, step: Step) -> str | None:
        dev = self.pick(self.running_members(), step.pick[0])
        if dev is None:
            return None
        self.op(dev, f"{dev.name} rotate", lambda doc: doc.rotate_keys())
        return f"{dev.name} rotates keys"

    async def do_rotate_race(self, step: Step) -> str | None:
        members = self.running_members()
        if len(members) < 2:
            return None
        a = self.pick(members, step.pick[0])
        b = self.pick([m for m in members if m is not a], step.pick[1])
        for dev in (a, b):
            self.op(dev, f"{dev.name} rotate (race)", lambda doc: doc.rotate_keys())
        return f"{a.name} and {b.name} rotate at once"

    async def do_lease_race(self, step: Step) -> str | None:
        """A rival's commit in flight when the device holding the fast path's lease (it
        decided the last slot) commits again, a few milliseconds later: the lease must stop
        the rival or the rival must break the lease, never both values decided."""
        members = self.running_members()
        holders = [m for m in members if m.doc is not None
                   and m.doc.membership.leases.holds(m.doc.group_id, m.doc.epoch + 1)]
        a = self.pick(holders, step.pick[0])
        b = self.pick([m for m in members if m is not a], step.pick[1])
        if a is None or b is None:
            return None
        self.op(b, f"{b.name} rotate (rival)", lambda doc: doc.rotate_keys())
        delay = (step.pick[2] % 40) / 1000
        await trio.sleep(delay)
        self.op(a, f"{a.name} rotate (lease)", lambda doc: doc.rotate_keys())
        return f"{b.name} rotates, {a.name} (lease holder) {delay * 1000:.0f} ms later"

    async def do_add(self, step: Step) -> str | None:
        inviter = self.pick(self.running_admins(), step.pick[0])
        if inviter is None or len(self.world.devices) >= MAX_DEVICES:
            return None
        return await self.join(inviter, wait=False)

    async def do_add_vanish(self, step: Step) -> str | None:
        inviter = self.pick(self.running_admins(), step.pick[0])
        if inviter is None or len(self.world.devices) >= MAX_DEVICES:
            return None
        return await self.join(inviter, wait=False, vanish=True) + ", then crashes"

    async def join(self, inviter: SimDevice, *, wait: bool, vanish: bool = False) -> str:
        """``inviter`` invites a new device. ``vanish``: the inviter crashes the instant it
        applies the next decision (normally the add), before it can send anything else."""
        assert inviter.doc is not None
        dev = self.world.add_device()
        await self.world.start_device(dev)
        with entropy.wall_clock(inviter.clock):
            # New devices join as admins, so that every one may invite and remove until a
            # role step demotes it (the role steps make the readers and writers).
            ticket = inviter.doc.invite(ttl=3600, role=Role.ADMIN)
        had = markers(inviter.doc.value())  # a completed join holds at least these
        done = trio.Event()

        async def go() -> None:
            assert dev.device is not None
            dev.joining = True
            try:
                with trio.fail_after(OP_TIMEOUT):
                    dev.doc = await dev.device.join(ticket)
                dev.joined = True
                self.stats["ops_ok"] += 1
                self.event(f"{dev.name} joined at epoch {dev.doc.epoch}")
                missing = had - markers(dev.doc.value())
                if missing:
                    self.fail([Violation("join-complete", f"{dev.name}'s join returned without "
                                         f"{len(missing)} updates its inviter held, e.g. "
                                         f"{sorted(missing)[:3]}")])
            except (SyncnodeError, trio.TooSlowError) as exc:
                self.stats["ops_failed"] += 1
                self.event(f"{dev.name} join failed: {type(exc).__name__}: {exc}")
            finally:
                dev.joining = False
                done.set()
            if self.scenario.joins_complete and not dev.joined:
                self.fail(self.checker.joins_done([dev]))

        assert dev.device is not None
        dev.device.spawn(go)
        if vanish:
            epoch, device = inviter.doc.epoch, inviter.device

            async def crash_on_add() -> None:
                assert inviter.doc is not None
                with trio.move_on_after(OP_TIMEOUT):
                    await inviter.doc.wait_epoch(epoch + 1)
                    if inviter.device is device:  # not crashed and restarted meanwhile
                        await self.world.crash_device(inviter, power_loss=False)
                        self.stats["crashes"] += 1
                        self.event(f"{inviter.name} crashed as its add was decided")

            self.world.nursery.start_soon(crash_on_add)
        if wait:
            await done.wait()
            if not dev.joined and not self.violations:
                raise RuntimeError(f"setup: {dev.name} could not join without faults")
        return f"{inviter.name} invites {dev.name}"

    async def do_remove(self, step: Step) -> str | None:
        members = self.running_members()
        actor = self.pick(members, step.pick[0])
        if actor is None:
            return None
        assert actor.doc is not None
        in_manifest = {d.fingerprint for d in actor.doc.manifest.devices}
        targets = [d for d in self.world.devices if d is not actor and d.joined
                   and d.fingerprint in in_manifest]
        if len(in_manifest) < 3 or not targets:
            return None
        target = self.pick(targets, step.pick[1])
        self.op(actor, f"{actor.name} remove {target.name}",
                lambda doc: doc.remove_device(short_id(target.fingerprint)))
        return f"{actor.name} removes {target.name}"

    def op(self, dev: SimDevice, what: str, fn: Callable[[Document], Awaitable[Any]]) -> None:
        """Run a membership operation in the device's own task tree (a crash ends it)."""
        doc, device = dev.doc, dev.device
        assert doc is not None and device is not None

        async def go() -> None:
            try:
                with trio.fail_after(OP_TIMEOUT):
                    result = await fn(doc)
                self.stats["ops_ok"] += 1
                self.event(f"{what}: done, epoch {result}")
            except (SyncnodeError, trio.TooSlowError) as exc:
                self.stats["ops_failed"] += 1
                self.event(f"{what}: failed: {type(exc).__name__}: {exc}")

        device.spawn(go)

    def endpoints(self) -> list[bytes]:
        return [n.key.public for n in self.world.nodes] + [
            d.endpoint for d in self.world.devices if d.endpoint]

    async def do_partition(self, step: Step) -> str:
        ends = self.endpoints()
        bits = step.pick[0]
        side = [(bits >> i) & 1 for i in range(len(ends))]
        a = [e for e, s in zip(ends, side, strict=True) if s]
        b = [e for e, s in zip(ends, side, strict=True) if not s]
        self.net.partition(a, b)
        self.stats["partitions"] += 1
        return f"partition {{{self.names(a)}}} | {{{self.names(b)}}}"

    async def do_cut_one_way(self, step: Step) -> str:
        ends = self.endpoints()
        src = self.pick(ends, step.pick[0])
        dst = self.pick([e for e in ends if e != src], step.pick[1])
        self.net.block(src, dst)
        self.stats["partitions"] += 1
        return f"cut {self.names([src])} -> {self.names([dst])}"

    async def do_heal(self, step: Step) -> str:
        self.net.heal()
        return "network healed"

    def names(self, ends: list[bytes]) -> str:
        by_id = {n.key.public: n.name for n in self.world.nodes}
        by_id.update({d.endpoint: d.name for d in self.world.devices if d.endpoint})
        return " ".join(by_id[e] for e in ends)

    async def do_node_crash(self, step: Step) -> str | None:
        node = self.pick([n for n in self.world.nodes if n.up], step.pick[0])
        if node is None:
            return None
        await self.world.crash_node(node)
        self.stats["crashes"] += 1
        return f"{node.name} crashed"

    async def do_node_restart(self, step: Step) -> str | None:
        node = self.pick([n for n in self.world.nodes if not n.up and not n.retired],
                         step.pick[0])
        if node is None:
            return None
        await self.world.start_node(node)
        return f"{node.name} restarted"

    async def do_node_wipe(self, step: Step) -> str | None:
        """Wipe a syncnode's storage (same key), unless an earlier wipe is not reconciled
        yet: the promise holds for losses spaced by the reconciliation time, not for two
        copies lost at once."""
        node = self.pick([n for n in self.world.nodes if n.up and not n.retired], step.pick[0])
        if node is None or self.checker.acked_stored():
            return None
        await self.world.wipe_node(node)
        self.stats["crashes"] += 1
        return f"{node.name} wiped (same key)"

    async def do_device_crash(self, step: Step, offline_steps: int = 0) -> str | None:
        dev = self.pick([d for d in self.world.devices if d.up and d.joined], step.pick[0])
        if dev is None:
            return None
        power_loss = step.pick[1] % 2 == 0
        await self.world.crash_device(dev, power_loss=power_loss)
        self.stats["crashes"] += 1
        if offline_steps:
            dev.restart_at = step.index + offline_steps
        how = "power loss" if power_loss else "crash"
        return f"{dev.name} {how}" + (f", offline for {offline_steps} steps"
                                      if offline_steps else "")

    async def do_device_offline(self, step: Step) -> str | None:
        return await self.do_device_crash(step, offline_steps=10 + step.pick[2] % 30)

    async def do_device_restart(self, step: Step) -> str | None:
        dev = self.pick([d for d in self.world.devices if not d.up and d.joined
                         and d.restart_at is None], step.pick[0])
        if dev is None:
            return None
        await self.restart_device(dev)
        return f"{dev.name} restarted"

    async def restart_device(self, dev: SimDevice) -> None:
        dev.restart_at = None
        await self.world.start_device(dev)
        if dev.doc is not None:  # edits lost with an unsynced tail are no longer expected
            have = markers(dev.doc.value())
            dev.made = [m for m in dev.made if m in have]

    async def restart_due(self, index: int) -> None:
        for dev in self.world.devices:
            if dev.restart_at is not None and dev.restart_at <= index and not dev.up:
                await self.restart_device(dev)
                self.event(f"{dev.name} back online")

    async def do_clock_jump(self, step: Step) -> str:
        machines: list[SimNode | SimDevice] = [*self.world.nodes, *self.world.devices]
        target = self.pick(machines, step.pick[0])
        jump = JUMPS[step.pick[1] % len(JUMPS)]
        target.clock.offset += jump
        return f"{target.name}'s wall clock jumps {jump:+.0f} s"

    # -- bookkeeping -----------------------------------------------------------------------------

    def note_acks(self) -> None:
        for dev in self.world.devices:
            if dev.up and dev.active:
                assert dev.doc is not None
                s = dev.doc.sync_status()
                if s.unsent == 0 and s.outbox == 0:
                    dev.acked.update(dev.made)
                    dev.made.clear()
                    dev.acked_seq = max(dev.acked_seq, dev.doc.next_seq - 1)

    async def quiesce(self) -> None:
        """Heal everything, restart everyone, let traffic settle (bounded)."""
        self.net.heal()
        self.net.faults = QUIET
        self.net._link_faults.clear()
        for node in self.world.nodes:
            if not node.up and not node.retired:
                await self.world.start_node(node)
        for dev in self.world.devices:
            if dev.joined and not dev.up:
                await self.restart_device(dev)
        self.event("quiesce: network healed, everyone restarted")
        if self.scenario.colluding:
            # Split devices never agree, and their refused updates never leave the outbox:
            # give detection a fixed while instead of waiting for a quiet that cannot come.
            await trio.sleep(COLLUDING_QUIESCE)
            self.event("detection window over")
            return
        deadline = trio.current_time() + QUIESCE_TIMEOUT
        while trio.current_time() < deadline:
            await trio.sleep(1.0)
            self.note_acks()
            if self.settled():
                self.event("quiet")
                await self.detection_window()
                return
        self.event("did not settle")
        self.diagnose()

    async def detection_window(self) -> None:
        """With a withholding syncnode, give every device time for its next heads check
        (``holdings_interval``) after the last acks (invariant ``withholding-detected``)."""
        if any(n.behaviour == "withhold" for n in self.world.nodes):
            await trio.sleep(2 * self.world.config.holdings_interval + 1.0)
            self.event("detection window over")

    def diagnose(self) -> None:
        """Who holds what, for a run that did not settle."""
        for node in self.world.nodes:
            log = self.world.node_log(node)
            self.event(f"  {node.name} ({node.behaviour}, {'up' if node.up else 'down'}): "
                       f"decided up to slot {max(log)}")
        for dev in self.world.devices:
            if dev.doc is None:
                self.event(f"  {dev.name}: {'up' if dev.up else 'down'}, no document")
                continue
            s = dev.doc.sync_status()
            links = self.names(sorted(dev.doc.clients))
            self.event(f"  {dev.name}: {dev.doc.status} epoch {dev.doc.epoch}, unsent {s.unsent}, "
                       f"outbox {s.outbox}, linked to [{links}]")

    def settled(self) -> bool:
        if any(d.joining for d in self.world.devices):
            return False
        members = self.world.members()
        if not members:
            return True
        docs = [d.doc for d in members if d.doc is not None]
        for doc in docs:
            s = doc.sync_status()
            if s.unsent or s.outbox:
                return False
        if self.scenario.colluding:
            return True
        if self.scenario.acked_everywhere and self.checker.acked_stored():
            return False
        return (len({d.epoch for d in docs}) == 1
                and all(d.value() == docs[0].value() for d in docs[1:]))

    def summary(self) -> None:
        members = self.world.members()
        epochs = sorted({d.doc.epoch for d in members if d.doc is not None})
        self.stats.update(virtual_s=round(trio.current_time()), members=len(members),
                          devices=len(self.world.devices), epochs=epochs[-1] if epochs else 0)
        self.event(f"end: {len(members)} members at epochs {epochs}; "
                   f"{self.stats['edits']} edits")
        for dev in members:
            assert dev.doc is not None
            canonical = json.dumps(dev.doc.value(), sort_keys=True, default=repr)
            digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
            self.event(f"{dev.name}: epoch {dev.doc.epoch} document {digest}")


def run(seed: int, *, steps: int = 60, scenario: str = "baseline",
        faults: frozenset[str] = frozenset(), variant: str | None = None,
        keep: Path | None = None, budget: float = 120.0) -> Result:
    """Run one seed and return its result (never raises for a violation)."""
    sc = SCENARIOS[scenario]
    configure_logging(os.environ.get("SIM_LOG_LEVEL", "critical"), json=True)
    root = Path(tempfile.mkdtemp(prefix=f"sim-{seed}-", dir=_tmpfs()))
    started = time.perf_counter()
    r = Run(seed, sc, frozenset(faults) | sc.faults, steps, root, variant)
    import trio._core._run as trio_run  # see the module docstring

    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    trio_run._r.seed(seed)
    random.seed(seed)
    def out_of_time(_signum: int, _frame: Any) -> None:
        raise Stuck(f"no end after {budget:.0f} s of real time (livelock?) at virtual "
                    f"time {r.trace[-1].split()[0] if r.trace else 0}")

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        with entropy.simulated(seed):
            trio.run(r.main, clock=trio.testing.MockClock(autojump_threshold=0))
    except Exception as exc:  # a crash of the code under test is a finding, not a tool error
        leaf = _leaf(exc)
        r.trace.append(f"CRASH {type(leaf).__name__}: {leaf}")
        r.trace += traceback.format_exception(leaf)[-8:]
        r.violations.append(Violation("no-crash", f"{type(leaf).__name__}: {leaf}"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.copytree(root, keep, dirs_exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)
    h = hashlib.sha256()
    for line in r.trace:
        h.update(line.encode() + b"\n")
    h.update(r.net.trace_digest().encode())
    r.stats["real_s"] = round(time.perf_counter() - started, 2)
    return Result(seed, scenario, steps, r.violations, r.trace, h.hexdigest(), r.stats)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _tmpfs() -> str | None:
    """/dev/shm when there is one: fsync there costs nothing, and nothing here outlives the
    run (crash-consistency comes from the file copies the world takes, not from the disk)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
