"""What a document does over each link to a syncnode, once the link is authenticated.

:meth:`Session.serve` runs one link's session:

1. bring the syncnode up to date with our log (:meth:`Session.sync_node`: register the group,
   tell it the decisions it lacks, :func:`device.rules.slots_to_tell`), then subscribe to the
   group's live feed; from then on the link counts as up (:meth:`device.links.Links.up`);
2. alongside, for as long as the link lasts: send the outbox (:meth:`device.outbox.Outbox.push`),
   announce each decision we apply from now on, learn when a gap shows, read join requests
   (:meth:`device.invites.Invites.run`) and leave requests (:meth:`device.leaving.Leaving.run`),
   keep the link alive and follow moved syncnodes (:mod:`device.links`);
3. learn the decisions the syncnode has beyond our epoch, then **backfill**: ask for the
   envelopes past our per-sender watermarks (:meth:`proto.causal.CausalBuffer.watermarks`),
   page after page (:func:`device.rules.backfill_again`), and again every
   ``backfill_interval``; each page's signed statement is checked, and so are the
   syncnode's signed heads, now and every ``holdings_interval`` (:mod:`device.witness`);
4. pass what the subscription pushes to one queue, which :meth:`Session.processor` applies in
   arrival order (envelopes in batches, through :mod:`device.inbox`; decisions through
   :mod:`device.membership`), whichever link it came from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
import trio.lowlevel

from device.inbox import Inbox
from device.invites import Invites
from device.leaving import Leaving
from device.links import Links
from device.membership import Membership
from device.outbox import Outbox
from device.replica import Replica
from device.rules import backfill_again, learn_after_sync, named_since, slots_to_tell
from proto.envelope import Envelope
from proto.errors import TransportError
from proto.identity import short_id
from proto.logs import get_logger
from proto.messages import ErrorCode
from proto.rpc import RemoteError, Subscription, SyncnodeClient
from proto.service import MailboxNotice

log = get_logger("device.document")

QUEUE = 4096
"""Pushed items waiting for the processor (a link's subscription waits while it is full)."""
BATCH = 1024
"""Most pushed items the processor applies in one step."""


class Session:
    """One document's sessions with its syncnodes (see the module doc)."""

    def __init__(self, replica: Replica, links: Links, outbox: Outbox, inbox: Inbox,
                 membership: Membership, invites: Invites, leaving: Leaving) -> None:
        self.replica = replica
        self.links = links
        self.outbox = outbox
        self.inbox = inbox
        self.membership = membership
        self.invites = invites
        self.leaving = leaving
        self._queue_send, self._queue = trio.open_memory_channel[tuple[SyncnodeClient, Any]](
            QUEUE)

    async def serve(self, client: SyncnodeClient) -> None:
        """One link's session (see the module doc); ends with the link."""
        known = await self.sync_node(client)
        async with self._subscription(client) as sub, trio.open_nursery() as nursery:
            self.links.up(client)
            nursery.start_soon(self.outbox.push, client, self.sync_node)
            nursery.start_soon(self._announce, client, known)
            nursery.start_soon(self._learner, client)
            nursery.start_soon(self.invites.run, client)
            nursery.start_soon(self.leaving.run, client)
            nursery.start_soon(self.links.keepalive, client)
            nursery.start_soon(self.links.follow_addresses, client)
            await self.membership.learn(client)
            self.replica.learned.set()
            await self.backfill(client)
            nursery.start_soon(self._periodic_backfill, client)
            nursery.start_soon(self.outbox.witness.run, client)
            async for item in sub:
                if isinstance(item, MailboxNotice):
                    self.invites.notify()
                    self.leaving.notify()
                    continue
                await self._queue_send.send((client, item))
            raise TransportError("subscription ended")

    @asynccontextmanager
    async def _subscription(self, client: SyncnodeClient) -> AsyncIterator[Subscription]:
        """The group's live feed from ``client``, its start bounded by ``keepalive_timeout``:
        it has a stream of its own, which the link's watchdog does not see."""
        limit = self.replica.host.config.keepalive_timeout
        async with AsyncExitStack() as stack:
            sub: Subscription | None = None
            with trio.move_on_after(limit):
                sub = await stack.enter_async_context(client.subscribe(self.replica.group_id))
            if sub is None:
                raise TransportError(f"no answer to the subscription within {limit:g} s")
            yield sub

    # -- the decided log -------------------------------------------------------------------------

    async def sync_node(self, client: SyncnodeClient) -> int:
        """Make the syncnode know our group and every decision we know (it may have missed
        the genesis while offline, or the decision that added us). Returns the slot up to
        which it now knows our log."""
        r = self.replica
        heads = {h.group_id: h.top for h in (await client.heads([r.group_id])).heads}
        top = heads.get(r.group_id)
        hidden = top is None
        if top is None:
            # Not hosted there, or not shown to us: a syncnode shows a group's head only to
            # its current members and syncnodes, so a device removed meanwhile sees none. It
            # may still read on from its own epoch, up to its removal (learn, below).
            await self._host_group(client)
            top = 0
        epoch = r.epoch
        for slot in slots_to_tell(top, epoch):
            await self._tell(client, slot)
        if learn_after_sync(hidden, top, r.epoch):
            await self.membership.learn(client)
        return max(top, epoch)

    async def _host_group(self, client: SyncnodeClient) -> None:
        """Hand the syncnode our group: a founding syncnode registers the genesis; one that an
        admin added later adopts it, given the decision that named it (it verifies the log up to
        there, from us below or from its peers, then pulls the envelopes from them)."""
        r = self.replica
        named = named_since([r.values[s].manifest for s in range(r.epoch + 1)], client.node_id)
        if named is None:
            # Not one of the current syncnodes (a link closing after a removal): leave it be.
            return
        if named == 0 or client.node_id in r.values[0].manifest.acceptors():
            await client.register_group(r.values[0])
        else:
            await client.adopt_group(r.values[0], r.decided[named])

    async def _announce(self, client: SyncnodeClient, known: int) -> None:
        """Tell the syncnode each decision we apply from now on that it may lack. A decision
        reached while it was cut off (the proposer's announcement lost) would otherwise stay
        with the devices that applied it, and the others, who learn only from syncnodes,
        would never see it (found by the simulator)."""
        r = self.replica
        while r.status == "active":
            if known >= r.epoch:
                await r.epoch_changed.wait()
                continue
            known += 1
            await self._tell(client, known)

    async def _tell(self, client: SyncnodeClient, slot: int) -> None:
        try:
            await client.learn(self.replica.decided[slot])
        except RemoteError as exc:
            if exc.code not in (ErrorCode.CONFLICT, ErrorCode.INVALID):
                raise
            # The syncnode holds another certified value for this slot, or another chain
            # before it: syncnodes equivocated. It keeps the proof; we raise our alarm when its
            # value reaches us. Retrying would not change its mind.
            log.error("syncnode holds a conflicting decision",
                      doc=short_id(self.replica.group_id), node=short_id(client.node_id),
                      slot=slot, error=exc.detail)

    async def _learner(self, client: SyncnodeClient) -> None:
        while True:
            await self.replica.learn_wanted.wait()
            await self.membership.learn(client)

    # -- envelopes -------------------------------------------------------------------------------

    async def backfill(self, client: SyncnodeClient) -> None:
        """Fetch the envelopes past our watermarks from ``client``, every page."""
        r = self.replica
        more = True
        started = trio.current_time()
        served: dict[bytes, int] = {}
        while more and r.status == "active":
            before = r.buffer.watermarks()
            page = await client.backfill(r.group_id, before)
            self.outbox.witness.backfilled(client.node_id, before, page)
            for env in page.envelopes:
                served[env.sender] = max(served.get(env.sender, 0), env.seq)
            async with r.apply_lock:
                self.inbox.receive(page.envelopes)
            more = backfill_again(page.more, before, r.buffer.watermarks())
            await trio.lowlevel.checkpoint()
        self.inbox.check_gap(client.node_id if not more else None, started, served)
        self.inbox.ask_if_missing()

    async def _periodic_backfill(self, client: SyncnodeClient) -> None:
        while self.replica.status == "active":
            await trio.sleep(self.replica.host.config.backfill_interval)
            await self.backfill(client)

    async def processor(self) -> None:
        """Apply pushed items in arrival order, envelopes in batches. While more keep coming,
        the received steps are stored together (:meth:`Inbox.receive` with ``defer``): by the
        next transaction of the device, or when :meth:`Inbox.save_deadline` passes
        (:mod:`device.receive_journal`)."""
        try:
            await self._process()
        finally:
            self.inbox.save()

    async def _process(self) -> None:
        while True:
            got = None
            with trio.move_on_at(self.inbox.save_deadline()):
                got = await self._queue.receive()
            if got is None:  # quiet long enough, or many waiting: store what was received
                self.inbox.save()
                continue
            batch = [got]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.receive_nowait())
                except trio.WouldBlock:
                    break
            envelopes: list[Envelope] = []
            async with self.replica.apply_lock:
                for _client, it in batch:
                    if isinstance(it, Envelope):
                        envelopes.append(it)
                        continue
                    if envelopes:
                        self.inbox.receive(envelopes, defer=True)
                        envelopes = []
                    self.membership.apply_decided_now(it)
                if envelopes:
                    self.inbox.receive(envelopes, defer=True)
            self.inbox.check_gap()
            self.inbox.ask_if_missing()
