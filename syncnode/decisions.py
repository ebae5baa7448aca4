"""The decided log of each group: learning decisions, keeping evidence of equivocation, and
serving the log and heads to those who may read them.

A decision (a value with its certificate: a quorum of signed Accepteds) comes from a device or
from a peer syncnode (:mod:`syncnode.peers`); either way it is verified against the group's
manifest chain and stored only as the next slot, so a peer is never trusted, only its
evidence. A certified value for a slot that already holds another is proof that acceptors
equivocated: it is kept (:meth:`~syncnode.storage.Storage.put_equivocation`) and refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proto.codec import decode_as, encode
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import ManifestError, verify_decided
from proto.messages import ErrorCode
from proto.paxos.messages import Certificate, Decided, EquivocationProof, value_hash
from proto.paxos.quorum import CertificateError, verify_certificate
from proto.service import MAX_PAGE, DecidedPage, FetchDecided, FetchHeads, Head, Heads
from syncnode.fanout import Publish
from syncnode.groups import Groups, GroupState, may_read
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import Storage, StorageConflict

log = get_logger("syncnode.service")

PAGE_BYTES = 4 * 1024 * 1024
"""Soft byte budget of one page of decided values or envelopes (well under a frame)."""

Fire = Callable[[Callable[[], Awaitable[object]]], None]
"""Run a write nobody waits for (evidence) in the background."""


class DecidedLog:
    def __init__(self, store: Storage, groups: Groups, metrics: Metrics, *, publish: Publish,
                 fire: Fire) -> None:
        self.store = store
        self.groups = groups
        self.metrics = metrics
        self.publish = publish
        self.fire = fire

    async def decided_at(self, group_id: bytes, slot: int) -> Decided:
        rec = await self.store.decided(group_id, slot)
        assert rec is not None and rec.certificate is not None
        return Decided(rec.value, decode_as(rec.certificate, Certificate))

    async def learn(self, msg: Decided, *, source: str, session: Session | None = None) -> int:
        """Verify and store a decision (from a device or a peer syncnode). Returns 1 when it was
        new, 0 when already known; raises RequestError otherwise."""
        cert = msg.certificate
        g = await self.groups.require(cert.group_id)
        if value_hash(msg.value) != cert.value_hash:
            raise RequestError(ErrorCode.INVALID, "value does not match the certificate")
        if cert.slot == 0:
            raise RequestError(ErrorCode.INVALID, "slot 0 is the genesis")
        async with g.lock:
            if g.deleted:  # by syncnode.hosting while we waited
                raise RequestError(ErrorCode.NOT_FOUND, "this syncnode does not host that group")
            if cert.slot <= g.top:
                return await self._known(g, msg)
            if cert.slot > g.top + 1:
                self.groups.behind(session, g)
                raise RequestError(ErrorCode.NOT_FOUND,
                                   f"missing slots {g.top + 1}..{cert.slot - 1}; catching up")
            try:
                value = verify_decided(g.manifest, msg.value, cert)
            except CertificateError as exc:
                raise RequestError(ErrorCode.INVALID, f"certificate: {exc}") from None
            except ManifestError as exc:
                # A valid certificate for an invalid value means a quorum of acceptors broke the
                # rules. Refuse to serve it; members will see the same.
                log.error("certified value breaks the manifest rules", group=short_id(g.group_id),
                          slot=cert.slot, error=str(exc))
                raise RequestError(ErrorCode.INVALID, f"certified value is invalid: {exc}"
                                   ) from None
            try:
                await self.store.append_decided(g.group_id, cert.slot, msg.value, encode(cert),
                                                value.manifest.wire)
            except StorageConflict:
                # Another process of this node (shared storage) stored the slot since we read
                # the group: catch up with what it stored and answer as for a known slot.
                await self.groups.reload(g)
                if cert.slot <= g.top:
                    return await self._known(g, msg)
                raise RequestError(ErrorCode.CONFLICT, f"slot {cert.slot} cannot be stored "
                                   "yet; retry") from None
            g.top, g.manifest, g.bytes_used = cert.slot, value.manifest, \
                g.bytes_used + len(msg.value)
        self.metrics.decisions.inc()
        log.info("decision stored", group=short_id(g.group_id), slot=cert.slot,
                 epoch=value.manifest.epoch, devices=len(value.manifest.devices),
                 signer=short_id(value.signer), source=source)
        self.publish(g, msg, new_manifest=True)
        return 1

    async def _known(self, g: GroupState, msg: Decided) -> int:
        stored = await self.decided_at(g.group_id, msg.certificate.slot)
        if stored.certificate.value_hash == msg.certificate.value_hash:
            return 0
        try:
            acceptors = (await self.groups.manifest_at(g.group_id, msg.certificate.slot - 1)
                         ).acceptors()
            verify_certificate(msg.certificate, acceptors)
        except CertificateError as exc:
            raise RequestError(ErrorCode.INVALID, f"certificate: {exc}") from None
        proof = EquivocationProof(stored.certificate, msg.certificate)
        self.metrics.equivocations.inc()
        log.error("EQUIVOCATION: two certified values for one slot", group=short_id(g.group_id),
                  slot=msg.certificate.slot)
        group_id, slot, blob = g.group_id, msg.certificate.slot, encode(proof)
        self.fire(lambda: self.store.put_equivocation(group_id, slot, blob))
        raise RequestError(ErrorCode.CONFLICT,
                           "a different value is certified for this slot (equivocation)")

    # -- reading the log (who may: syncnode.groups) ---------------------------------------------

    async def fetch_decided(self, session: Session, msg: FetchDecided) -> DecidedPage:
        g = await self.groups.get(msg.group_id)
        limit = max(1, min(msg.limit, MAX_PAGE))
        up_to = None if g is None else \
            await self.groups.readable_up_to(session, g, msg.from_slot, limit)
        if g is None or up_to is None:
            self.metrics.refuse("log_not_member")
            raise RequestError(ErrorCode.UNAUTHORIZED,
                               "only members of a group and its syncnodes read its decided "
                               "log (or this syncnode does not host the group)")
        genesis = None
        if msg.from_slot == 0:
            rec = await self.store.decided(g.group_id, 0)
            genesis = rec.value if rec else None
        page = await self.store.decided_range(g.group_id, max(msg.from_slot, 1), up_to,
                                              limit=limit, max_bytes=PAGE_BYTES)
        out = tuple(Decided(rec.value, decode_as(rec.certificate, Certificate))
                    for _, rec in page if rec.certificate is not None)
        return DecidedPage(g.group_id, genesis, out, up_to)

    async def fetch_heads(self, session: Session, msg: FetchHeads) -> Heads:
        """Heads of the asked groups this node hosts and the session may read (above); the
        others are left out, hosted or not."""
        heads = []
        hidden = False
        for gid in msg.group_ids:
            g = await self.groups.get(gid)
            if g is None:
                continue
            if may_read(session, g.manifest):
                heads.append(Head(gid, g.top))
            else:
                hidden = True
        if hidden:
            if "heads_not_member" not in session.counted:  # a joiner polls until it is added
                session.counted.add("heads_not_member")
                self.metrics.refuse("heads_not_member")
        return Heads(tuple(heads))
