"""The inviter's side of joining: invite tickets, join requests, and the state handoff.

An admin makes a one-time ticket (:meth:`Invites.create`) for a role (writer by default); only
admins invite, because the inviter is the one who commits the add, and adds are the admins'
(:func:`proto.manifest.validate_transition`); a writer who wants someone in asks an admin.
The role is recorded with the invite here and is the one the device is added with (the ticket
names it too, for the joiner to show, but a joiner's copy is never trusted).

The new device leaves a join request sealed to us in the invite's own box on each syncnode: a
mailbox whose key pair both sides derive from the ticket's secret, into which only a holder of
the ticket can put
(:func:`proto.handoff.invite_box`). We authenticate with the box key of each open invite, read
every page of its box, and delete each request once handled, and at once anything that does
not open or names another invite: nothing a stranger sends reaches us or piles up. The
syncnodes push a notice on our subscription when an item arrives in a box we read, so an
online inviter reads it at once (a slow poll remains as a safety net).

For a valid request we store the whole document on a quorum of syncnodes, in the joiner's
mailbox and encrypted with the ticket's secret (:mod:`proto.handoff`), while the add goes
through Paxos, and announce the decided add only once that copy is stored: from the moment
the joiner can learn of its add, it can get the document whatever happens to us. (If we stop
between the ballot and the announce, the add is decided but nobody learns it until our next
commit finishes it, or another proposer's finds it; the joiner waits, as it would for an
inviter that stopped before proposing. If the copy cannot be stored on a quorum, the add is
announced anyway and the joiner gets the document from a member.) Overlapping the two saves
the staging time (a few to tens of milliseconds) from every join.

A request with a spent or expired ticket gets a refusal the joiner reads within seconds; one
for an invite we do not know (revoked, or made on another device) lands in a box nobody
reads, and the joiner waits until its timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from device.errors import NotAllowed, Offline
from device.links import Links
from device.membership import Membership
from device.mls import MlsError
from device.offers import seat_of
from device.outbox import Outbox
from device.replica import Replica
from proto import entropy
from proto.errors import DecodeError, SyncnodeError
from proto.handoff import (
    MAX_HANDOFF,
    JoinRefusal,
    invite_box_from_hash,
    seal_parts,
    seal_refusal,
)
from proto.identity import SecretKey, fingerprint, short_id
from proto.invite import MAX_NAME, InviteTicket, JoinRequest, secret_hash
from proto.logs import get_logger
from proto.manifest import ManifestError, Role, genesis_hash
from proto.p2p import SnapshotOffer
from proto.rpc import SyncnodeClient
from proto.service import MailboxKind
from proto.wakeup import Signal

log = get_logger("device.invites")

HANDOFF_TTL = 24 * 3600
"""How long the staged state waits on the syncnodes for the joiner (it normally takes it at once
and deletes it)."""
REFUSAL_TTL = 3600
EXPIRY_GRACE = 600.0
"""Requests for tickets expired this recently are still read (and refused): clocks differ."""
MAILBOX_PAGE = 64


def _role_key(hashed: bytes) -> str:
    return f"invite_role:{hashed.hex()}"


class InviteError(SyncnodeError):
    """An invite cannot be made or has ended without a new member (expired unused)."""


class _Staging:
    """The join's staged copy, stored while the add is balloted (:meth:`Invites._stage`):
    ``done`` once it ended, with on how many syncnodes it was stored or why not."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.stored = 0
        self.error: str | None = None

    async def run(self, stage: Callable[[JoinRequest], Awaitable[int]], req: JoinRequest
                  ) -> None:
        try:
            self.stored = await stage(req)
        except SyncnodeError as exc:
            self.error = str(exc)
        finally:
            self.done.set()


@dataclass(frozen=True)
class Added:
    """An invite that was used: who was added, at which slot, and on how many syncnodes the
    document waited for it before the add was announced."""

    device: str
    endpoint_id: bytes
    slot: int
    staged_on: int


class Invites:
    """Open invites of one document and the join requests for them (one per document)."""

    def __init__(self, replica: Replica, outbox: Outbox, links: Links,
                 membership: Membership) -> None:
        self.replica = replica
        self.host = replica.host
        self.outbox = outbox
        self.links = links
        self.membership = membership
        self.changed = Signal()
        """Fires when a request arrives, a device is added, or a direct transfer finished."""
        self.added: dict[bytes, Added] = {}
        self.requested: dict[bytes, str] = {}
        self.served: set[bytes] = set()
        """Endpoints that received the whole document from us directly (peer to peer)."""
        self._wanted = Signal()
        self._notices = 0
        self._lock = trio.Lock()
        self._retry_at = -float("inf")
        self._backoff = 0.5

    # -- making tickets ------------------------------------------------------------------------

    def create(self, ttl: float, role: Role = Role.WRITER) -> str:
        """A one-time ticket valid for ``ttl`` seconds, for a device that gets ``role``."""
        self.membership.require_admin("invite devices")
        if not ttl > 0:
            raise InviteError(f"an invite needs a positive lifetime in seconds, not {ttl:g}")
        r, host = self.replica, self.host
        secret = entropy.token_bytes(16)
        expires = entropy.wall() + ttl
        with r.store.transaction() as db:
            db.execute("INSERT INTO invites (secret_hash, group_id, expires_at) VALUES (?,?,?)",
                       (secret_hash(secret), r.group_id, expires))
            r.store.set_meta(_role_key(secret_hash(secret)), bytes([role]))
        self.notify()  # the request usually follows at once: read the mailbox now
        return str(InviteTicket(r.group_id, genesis_hash(r.values[0].encode()),
                                host.key.public, host.endpoint_id,
                                host.addresses(), r.manifest.syncnodes, secret,
                                int(expires), r.name[:MAX_NAME], role))

    def _role(self, hashed: bytes) -> Role:
        """The role recorded for the invite (writer for invites made before roles)."""
        raw = self.replica.store.get_meta(_role_key(hashed))
        return Role(raw[0]) if raw else Role.WRITER

    def notify(self) -> None:
        """Something may be waiting in our mailbox (a syncnode's notice, or a new invite)."""
        self._notices += 1
        self._wanted.fire()

    def transfer_done(self, endpoint_id: bytes) -> None:
        self.served.add(endpoint_id)
        self.changed.fire()

    async def wait(self, ticket: str, *, grace: float = 10.0,
                   say: Callable[[str], None] = lambda _m: None) -> tuple[Added, str]:
        """Until the device holding ``ticket`` is added and has the document: it took it from
        us directly, or (after ``grace`` seconds) it can take it from the syncnodes, where it
        was stored before the add was announced. Returns who was added and ``"direct"`` or
        ``"syncnodes"``. Raises :class:`InviteError` when the ticket expires unused."""
        t = InviteTicket.parse(ticket)
        key = secret_hash(t.secret)
        said: set[str] = set()

        def once(msg: str) -> None:
            if msg not in said:
                said.add(msg)
                say(msg)

        once("waiting for the new device to send its join request")
        while key not in self.added:
            if key in self.requested:
                once(f"join request from {self.requested[key]}; storing the document on the "
                     "syncnodes and adding the device through Paxos")
            left = t.expires_at - entropy.wall()
            if left <= 0:
                raise InviteError("the invite expired before a device used it")
            with trio.move_on_after(min(left, 5.0)):
                await self.changed.wait()
        added = self.added[key]
        once(f"added {added.device} at epoch {added.slot}; the document is stored for it on "
             f"{added.staged_on} syncnode(s); waiting for it to fetch the document")
        with trio.move_on_after(grace):
            while added.endpoint_id not in self.served:
                await self.changed.wait()
        return added, "direct" if added.endpoint_id in self.served else "syncnodes"

    # -- reading join requests -----------------------------------------------------------------

    def _boxes(self) -> list[tuple[bytes, SecretKey]]:
        """The invites whose box we read, by secret hash: every one that could still be asked
        for (used ones too: a request for a spent ticket is answered with a refusal)."""
        return [(h, invite_box_from_hash(h)) for (h,) in self.replica.store.all(
            "SELECT secret_hash FROM invites WHERE group_id=? AND expires_at>?",
            self.replica.group_id, entropy.wall() - EXPIRY_GRACE)]

    async def run(self, client: SyncnodeClient) -> None:
        """Per syncnode link: read join requests when notified (safety-net poll otherwise)."""
        authenticated: set[bytes] = set()
        while self.replica.status == "active":
            mark = self._notices
            if trio.current_time() >= self._retry_at:
                for hashed, box in self._boxes():
                    if box.public not in authenticated:
                        await client.authenticate(box)
                        authenticated.add(box.public)
                    await self._read(client, hashed, box)
            if self._notices == mark:  # nothing arrived while we read
                with trio.move_on_after(self.host.config.mailbox_interval):
                    await self._wanted.wait()

    async def _read(self, client: SyncnodeClient, hashed: bytes, box: SecretKey) -> None:
        """Every page of one invite's box; what is handled, unreadable or not for this invite
        is deleted."""
        after = 0
        while True:
            page = await client.mailbox_fetch(box.public, after, MAILBOX_PAGE)
            done = []
            for item in page.items:
                after = max(after, item.item_id)
                if item.kind != MailboxKind.KEY_PACKAGE \
                        or await self._request(item.payload, hashed):
                    done.append(item.item_id)
            if done:
                await client.mailbox_ack(box.public, done)
            if not page.more:
                return

    async def _request(self, sealed: bytes, hashed: bytes) -> bool:
        """Handle one join request found in the box of the invite with secret hash ``hashed``;
        False if it should stay in the mailbox (retry later)."""
        r = self.replica
        try:
            req = JoinRequest.open(self.host.key, sealed)
        except DecodeError as exc:
            log.warning("unreadable join request", error=str(exc))
            return True
        if req.group_id != r.group_id or secret_hash(req.secret) != hashed:
            # Only a holder of this ticket could put it here, and it names something else:
            # nobody wants it.
            log.warning("join request for another invite in an invite's box",
                        doc=short_id(r.group_id))
            return True
        async with self._lock:
            key = hashed
            joiner = short_id(fingerprint(req.sig_pub))
            row = r.store.one("SELECT expires_at, used FROM invites WHERE secret_hash=? AND "
                              "group_id=?", key, r.group_id)
            seat = seat_of(r.store, key)  # an invite bound to one device (device/offers.py)
            if seat is not None and seat.fingerprint != fingerprint(req.sig_pub):
                await self._refuse(req, "this invite is bound to another member's device")
                return True
            if row is not None and row[1]:
                if r.manifest.device(fingerprint(req.sig_pub)) is None:
                    await self._refuse(req, "this invite was already used by another device")
                return True  # else a copy of the request that was granted, from another node
            if row is None:
                await self._refuse(req, "the inviter has no such invite (revoked, or made on "
                                        "another device)")
                return True
            if row[0] < entropy.wall():
                await self._refuse(req, "the invite has expired; ask for a new one")
                return True
            self.requested[key] = joiner
            self.changed.fire()
            staging = _Staging()
            self.host.spawn(staging.run, self._stage, req)
            try:
                role = self._role(key) if seat is None else seat.role  # seat: the role the
                # device has in the group the document was made from
                slot = await self.membership.add_device(req.key_package, req.sig_pub,
                                                        req.endpoint_id, role, addrs=req.addrs,
                                                        before_announce=staging.done.wait)
                await staging.done.wait()
                staged = staging.stored
                if staged == 0 and staging.error is not None:
                    log.warning("device added, but the document could not be staged for it; "
                                "it gets it from a member", doc=short_id(r.group_id),
                                error=staging.error)
            except (ManifestError, MlsError, NotAllowed) as exc:
                log.warning("join request refused", doc=short_id(r.group_id), error=str(exc))
                await self._refuse(req, f"the join request is invalid: {exc}"[:200])
                return True
            except SyncnodeError as exc:
                # Back off: with the syncnodes unreachable or in contention, retrying at once
                # only burns CPU (found by the simulator).
                self._retry_at = trio.current_time() + self._backoff
                self._backoff = min(self._backoff * 2, 30.0)
                log.info("cannot add the invited device yet", doc=short_id(r.group_id),
                         error=str(exc), retry_in=self._backoff / 2)
                return False
            self._backoff = 0.5
            with r.store.transaction() as db:
                db.execute("UPDATE invites SET used=1 WHERE secret_hash=?", (key,))
            self.added[key] = Added(joiner, req.endpoint_id, slot, staged)
            self.changed.fire()
            log.info("device added from an invite", doc=short_id(r.group_id), device=joiner,
                     slot=slot, staged_on=staged)
            return True

    async def _stage(self, req: JoinRequest) -> int:
        """Store the whole document for the joiner on a quorum of syncnodes (alongside the
        add's ballot, before its announce). Returns on how many it was stored; raises if fewer
        than a quorum."""
        r = self.replica
        self.outbox.flush()  # our own edits are then covered by the vector, not only the bytes
        data = r.crdt.snapshot()
        if len(data) > MAX_HANDOFF:
            log.warning("document too large to stage on the syncnodes; the new device needs a "
                        "member online", doc=short_id(r.group_id), bytes=len(data))
            return 0
        body = r.snapshot_body(data)
        parts = seal_parts(req.secret, SnapshotOffer.sign(self.host.key, body, 0),
                           req.sig_pub, data)
        acceptors = r.manifest.acceptors()
        stored = await self._put_all(req.sig_pub, MailboxKind.STATE_HANDOFF, parts,
                                     HANDOFF_TTL, [n for n in self.links.clients if n in acceptors],
                                     acceptors.quorum)
        if stored < acceptors.quorum:
            raise Offline(f"the document reached {stored} of {len(acceptors)} syncnodes; "
                          f"adding a device needs it on {acceptors.quorum}")
        return stored

    async def _refuse(self, req: JoinRequest, reason: str) -> None:
        r = self.replica
        sealed = seal_refusal(req.secret, JoinRefusal(r.group_id, req.sig_pub, reason))
        n = await self._put_all(req.sig_pub, MailboxKind.JOIN_REFUSED, [sealed], REFUSAL_TTL,
                                list(self.links.clients), r.manifest.acceptors().quorum)
        log.info("join request refused", doc=short_id(r.group_id),
                 device=short_id(fingerprint(req.sig_pub)), reason=reason, told=n)

    async def _put_all(self, recipient: bytes, kind: MailboxKind, payloads: list[bytes],
                       ttl: int, nodes: list[bytes], enough: int) -> int:
        """Put every payload on each of ``nodes`` in parallel. Returns how many took them all,
        once ``enough`` did or every put has ended: the others finish in the background, so a
        frozen syncnode of the minority does not hold the add up."""
        ok: list[bytes] = []
        targets = [c for n in nodes if (c := self.links.clients.get(n)) is not None]
        if not targets:
            return 0
        ended, done = [0], trio.Event()

        async def put(client: SyncnodeClient) -> None:
            try:
                for p in payloads:
                    await client.mailbox_put(recipient, kind, p, ttl,
                                             group_id=self.replica.group_id)
                ok.append(client.node_id)
            except SyncnodeError as exc:
                log.info("mailbox put failed", node=short_id(client.node_id), error=str(exc))
            finally:
                ended[0] += 1
                if len(ok) >= enough or ended[0] == len(targets):
                    done.set()

        for client in targets:
            self.host.spawn(put, client)
        await done.wait()
        return len(ok)

