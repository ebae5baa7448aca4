"""How this syncnode hosts each group: named by its genesis, adopted later, or removed
(issue 16, "Changing the syncnodes").

A group's syncnodes change by admin commits: the acceptors of slot ``s`` are the syncnodes of
manifest ``s - 1``, so a syncnode named from slot ``N`` on must hold the log before it can vote.

* **Adopted.** An admin device sends ``AdoptGroup(genesis, named)`` right after slot ``N`` is
  decided. The genesis is checked like ``RegisterGroup`` (same limits), but this node need not be
  in it. ``named`` cannot be verified yet (the manifests between are missing), so only the
  syncnodes its manifest lists are kept, as **hints**: dial targets for the decided-log catch-up
  (:mod:`syncnode.peers`), bounded like every peer. Everything learned is verified from the
  genesis forward. Once the verified log reaches slot ``N``: if manifest ``N`` names this node it
  is **serving** and pulls the envelope history (:mod:`syncnode.history`); if not, the claim was
  false (or stale) and the adoption is dropped with its data.
* **Removed.** Once the newest manifest no longer names this node, it refuses the group's
  Store, Subscribe and new Paxos slots with GONE (so devices go to the new syncnodes), keeps
  answering reads of the log and status to those allowed (a device that was away learns where
  the group went), and deletes the group after ``removed_group_retention`` seconds.

A group created from its genesis has no hosting record until it is removed: it is serving and
its history is complete. Records are cached (the GONE check is on the Store path).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from proto.codec import decode_as, encode
from proto.errors import DecodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import LogValue, Manifest, SyncnodeEntry
from proto.messages import ErrorCode
from proto.paxos.messages import Decided, value_hash
from proto.service import AdoptGroup, GroupRegistered, GroupStatus
from syncnode.admission import Admission, check_genesis
from syncnode.budgets import LRU
from syncnode.config import Limits
from syncnode.groups import Groups, GroupState, may_read
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import HostingRecord, Storage, StorageConflict

log = get_logger("syncnode.hosting")

FROM_GENESIS = HostingRecord(None, None, True, True)
"""What a group without a hosting record is."""
REMOVAL_SCAN = 64
"""Slots looked back to find the one that removed this node (decisions may be learned in any
order of calls; the first slot whose manifest drops it is the one reported)."""


class Hosting:
    def __init__(self, node_id: bytes, store: Storage, groups: Groups, admission: Admission,
                 limits: Limits, metrics: Metrics, *, now: Callable[[], float],
                 capacity: int = 4096) -> None:
        self.node_id = node_id
        self.store = store
        self.groups = groups
        self.admission = admission
        self.limits = limits
        self.metrics = metrics
        self.now = now
        self.cache = LRU(capacity)
        self.lock = trio.Lock()
        self.pull: Callable[[bytes], None] = lambda group_id: None
        """Hook: ask the history task to pull a serving group's envelopes."""

    async def record(self, group_id: bytes) -> HostingRecord:
        rec: HostingRecord | None = self.cache.get(group_id)
        if rec is None:
            rec = await self.store.hosting(group_id) or FROM_GENESIS
            self.cache.put(group_id, rec)
        return rec

    async def _put(self, group_id: bytes, rec: HostingRecord) -> None:
        await self.store.put_hosting(group_id, rec)
        self.cache.put(group_id, rec)

    def names_me(self, m: Manifest) -> bool:
        return self.node_id in m.acceptors()

    # -- AdoptGroup -----------------------------------------------------------------------------

    async def adopt(self, session: Session, msg: AdoptGroup) -> GroupRegistered:
        value = check_genesis(msg.genesis)
        gid = value.manifest.group_id
        named = self._check_named(gid, msg.named)
        existing = await self.groups.get(gid)
        if existing is not None:
            stored = await self.store.decided(gid, 0)
            if stored is None or stored.value != msg.genesis:
                raise RequestError(ErrorCode.CONFLICT, "a different group has this id")
        else:
            await self.admission.admit(session, value)
        try:
            created = await self.store.adopt_group(gid, value.signer, msg.genesis, self.now(),
                                                   named_slot=msg.named.certificate.slot,
                                                   adoption=encode(msg.named))
        except StorageConflict:
            raise RequestError(ErrorCode.CONFLICT, "a different group has this id") from None
        self.cache.pop(gid, None)
        if created:
            session.groups_created += 1
            self.metrics.groups.inc()
        log.info("group adopted" if created else "group adoption again", group=short_id(gid),
                 named_slot=msg.named.certificate.slot, hints=len(named.syncnodes),
                 peer=short_id(session.remote_id))
        self.groups.catchup(gid)
        await self.decided(gid)  # already there (adopted again after catching up)?
        return GroupRegistered(gid, created)

    def _check_named(self, group_id: bytes, named: Decided) -> Manifest:
        """The manifest of the naming decision, checked as far as it can be without the log:
        it is for this group and slot, names this node, and lists few enough peers."""
        cert = named.certificate
        try:
            value = LogValue.decode(named.value)
        except DecodeError as exc:
            raise RequestError(ErrorCode.INVALID, f"bad named value: {exc}") from None
        m = value.manifest
        if cert.group_id != group_id or m.group_id != group_id:
            raise RequestError(ErrorCode.INVALID, "the named decision is for another group")
        if cert.slot < 1 or m.epoch != cert.slot or value_hash(named.value) != cert.value_hash:
            raise RequestError(ErrorCode.INVALID,
                               "the named value does not match its certificate's slot")
        if not self.names_me(m):
            raise RequestError(ErrorCode.INVALID, "the named manifest does not name this "
                               "syncnode")
        if len(m.syncnodes) > self.limits.max_group_syncnodes:
            self.metrics.refuse("too_many_syncnodes")
            raise RequestError(ErrorCode.INVALID, f"a group may name at most "
                               f"{self.limits.max_group_syncnodes} syncnodes here")
        return m

    async def hints(self, group_id: bytes) -> tuple[SyncnodeEntry, ...]:
        """Extra peers to catch the log up from: those of a pending adoption's claim."""
        rec = await self.record(group_id)
        if rec.named_slot is None or rec.serving or rec.adoption is None:
            return ()
        try:
            named = decode_as(rec.adoption, Decided)
            syncnodes = LogValue.decode(named.value).manifest.syncnodes
        except DecodeError:
            return ()
        return tuple(e for e in syncnodes if e.node_id != self.node_id)

    # -- following the log ----------------------------------------------------------------------

    async def decided(self, group_id: bytes) -> None:
        """After a decision of the group was stored (or an adoption arrived): become serving,
        drop a false adoption, or notice that this node was removed (or added back)."""
        async with self.lock:
            g = await self.groups.get(group_id)
            if g is None:
                return
            rec = await self.record(group_id)
            if rec.named_slot is not None and not rec.serving and rec.removed_slot is None:
                await self._adoption_reached(g, rec)
            elif rec.removed_slot is None and not self.names_me(g.manifest):
                slot = await self._removal_slot(g)
                await self._put(group_id, rec._replace(serving=False, removed_slot=slot,
                                                       removed_at=self.now()))
                log.warning("this syncnode was removed from the group", group=short_id(group_id),
                            slot=slot, retention=self.limits.removed_group_retention)
            elif rec.removed_slot is not None and self.names_me(g.manifest):
                # Added back: what was stored while away is missing, so pull it again.
                await self._put(group_id, HostingRecord(g.top, rec.adoption, True, False))
                log.info("this syncnode was added back to the group", group=short_id(group_id),
                         slot=g.top)
                self.pull(group_id)

    async def _adoption_reached(self, g: GroupState, rec: HostingRecord) -> None:
        assert rec.named_slot is not None
        if g.top < rec.named_slot:
            return
        if self.names_me(await self.groups.manifest_at(g.group_id, rec.named_slot)):
            await self._put(g.group_id, rec._replace(serving=True))
            log.info("adopted group is serving; pulling its history", group=short_id(g.group_id),
                     slot=rec.named_slot)
            self.pull(g.group_id)
            return
        log.warning("dropping an adoption: the verified manifest of the named slot does not "
                    "name this syncnode", group=short_id(g.group_id), slot=rec.named_slot)
        self.metrics.refuse("adoption_not_named")
        await self.delete(g.group_id)

    async def _removal_slot(self, g: GroupState) -> int:
        slot = g.top
        for _ in range(REMOVAL_SCAN):
            if slot <= 1:
                break
            try:
                if self.names_me(await self.groups.manifest_at(g.group_id, slot - 1)):
                    break
            except KeyError:
                break
            slot -= 1
        return slot

    async def history_done(self, group_id: bytes) -> None:
        async with self.lock:
            rec = await self.record(group_id)
            if rec.serving and not rec.history_complete:
                await self._put(group_id, rec._replace(history_complete=True))
                log.info("group history complete", group=short_id(group_id))

    # -- refusing a removed group ---------------------------------------------------------------

    async def refuse_if_removed(self, g: GroupState) -> None:
        """GONE when this node no longer serves ``g`` (only groups whose newest manifest does
        not name it pay a lookup: a pending adoption is not refused)."""
        if self.names_me(g.manifest):
            return
        rec = await self.record(g.group_id)
        if rec.named_slot is not None and not rec.serving and rec.removed_slot is None:
            return
        slot = rec.removed_slot if rec.removed_slot is not None else g.top
        self.metrics.refuse("group_gone")
        raise RequestError(ErrorCode.GONE, f"this syncnode no longer serves this group "
                           f"(removed at slot {slot})")

    # -- status and retention -------------------------------------------------------------------

    async def status(self, session: Session, group_id: bytes) -> GroupStatus:
        g = await self.groups.get(group_id)
        if g is None or not await self._may_see(session, g):
            self.metrics.refuse("status_not_member")
            raise RequestError(ErrorCode.UNAUTHORIZED,
                               "only members of a group and its syncnodes read its status "
                               "(or this syncnode does not host the group)")
        rec = await self.record(group_id)
        serving = rec.serving and rec.removed_slot is None
        return GroupStatus(group_id, g.top, serving, rec.history_complete,
                           await self.store.envelope_count(group_id), rec.removed_slot)

    async def _may_see(self, session: Session, g: GroupState) -> bool:
        """Who reads the log may read the status: the newest manifest's devices and
        syncnodes, and those of the manifest before it (removed by the newest decision)."""
        if may_read(session, g.manifest):
            return True
        try:
            return g.top >= 1 and may_read(session, await self.groups.manifest_at(g.group_id,
                                                                                  g.top - 1))
        except KeyError:
            return False

    async def delete(self, group_id: bytes) -> None:
        """Delete the group and forget its cached state. Under the group's lock, so no
        decision is being appended meanwhile (one that comes later finds no group)."""
        g = await self.groups.get(group_id)
        if g is None:
            return
        async with g.lock:
            if await self.store.delete_group(group_id):
                self.metrics.groups.dec()
            g.deleted = True
            self.groups.cache.pop(group_id, None)
            self.cache.pop(group_id, None)

    async def expire_removed(self) -> int:
        """Delete the groups this node was removed from more than ``removed_group_retention``
        seconds ago (0: keep them forever). How many were deleted."""
        keep = self.limits.removed_group_retention
        if keep <= 0:
            return 0
        now, deleted, after = self.now(), 0, b""
        while True:
            page = await self.store.hosting_records(after, 1000)
            for gid, rec in page:
                if rec.removed_at is not None and rec.removed_at + keep <= now:
                    async with self.lock:
                        current = await self.store.hosting(gid)
                        if current is None or current.removed_at != rec.removed_at:
                            continue  # added back meanwhile
                        await self.delete(gid)
                    deleted += 1
                    log.info("deleted a group this syncnode was removed from",
                             group=short_id(gid), removed_slot=rec.removed_slot,
                             removed_for=round(now - rec.removed_at))
            if len(page) < 1000:
                return deleted
            after = page[-1][0]

    async def retention(self, interval: float) -> None:
        """The periodic task around :meth:`expire_removed`."""
        while True:
            await trio.sleep(interval)
            try:
                await self.expire_removed()
            except Exception as exc:
                log.error("deleting removed groups failed", error=str(exc))
