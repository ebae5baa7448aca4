"""The records behind new documents made from a group: seats on the inviter, offers on a member.

The flows are in :mod:`device.group_docs`; this module owns their two tables and the two steps
that run inside the document engine, so the engine needs no import of the flows (which import
the document facade):

* **seats** (inviter side): an invite bound to one device and a role. :func:`seat_of` is what
  :mod:`device.invites` asks before admitting a join request: a request for a seat from any
  other signature key is refused, and the seat's holder is added with the role it had in the
  old group.
* **offers** (member side): :func:`take_offer` runs when :mod:`device.inbox` delivers a
  ``DOC_INVITE`` payload. It keeps the offer only if its sender is an admin of the old group
  *now* (copying a membership is an admin's act, as adding one is) and it has a seat for this
  device, records it as ``pending`` (once per new document: redelivery, a second copy or a
  restart never joins twice) and wakes the device's joiner. An offer is ``joined`` or
  ``failed`` (with the reason) once handled.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from device.replica import Replica
from device.store import Store
from proto import entropy
from proto.doc_offer import DocOffer
from proto.errors import DecodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import Role
from proto.payload import Payload

log = get_logger("device.offers")

PENDING, JOINED, FAILED = "pending", "joined", "failed"


@dataclass(frozen=True)
class SeatBinding:
    """Who may use an invite, and as what."""

    fingerprint: bytes
    role: Role


@dataclass(frozen=True)
class Offer:
    """A new document offered to this device through the group ``source``."""

    group_id: bytes
    source: bytes
    ticket: str
    status: str
    detail: str


def bind_seats(db: sqlite3.Connection, seats: list[tuple[bytes, bytes, Role]]) -> None:
    """Record ``(secret_hash, fingerprint, role)`` seats (in the caller's transaction, the one
    that records their invites)."""
    db.executemany("INSERT INTO seats VALUES (?,?,?)",
                   [(h, fpr, int(role)) for h, fpr, role in seats])


def seat_of(store: Store, secret_hash: bytes) -> SeatBinding | None:
    """The device and role an invite is bound to; None for an ordinary invite (anyone holding
    the ticket, default role)."""
    row = store.one("SELECT fingerprint, role FROM seats WHERE secret_hash=?", secret_hash)
    return None if row is None else SeatBinding(bytes(row[0]), Role(row[1]))


def take_offer(r: Replica, p: Payload) -> None:
    """A delivered ``DOC_INVITE`` payload of document ``r`` (see the module doc)."""
    sender = r.manifest.device(p.sender)
    if sender is None or sender.role != Role.ADMIN:
        log.warning("document offer from a device that is not an admin; ignored",
                    doc=short_id(r.group_id), sender=short_id(p.sender))
        return
    try:
        offer = DocOffer.decode(p.body)
    except DecodeError as exc:
        r.alarm("bad-update", f"from {short_id(p.sender)} seq {p.seq}: {exc}")
        return
    ticket = offer.ticket_for(r.me, sender.sig_pub)
    if ticket is None:  # not for us (we made it, or we are not in its copy of the members)
        return
    with r.store.transaction() as db:
        added = db.execute("INSERT OR IGNORE INTO offers VALUES (?,?,?,?,?,?)",
                           (offer.group_id, r.group_id, str(ticket), PENDING, "",
                            entropy.wall())).rowcount
    if added:
        log.info("new document offered through a group", doc=short_id(offer.group_id),
                 source=short_id(r.group_id), sender=short_id(p.sender))
        r.host.offer_arrived()


def pending(store: Store) -> list[Offer]:
    return [Offer(bytes(g), bytes(s), t, st, d) for g, s, t, st, d in store.all(
        "SELECT group_id, source, ticket, status, detail FROM offers WHERE status=? "
        "ORDER BY at", PENDING)]


def settle(store: Store, group_id: bytes, status: str, detail: str = "") -> None:
    with store.transaction() as db:
        db.execute("UPDATE offers SET status=?, detail=?, at=? WHERE group_id=?",
                   (status, detail, entropy.wall(), group_id))
