"""The envelope store: a group's application messages (encrypted CRDT updates), kept by
``(sender, seq)`` and served by per-sender watermark.

A syncnode checks what it can without the group's keys: the sender is a current member, the
envelope's signature verifies under the sender's key, the sender is no reader in the manifest of
the envelope's epoch (:func:`proto.manifest.may_send`: a reader sends no envelopes at all, since
we cannot see what kind of payload one holds), the epoch is not ahead of this node's log, and
the group stays under its byte quota. Storing is idempotent (the same envelope again is
acknowledged again); a different envelope under a taken ``(sender, seq)`` is a CONFLICT.

**Visible before durable.** A new envelope is pushed to the group's subscribers as soon as the
storage has decided it is new, in parallel with the group commit's fsync; the sender's
acknowledgement (a signed statement that the node holds it) waits for the commit. So a push
means "authentic, in this node's order, being stored", and only an ack means "durable here".
Nothing acknowledged can be lost this way: if the node crashes before the commit, the pushed
envelope is not stored and not acknowledged, the sender's outbox keeps it until a quorum
acknowledged it and sends it again, and receivers that applied it early ignore the duplicate.

Both answers are signed statements (:mod:`syncnode.statements`): the ack once the envelope is
durable, and each backfill page with what it returns, so withholding leaves evidence.
For anti-entropy (:mod:`proto.antientropy`) it also answers a digest of each group's envelopes
and their per-sender summary, both read from the summary the storage keeps with the envelopes
(one row per sender: never a scan of the envelopes), to the group's syncnodes and members.

An envelope covered by the group's applied compaction point is acknowledged without being
kept (the state holds it: a device resending an old outbox loses nothing), and a backfill from
below the point gets the state envelope first (:mod:`syncnode.compaction`).
"""

from __future__ import annotations

from proto.antientropy import (
    Digests,
    FetchDigests,
    FetchMarks,
    GroupDigest,
    Marks,
    Summary,
    group_digest,
    marks_of,
)
from proto.codec import decode_as, encode
from proto.envelope import Envelope
from proto.manifest import Manifest, may_send
from proto.messages import ErrorCode
from proto.service import MAX_PAGE, Backfill, BackfillPage, Stored
from syncnode.compaction import Compactor
from syncnode.config import Limits
from syncnode.decisions import PAGE_BYTES
from syncnode.fanout import Publish
from syncnode.groups import Groups, may_read, require_member
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.statements import Notary
from syncnode.storage import Storage, StorageConflict


class Envelopes:
    def __init__(self, store: Storage, groups: Groups, limits: Limits, metrics: Metrics, *,
                 publish: Publish, notary: Notary, compactor: Compactor) -> None:
        self.notary = notary
        self.store = store
        self.compactor = compactor
        self.groups = groups
        self.limits = limits
        self.metrics = metrics
        self.publish = publish

    async def store_envelope(self, session: Session, msg: Envelope) -> Stored:
        g = await self.groups.require(msg.group_id)
        require_member(session, g)
        if msg.epoch > g.top:
            self.groups.behind(session, g)
            raise RequestError(ErrorCode.NOT_FOUND,
                               f"envelope epoch {msg.epoch} is ahead of this syncnode's "
                               f"{g.top}; send the decision first or retry")
        sender = g.manifest.device(msg.sender)
        if sender is None:
            raise RequestError(ErrorCode.UNAUTHORIZED, "sender is not a current member")
        if msg.seq < 1:
            raise RequestError(ErrorCode.INVALID, "seq counts from 1")
        if not msg.verify(sender.sig_pub):
            raise RequestError(ErrorCode.UNAUTHORIZED, "envelope signature does not verify")
        at_epoch = (await self._manifest_at(g.group_id, msg.epoch)) or g.manifest
        role = at_epoch.device(msg.sender)
        if role is None or not may_send(role):
            self.metrics.refuse("reader_update")
            raise RequestError(ErrorCode.UNAUTHORIZED,
                               f"the sender is a reader at epoch {msg.epoch}: readers' "
                               "updates are not accepted")
        raw = encode(msg)
        if g.bytes_used + len(raw) > self.limits.max_bytes_per_group:
            raise RequestError(ErrorCode.QUOTA_EXCEEDED,
                               f"group is over its {self.limits.max_bytes_per_group} byte quota")
        try:
            # Pushed to subscribers as soon as the storage knows it is new, while the group
            # commit flushes (``staged``); acknowledged to the sender only once durable.
            new = await self.store.store_envelope(msg.group_id, msg.sender, msg.seq,
                                                  msg.digest(), raw,
                                                  staged=lambda: self.publish(g, msg))
        except StorageConflict:
            raise RequestError(ErrorCode.CONFLICT,
                               f"sender already stored a different seq {msg.seq}") from None
        if new:
            g.bytes_used += len(raw)
            self.metrics.messages_stored.inc()
        return await self.notary.ack(msg)

    async def _manifest_at(self, group_id: bytes, epoch: int) -> Manifest | None:
        """The manifest the envelope's epoch names (None if this node lacks it: the current
        one then decides, which is stricter only for a reader promoted since)."""
        try:
            return await self.groups.manifest_at(group_id, epoch)
        except KeyError:
            return None

    async def backfill(self, session: Session, msg: Backfill) -> BackfillPage:
        """For current members, and the group's own syncnodes: one added to the group pulls
        the history from the others (:mod:`syncnode.history`), as it reads their log."""
        g = await self.groups.require(msg.group_id)
        if not any(s.node_id == session.remote_id for s in g.manifest.syncnodes):
            require_member(session, g)
        marks = {w.sender: w.seq for w in msg.watermarks}
        limit = max(1, min(msg.limit, MAX_PAGE))
        at = await self.notary.stamp()  # before reading (proto.holdings)
        first = await self.compactor.state_first(g, marks)
        if first is not None and limit == 1:
            raws, more = [], True
        else:
            raws, more = await self.store.envelopes_after(
                g.group_id, marks, limit=limit - (first is not None), max_bytes=PAGE_BYTES)
        out = tuple(decode_as(raw, Envelope) for raw in raws)
        if first is not None:  # the state first: it covers what this device lacks below it
            out = (first, *(e for e in out if (e.sender, e.seq) != (first.sender, first.seq)))
        self.metrics.messages_served.inc(len(out))
        covered = await self.notary.covered(g.group_id)  # after the read (Notary.covered)
        return BackfillPage(out, more, self.notary.incarnation, at,
                            await self.notary.backfill_signature(msg, at, out, more, covered),
                            covered)

    async def summary(self, group_id: bytes) -> dict[bytes, Summary]:
        return {s: Summary(*v) for s, v in (await self.store.envelope_summary(group_id)).items()}

    async def digests(self, session: Session, msg: FetchDigests) -> Digests:
        """Digests of the asked groups this node hosts and the session may read (the group's
        syncnodes and members); the others are left out. Cost: one summary row per sender
        of each group asked, at most :data:`proto.antientropy.MAX_DIGESTS` groups."""
        out = []
        for gid in dict.fromkeys(msg.group_ids):
            g = await self.groups.get(gid)
            if g is None or not may_read(session, g.manifest):
                continue
            summary = await self.summary(gid)
            out.append(GroupDigest(gid, group_digest(summary),
                                   sum(s.envelopes for s in summary.values())))
        return Digests(tuple(out))

    async def marks(self, session: Session, msg: FetchMarks) -> Marks:
        g = await self.groups.require(msg.group_id)
        if not may_read(session, g.manifest):
            self.metrics.refuse("marks_not_member")
            raise RequestError(ErrorCode.UNAUTHORIZED,
                               "only a group's syncnodes and members read its marks")
        senders, more = marks_of(await self.summary(g.group_id))
        return Marks(g.group_id, senders, more)
