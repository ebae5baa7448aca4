"""The envelope history of a group this node was added to: pulled from the group's other
syncnodes, verified, resumable (issue 16, "Changing the syncnodes").

Once an adopted group is serving (:mod:`syncnode.hosting`), this node pulls the envelopes the
group's syncnodes stored before it was named, with the ordinary ``Backfill`` request (per-sender
watermarks, paged), which the group's own syncnodes may send. Each envelope is checked like a
device's Store (:func:`envelope_problem`: the sender is a member at the envelope's epoch and
signed it; the group's byte quota) and stored, but not pushed to subscribers: it is old news
to them.

**Complete.** Devices count an envelope durable once a quorum ``q`` of the ``n`` syncnodes of
its epoch stored it. Every such envelope from before this node was named is on at least ``q``
syncnodes of manifest ``named - 1``, so any ``n - q + 1`` of them include a holder: history is
complete once a full pass (every page, ``more`` false) succeeded from that many of them
(:func:`holders_needed`). The flag is persisted; until then, failed peers are retried with the
peer sync's backoff.

**Resumable.** A pass starts from the watermarks of what is stored (the contiguous seqs of each
sender, :meth:`~syncnode.storage.Storage.envelope_marks`), so a restart continues where the
last one stopped; on start, every serving group whose history is incomplete is pulled again.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from proto.codec import encode
from proto.envelope import Envelope
from proto.errors import SyncnodeError
from proto.identity import short_id
from proto.logs import get_logger
from proto.manifest import Manifest, SyncnodeEntry, may_send
from proto.rpc import SyncnodeClient
from syncnode.groups import GroupState
from syncnode.peers import CONNECT_TIMEOUT, PEERS_AT_ONCE, PeerSync
from syncnode.service import Service
from syncnode.storage import StorageConflict

log = get_logger("syncnode.history")

PAGE = 256
RETRY = 5.0
"""Seconds before an incomplete pull is tried again (each peer also backs off on its own)."""


def holders_needed(m: Manifest) -> int:
    """Syncnodes of ``m`` that together hold every envelope a quorum of them acknowledged:
    ``n - q + 1`` (any that many meet every quorum)."""
    n = len(m.syncnodes)
    return n - m.acceptors().quorum + 1


def envelope_problem(m: Manifest, group_id: bytes, env: Envelope) -> str | None:
    """Why a pulled envelope must not be stored (``m``: the manifest of its epoch), or None.
    The checks a device's Store gets, judged at the envelope's own epoch."""
    if env.group_id != group_id:
        return "envelope is for another group"
    if env.seq < 1:
        return "seq counts from 1"
    sender = m.device(env.sender)
    if sender is None:
        return "sender is not a member at the envelope's epoch"
    if not env.verify(sender.sig_pub):
        return "envelope signature does not verify"
    if not may_send(sender):
        return "the sender is a reader at the envelope's epoch"
    return None


class PassFailed(Exception):
    """A pass from one peer did not finish (the peer served something refused)."""


class HistoryPull:
    """Pulls the history of serving groups whose history is incomplete. Start :meth:`run` in
    a nursery; :mod:`syncnode.hosting` asks for a group through ``service.hosting.pull``."""

    def __init__(self, service: Service, peers: PeerSync, *, retry: float = RETRY) -> None:
        self.service = service
        self.peers = peers
        self.retry = retry
        self._wanted: set[bytes] = set()
        self._running: set[bytes] = set()
        self._wake = trio.Event()
        self._passed: dict[bytes, set[bytes]] = {}
        """Group -> peers a full pass succeeded from (in this run; a restart passes again,
        cheaply: the watermarks skip what is stored)."""
        self._groups = trio.CapacityLimiter(max(1, service.limits.catchup_concurrency))
        service.hosting.pull = self.request

    def request(self, group_id: bytes) -> None:
        self._wanted.add(group_id)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await self.resume()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                wanted, self._wanted = self._wanted, set()
                for group_id in wanted:
                    if group_id in self._running:
                        self._wanted.add(group_id)
                    else:
                        self._running.add(group_id)
                        nursery.start_soon(self._task, group_id)

    async def resume(self) -> None:
        """Ask for every serving group whose history is not complete (after a restart)."""
        after = b""
        while True:
            page = await self.service.store.hosting_records(after, 1000)
            for group_id, rec in page:
                if rec.serving and not rec.history_complete and rec.removed_slot is None:
                    self.request(group_id)
            if len(page) < 1000:
                return
            after = page[-1][0]

    async def _task(self, group_id: bytes) -> None:
        try:
            async with self._groups:
                done = await self.pull(group_id)
            if not done:
                await trio.sleep(self.retry)
                self._wanted.add(group_id)
        finally:
            self._running.discard(group_id)
            if group_id in self._wanted:
                self._wake.set()

    async def pull(self, group_id: bytes) -> bool:
        """One round: a pass from each peer of manifest ``named - 1`` not yet passed. Whether
        the history is complete (or nothing is to be pulled)."""
        rec = await self.service.hosting.record(group_id)
        g = await self.service.group(group_id)
        if g is None or not rec.serving or rec.history_complete or rec.named_slot is None:
            return True
        before = await self.service.manifest_at(group_id, rec.named_slot - 1)
        need = holders_needed(before)
        passed = self._passed.setdefault(group_id, set())
        limiter = trio.CapacityLimiter(PEERS_AT_ONCE)

        async def one(entry: SyncnodeEntry) -> None:
            async with limiter, self.peers.dial(entry) as client:
                if client is None:
                    return
                try:
                    with trio.fail_after(10 * CONNECT_TIMEOUT):
                        stored = await self.pass_from(client, g, entry)
                except (SyncnodeError, trio.TooSlowError, PassFailed) as exc:
                    log.warning("history pull from peer failed", peer=short_id(entry.node_id),
                                group=short_id(group_id), error=str(exc))
                    return
                passed.add(entry.node_id)
                log.info("history pass done", peer=short_id(entry.node_id),
                         group=short_id(group_id), stored=stored)

        async with trio.open_nursery() as nursery:
            for entry in before.syncnodes:
                if entry.node_id != self.service.node_id and entry.node_id not in passed:
                    nursery.start_soon(one, entry)
        if len(passed & {e.node_id for e in before.syncnodes}) < need:
            return False
        await self.service.hosting.history_done(group_id)
        self._passed.pop(group_id, None)
        return True

    async def pass_from(self, client: SyncnodeClient, g: GroupState, entry: SyncnodeEntry) -> int:
        """Every page of the peer's envelopes above our watermarks; how many were new."""
        marks = await self.service.store.envelope_marks(g.group_id)
        stored, _pages, complete = await self.pull_pages(client, g, entry, marks)
        if not complete:  # a full pass is one that ended with ``more`` false
            raise PassFailed("peer announced more envelopes and sent none")
        return stored

    async def pull_pages(self, client: SyncnodeClient, g: GroupState, entry: SyncnodeEntry,
                         marks: dict[bytes, int]) -> tuple[int, int, bool]:
        """Every page of the peer's envelopes above ``marks`` (advanced as pages arrive),
        stored; returns how many were new, the pages, and whether the last page said there
        was no more. An empty page ends it whatever ``more`` says: a peer cannot keep it
        asking for nothing (the pull is then not complete)."""
        stored = pages = 0
        while True:
            page = await client.backfill(g.group_id, marks, PAGE)
            pages += 1
            stored += await self.store_page(g, page.envelopes, entry)
            for env in page.envelopes:
                marks[env.sender] = max(marks.get(env.sender, 0), env.seq)
            if not page.more or not page.envelopes:
                return stored, pages, not page.more

    async def store_page(self, g: GroupState, envelopes: Sequence[Envelope],
                         peer: SyncnodeEntry) -> int:
        """Verify and store a page of pulled envelopes (no push to subscribers: old news to
        them); how many were new. Raises :class:`PassFailed` for one that must not be stored.
        Stored concurrently so the storage's group commit makes it one transaction and one
        fsync (one per envelope made a 10k-envelope pull take 15 s). Every envelope is checked
        before any is stored; the group's byte quota may be overshot by at most one page."""
        for env in envelopes:
            await self.check_pulled(g, env)
        stored = [0]

        async def one(env: Envelope) -> None:
            new = await self.store_checked(g, env, peer)
            stored[0] += new  # not `+= await`: it reads the sum before awaiting

        async with trio.open_nursery() as nursery:
            for env in envelopes:
                nursery.start_soon(one, env)
        return stored[0]

    async def check_pulled(self, g: GroupState, env: Envelope) -> None:
        """Raise :class:`PassFailed` if a pulled envelope must not be stored."""
        svc = self.service
        if env.epoch > g.top:
            svc.groups.catchup(g.group_id)
            raise PassFailed(f"envelope epoch {env.epoch} is ahead of this syncnode's {g.top}")
        why = envelope_problem(await svc.manifest_at(g.group_id, env.epoch), g.group_id, env)
        if why is not None:
            svc.metrics.refuse("history_envelope_invalid")
            raise PassFailed(f"peer served an invalid envelope: {why}")

    async def store_checked(self, g: GroupState, env: Envelope, peer: SyncnodeEntry) -> int:
        """Store an envelope :meth:`check_pulled` passed; 1 when it was new."""
        svc = self.service
        raw = encode(env)
        if g.bytes_used + len(raw) > svc.limits.max_bytes_per_group:
            raise PassFailed(f"group is over its {svc.limits.max_bytes_per_group} byte quota")
        try:
            new = await svc.store.store_envelope(g.group_id, env.sender, env.seq, env.digest(),
                                                 raw)
        except StorageConflict:  # signed by the sender: the device equivocated; keep the first
            log.warning("pulled envelope conflicts with a stored one", group=short_id(g.group_id),
                        sender=short_id(env.sender), seq=env.seq, peer=short_id(peer.node_id))
            return 0
        if new:
            g.bytes_used += len(raw)
            svc.metrics.messages_stored.inc()
            svc.compact_soon(g)  # it may be the state a decided compaction waits for
        return int(new)
