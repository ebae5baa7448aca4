"""One shared document: the app's handle (:class:`Document`) on an MLS group, a CRDT, a decided
log, and its links to syncnodes.

:class:`Document` is a facade: the public API, and the wiring of the engine parts that do the
work, one concept each (every step below is one SQLite transaction that also saves the MLS
state it touched):

* **edit** (:meth:`Document.change`): run the app's function on the CRDT, store the update as
  local state and as "not yet sent". Nothing else; works offline.
* **flush, seal, send** (:mod:`device.outbox`): coalesce unsent edits into one payload, encrypt
  it in the current epoch, seal it in a signed envelope with the next seq and put it in the
  outbox. The outbox is sent to every syncnode of the group; an envelope leaves the outbox
  once a quorum stored it (then it is **durable**).
* **receive** (:mod:`device.inbox`): envelopes from live push and backfill are deduplicated by
  ``(sender, seq)``, checked against the manifest of their epoch, decrypted (messages of a
  future epoch wait for the commit), checked against the MLS sender, and delivered causally
  to the CRDT in batches; whole-document states for devices that cannot read older epochs.
* **decide** (:mod:`device.membership`): a decided value is applied only in slot order, after
  its certificate and the manifest rules verify (:func:`proto.manifest.verify_decided`) and
  MLS accepts the commit from the signer. Our own membership changes go through Paxos; if
  another device's commit wins the slot, ours is rebuilt on the new epoch and proposed again.
* **links** (:mod:`device.links`, :mod:`device.session`): one link per syncnode, redialled
  with backoff and dropped when the syncnode stops answering; over each, the syncnode is
  brought up to date with our log, and the document subscribes, backfills, learns and sends.
* **invites** (:mod:`device.invites`): join requests for our invites, and the document stored
  for a new device before its add.
* **roles** (:class:`proto.manifest.Role`): admins change membership, roles and syncnodes;
  writers edit; readers only receive (:meth:`Document.change` refuses, and nothing of theirs
  is sealed). Leaving is a request an admin carries out (:mod:`device.leaving`); every device
  rotates its own keys periodically (:mod:`device.rotation`).

The rules these parts follow (what goes into an update, when it is durable, whether a decision
applies, when a link is dead...) are plain functions in :mod:`device.rules`; the state they
share is the :class:`~device.replica.Replica`. Every engine part logs as ``device.document``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from device.compaction import Compactor
from device.crdt_loro import Editor
from device.errors import DocumentError, NotAllowed
from device.events import Alarm, Change, Event, Member, SyncStatus
from device.federation import HISTORY_WAIT, Federation, Say
from device.host import Host
from device.inbox import Inbox
from device.invites import Added, Invites
from device.leaving import Leaving
from device.links import Links
from device.membership import Membership
from device.mls import MlsGroup
from device.outbox import Outbox
from device.replica import Replica
from device.rotation import Rotation
from device.session import Session
from device.store import Store
from device.witness import Witness
from proto.causal import CausalBuffer
from proto.crdt import CrdtBackend, PartialChange
from proto.envelope import Envelope
from proto.identity import short_id
from proto.manifest import LogValue, Manifest, Role
from proto.paxos.messages import Decided
from proto.rpc import SyncnodeClient
from proto.ticket import NodeTicket

__all__ = ["Alarm", "Change", "Document", "Event", "Member", "SyncStatus"]


class Document:
    """A document of this device: open it with :meth:`Device.create_document`,
    :meth:`Device.join` or :meth:`Device.document`."""

    def __init__(self, device: Host, group_id: bytes) -> None:
        self.device = device
        self.replica = Replica(device, group_id)
        self.witness = Witness(self.replica)
        self.outbox = Outbox(self.replica, self.witness)
        self.inbox = Inbox(self.replica, self.outbox)
        self.links = Links(self.replica)
        self.membership = Membership(self.replica, self.outbox, self.inbox, self.links)
        self.invites = Invites(self.replica, self.outbox, self.links, self.membership)
        self.federation = Federation(self.replica, self.membership, self.links)
        self.leaving = Leaving(self.replica, self.links, self.membership)
        self.rotation = Rotation(self.replica, self.outbox, self.membership)
        self.compactor = Compactor(self.replica, self.outbox, self.membership)
        self.session = Session(self.replica, self.links, self.outbox, self.inbox,
                               self.membership, self.invites, self.leaving)

    # -- what the document is --------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.group_id.hex()

    @property
    def group_id(self) -> bytes:
        return self.replica.group_id

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def crdt_type(self) -> str:
        return self.replica.crdt_type

    @property
    def me(self) -> bytes:
        """This device's fingerprint."""
        return self.replica.me

    @property
    def store(self) -> Store:
        return self.replica.store

    @property
    def epoch(self) -> int:
        return self.replica.epoch

    @property
    def joined_epoch(self) -> int:
        return self.replica.joined_epoch

    @property
    def status(self) -> str:
        """``active``, ``removed`` (this device was removed), ``left`` (this device left: an
        admin removes it) or ``failed`` (see alarms)."""
        return self.replica.status

    @property
    def manifest(self) -> Manifest:
        return self.replica.manifest

    @property
    def values(self) -> dict[int, LogValue]:
        """The decided log this device applied, by slot (slot 0: the genesis)."""
        return self.replica.values

    @property
    def decided(self) -> dict[int, Decided]:
        """The decision certificates of :attr:`values` (slots from 1)."""
        return self.replica.decided

    @property
    def mls(self) -> MlsGroup:
        return self.replica.mls

    @property
    def crdt(self) -> CrdtBackend:
        return self.replica.crdt

    @property
    def buffer(self) -> CausalBuffer:
        return self.replica.buffer

    @property
    def state_loaded(self) -> trio.Event:
        """Set once this device holds the document's content (always, except right after a
        join until a member's state arrived)."""
        return self.replica.state_loaded

    @property
    def next_seq(self) -> int:
        return self.outbox.next_seq

    @property
    def future(self) -> dict[tuple[bytes, int], Envelope]:
        return self.inbox.future

    @property
    def clients(self) -> dict[bytes, SyncnodeClient]:
        """The syncnode links that are up, by node id."""
        return self.links.clients

    # -- content -----------------------------------------------------------------------------

    def value(self) -> Any:
        """The document as plain Python values."""
        return self.replica.crdt.value()

    def change(self, fn: Callable[[Editor], Any]) -> None:
        """Apply a local edit now (also offline); it is sent within the flush interval.

        ``fn`` receives an :class:`~device.crdt_loro.Editor`: ``e.text("body").insert(0, "hi")``,
        ``e.map("meta").insert("title", "x")``, ``e.list("items").push(1)``,
        ``e.counter("likes").increment(1)``. When this returns the edit is in the database:
        it survives a crash of the process at once, and a power loss once sealed into an
        update (within ``flush_interval``/``coalesce_max``; that step fsyncs).
        """
        if self.status != "active":
            raise DocumentError(f"document is {self.status}")
        if not self.replica.may_send:
            raise NotAllowed("this device is a reader in this document and cannot edit it; "
                             "an admin can make it a writer")
        failed: BaseException | None = None
        try:
            update = self.replica.crdt.change(fn)
        except PartialChange as partial:  # keep what it did do: saved state = state in memory
            update, failed = partial.update, partial.error
        if update is None:
            return
        self.outbox.edit(update)
        self.replica.emit(Change("local", (short_id(self.me),), 1))
        if failed is not None:
            raise failed

    def flush(self) -> None:
        """Seal pending local edits into an update now rather than at the flush interval."""
        self.outbox.flush()

    def publish_state(self) -> None:
        """Store the whole document, encrypted in the current epoch, on the syncnodes (see
        :meth:`device.outbox.Outbox.publish_state`)."""
        self.outbox.publish_state()

    def compact_local(self) -> None:
        """Replace the CRDT updates stored on this device by one snapshot (bounded load time;
        happens by itself every ``snapshot_every`` updates)."""
        self.replica.compact()

    async def compact(self) -> int | None:
        """Compact the document's history on its syncnodes: store the whole document there
        and commit a compaction point, after which they delete the updates it covers
        (:mod:`device.compaction`). Writers and admins; returns the slot (None: a point
        decided meanwhile covers ours). Also happens by itself (``compact_every_updates``)."""
        return await self.compactor.compact()

    # -- events and status -------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback`` with every :class:`Change` and :class:`Alarm`; returns a function
        that unsubscribes."""
        listeners = self.replica.listeners
        listeners.append(callback)
        return lambda: listeners.remove(callback)

    @asynccontextmanager
    async def events(self, buffer: int = 1024) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        """``async with doc.events() as changes: async for ev in changes: ...``"""
        send, receive = trio.open_memory_channel[Event](buffer)

        def push(ev: Event) -> None:
            try:
                send.send_nowait(ev)
            except trio.WouldBlock:
                pass

        unsubscribe = self.subscribe(push)
        try:
            yield receive
        finally:
            unsubscribe()

    def members(self) -> list[Member]:
        return [Member(short_id(d.fingerprint), d.fingerprint, d.role.name.lower(),
                       d.endpoint_id, d.fingerprint == self.me)
                for d in self.manifest.devices]

    def sync_status(self) -> SyncStatus:
        waiting = self.inbox.waiting_for()
        return SyncStatus(self.epoch, self.outbox.durable(), self.outbox.unsent(),
                          len(self.outbox.pending), tuple(short_id(n) for n in self.clients),
                          len(self.manifest.syncnodes), self.status, waiting,
                          waiting > 0 and self.inbox.gap_asks > 0)

    def alarms(self) -> list[Alarm]:
        return self.replica.alarms()

    async def wait_durable(self) -> None:
        """Until every edit made so far is stored by a quorum of syncnodes."""
        self.links.wake_below_quorum()
        while self.status == "active":
            s = self.sync_status()
            if s.unsent == 0 and s.outbox == 0:
                return
            await self.outbox.durable_changed.wait()

    async def wait_caught_up(self) -> None:
        """Until this run has learned, from some syncnode, the decisions it missed while it
        was not running. Seal edits after it: an update sealed in an epoch the group has left
        cannot be read by members added since (the flusher waits the same way, bounded by
        ``connect_timeout``; :meth:`flush` does not)."""
        await self.replica.learned.wait()

    async def wait_connected(self, count: int) -> None:
        """Until links to ``count`` syncnodes are up."""
        await self.links.wait_connected(count)

    async def wait_epoch(self, epoch: int) -> None:
        while self.epoch < epoch:
            await self.replica.epoch_changed.wait()

    # -- membership --------------------------------------------------------------------------

    def invite(self, ttl: float = 24 * 3600, role: Role = Role.WRITER) -> str:
        """A one-time invite ticket for a new device (see :meth:`Device.join`), valid for
        ``ttl`` seconds; the device is added as ``role``. The add happens when the new
        device's request arrives while this device is online; :meth:`wait_invite` follows it.
        Admins only (:class:`NotAllowed` otherwise, before anything is stored)."""
        return self.invites.create(ttl, role)

    async def wait_invite(self, ticket: str, *, grace: float = 10.0,
                          say: Callable[[str], None] = lambda _m: None) -> tuple[Added, str]:
        """Until the device holding ``ticket`` is added and holds the document (see
        :meth:`device.invites.Invites.wait`)."""
        return await self.invites.wait(ticket, grace=grace, say=say)

    async def add_device(self, key_package: bytes, sig_pub: bytes, endpoint_id: bytes,
                         role: Role = Role.WRITER, addrs: tuple[str, ...] = ()) -> int:
        """Add a device by its KeyPackage (through Paxos); returns the slot that added it.
        ``addrs`` (its endpoint's addresses) go into the manifest as dialling hints."""
        return await self.membership.add_device(key_package, sig_pub, endpoint_id, role, addrs)

    async def remove_device(self, device_id: str) -> int:
        """Remove a member (by id prefix); returns the slot of the removal."""
        return await self.membership.remove_device(device_id)

    async def rotate_keys(self) -> int:
        """Commit a key update (new epoch secrets, fresh leaf key); returns its slot. Any
        member may; it also happens by itself (``rotate_keys_after``, :mod:`device.rotation`)."""
        return await self.membership.rotate_keys()

    async def set_role(self, device_id: str, role: Role | str) -> int:
        """Give a member (by id prefix) ``role`` (a :class:`Role` or ``"admin"``,
        ``"writer"``, ``"reader"``) through Paxos; returns the slot. Admins only; the last
        admin cannot be demoted (:class:`NotAllowed`)."""
        if isinstance(role, str):
            try:
                role = Role[role.upper()]
            except KeyError:
                raise DocumentError(f"no role {role!r} (admin, writer or reader)") from None
        return await self.membership.set_role(device_id, role)

    async def leave(self) -> None:
        """Leave the document: ask its admins to remove this device (through the syncnodes'
        mailboxes, see :mod:`device.leaving`), then stop syncing it here at once
        (:attr:`status` becomes ``left``). The last admin must make another member admin
        first (:class:`NotAllowed`)."""
        await self.leaving.leave()

    # -- the document's syncnodes (admins; see :mod:`device.federation`) -------------------------

    async def add_syncnode(self, ticket: str | NodeTicket, *, wait: float = HISTORY_WAIT,
                           say: Say | None = None) -> int:
        """Add a syncnode (its ticket); returns the slot, once it holds the history."""
        return await self.federation.add(_ticket(ticket), wait=wait, say=say or _quiet)

    async def remove_syncnode(self, node_id: str, *, say: Say | None = None) -> int:
        """Remove a syncnode (by node id prefix) once the others hold the history."""
        return await self.federation.remove(node_id, say=say or _quiet)

    async def replace_syncnode(self, old: str, new: str | NodeTicket, *,
                               wait: float = HISTORY_WAIT, say: Say | None = None
                               ) -> tuple[int, int]:
        """Replace syncnode ``old`` (id prefix) by ``new`` (ticket): add, wait for its history,
        remove; returns both slots."""
        return await self.federation.replace(old, _ticket(new), wait=wait, say=say or _quiet)

    # -- the engine's entry points (the device, joins, tests) --------------------------------

    async def run(self) -> None:
        """All the document's background work; runs until cancelled or the doc is removed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.outbox.flusher)
            nursery.start_soon(self.session.processor)
            nursery.start_soon(self.rotation.run)
            nursery.start_soon(self.compactor.run)
            nursery.start_soon(self.links.run, self.session.serve)

    def receive(self, envelopes: Sequence[Envelope]) -> int:
        """Process envelopes from a syncnode; returns how many payloads were delivered."""
        return self.inbox.receive(envelopes)

    def load_state(self, snapshot: bytes, covers: dict[bytes, int]) -> None:
        """Load a member's snapshot that contains every payload in ``covers`` (a verified p2p
        transfer); backfill then only fetches what came after it."""
        self.inbox.load_state(snapshot, covers)

    async def apply_decided(self, d: Decided) -> bool:
        """Apply the decision for the next slot (or check a known one for equivocation).
        Returns True if the epoch advanced."""
        return await self.membership.apply_decided(d)

    async def learn(self, client: SyncnodeClient) -> None:
        """Fetch and apply every decision the syncnode has beyond our epoch."""
        await self.membership.learn(client)

    def relink(self, node_id: bytes) -> None:
        """Drop the link to ``node_id`` (or its pending dial) and dial again at once."""
        self.links.relink(node_id)


def _ticket(ticket: str | NodeTicket) -> NodeTicket:
    return ticket if isinstance(ticket, NodeTicket) else NodeTicket.parse(ticket)


def _quiet(_message: str) -> None:
    pass
