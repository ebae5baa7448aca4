"""Compaction of a document's history on the syncnodes: a committed whole-document state.

Without it a syncnode keeps every envelope of a group for good, and a device that was offline
replays every update it missed. :meth:`Compactor.compact` (``doc.compact()``, ``syncdevice
compact DOC``, and automatically, :meth:`Compactor.run`) does three steps:

1. **seal**: flush our unsent edits, then seal the whole document as a ``STATE`` of ours, in
   one synchronous step, so the vector it covers (everything delivered here, our own seqs up
   to the state's included) matches the snapshot exactly;
2. **store**: wait until a quorum of syncnodes stored that envelope (it is durable, so the
   point can never name a state that is lost);
3. **commit** through Paxos an MLS key update whose manifest carries the
   :class:`proto.compaction.CompactionPoint` (covered vector, the state envelope's id and
   digest, the hash of its body, its CRDT version). The manifest rules let writers and admins
   do that, and only forward. If another device's commit wins the slot, ours is rebuilt on
   the new epoch unless a point decided meanwhile already covers ours.

After the decision the syncnodes delete the covered envelopes (:mod:`syncnode.compaction`),
and a device that backfills from below the point gets the state first. Members check the
point against what they hold (:mod:`device.compaction_check`); one proven wrong raises the
``bad-compaction`` alarm with :class:`proto.compaction.CompactionEvidence`, and the member
publishes its own state, so what the bad point lost lives on (CRDT merge).

Nothing on a device is deleted or skipped because of a point: unsent edits are sealed with
seqs above anything a point covered of ours (a point covers only what we had sent), and an
old outbox is sent again whatever its seqs (syncnodes acknowledge a covered envelope without
keeping it: its content is in the state).

**Automatic trigger**: once ``compact_every_updates`` payloads or ``compact_every_bytes`` of
CRDT updates were delivered or sealed here since the last decided point (0 turns a threshold
off), a writer or admin compacts after a random jitter (so members crossing the threshold
together rarely both propose; the loser's build sees the winner's point and stops). The
counters are in memory: a restart starts them again.
"""

from __future__ import annotations

import trio

from device.compaction_check import Finding, compaction_due, still_advances
from device.errors import DocumentError, NotAllowed, Offline
from device.membership import Membership
from device.outbox import Outbox
from device.replica import Replica
from proto import entropy
from proto.codec import encode
from proto.compaction import CompactionEvidence, CompactionPoint, make_point
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import LogValue, next_manifest, sign_value

log = get_logger("device.document")


class Compactor:
    """One document's compactions (see the module doc)."""

    def __init__(self, replica: Replica, outbox: Outbox, membership: Membership) -> None:
        self.replica = replica
        self.outbox = outbox
        self.membership = membership
        self.compactions = 0
        """Compactions of ours decided (since the document was opened)."""
        self._lock = trio.Lock()
        self._due = trio.Event()
        self._republished: set[int] = set()
        replica.ledger.on_wrong = self._wrong
        replica.ledger.on_record = self._maybe_due

    # -- committing a point ----------------------------------------------------------------------

    async def compact(self) -> int | None:
        """Seal, store and commit a compaction point covering everything delivered here;
        returns its slot (None: a point decided meanwhile covers ours already). Raises
        :class:`NotAllowed` for a reader, :class:`Offline` if the state does not reach a
        quorum within ``compact_wait`` or no quorum decides."""
        r = self.replica
        if not r.may_send:
            raise NotAllowed("readers do not compact (they send nothing)")
        if r.status != "active":
            raise DocumentError(f"document is {r.status}")
        async with self._lock:
            self.outbox.flush()  # our edits first: the state then covers them by seq
            async with r.apply_lock:  # nothing delivered between snapshot and vector
                sealed = self.outbox.seal_state()
            if sealed is None:
                raise DocumentError("the document is too large for one state message; "
                                    "not compacted")
            payload, env, snapshot = sealed
            point = make_point({**payload.vector(), r.me: payload.seq}, r.me, payload.seq,
                               env.digest(), payload.body, r.crdt.version_of([snapshot]))
            log.info("compaction state sealed; waiting for a quorum to store it",
                     doc=short_id(r.group_id), seq=payload.seq, bytes=len(snapshot),
                     senders=len(point.covered))
            await self._wait_durable(payload.seq)
            slot = await self.membership.commit(lambda: self._build(point))
            if r.manifest.compaction != point.encode():
                log.info("a compaction decided meanwhile covers ours", doc=short_id(r.group_id))
                return None
            self.compactions += 1
            log.info("compaction decided", doc=short_id(r.group_id), slot=slot,
                     state_seq=payload.seq, covered=sum(c.seq for c in point.covered))
            return slot

    async def _wait_durable(self, seq: int) -> None:
        limit = self.replica.host.config.compact_wait
        with trio.move_on_after(limit):
            while seq in self.outbox.pending.waiting and self.replica.status == "active":
                await self.outbox.durable_changed.wait()
            return
        raise Offline(f"the compaction state was not stored by a quorum within {limit:g} s")

    def _build(self, point: CompactionPoint) -> LogValue | None:
        r = self.replica
        if not still_advances(r.manifest.compaction, point):
            return None
        commit = r.mls.build_update()
        m = next_manifest(r.manifest, commit, compaction=point.encode())
        return sign_value(r.host.key, m, commit)

    # -- the automatic trigger -------------------------------------------------------------------

    def _maybe_due(self) -> None:
        cfg = self.replica.host.config
        ledger = self.replica.ledger
        if compaction_due(ledger.since_point, ledger.bytes_since_point,
                          every=cfg.compact_every_updates, every_bytes=cfg.compact_every_bytes):
            self._due.set()

    async def run(self) -> None:
        """Compact whenever a threshold is crossed (see the module doc)."""
        r = self.replica
        cfg = r.host.config
        backoff = 1.0
        while r.status == "active":
            await self._due.wait()
            self._due = trio.Event()
            if not r.may_send:
                continue
            await trio.sleep(entropy.uniform(0, cfg.compact_jitter))
            ledger = r.ledger
            if not compaction_due(ledger.since_point, ledger.bytes_since_point,
                                  every=cfg.compact_every_updates,
                                  every_bytes=cfg.compact_every_bytes):
                continue  # another member's point was decided meanwhile
            try:
                await self.compact()
                backoff = 1.0
            except SyncnodeError as exc:
                log.info("automatic compaction failed; retrying later",
                         doc=short_id(r.group_id), error=str(exc), retry_in=backoff)
                await trio.sleep(backoff * entropy.uniform(0.5, 1.0))
                backoff = min(backoff * 2, cfg.rotate_keys_backoff_max)
                self._maybe_due()

    # -- a point proven wrong ----------------------------------------------------------------------

    def _wrong(self, finding: Finding) -> None:
        """Alarm with evidence, then publish our own state once per bad point: it holds what
        the point's state lacks, and goes to every member through the syncnodes."""
        r = self.replica
        d = r.decided.get(finding.slot)
        evidence = None if d is None else encode(CompactionEvidence(
            d, finding.reason[:512], finding.sender, finding.seq, finding.observed_version,
            finding.observed_vector, finding.observed_body_hash))
        r.alarm("bad-compaction", f"slot {finding.slot}: {finding.reason} "
                f"({short_id(finding.sender)} seq {finding.seq})", evidence)
        if finding.slot not in self._republished and r.status == "active":
            self._republished.add(finding.slot)
            self.outbox.publish_state()
