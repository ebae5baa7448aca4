"""The groups a syncnode hosts, as the service sees them: each group's current state (top
slot, current manifest, bytes used), the manifest of any epoch, and who a session is in a group
(a current member, or someone who may read its log).

Group state is loaded lazily from storage and held in a bounded LRU, so a node can host far more
groups than fit in memory. The service's parts share one :class:`Groups`; a part that changes a
group's state does so on the :class:`GroupState` it holds, after the change is durable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from proto.codec import decode_struct
from proto.manifest import LogValue, Manifest
from proto.messages import ErrorCode
from syncnode.budgets import LRU
from syncnode.metrics import Metrics
from syncnode.session import RequestError, Session
from syncnode.storage import Storage

RELOAD_EVERY = 0.05
"""Seconds between reloads of one group that requests may cause (:meth:`Groups.reload`)."""


@dataclass
class GroupState:
    group_id: bytes
    creator: bytes
    top: int
    manifest: Manifest
    bytes_used: int
    lock: trio.Lock = field(default_factory=trio.Lock)
    deleted: bool = False
    """Set (under ``lock``) when the group's data was deleted: holders of this state stop."""
    compacted: bytes | None = None
    """The compaction point applied here (:mod:`syncnode.compaction`); the decided one is in
    ``manifest.compaction`` and may be ahead until this node holds its state envelope."""
    reloaded_at: float = float("-inf")
    """When a request last had :meth:`Groups.reload` read the group again (throttled)."""


class Groups:
    """Hosted groups: cached state, manifests, membership and read rights."""

    def __init__(self, store: Storage, metrics: Metrics, capacity: int) -> None:
        self.store = store
        self.metrics = metrics
        self.cache = LRU(capacity)
        self.catchup: Callable[[bytes], None] = lambda group_id: None
        """Hook: ask the peer-sync task to fetch missing decisions of a group."""

    async def count(self) -> int:
        return await self.store.group_count()

    async def get(self, group_id: bytes) -> GroupState | None:
        g: GroupState | None = self.cache.get(group_id)
        if g is not None:
            self.cache.move_to_end(group_id)
            return g
        rec = await self.store.group(group_id)
        if rec is None:
            return None
        manifest = await self.manifest_at(group_id, rec.top)
        compacted = await self.store.compaction(group_id)
        loaded: GroupState | None = self.cache.get(group_id)
        if loaded is not None:  # by another request while we read
            return loaded
        g = GroupState(group_id, rec.creator, rec.top, manifest, rec.bytes_used,
                       compacted=compacted)
        self.cache.put(group_id, g)
        return g

    async def reload(self, g: GroupState, *, throttled: bool = False) -> list[int]:
        """Bring ``g`` up to what storage holds, which another process of this node may have
        changed (shared storage): the top slot and its manifest only ever move forward; the
        bytes used and the applied compaction are taken as stored. Returns the slots decided
        since ``g`` was read (oldest first). ``throttled`` (a request asked, which anyone may
        send): at most once per :data:`RELOAD_EVERY` seconds per group, so made-up slots and
        epochs cost the database nothing more."""
        if throttled:
            now = trio.current_time()
            if now - g.reloaded_at < RELOAD_EVERY:
                return []
            g.reloaded_at = now
        rec = await self.store.group(g.group_id)
        if rec is None:
            return []
        compacted = await self.store.compaction(g.group_id)
        learned = []
        if rec.top > g.top:
            try:
                manifest = await self.manifest_at(g.group_id, rec.top)
            except KeyError:
                return []
            if rec.top > g.top:  # still: not moved on by a request while we read
                learned = list(range(g.top + 1, rec.top + 1))
                g.top, g.manifest = rec.top, manifest
        g.bytes_used, g.compacted = rec.bytes_used, compacted
        return learned

    async def require(self, group_id: bytes) -> GroupState:
        g = await self.get(group_id)
        if g is None:
            raise RequestError(ErrorCode.NOT_FOUND, "this syncnode does not host that group")
        return g

    async def manifest_at(self, group_id: bytes, epoch: int) -> Manifest:
        """The manifest of ``epoch`` (KeyError if this node has not decided that slot)."""
        g: GroupState | None = self.cache.get(group_id)
        if g is not None and g.top == epoch:
            return g.manifest
        # Just the manifest of each epoch is kept apart: reading it avoids loading and decoding
        # whole log values (commit + Welcome, up to megabytes).
        blob = await self.store.manifest(group_id, epoch)
        if blob is None and epoch == 0:  # the genesis is small: its manifest is not kept twice
            genesis = await self.store.decided(group_id, 0)
            if genesis is not None:
                return LogValue.decode(genesis.value).manifest
        if blob is None:
            raise KeyError((group_id, epoch))
        return decode_struct(blob, Manifest)

    def behind(self, session: Session | None, g: GroupState) -> None:
        """A request showed this node is behind on ``g``: ask the peer sync to catch up, but
        only for a current member or one of the group's own syncnodes (``session`` None: this
        node's own code). A stranger's Prepare for a made-up slot must not make the node dial
        anything."""
        if session is not None and not may_read(session, g.manifest):
            self.metrics.refuse("catchup_not_member")
            return
        self.catchup(g.group_id)

    # Who reads a group's decided log and heads (issue 14, finding 7). Manifests name every
    # member's keys, endpoints and addresses and the group's syncnodes; commits and Welcomes
    # show sizes and timing. So:
    # - a current member (a session authenticated with a device key of the current manifest)
    #   and the group's own syncnodes (the connection's authenticated endpoint id is a node id
    #   of the current manifest: peer catch-up and sweeps) read all of it, from the genesis (a
    #   device added at slot s is a member from s on, and then verifies the log from slot 0);
    # - a former member or syncnode reads from the slot after an epoch whose manifest names it
    #   up to the slot that dropped it, so a device removed while away learns its removal, and
    #   nothing later;
    # - anyone else, including a device waiting to be added, gets UNAUTHORIZED for the log and
    #   no head for the group. An unknown group gets the same UNAUTHORIZED as a hidden one, and
    #   the same empty answer from FetchHeads: the log requests are no existence oracle. (Group
    #   ids are random; RegisterGroup must still refuse an id that is taken, with CONFLICT.)

    async def readable_up_to(self, session: Session, g: GroupState, from_slot: int, limit: int
                             ) -> int | None:
        """The last slot of ``g`` the session may read in a page from ``from_slot`` (None: not
        allowed at all)."""
        if may_read(session, g.manifest):
            return g.top
        top = g.top
        if not 1 <= from_slot <= top:
            return None
        try:
            if not may_read(session, await self.manifest_at(g.group_id, from_slot - 1)):
                return None
            last = min(top, from_slot + min(limit, 64) - 1)
            for slot in range(from_slot, last + 1):  # a former member: up to its removal
                if not may_read(session, await self.manifest_at(g.group_id, slot)):
                    return slot
        except KeyError:  # a manifest this node lacks: nothing to judge by
            return None
        return last


def may_read(session: Session, m: Manifest) -> bool:
    """Is the session a device or syncnode named by manifest ``m``?"""
    if any(s.node_id == session.remote_id for s in m.syncnodes):
        return True
    return any((d := m.device(fpr)) is not None and d.sig_pub == pub
               for fpr, pub in session.keys.items())


def require_member(session: Session, g: GroupState) -> bytes:
    """The fingerprint under which the session acts as a current member of ``g``."""
    for fpr, pub in session.keys.items():
        d = g.manifest.device(fpr)
        if d is not None and d.sig_pub == pub:
            return fpr
    raise RequestError(ErrorCode.UNAUTHORIZED,
                       "not authenticated as a current member of this group")
