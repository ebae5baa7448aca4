"""Anti-entropy among a group's syncnodes: every syncnode comes to hold every envelope any
other syncnode of the group holds, without any device's help (issue 17).

A device counts an update durable once a quorum of the syncnodes stored it, so a syncnode may
lack some: it was down, frozen or slow, its data directory was lost, or it joined the group
while a device sent only to the old set. The quorum keeps each acknowledged update, but with
fewer copies than promised, and after the next loss perhaps none. So each round, for a set of
groups (below), this node asks each other syncnode of the group's current manifest:

1. ``FetchDigests`` (:mod:`proto.antientropy`), up to 256 groups per request: a 16-byte digest
   of the per-sender summary of the peer's envelopes. A digest equal to ours ends it: an
   in-sync group costs its share of one small request per peer, and no envelope.
2. For a group whose digest differs, ``FetchMarks`` (the peer's per-sender count, top,
   contiguous mark and set sum), then an ordinary ``Backfill`` from our *contiguous* mark of
   each sender whose copies differ (:func:`proto.antientropy.backfill_marks`), so seqs missing
   below our own top are fetched too. Each envelope is verified and stored like a history
   pull's (:meth:`syncnode.history.HistoryPull.store_page`: the sender is a member at the
   envelope's epoch and signed it; the quota). Only pulls: each node fills its own gaps; the
   peer fills its own at its own round.
3. A group the peer leaves out of its digests is one it does not host (a syncnode whose data
   was wiped and that came back with the same key), or does not let us read (its log is behind
   ours). Either way it is handed the group: ``AdoptGroup`` with the decision of the slot from
   which the manifests name it (verified from the genesis by the peer before it serves, then
   its history is pulled, :mod:`syncnode.hosting`), or ``RegisterGroup`` for a group with only
   its genesis. At most once per :data:`REHOST_ROUNDS` rounds per (group, peer).

**Which groups, and the bound.** A round covers the groups a device stored to within the last
:data:`ACTIVE_ROUNDS` rounds (at most :data:`MAX_TRACKED`), plus the next
``reconcile_groups_per_round`` (default 256) of all hosted groups in id order, from a cursor that
wraps around: every group is compared at least once every ``groups / groups_per_round``
rounds, however quiet, and a node with 100,000 groups compares 256 + active ones per round, not
100,000. Per round and peer: ``ceil(groups / 256)`` ``FetchDigests`` of about 60 bytes per group
asked and answered, and our own digests cost one summary row per sender of each group (the
storage keeps the summary with the envelopes: no scan). Only a group whose copies differ costs
more: one ``FetchMarks`` (about 90 bytes per sender) and the Backfill pages of what we lack
(plus what we hold above our first gap of a differing sender). A peer that claims envelopes it
never serves costs that much again every round (a withholding syncnode; it is logged). Peers are
dialled through :class:`syncnode.peers.PeerSync` (the same budget and backoff), at most
``catchup_concurrency`` at once.
"""

from __future__ import annotations

from collections import defaultdict

import trio

from proto.antientropy import MAX_DIGESTS, backfill_marks, group_digest
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import SyncnodeEntry
from proto.rpc import SyncnodeClient
from proto.service import AdoptGroup, GroupRegistered, RegisterGroup
from syncnode.budgets import LRU
from syncnode.groups import GroupState
from syncnode.history import HistoryPull, PassFailed
from syncnode.peers import CONNECT_TIMEOUT, PeerSync
from syncnode.service import Service

log = get_logger("syncnode.reconcile")

ACTIVE_ROUNDS = 3
"""A group is reconciled for this many rounds after the last envelope a device stored for it
(besides its turn in the round robin)."""
MAX_TRACKED = 100_000
REHOST_ROUNDS = 6
"""Rounds before a peer that did not show a group is handed it again."""
NAMING_SCAN = 64
"""Slots looked back for the one from which the manifests name a peer (beyond: the slot
this far back is given; the peer verifies whatever it is given)."""


class Reconciler:
    """Start :meth:`run` in a nursery; it hooks itself into the service's stores."""

    def __init__(self, service: Service, peers: PeerSync, history: HistoryPull, *,
                 interval: float, groups_per_round: int = 256) -> None:
        self.service = service
        self.peers = peers
        self.history = history
        self.interval = interval
        self.groups_per_round = groups_per_round
        self._active = LRU(MAX_TRACKED)
        """Group -> virtual time of the last envelope a device stored for it."""
        self._cursor = b""
        """The round robin: the last group id visited."""
        self._rehosted = LRU(MAX_TRACKED)
        """(group, peer) -> when it was last handed the group."""
        self.stats: dict[str, int] = defaultdict(int)
        """Totals since start: rounds, groups, digests asked, groups that differed, marks,
        backfill pages, envelopes stored, groups handed to peers (for the benchmark and
        operators' logs)."""
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
            try:
                await self.round()
            except Exception as exc:  # never the end of the node: try again next round
                log.error("reconcile round failed", error=repr(exc))

    async def _due(self) -> list[bytes]:
        """This round's groups: the recently active ones and the next round-robin batch."""
        horizon = trio.current_time() - ACTIVE_ROUNDS * self.interval
        groups = {g: None for g, at in list(self._active.items()) if at >= horizon}
        for g in [g for g, at in list(self._active.items()) if at < horizon]:
            self._active.pop(g, None)
        want = max(0, self.groups_per_round)
        batch = await self.service.store.group_ids(self._cursor, want) if want else []
        if len(batch) < want and self._cursor:  # wrap around
            batch += [g for g in await self.service.store.group_ids(b"", want - len(batch))
                      if g not in batch]
            self._cursor = b""
        if batch:
            self._cursor = batch[-1]
        groups.update(dict.fromkeys(batch))
        return list(groups)

    async def round(self) -> int:
        """Compare this round's groups with their other syncnodes and fetch what differs;
        returns the envelopes stored."""
        stored_before = self.stats["stored"]
        by_peer: dict[bytes, list[GroupState]] = defaultdict(list)
        entries: dict[bytes, SyncnodeEntry] = {}
        for group_id in await self._due():
            g = await self._serving(group_id)
            if g is None:
                continue
            self.stats["groups"] += 1
            for entry in g.manifest.syncnodes:
                if entry.node_id != self.service.node_id:
                    by_peer[entry.node_id].append(g)
                    entries[entry.node_id] = entry
        limiter = trio.CapacityLimiter(max(1, self.service.limits.catchup_concurrency))

        async def one(node_id: bytes) -> None:
            async with limiter, self.peers.dial(entries[node_id]) as client:
                if client is None:
                    return
                try:
                    await self._with_peer(client, entries[node_id], by_peer[node_id])
                except (SyncnodeError, trio.TooSlowError) as exc:
                    log.debug("reconcile with peer failed", peer=short_id(node_id),
                              error=str(exc))

        async with trio.open_nursery() as nursery:
            for node_id in by_peer:
                nursery.start_soon(one, node_id)
        self.stats["rounds"] += 1
        return self.stats["stored"] - stored_before

    async def _serving(self, group_id: bytes) -> GroupState | None:
        """The group, if this node serves it with its history (an adoption still pulling
        its history is :mod:`syncnode.history`'s)."""
        g = await self.service.group(group_id)
        if g is None or g.deleted or self.service.node_id not in g.manifest.acceptors():
            return None
        rec = await self.service.hosting.record(group_id)
        return g if rec.serving and rec.removed_slot is None else None

    async def group(self, group_id: bytes) -> int:
        """Reconcile one group with each of its other syncnodes now (tests, and a caller that
        knows a group needs it); the envelopes stored."""
        g = await self._serving(group_id)
        if g is None:
            return 0
        before = self.stats["stored"]
        for entry in g.manifest.syncnodes:
            if entry.node_id == self.service.node_id:
                continue
            async with self.peers.dial(entry) as client:
                if client is None:
                    continue
                try:
                    await self._with_peer(client, entry, [g])
                except (SyncnodeError, trio.TooSlowError) as exc:
                    log.debug("reconcile with peer failed", peer=short_id(entry.node_id),
                              error=str(exc))
        return self.stats["stored"] - before

    async def _with_peer(self, client: SyncnodeClient, entry: SyncnodeEntry,
                         groups: list[GroupState]) -> None:
        for i in range(0, len(groups), MAX_DIGESTS):
            chunk = groups[i:i + MAX_DIGESTS]
            with trio.fail_after(CONNECT_TIMEOUT):
                answer = await client.digests([g.group_id for g in chunk])
            self.stats["digest_requests"] += 1
            self.stats["digests"] += len(chunk)
            theirs = {d.group_id: d.digest for d in answer.digests}
            for g in chunk:
                if g.group_id not in theirs:
                    await self._hand_over(client, entry, g)
                    continue
                ours = await self.service.envelopes.summary(g.group_id)
                if group_digest(ours) == theirs[g.group_id]:
                    continue
                self.stats["differed"] += 1
                try:
                    with trio.fail_after(10 * CONNECT_TIMEOUT):
                        got = await self._pull(client, g, entry)
                except PassFailed as exc:
                    log.warning("reconcile pull refused", peer=short_id(entry.node_id),
                                group=short_id(g.group_id), error=str(exc))
                    continue
                if got:
                    log.info("filled gaps from a peer", group=short_id(g.group_id),
                             peer=short_id(entry.node_id), envelopes=got)

    async def _pull(self, client: SyncnodeClient, g: GroupState, entry: SyncnodeEntry) -> int:
        """Fetch what the peer holds of ``g`` and we may lack (see the module doc)."""
        marks = await client.marks(g.group_id)
        self.stats["marks"] += 1
        wanted = backfill_marks(await self.service.envelopes.summary(g.group_id), marks.senders)
        if wanted is None:
            return 0
        stored, pages, _complete = await self.history.pull_pages(client, g, entry, wanted)
        self.stats["pages"] += pages
        self.stats["stored"] += stored
        return stored

    async def _hand_over(self, client: SyncnodeClient, entry: SyncnodeEntry,
                         g: GroupState) -> None:
        """The peer did not show ``g``: hand it the group (module doc, step 3)."""
        key = (g.group_id, entry.node_id)
        now = trio.current_time()
        if self._rehosted.get(key, -float("inf")) > now - REHOST_ROUNDS * self.interval:
            return
        self._rehosted.put(key, now)
        genesis = await self.service.store.decided(g.group_id, 0)
        if genesis is None:
            return
        if g.top == 0:
            msg: AdoptGroup | RegisterGroup = RegisterGroup(genesis.value)
        else:
            msg = AdoptGroup(genesis.value, await self.service.decided_at(
                g.group_id, await self._named_from(g, entry.node_id)))
        with trio.fail_after(CONNECT_TIMEOUT):
            done = await client.call(msg, GroupRegistered)
        self.stats["handed_over"] += 1
        log.info("handed a group to a syncnode that did not show it" if done.created else
                 "handed a group again to a syncnode that did not show it",
                 group=short_id(g.group_id), peer=short_id(entry.node_id),
                 how=type(msg).__name__)

    async def _named_from(self, g: GroupState, node_id: bytes) -> int:
        """The first slot (at least 1) from which every manifest up to the newest names
        ``node_id`` (looked back at most :data:`NAMING_SCAN` slots)."""
        slot = g.top
        for _ in range(NAMING_SCAN):
            if slot <= 1:
                break
            try:
                m = await self.service.manifest_at(g.group_id, slot - 1)
            except KeyError:
                break
            if node_id not in m.acceptors():
                break
            slot -= 1
        return slot
