"""Simulator steps for compaction (issue 17): a member compacts the document's history.

``compact`` has a running writer or admin call the real :meth:`device.document.Document.compact`
(seal the whole document as a STATE, wait for a quorum to store it, commit the point through
Paxos) as an operation in its own task, so crashes, partitions and contention hit it anywhere
on the way. The ``compact`` scenario mixes it with device crashes and long offline periods: a
device that was offline across a point catches up from the state plus the tail, and edits it
made before (sealed or not, acknowledged or not) must still reach everyone. The invariants
``acked-delivered`` and ``converged`` check that at the end, ``compacted`` checks that honest
syncnodes keep nothing a point they applied covers (but its state), and ``alarms`` that no
honest compaction was ever reported as bad.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from simulations.scenarios import Step

if TYPE_CHECKING:
    from simulations.runner import Run


class CompactionSteps:
    """Mixed into :class:`simulations.runner.Run`."""

    async def do_compact(self: Run, step: Step) -> str | None:
        writers = [d for d in self.running_members()
                   if d.doc is not None and d.doc.replica.may_send]
        dev = self.pick(writers, step.pick[0])
        if dev is None:
            return None
        self.op(dev, f"{dev.name} compact", lambda doc: doc.compact())
        return f"{dev.name} compacts"
