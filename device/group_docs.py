"""New documents from a group: ``device.create_document(..., from_group=doc)`` makes a document
whose members and roles are those of ``doc``, and the members join it with no manual step.

**Why not in MLS.** RFC 9420 has ReInit and branch PSKs for exactly this, but the binding we
use (mls-rs via uniffi, ``device/mls.py``) exposes no proposals, PSKs, group-context extensions
or external joins, and a Welcome needs each member's fresh KeyPackage, which only the member can
make (its private key lives in that member's process). So the new group is created as any
other, and the **old group carries the invitations**, which is what MLS does give us: a
message only the current members can read, authenticated as coming from one of them.

**Creator** (:func:`create_from_group`), who must be an admin of the old document (copying a
membership and its roles is a membership act, as adding a device is):

1. Creates the new document (by default on the old document's syncnodes) as usual: it is its
   only member, and admin.
2. For every other device of the old manifest, makes a one-use invite for the new document
   **bound to that device**: a seat (:mod:`device.offers`) names the device's fingerprint and
   its role in the old manifest, copied as is. The inviter admits a join request for a seat
   only from that device's MLS signature key, and adds it with that role
   (:mod:`device.invites`); another key presenting the seat's ticket is refused.
3. Sends one ``DOC_INVITE`` payload through the *old* group (:class:`proto.doc_offer.DocOffer`:
   the new group, its genesis hash, syncnodes, name and every seat's secret), in the same
   transaction that records the invites. MLS keeps it confidential to the old group's members.
   It is an envelope like an edit: durable once a quorum of the old syncnodes stored it.

**Members** (:class:`Offers`): when the inbox delivers the offer, :func:`device.offers.take_offer`
keeps it if its sender is an admin of the old group and it holds a seat for this device, and
records it once (so a redelivery or a restart never joins twice). Each pending offer is then
joined in the background through the ordinary join flow (:mod:`device.joining`): the join
request goes into the invite's box in the syncnodes' **mailbox**, not as an envelope, so a
reader of the old document (whose envelopes syncnodes refuse) joins like anyone else. A join
that cannot complete yet (inviter offline, syncnodes unreachable) is retried with backoff until
the offer expires (:data:`OFFER_TTL`); a refusal or an expired offer is final: the offer is
marked failed and a ``new-document`` alarm is raised on the old document. A success emits
:class:`device.events.NewDocument` to the old document's listeners.

The inviter must be online to admit each member (as with any invite): it reads the seats'
boxes whenever the new document runs, so members join within seconds of each other being
online. Limits: a device added to the old document after the offer was sent, or one that only
got the old document's state (not the offer itself), is not offered the new document (invite
it by hand); and a join request is bound to the process that made it (KeyPackage keys live in
memory), so a member process that stops between its request and the Welcome may be added with
a key package it no longer holds, and then fails to join (the same as a manual ``join`` that is
interrupted): the offer is marked failed with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from device import joining, offers
from device.document import Document
from device.errors import DocumentError, JoinError, JoinRefused
from device.events import NewDocument
from proto import entropy
from proto.doc_offer import DocOffer, Seat
from proto.errors import DecodeError, SyncnodeError
from proto.identity import fingerprint, short_id
from proto.invite import MAX_NAME, InviteTicket, secret_hash
from proto.logs import get_logger
from proto.manifest import Role, genesis_hash
from proto.payload import PayloadKind
from proto.ticket import NodeTicket
from proto.wakeup import Signal

log = get_logger("device.group_docs")

OFFER_TTL = 7 * 24 * 3600
"""How long the members of the old group may take to join (the syncnodes keep a join request
at most this long too)."""
ATTEMPT = 600.0
"""One join attempt waits at most this long for the inviter before starting over."""
RETRY_MIN, RETRY_MAX = 2.0, 300.0


class GroupDevice(joining.Joiner, Protocol):
    """What these flows need from the device (:class:`device.agent.Device`)."""

    async def create_document(self, syncnodes: Sequence[str | NodeTicket] = (),
                              crdt: str = "loro", name: str = "") -> Document: ...


async def create_from_group(device: GroupDevice, source: Document,
                            syncnodes: Sequence[str | NodeTicket], crdt: str,
                            name: str) -> Document:
    """A new document with the members and roles of ``source`` (see the module doc); on
    ``syncnodes``, or ``source``'s if empty. Raises :class:`DocumentError` unless this device
    is an admin of ``source``."""
    if source.status != "active":
        raise DocumentError(f"document {source.name} is {source.status}")
    me = source.manifest.device(device.fingerprint)
    if me is None or me.role != Role.ADMIN:
        role = me.role.name.lower() if me is not None else "not a member"
        raise DocumentError(f"only an admin of {source.name} can make a document with its "
                            f"members (this device is {role} there)")
    if crdt != source.crdt_type:
        raise DocumentError(f"{source.name} is a {source.crdt_type} document; a document made "
                            f"from its members is one too, not {crdt}")
    if not syncnodes:
        syncnodes = [device.syncnode_ticket(NodeTicket(e.node_id, e.addrs))
                     for e in source.manifest.syncnodes]
    others = [d for d in source.manifest.devices if d.fingerprint != device.fingerprint]
    doc = await device.create_document(syncnodes, crdt, name)
    if not others:
        return doc
    expires = entropy.wall() + OFFER_TTL
    seats = [Seat(d.fingerprint, entropy.token_bytes(16)) for d in others]
    offer = DocOffer(doc.group_id, genesis_hash(doc.values[0].encode()), device.endpoint_id,
                     device.addresses()[:8], doc.manifest.syncnodes, int(expires),
                     doc.name[:MAX_NAME], tuple(seats))
    with device.store.transaction() as db:  # the invites and the offer that hands them out
        db.executemany("INSERT INTO invites (secret_hash, group_id, expires_at) VALUES (?,?,?)",
                       [(secret_hash(s.secret), doc.group_id, expires) for s in seats])
        offers.bind_seats(db, [(secret_hash(s.secret), d.fingerprint, d.role)
                               for s, d in zip(seats, others, strict=True)])
        source.outbox.seal(PayloadKind.DOC_INVITE, offer.encode())
    doc.invites.notify()
    log.info("document made from a group", doc=short_id(doc.group_id),
             source=short_id(source.group_id), seats=len(seats))
    return doc


def seated(doc: Document, source: Document) -> tuple[set[bytes], set[bytes]]:
    """Of the devices of ``source`` (other than this one): those that are members of ``doc``
    already, and those still to join."""
    wanted = {d.fingerprint for d in source.manifest.devices if d.fingerprint != doc.me}
    present = {d.fingerprint for d in doc.manifest.devices}
    return wanted & present, wanted - present


class Offers:
    """The member side: joins every pending offer in the background (one task per offer)."""

    def __init__(self, device: GroupDevice) -> None:
        self.device = device
        self._wanted = Signal()
        self._running: set[bytes] = set()

    def wake(self) -> None:
        """An offer was recorded (:meth:`device.agent.Device.offer_arrived`)."""
        self._wanted.fire()

    async def run(self) -> None:
        """Start a join for each pending offer, now (offers left from an earlier run) and
        whenever one arrives; until the device closes."""
        if not self.device.config.join_offers:
            return
        while True:
            for offer in offers.pending(self.device.store):
                if offer.group_id not in self._running:
                    self._running.add(offer.group_id)
                    self.device.spawn(self._join, offer)
            await self._wanted.wait()

    async def _join(self, offer: offers.Offer) -> None:
        try:
            await self._attempts(offer)
        finally:
            self._running.discard(offer.group_id)

    async def _attempts(self, offer: offers.Offer) -> None:
        device = self.device
        try:
            t = InviteTicket.parse(offer.ticket)
        except DecodeError as exc:  # we wrote it: only a damaged store gets here
            self._failed(offer, f"unreadable offer: {exc}")
            return
        backoff = RETRY_MIN
        while True:
            if device.document_for(offer.group_id) is not None:
                offers.settle(device.store, offer.group_id, offers.JOINED, "already a member")
                return
            left = t.expires_at - entropy.wall()
            if left <= 0:
                self._failed(offer, "the offer expired before this device could join")
                return
            try:
                doc = await joining.join(device, offer.ticket, name=t.name,
                                         timeout=min(left, ATTEMPT),
                                         say=lambda msg: log.info(msg, doc=t.name),
                                         on_progress=None)
            except JoinRefused as exc:
                self._failed(offer, str(exc))
                return
            except JoinError as exc:  # unreachable, inviter offline: try again later
                log.info("cannot join an offered document yet", doc=short_id(offer.group_id),
                         error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            except SyncnodeError as exc:  # MLS refused the Welcome, a bad log...: final
                self._failed(offer, str(exc))
                return
            offers.settle(device.store, offer.group_id, offers.JOINED)
            log.info("joined a document offered through a group", doc=short_id(doc.group_id),
                     source=short_id(offer.source))
            source = device.document_for(offer.source)
            if source is not None:
                source.replica.emit(NewDocument(doc.id, doc.name,
                                                short_id(fingerprint(t.inviter))))
            return

    def _failed(self, offer: offers.Offer, reason: str) -> None:
        offers.settle(self.device.store, offer.group_id, offers.FAILED, reason)
        log.warning("could not join an offered document", doc=short_id(offer.group_id),
                    error=reason)
        source = self.device.document_for(offer.source)
        if source is not None:
            source.replica.alarm("new-document", f"could not join the document "
                                 f"{short_id(offer.group_id)} made from this one: {reason}")
