"""Simulator steps that change who serves a document (issue 16): replacing syncnodes, retiring
the ones that left, and partitioning the old set from the new one.

A scenario with ``spares`` starts that many extra syncnodes that the genesis does not name.
``replace`` has an admin move the document from one of its syncnodes to a spare (the real
:meth:`device.document.Document.replace_syncnode`: add, wait for the new one's history,
remove). ``retire`` stops a syncnode that no member's manifest names any more and deletes its
database for good: from then on, every acknowledged update must live on the syncnodes that
replaced it (the ``acked-delivered`` and ``converged`` invariants check it at the end).
``partition-sets`` cuts the founding syncnodes (and some devices) off from the spares.

``role`` has an admin give another member a role (admin, writer or reader). Every device starts
as an admin (the workload has any member invite and remove), so the non-admins are the ones a
role step demoted; their own invites and removals are then refused, and a reader's edits are
refused locally. The ``admin-only`` and ``reader-silent`` invariants check that no decision of
a non-admin changed anything but its own keys and that no syncnode stored a reader's update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proto.identity import short_id
from proto.manifest import Role
from simulations.scenarios import Step

if TYPE_CHECKING:
    from simulations.runner import Run

REPLACE_WAIT = 60.0
"""How long a replacement waits for the new syncnode's history before it gives up (the step
then leaves the document with one syncnode more; a later replacement continues)."""


class GovernanceSteps:
    """Mixed into :class:`simulations.runner.Run`."""

    replacing = False

    def _named(self: Run) -> set[bytes]:
        """Syncnodes any joined device's current manifest names (down devices included: a
        device that was offline follows the group through them)."""
        return {e.node_id for d in self.world.devices if d.doc is not None
                for e in d.doc.manifest.syncnodes}

    async def do_replace(self: Run, step: Step) -> str | None:
        if self.replacing:
            return None
        actor = self.pick(self.running_admins(), step.pick[0])
        if actor is None:
            return None
        assert actor.doc is not None
        current = [e.node_id for e in actor.doc.manifest.syncnodes]
        spares = [n for n in self.world.nodes if n.spare and not n.used and not n.retired]
        old = self.pick(current, step.pick[1])
        new = self.pick(spares, step.pick[2])
        if new is None:
            return None
        new.used = True
        old_name = self.names([old])
        self.replacing = True

        async def replace(doc: Any) -> Any:
            try:
                return await doc.replace_syncnode(old.hex(), new.ticket, wait=REPLACE_WAIT)
            finally:
                self.replacing = False

        self.op(actor, f"{actor.name} replace {old_name} by {new.name}", replace)
        return f"{actor.name} replaces {old_name} by {new.name}"

    async def do_retire(self: Run, step: Step) -> str | None:
        if any(d.joined and not d.up for d in self.world.devices):
            return None  # an offline device may still need it to follow the group
        named = self._named()
        gone = [n for n in self.world.nodes if not n.retired and n.used
                and n.key.public not in named]
        node = self.pick(gone, step.pick[0])
        if node is None:
            return None
        await self.world.retire_node(node)
        return f"{node.name} retired: stopped, its data deleted"

    async def do_partition_sets(self: Run, step: Step) -> str:
        founding = [n.key.public for n in self.world.nodes if not n.spare]
        spares = [n.key.public for n in self.world.nodes if n.spare]
        devices = [d.endpoint for d in self.world.devices if d.endpoint]
        side = [(step.pick[0] >> i) & 1 for i in range(len(devices))]
        a = founding + [e for e, s in zip(devices, side, strict=True) if s]
        b = spares + [e for e, s in zip(devices, side, strict=True) if not s]
        self.net.partition(a, b)
        self.stats["partitions"] += 1
        return f"partition old {{{self.names(a)}}} | new {{{self.names(b)}}}"


    async def do_role(self: Run, step: Step) -> str | None:
        actor = self.pick(self.running_admins(), step.pick[0])
        if actor is None:
            return None
        assert actor.doc is not None
        targets = [d for d in self.world.devices if d is not actor and d.joined
                   and actor.doc.manifest.device(d.fingerprint) is not None]
        target = self.pick(targets, step.pick[1])
        if target is None:
            return None
        role = (Role.ADMIN, Role.WRITER, Role.READER)[step.pick[2] % 3]
        self.op(actor, f"{actor.name} makes {target.name} {role.name.lower()}",
                lambda doc: doc.set_role(short_id(target.fingerprint), role))
        return f"{actor.name} makes {target.name} {role.name.lower()}"
