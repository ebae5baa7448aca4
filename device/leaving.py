"""Leaving a document: the leaver's request, and the admins' side that carries it out.

MLS (mls-rs) refuses a commit that removes its own committer, so a device cannot take itself
out of the group. Leaving is a request another member carries out (design, issue 16):

* **the leaver** (:meth:`Leaving.leave`) signs a :class:`proto.leave.LeaveRequest` and leaves it
  in the mailbox of every admin's device key on the group's syncnodes
  (``MailboxKind.LEAVE_REQUEST``; a syncnode takes that kind only from a current member). Once
  a quorum of syncnodes holds it, the document is marked ``left`` here at once and this device
  stops syncing it: it seals and applies nothing more (its keys still open the current epoch
  until the removal; that is what leaving promises, not more). The last admin cannot leave
  while other members remain: it must make another member admin first. A device alone in the
  document just marks it left: there is nobody to tell.
* **an admin** (:meth:`Leaving.run`, per syncnode link) reads its own mailbox when a syncnode
  pushes a notice (and every ``mailbox_interval`` as a safety net), checks each request's
  signature against the manifest, and commits the removal through Paxos like any other
  (:meth:`device.membership.Membership.remove_device`). Several admins may see the same
  request: the first removal wins the slot and the others find nothing left to do. An item is
  acknowledged (deleted) once the leaver is out; one for another document of this device is
  left for that document.
"""

from __future__ import annotations

import trio

from device.errors import DocumentError, NotAllowed, Offline
from device.links import Links
from device.membership import Membership
from device.replica import Replica
from device.rules import last_admin
from proto.errors import DecodeError, SyncnodeError
from proto.identity import short_id
from proto.leave import LeaveRequest
from proto.logs import get_logger
from proto.manifest import DeviceEntry, Role
from proto.rpc import SyncnodeClient
from proto.service import MailboxKind
from proto.wakeup import Signal

log = get_logger("device.document")

LEAVE_TTL = 7 * 24 * 3600
"""How long a leave request waits for an admin to come online (the syncnodes' default
``max_mailbox_ttl``)."""
PAGE = 64


class Leaving:
    """One document's leave requests, sent and carried out (see the module doc)."""

    def __init__(self, replica: Replica, links: Links, membership: Membership) -> None:
        self.replica = replica
        self.host = replica.host
        self.links = links
        self.membership = membership
        self._wanted = Signal()
        self._notices = 0
        self._retry_at = -float("inf")

    # -- the leaver ------------------------------------------------------------------------------

    async def leave(self) -> None:
        """Ask the admins to remove this device, then mark the document ``left`` here."""
        r = self.replica
        if r.status != "active":
            raise DocumentError(f"document is {r.status}")
        m = r.manifest
        others = [d for d in m.devices if d.fingerprint != r.me]
        admins = [d for d in others if d.role == Role.ADMIN]
        if others and last_admin(m, r.me):
            raise NotAllowed("this device is the last admin; make another member admin first "
                             "(role DOC DEVICE admin), then leave")
        if admins:
            await self._ask(admins)
        with r.store.transaction() as db:
            db.execute("UPDATE documents SET status='left' WHERE group_id=?", (r.group_id,))
        r.status = "left"
        r.epoch_changed.fire()  # wakes the loops that run while the document is active
        log.info("left the document; an admin removes this device", doc=short_id(r.group_id),
                 admins=len(admins))

    async def _ask(self, admins: list[DeviceEntry]) -> None:
        r = self.replica
        payload = LeaveRequest.sign(self.host.key, r.group_id, r.epoch).encode()
        acceptors = r.manifest.acceptors()
        await self.links.wait_for_quorum()
        told = 0

        async def tell(node: bytes, client: SyncnodeClient) -> None:
            nonlocal told
            try:
                for admin in admins:
                    await client.mailbox_put(admin.sig_pub, MailboxKind.LEAVE_REQUEST, payload,
                                             LEAVE_TTL, group_id=r.group_id)
                told += 1
            except SyncnodeError as exc:
                log.info("leave request not stored", node=short_id(node), error=str(exc))

        # All syncnodes at once: an admin may act on the first copy, and once it removed us
        # the others refuse our puts (we are no longer a member), so one at a time could
        # fail a leave that was carried out (a fast commit takes a few milliseconds).
        async with trio.open_nursery() as nursery:
            for node, client in list(self.links.clients.items()):
                if node in acceptors:
                    nursery.start_soon(tell, node, client)
        if told < acceptors.quorum:
            await self.membership.learn_round()
            if r.manifest.device(r.me) is None:
                return  # refused because an admin already removed us: the leave is done
            raise Offline(f"the leave request reached {told} of {len(acceptors)} syncnodes; "
                          f"leaving needs {acceptors.quorum} (the document stays as it was)")

    # -- an admin --------------------------------------------------------------------------------

    def notify(self) -> None:
        """Something may be waiting in our mailbox (a syncnode's notice)."""
        self._notices += 1
        self._wanted.fire()

    async def run(self, client: SyncnodeClient) -> None:
        """Per syncnode link: carry out the leave requests left for this device (an admin)."""
        r = self.replica
        while r.status == "active":
            mark = self._notices
            me = r.manifest.device(r.me)
            if me is not None and me.role == Role.ADMIN and trio.current_time() >= self._retry_at:
                await self._read(client)
            if self._notices == mark:
                with trio.move_on_after(self.host.config.mailbox_interval):
                    await self._wanted.wait()

    async def _read(self, client: SyncnodeClient) -> None:
        r = self.replica
        me = self.host.key.public
        after = 0
        while True:
            page = await client.mailbox_fetch(me, after, PAGE)
            done = []
            for item in page.items:
                after = max(after, item.item_id)
                if item.kind == MailboxKind.LEAVE_REQUEST and await self._carry_out(item.payload):
                    done.append(item.item_id)
            if done:
                await client.mailbox_ack(me, done)
            if not page.more or r.status != "active":
                return

    async def _carry_out(self, payload: bytes) -> bool:
        """Remove the leaver of one request; True once nothing is left to do for it."""
        r = self.replica
        try:
            req = LeaveRequest.decode(payload)
        except DecodeError:
            return False  # not ours to judge (it expires)
        if req.body.group_id != r.group_id:
            return False  # another document's (same device key): left for it
        leaver = r.manifest.device(req.body.leaver)
        if leaver is None:
            return True  # out already
        if not req.verify(leaver.sig_pub):
            log.warning("leave request with a bad signature", doc=short_id(r.group_id))
            return True
        try:
            slot = await self.membership.remove_device(leaver.fingerprint.hex())
        except SyncnodeError as exc:
            self._retry_at = trio.current_time() + self.host.config.mailbox_interval
            log.info("cannot remove a leaving device yet", doc=short_id(r.group_id),
                     device=short_id(leaver.fingerprint), error=str(exc))
            return False
        log.info("removed a device at its request", doc=short_id(r.group_id),
                 device=short_id(leaver.fingerprint), slot=slot)
        return True
