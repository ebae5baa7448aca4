"""A new document offered to the members of an existing group (issue 16, "new documents from a
group"): the body of a ``DOC_INVITE`` payload (:class:`proto.payload.PayloadKind`).

An admin of a document makes a new document with the same members and roles
(:mod:`device.group_docs`). The MLS binding has no ReInit, branch, PSK or group-context
extension (see the MLS notes), so the new group cannot be derived from the old one inside MLS;
instead the old group *carries the invitations*: one MLS application message to the old group,
whose confidentiality and sender authentication MLS already gives, holds one **seat** per other
member: that member's fingerprint and a one-time invite secret. Each member rebuilds an ordinary
:class:`~proto.invite.InviteTicket` from the offer and its own seat
(:meth:`DocOffer.ticket_for`) and joins through the usual join flow; the inviter admits a
request for a seat only from the device the seat names, with the role it had in the old group.

Why seats and not one ticket per member: what is common (group, genesis hash, inviter endpoint,
syncnodes, expiry, name) is sent once and a seat is 48 bytes, so an offer to the 1000 devices a
group may hold stays ~50 KB. The inviter's signature key is *not* in the offer: the receiver
takes it from the sender's entry in the old group's manifest (the MLS-authenticated sender), so
a seat can only ever name an admin who really sent it as the inviter.

Every member of the old group can read every seat's secret; that is why a seat is bound to a
fingerprint (a member presenting another member's seat is refused by the inviter) rather than
sealed to each member, which would cost one public-key box per member for no extra safety.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from proto.codec import (
    U64,
    Hash32,
    Len,
    MaxItems,
    MaxLen,
    PublicKey,
    decode_struct,
    encode_struct,
)
from proto.invite import MAX_NAME, InviteTicket
from proto.manifest import MAX_DEVICES, SyncnodeEntry
from proto.paxos.messages import MAX_ACCEPTORS, GroupId
from proto.ticket import Addrs


@dataclass(frozen=True)
class Seat:
    """One member's place in the new document: its fingerprint and its invite secret."""

    fingerprint: Hash32
    secret: Annotated[bytes, Len(16)]


@dataclass(frozen=True)
class DocOffer:
    """The new document, as an invite ticket minus the inviter key and secret, plus the seats."""

    group_id: GroupId
    genesis: Hash32
    inviter_endpoint: PublicKey
    inviter_addrs: Addrs
    syncnodes: Annotated[tuple[SyncnodeEntry, ...], MaxItems(MAX_ACCEPTORS)]
    expires_at: U64
    name: Annotated[str, MaxLen(MAX_NAME)]
    seats: Annotated[tuple[Seat, ...], MaxItems(MAX_DEVICES)]

    def encode(self) -> bytes:
        return encode_struct(self)

    @staticmethod
    def decode(data: bytes) -> DocOffer:
        """Bounded; raises :class:`proto.errors.DecodeError`."""
        return decode_struct(data, DocOffer)

    def ticket_for(self, fpr: bytes, inviter: bytes) -> InviteTicket | None:
        """The invite ticket of the seat of device ``fpr`` (None: no seat for it), with
        ``inviter`` (the offer's sender's signature key, from the old group's manifest)."""
        for seat in self.seats:
            if seat.fingerprint == fpr:
                return InviteTicket(self.group_id, self.genesis, inviter, self.inviter_endpoint,
                                    self.inviter_addrs, self.syncnodes, seat.secret,
                                    self.expires_at, self.name)
        return None
