"""Changing a document's syncnodes: add, remove and replace, live, with the history.

A document's syncnodes are named by its manifest, and the acceptors of slot ``s`` are those of
manifest ``s - 1``: an admin's commit whose manifest names a new set changes who orders the
group from the next slot on (:func:`proto.manifest.validate_transition` lets only admins do it).
What this module adds is the order of steps that keeps every acknowledged update safe:

* **add** (:meth:`Federation.add`): commit the manifest naming the new syncnode; the links
  follow the manifest (:meth:`device.links.Links.run`), and the first link to the new syncnode
  hands it the group (``AdoptGroup``: the genesis and the decision that named it) and every
  decision it lacks (:meth:`device.session.Session.sync_node`). The syncnode then pulls the
  stored envelopes from the others itself, verified, resumable. ``add`` returns once it reports
  its history complete (``GroupStatus.history_complete``): from then on it holds every update a
  quorum of the old set acknowledged.
* **remove** (:meth:`Federation.remove`): only once the remaining syncnodes hold the history
  (:func:`device.rules.removal_safe`), so no acknowledged update is left on too few of them.
  The removed syncnode refuses the group's new requests; it keeps serving the decided log to
  the group's devices for its grace period, which is how a device that was offline follows.
* **replace** (:meth:`Federation.replace`): add the new one (waiting for its history), then
  remove the old one. Two slots, and never fewer syncnodes holding the history than before;
  moving a document between operators is a sequence of replacements.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from device.errors import DocumentError, Offline
from device.links import Links
from device.membership import Membership
from device.replica import Replica
from device.rules import named_since, removal_safe, syncnodes_with, syncnodes_without
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import LogValue, Role, SyncnodeEntry, next_manifest, sign_value
from proto.ticket import NodeTicket

log = get_logger("device.document")

HISTORY_WAIT = 600.0
"""How long :meth:`Federation.add` waits, by default, for a new syncnode's history."""
POLL_MIN, POLL_MAX = 0.05, 1.0

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


class Federation:
    """One document's syncnode changes (see the module doc)."""

    def __init__(self, replica: Replica, membership: Membership, links: Links) -> None:
        self.replica = replica
        self.membership = membership
        self.links = links

    def _require_admin(self) -> None:
        me = self.replica.manifest.device(self.replica.me)
        if me is None or me.role != Role.ADMIN:
            raise DocumentError("only an admin of the document can change its syncnodes")

    def find(self, node_id: str) -> SyncnodeEntry:
        """The syncnode of the document whose id starts with ``node_id`` (hex)."""
        prefix = node_id.lower()
        found = [e for e in self.replica.manifest.syncnodes if e.node_id.hex().startswith(prefix)]
        if len(found) != 1:
            raise DocumentError(f"{'no' if not found else 'more than one'} syncnode of this "
                                f"document matches {node_id!r}")
        return found[0]

    async def _commit_syncnodes(self, change: Callable[[tuple[SyncnodeEntry, ...]],
                                                       tuple[SyncnodeEntry, ...] | None]) -> int:
        r = self.replica

        def build() -> LogValue | None:
            syncnodes = change(r.manifest.syncnodes)
            if syncnodes is None:
                return None  # already done (by us in an earlier attempt, or another admin)
            commit = r.mls.build_update()
            m = next_manifest(r.manifest, commit, syncnodes=syncnodes)
            return sign_value(r.host.key, m, commit)

        return await self.membership.commit(build)

    async def add(self, ticket: NodeTicket, *, wait: float = HISTORY_WAIT,
                  say: Say = _quiet) -> int:
        """Add the syncnode of ``ticket``; returns the slot that added it, once it holds the
        history (or raises :class:`Offline` after ``wait`` seconds; it keeps pulling, and
        :meth:`history_status` tells when it is done)."""
        self._require_admin()
        entry = SyncnodeEntry(ticket.node_id, tuple(ticket.addrs[:8]))
        try:
            syncnodes_with(self.replica.manifest.syncnodes, entry)
        except ValueError as exc:
            raise DocumentError(str(exc)) from None

        def change(current: tuple[SyncnodeEntry, ...]) -> tuple[SyncnodeEntry, ...] | None:
            if any(e.node_id == entry.node_id for e in current):
                return None
            return syncnodes_with(current, entry)

        say(f"committing the new syncnode set ({len(self.replica.manifest.syncnodes) + 1} "
            "syncnodes)...")
        slot = await self._commit_syncnodes(change)
        log.info("syncnode added", doc=short_id(self.replica.group_id),
                 node=short_id(entry.node_id), slot=slot)
        say(f"slot {slot}: syncnode {short_id(entry.node_id)} added; it is pulling the "
            "document's history from the others...")
        await self.wait_history(entry.node_id, wait, say)
        return slot

    async def remove(self, node_id: str, *, say: Say = _quiet) -> int:
        """Remove a syncnode (by id prefix) once the others hold the history; returns the
        slot. A removed syncnode refuses the group from then on."""
        self._require_admin()
        target = self.find(node_id).node_id
        try:
            remaining = syncnodes_without(self.replica.manifest.syncnodes, target)
        except ValueError as exc:
            raise DocumentError(str(exc)) from None
        ids = [e.node_id for e in remaining]
        say("checking that the remaining syncnodes hold the whole history...")
        complete = await self._history_answers(ids)
        if not removal_safe(complete, ids):
            pulling = [short_id(n) for n in ids if complete.get(n) is False]
            silent = [short_id(n) for n in ids if n not in complete]
            raise DocumentError(
                "not removed: every remaining syncnode must hold the whole history first; " +
                "; ".join([*([f"still pulling it: {', '.join(pulling)}"] if pulling else []),
                           *([f"not reachable: {', '.join(silent)}"] if silent else [])]))

        def change(current: tuple[SyncnodeEntry, ...]) -> tuple[SyncnodeEntry, ...] | None:
            if all(e.node_id != target for e in current):
                return None
            return syncnodes_without(current, target)

        slot = await self._commit_syncnodes(change)
        log.info("syncnode removed", doc=short_id(self.replica.group_id),
                 node=short_id(target), slot=slot)
        say(f"slot {slot}: syncnode {short_id(target)} removed")
        return slot

    async def replace(self, old: str, ticket: NodeTicket, *, wait: float = HISTORY_WAIT,
                      say: Say = _quiet) -> tuple[int, int]:
        """Add the syncnode of ``ticket`` (waiting for its history), then remove ``old``;
        returns both slots."""
        self._require_admin()
        self.find(old)  # fail before any change when ``old`` is not one of ours
        if ticket.node_id not in self.replica.manifest.acceptors():
            added = await self.add(ticket, wait=wait, say=say)
        else:  # a replacement interrupted after its add: finish it
            await self.wait_history(ticket.node_id, wait, say)
            r = self.replica
            added = named_since([r.values[s].manifest for s in range(r.epoch + 1)],
                                ticket.node_id) or r.epoch
        return added, await self.remove(old, say=say)

    # -- the history of a new syncnode ------------------------------------------------------------

    async def history_status(self, node_id: bytes) -> bool | None:
        """Whether a linked syncnode holds the group's whole history (None: not linked, or it
        did not answer)."""
        client = self.links.clients.get(node_id)
        if client is None:
            return None
        try:
            with trio.move_on_after(self.replica.host.config.keepalive_timeout):
                status = await client.group_status(self.replica.group_id)
                return bool(status.serving and status.history_complete)
        except SyncnodeError as exc:
            log.debug("no group status", node=short_id(node_id), error=str(exc))
        return None

    async def _history_answers(self, nodes: list[bytes]) -> dict[bytes, bool]:
        await self.links.wait_for_quorum()
        out: dict[bytes, bool] = {}

        async def one(node: bytes) -> None:
            done = await self.history_status(node)
            if done is not None:
                out[node] = done

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node)
        return out

    async def wait_history(self, node_id: bytes, wait: float, say: Say = _quiet) -> None:
        """Until the syncnode reports the group's whole history (raises :class:`Offline` after
        ``wait`` seconds)."""
        poll = POLL_MIN
        said = False
        with trio.move_on_after(wait):
            while True:
                if await self.history_status(node_id):
                    say(f"syncnode {short_id(node_id)} holds the history")
                    return
                if not said and node_id not in self.links.clients:
                    say(f"waiting for a link to syncnode {short_id(node_id)}...")
                    said = True
                await trio.sleep(poll)
                poll = min(POLL_MAX, poll * 2)
        raise Offline(f"syncnode {short_id(node_id)} did not report the document's history "
                      f"within {wait:g} s; it is part of the document and keeps pulling it "
                      "(do not remove another syncnode until it has)")
