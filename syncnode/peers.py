"""Catch-up of the decided log from peer syncnodes.

A syncnode that was down (or partitioned) while slots were decided learns them afterwards from
the other syncnodes of the group: it fetches decided values with their certificates and feeds
each through the same verification as a certificate sent by a device
(:meth:`syncnode.service.Service.learn`), so a peer is never trusted, only its evidence.

The sweep also hands each peer this node's signed address record, so devices that still reach
one syncnode of a group learn where a moved one is now (:mod:`proto.address`).

Triggers: a request that shows this node is behind (a Paxos message, decision or envelope for a
later slot/epoch) asks for one group at once; a periodic sweep compares heads with each peer in
batches (so 10,000 idle groups cost a few small requests, not 10,000).
"""

from __future__ import annotations

from collections import defaultdict

import trio

from proto.address import AddressRecord
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import SyncnodeEntry
from proto.rpc import SyncnodeClient
from proto.service import MAX_HEADS
from proto.ticket import NodeTicket, preferred
from proto.transport.base import Transport
from syncnode.service import RequestError, Service
from syncnode.storage import rows

log = get_logger("syncnode.peers")

CONNECT_TIMEOUT = 5.0


class PeerSync:
    def __init__(self, service: Service, transport: Transport, *,
                 overrides: dict[bytes, list[str]] | None = None, interval: float = 30.0
                 ) -> None:
        self.service = service
        self.transport = transport
        self.overrides = overrides or {}
        self.interval = interval
        self._wanted: set[bytes] = set()
        self._refused: dict[tuple[bytes, bytes], float] = {}
        """(group, peer) -> until when not to ask that peer again (it served a decision we
        refuse: without this, catching up from it loops as fast as requests come in)."""
        self._wake = trio.Event()
        self._announced: dict[bytes, AddressRecord] = {}
        """Peer -> our address record it has acknowledged (sent again when it changes)."""
        service.catchup = self.request

    def request(self, group_id: bytes) -> None:
        self._wanted.add(group_id)
        self._wake.set()

    def _ticket(self, entry: SyncnodeEntry) -> NodeTicket:
        """Where to dial a peer: the operator's override, else its newest signed address
        record (it may have moved since the manifest was written) before the manifest's."""
        if entry.node_id in self.overrides:
            return NodeTicket(entry.node_id, tuple(self.overrides[entry.node_id]))
        learned = self.service.addresses.lookup([entry.node_id])
        return NodeTicket(entry.node_id,
                          preferred(learned[0].body.addrs if learned else (), entry.addrs))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        await self.sweep()
        while True:
            with trio.move_on_after(self.interval) as timer:
                await self._wake.wait()
            self._wake = trio.Event()
            if timer.cancelled_caught:
                await self.sweep()
            wanted, self._wanted = self._wanted, set()
            for group_id in wanted:
                await self.catch_up(group_id)

    async def catch_up(self, group_id: bytes) -> int:
        """Fetch decisions of one group from its other syncnodes until none has more."""
        g = self.service.group(group_id)
        if g is None:
            return 0
        learned = 0
        now = trio.current_time()
        for entry in g.manifest.syncnodes:
            if entry.node_id == self.service.node_id:
                continue
            if self._refused.get((group_id, entry.node_id), -1.0) > now:
                continue  # it served a decision we refuse; ask again at a later sweep
            try:
                learned += await self._from_peer(group_id, entry)
            except (SyncnodeError, trio.TooSlowError) as exc:
                log.warning("catch-up from peer failed", peer=short_id(entry.node_id),
                            group=short_id(group_id), error=str(exc))
        if learned:
            log.info("caught up", group=short_id(group_id), decisions=learned,
                     top=g.top)
        return learned

    async def _from_peer(self, group_id: bytes, entry: SyncnodeEntry) -> int:
        g = self.service.group(group_id)
        assert g is not None
        learned = 0
        async with SyncnodeClient.connect(self.transport, self._ticket(entry),
                                          timeout=CONNECT_TIMEOUT) as client:
            while True:
                page = await client.fetch_decided(group_id, g.top + 1, 64)
                for decided in page.decided:
                    try:
                        learned += await self.service.learn(
                            decided, source=f"peer {short_id(entry.node_id)}")
                    except RequestError as exc:
                        log.warning("peer served a decision we refuse",
                                    peer=short_id(entry.node_id), group=short_id(group_id),
                                    slot=decided.certificate.slot, error=exc.detail)
                        self._refused[(group_id, entry.node_id)] = \
                            trio.current_time() + self.interval
                        return learned
                if not page.decided or g.top >= page.top:
                    return learned

    async def sweep(self) -> None:
        """Compare heads with every peer of every hosted group; catch up where behind."""
        by_peer: dict[bytes, list[bytes]] = defaultdict(list)
        entries: dict[bytes, SyncnodeEntry] = {}
        for (group_id,) in list(rows(self.service.db, "SELECT group_id FROM groups")):
            g = self.service.group(group_id)
            if g is None:
                continue
            for entry in g.manifest.syncnodes:
                if entry.node_id != self.service.node_id:
                    by_peer[entry.node_id].append(group_id)
                    entries[entry.node_id] = entry
        behind: set[bytes] = set()
        for node_id, group_ids in by_peer.items():
            try:
                async with SyncnodeClient.connect(self.transport, self._ticket(entries[node_id]),
                                                  timeout=CONNECT_TIMEOUT) as client:
                    own = self.service.addresses.own
                    if own is not None and self._announced.get(node_id) != own:
                        # Tell the peer where we are now: it relays that to devices.
                        await client.put_address(own)
                        self._announced[node_id] = own
                    for i in range(0, len(group_ids), MAX_HEADS):
                        heads = await client.heads(group_ids[i:i + MAX_HEADS])
                        for head in heads.heads:
                            g = self.service.group(head.group_id)
                            if g is not None and head.top > g.top:
                                behind.add(head.group_id)
            except (SyncnodeError, trio.TooSlowError) as exc:
                log.debug("peer unreachable for sweep", peer=short_id(node_id), error=str(exc))
        for group_id in behind:
            await self.catch_up(group_id)
