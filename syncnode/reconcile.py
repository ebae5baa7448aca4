"""Envelope reconciliation among a group's syncnodes: fill the gaps a syncnode has.

A device counts an update durable once a quorum of the syncnodes stored it, so a syncnode may
lack some: it was down or slow, or it joined the group while a device that had not yet learned
of it sent only to the old set. Such gaps are harmless for durability (a quorum holds each
acknowledged update) but they shrink the margin: once the syncnodes that hold an update are
replaced or lost, fewer copies are left than the group was promised. So every syncnode fills
its own gaps from its peers: for each group it stored a device's envelope for recently, it asks
each other syncnode of the current manifest for what lies above its own watermarks (the
contiguous seqs per sender, so a gap is asked for again until it is filled) with the ordinary
``Backfill``, and stores each envelope after the same checks as a history pull
(:meth:`syncnode.history.HistoryPull.store_pulled`).

Cost: only groups with traffic in the last ``ACTIVE_ROUNDS`` intervals are reconciled (a quiet
group is reconciled a few more times after its last update, then left alone), at most
``catchup_concurrency`` at once, one request per peer when nothing is missing. This is not a
full anti-entropy: a syncnode that stays quiet never compares, and a gap in a sender's
history that no peer holds any more cannot be filled.
"""

from __future__ import annotations

import trio

from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import SyncnodeEntry
from syncnode.budgets import LRU
from syncnode.history import HistoryPull, PassFailed
from syncnode.peers import CONNECT_TIMEOUT, PEERS_AT_ONCE, PeerSync
from syncnode.service import Service

log = get_logger("syncnode.reconcile")

ACTIVE_ROUNDS = 3
"""A group is reconciled for this many intervals after the last envelope stored for it."""
MAX_TRACKED = 100_000


class Reconciler:
    """Start :meth:`run` in a nursery; it hooks itself into the service's stores."""

    def __init__(self, service: Service, peers: PeerSync, history: HistoryPull, *,
                 interval: float) -> None:
        self.service = service
        self.peers = peers
        self.history = history
        self.interval = interval
        self._active = LRU(MAX_TRACKED)
        """Group -> virtual time of the last envelope stored for it."""
        service.on_stored = self.touch

    def touch(self, group_id: bytes) -> None:
        self._active.put(group_id, trio.current_time())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        if self.interval <= 0:
            return
        while True:
            await trio.sleep(self.interval)
            await self.round()

    async def round(self) -> int:
        """Reconcile every recently active group once; returns the envelopes it stored."""
        horizon = trio.current_time() - ACTIVE_ROUNDS * self.interval
        groups = [g for g, at in list(self._active.items()) if at >= horizon]
        for g in [g for g, at in list(self._active.items()) if at < horizon]:
            self._active.pop(g, None)
        stored = [0]
        limiter = trio.CapacityLimiter(max(1, self.service.limits.catchup_concurrency))

        async def one(group_id: bytes) -> None:
            async with limiter:
                n = await self.group(group_id)  # not `+= await`: it reads before awaiting
                stored[0] += n

        async with trio.open_nursery() as nursery:
            for group_id in groups:
                nursery.start_soon(one, group_id)
        return stored[0]

    async def group(self, group_id: bytes) -> int:
        """Fill this node's gaps in one group from each of its other syncnodes."""
        g = await self.service.group(group_id)
        if g is None or g.deleted or self.service.node_id not in g.manifest.acceptors():
            return 0  # not (or no longer) one of its syncnodes
        stored = [0]
        limiter = trio.CapacityLimiter(PEERS_AT_ONCE)

        async def one(entry: SyncnodeEntry) -> None:
            async with limiter, self.peers.dial(entry) as client:
                if client is None:
                    return
                try:
                    with trio.fail_after(10 * CONNECT_TIMEOUT):
                        n = await self.history.pass_from(client, g, entry)
                        stored[0] += n  # (not `+= await`: concurrent passes lost counts)
                except (SyncnodeError, trio.TooSlowError, PassFailed) as exc:
                    log.debug("reconcile with peer failed", peer=short_id(entry.node_id),
                              group=short_id(group_id), error=str(exc))

        async with trio.open_nursery() as nursery:
            for entry in g.manifest.syncnodes:
                if entry.node_id != self.service.node_id:
                    nursery.start_soon(one, entry)
        if stored[0]:
            log.info("filled gaps from peers", group=short_id(group_id), envelopes=stored[0])
        return stored[0]
