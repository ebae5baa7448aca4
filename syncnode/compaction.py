"""Applying a group's decided compaction point: deleting covered envelopes, serving the state.

The newest manifest of a group carries its latest compaction point (:mod:`proto.compaction`;
the manifest rules checked its form and that it only advances). This node applies a point once
it holds the state envelope the point names, with the digest the point names: it then deletes
every envelope the point's vector covers except the state envelope, in one transaction
(:meth:`~syncnode.storage.Storage.compact_envelopes`), and the group's byte usage drops by what
was deleted. Until it holds that envelope, nothing is deleted (a node that missed the state
keeps serving the updates it covers; it applies the point when the state arrives by a device's
Store, a history pull or reconciliation).

A node cannot read the state, so it cannot check that the state really contains what the point
says: the committer (a writer or admin, who signed both the state envelope and the manifest)
answers for that, and members check it (:mod:`device.compaction`); one that is proven wrong is
an alarm with evidence on the members, who then publish their own state so the content lives on.

When a Backfill's watermarks are below the applied point for some sender (the device was
offline, or is a syncnode pulling the history), the state envelope goes first in the page:
delivering it covers the vector, so the tail that follows is deliverable at once and nothing
below the point is asked for again.
"""

from __future__ import annotations

from collections.abc import Mapping

from proto.codec import decode_as
from proto.compaction import CompactionPoint
from proto.envelope import Envelope
from proto.errors import DecodeError
from proto.identity import short_id
from proto.logs import get_logger
from syncnode.groups import Groups, GroupState
from syncnode.metrics import Metrics
from syncnode.storage import Storage, StorageConflict

log = get_logger("syncnode.compaction")


class Compactor:
    def __init__(self, store: Storage, groups: Groups, metrics: Metrics) -> None:
        self.store = store
        self.groups = groups
        self.metrics = metrics

    async def maybe_apply(self, g: GroupState) -> int:
        """Apply ``g``'s decided point if it is new and this node holds its state envelope;
        returns the bytes freed (0: nothing to do, or not yet)."""
        raw = g.manifest.compaction
        if raw is None or raw == g.compacted:
            return 0
        point = CompactionPoint.decode(raw)  # the manifest rules decoded it already
        held = await self.store.envelope(g.group_id, point.state_sender, point.state_seq)
        if held is None:
            log.debug("compaction waits for its state envelope", group=short_id(g.group_id),
                      sender=short_id(point.state_sender), seq=point.state_seq)
            return 0
        if held[0] != point.state_digest:
            # The committer signed two envelopes under one seq: the point names the other.
            # Deleting on its word would drop updates that only the missing state holds.
            log.error("compaction names a state envelope this node holds differently; not "
                      "applied", group=short_id(g.group_id), sender=short_id(point.state_sender),
                      seq=point.state_seq)
            self.metrics.refuse("compaction_state_mismatch")
            return 0
        async with g.lock:
            if g.deleted or g.manifest.compaction != raw or g.compacted == raw:
                return 0  # deleted, a newer point arrived meanwhile, or applied meanwhile
            try:
                freed = await self.store.compact_envelopes(
                    g.group_id, raw, self.deletion(point), (point.state_sender, point.state_seq))
            except StorageConflict as exc:
                log.error("compaction not applied", group=short_id(g.group_id), error=str(exc))
                return 0
            g.bytes_used -= freed
            g.compacted = raw
        log.info("compacted", group=short_id(g.group_id), freed_bytes=freed,
                 senders=len(point.covered), state_sender=short_id(point.state_sender),
                 state_seq=point.state_seq)
        return freed

    def deletion(self, point: CompactionPoint) -> dict[bytes, int]:
        """Per sender, the seqs to delete up to: exactly what the point covers (the
        simulator's ``delete-beyond`` control overrides this)."""
        return point.vector()

    async def state_first(self, g: GroupState, marks: Mapping[bytes, int]) -> Envelope | None:
        """The applied point's state envelope, if ``marks`` are below the point for some
        sender (the envelopes it covers are gone: the state replaces them); else None."""
        raw = await self.store.compaction(g.group_id)  # committed with the deletion (not the cache)
        if raw is None:
            return None
        point = CompactionPoint.decode(raw)
        if marks.get(point.state_sender, 0) >= point.state_seq or \
                all(marks.get(c.sender, 0) >= c.seq for c in point.covered):
            return None
        held = await self.store.envelope(g.group_id, point.state_sender, point.state_seq)
        if held is None:
            return None
        try:
            return decode_as(held[1], Envelope)
        except DecodeError:
            return None
