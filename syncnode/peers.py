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
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

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
from syncnode.budgets import LRU, TokenBucket
from syncnode.groups import GroupState
from syncnode.service import Service
from syncnode.session import RequestError

log = get_logger("syncnode.peers")

CONNECT_TIMEOUT = 5.0
BACKOFF_BASE = 5.0
BACKOFF_MAX = 600.0
KNOWN_FOR = 24 * 3600.0
"""A peer that answered within this long is "known": dialling it costs no dial budget."""
PEERS_AT_ONCE = 4
"""Peers of one group fetched from at once."""
UNKNOWN_DIALS_AT_ONCE = 4
"""Dials in progress at once to peers that never answered (made-up ones time out slowly)."""


class PeerSync:
    """Catch-up and the periodic sweep. Any member of any group can name syncnodes in its
    genesis, made-up ones included, so dialling is bounded (SECURITY.md, finding 3 of issue 14):
    each group catches up in its own task (``catchup_concurrency`` at once), its peers are dialled
    concurrently, a peer that fails backs off exponentially (5 s up to 10 min), and dials to peers
    that never answered spend a node-wide token bucket (``peer_dials_per_second``) and at most
    :data:`UNKNOWN_DIALS_AT_ONCE` slots. Peers that answered recently skip both, so honest groups
    never wait behind a group naming made-up syncnodes."""

    def __init__(self, service: Service, transport: Transport, *,
                 overrides: dict[bytes, list[str]] | None = None, interval: float = 30.0
                 ) -> None:
        self.service = service
        self.transport = transport
        self.overrides = overrides or {}
        self.interval = interval
        lim = service.limits
        self._wanted: set[bytes] = set()
        self._running: set[bytes] = set()
        self._refused: dict[tuple[bytes, bytes], float] = {}
        """(group, peer) -> until when not to ask that peer again (it served a decision we
        refuse: without this, catching up from it loops as fast as requests come in)."""
        self._backoff = LRU(100_000)
        """Peer -> (not before, consecutive failures)."""
        self._known = LRU(100_000)
        """Peer -> when it last answered."""
        self._dials: TokenBucket | None = None  # made in run(): it reads trio's clock
        self._groups = trio.CapacityLimiter(max(1, lim.catchup_concurrency))
        self._unknown = trio.CapacityLimiter(UNKNOWN_DIALS_AT_ONCE)
        self._wake = trio.Event()
        self._announced: dict[bytes, AddressRecord] = {}
        """Peer -> our address record it has acknowledged (sent again when it changes)."""
        service.catchup = self.request

    def request(self, group_id: bytes) -> None:
        self._wanted.add(group_id)
        self._wake.set()

    async def _ticket(self, entry: SyncnodeEntry) -> NodeTicket:
        """Where to dial a peer: the operator's override, else its newest signed address
        record (it may have moved since the manifest was written) before the manifest's."""
        if entry.node_id in self.overrides:
            return NodeTicket(entry.node_id, tuple(self.overrides[entry.node_id]))
        learned = await self.service.addresses.lookup([entry.node_id])
        return NodeTicket(entry.node_id,
                          preferred(learned[0].body.addrs if learned else (), entry.addrs))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        lim = self.service.limits
        self._dials = TokenBucket(lim.peer_dials_per_second, lim.peer_dial_burst)
        async with trio.open_nursery() as nursery:
            task_status.started()
            nursery.start_soon(self._sweeps)
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                wanted, self._wanted = self._wanted, set()
                for group_id in wanted:
                    if group_id in self._running:
                        self._wanted.add(group_id)  # again once the running one ends
                    else:
                        self._running.add(group_id)
                        nursery.start_soon(self._catch_up_task, group_id)

    async def _sweeps(self) -> None:
        while True:
            await self.sweep()
            await trio.sleep(self.interval)

    async def _catch_up_task(self, group_id: bytes) -> None:
        try:
            async with self._groups:
                await self.catch_up(group_id)
        finally:
            self._running.discard(group_id)
            if group_id in self._wanted:
                self._wake.set()

    @asynccontextmanager
    async def dial(self, entry: SyncnodeEntry) -> AsyncIterator[SyncnodeClient | None]:
        """A client for ``entry``, or None when the peer is backing off or the dial budget is
        spent. Records the outcome (known / backoff)."""
        now = trio.current_time()
        node = entry.node_id
        until, failures = self._backoff.get(node, (0.0, 0))
        if until > now:
            yield None
            return
        known = self._known.get(node, -KNOWN_FOR) > now - KNOWN_FOR
        if not known and self._dials is not None and not self._dials.take():
            self.service.metrics.refuse("peer_dial_budget")
            yield None
            return
        async with AsyncExitStack() as stack:
            if not known:
                await stack.enter_async_context(self._unknown)
            client: SyncnodeClient | None = None
            try:
                client = await stack.enter_async_context(SyncnodeClient.connect(
                    self.transport, await self._ticket(entry), timeout=CONNECT_TIMEOUT))
            except (SyncnodeError, trio.TooSlowError) as exc:
                failures += 1
                wait = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))
                self._backoff.put(node, (trio.current_time() + wait, failures))
                (log.info if known else log.debug)("peer unreachable", peer=short_id(node),
                                                   error=str(exc), retry_in=wait)
            else:
                self._backoff.pop(node, None)
                self._known.put(node, trio.current_time())
            yield client

    async def catch_up(self, group_id: bytes) -> int:
        """Fetch decisions of one group from its other syncnodes (several at once)."""
        g = await self.service.group(group_id)
        if g is None:
            return 0
        learned = [0]
        now = trio.current_time()
        peers = trio.CapacityLimiter(PEERS_AT_ONCE)

        async def one(entry: SyncnodeEntry) -> None:
            async with peers, self.dial(entry) as client:
                if client is None:
                    return
                try:
                    n = await self._from_peer(client, group_id, entry)
                    learned[0] += n  # not `+= await`: it reads the sum before awaiting
                except (SyncnodeError, trio.TooSlowError) as exc:
                    log.warning("catch-up from peer failed", peer=short_id(entry.node_id),
                                group=short_id(group_id), error=str(exc))

        async with trio.open_nursery() as nursery:
            for entry in await self.peers_of(g):
                if self._refused.get((group_id, entry.node_id), -1.0) > now:
                    continue  # it served a decision we refuse; ask again at a later sweep
                nursery.start_soon(one, entry)
        if learned[0]:
            log.info("caught up", group=short_id(group_id), decisions=learned[0], top=g.top)
        return learned[0]

    async def peers_of(self, g: GroupState) -> list[SyncnodeEntry]:
        """The other syncnodes of the group's newest manifest, and while an adoption is pending
        those its claim names (after a migration the genesis' syncnodes may all be gone; the
        claim is unverified, so they are dial targets only, at most ``max_group_syncnodes``)."""
        out = {e.node_id: e for e in g.manifest.syncnodes}
        for e in await self.service.hosting.hints(g.group_id):
            out.setdefault(e.node_id, e)
        out.pop(self.service.node_id, None)
        return list(out.values())

    async def _from_peer(self, client: SyncnodeClient, group_id: bytes,
                         entry: SyncnodeEntry) -> int:
        g = await self.service.group(group_id)
        assert g is not None
        learned = 0
        while True:
            with trio.fail_after(CONNECT_TIMEOUT):
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
        for group_id in await self._hosted():
            g = await self.service.group(group_id)
            if g is None:
                continue
            for entry in await self.peers_of(g):
                by_peer[entry.node_id].append(group_id)
                entries[entry.node_id] = entry
        behind: set[bytes] = set()
        at_once = trio.CapacityLimiter(max(1, self.service.limits.catchup_concurrency))

        async def one(node_id: bytes, group_ids: list[bytes]) -> None:
            async with at_once, self.dial(entries[node_id]) as client:
                if client is None:
                    return
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await self._compare(client, node_id, group_ids, behind)
                except (SyncnodeError, trio.TooSlowError) as exc:
                    log.debug("sweep of peer failed", peer=short_id(node_id), error=str(exc))

        async with trio.open_nursery() as nursery:
            for node_id, group_ids in by_peer.items():
                nursery.start_soon(one, node_id, group_ids)
        async with trio.open_nursery() as nursery:
            for group_id in behind - self._running:
                self._running.add(group_id)
                nursery.start_soon(self._catch_up_task, group_id)

    async def _hosted(self) -> list[bytes]:
        """Ids of every group this node hosts."""
        out: list[bytes] = []
        while True:
            page = await self.service.store.group_ids(out[-1] if out else b"", 1000)
            out += page
            if len(page) < 1000:
                return out

    async def _compare(self, client: SyncnodeClient, node_id: bytes, group_ids: list[bytes],
                       behind: set[bytes]) -> None:
        own = self.service.addresses.own
        if own is not None and self._announced.get(node_id) != own:
            # Tell the peer where we are now: it relays that to devices.
            await client.put_address(own)
            self._announced[node_id] = own
        for i in range(0, len(group_ids), MAX_HEADS):
            heads = await client.heads(group_ids[i:i + MAX_HEADS])
            for head in heads.heads:
                g = await self.service.group(head.group_id)
                if g is not None and head.top > g.top:
                    behind.add(head.group_id)
